"""The floors an HTTP ext_authz door could be built on, side by side through one real Envoy.

Candidates, each a bare server answering every request 200 with ``content-length: 0``:
  raw           uvloop + httptools with a raw asyncio.Protocol (bench/http_floor.py)
  uvicorn       a bare ASGI app (bench/http_apps.py) on uvicorn: uvloop, httptools, 1 worker
  granian_asgi  the same ASGI app on granian: 1 worker, 1 runtime thread, 1 blocking thread
  granian_rsgi  a bare RSGI app on granian, the same settings

What runs (127.0.0.1, ports picked at run time, every process stopped by its PID):
one Envoy (``--concurrency 1``, pinned to CPU 0) with one listener per candidate whose
ext_authz filter asks that candidate over HTTP (``http_service``, fail closed) before routing
to an upstream (another bench/http_floor.py); the candidates, the upstream and wrk pinned to
CPU 1. Each candidate is measured through Envoy (``wrk -t1 -c32`` on its listener) and
directly (the same wrk on the candidate). Every round runs every measurement once, the order
reversed on odd rounds; the report gives medians with min-max over the rounds, the CPU per
request of Envoy and of the candidate (utime + stime of the process tree over the run, from
/proc/PID/stat) and each round's ratios against the raw floor.

Writes bench/results/http_candidates.md (or --output) and prints it. 3 rounds x 10 s per
measurement (about 5 min); BENCH_QUICK=1: 1 round x 5 s (about 1 min). Needs the
bench-candidates extra (uvicorn, granian): ``pip install -e '.[dev,bench-candidates]'``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import loadgen
import reference
import report
from envoy_bench import (
    BENCH,
    ENVOY_CPU,
    QUICK,
    WORK_CPU,
    Load,
    Sample,
    Scenario,
    envoy_binary,
    log,
    ready,
    run_rounds,
    wrk_load,
)
from envoy_bootstrap import http_ext_authz
from loadgen import LoadResult
from procs import Proc, Stack, free_port, http_get, wait_until

from authz_server import devkeys

RESULTS = BENCH / "results" / "http_candidates.md"
ROUNDS = 1 if QUICK else 3
DURATION_S = 5 if QUICK else 10
CONNECTIONS = 32
_GRANIAN = ["--workers", "1", "--runtime-threads", "1", "--runtime-mode", "st"]
_GRANIAN += ["--blocking-threads", "1", "--loop", "uvloop", "--http", "1", "--no-ws"]
_GRANIAN += ["--log-level", "warning", "--working-dir", str(BENCH)]


@dataclass(frozen=True)
class Candidate:
    key: str  # [a-z_]: also Envoy's listener and cluster names
    label: str
    argv: list[str]  # the command; "{port}" stands for the port to listen on


CANDIDATES = [
    Candidate(
        "raw",
        "uvloop + httptools, raw asyncio.Protocol (bench/http_floor.py)",
        [sys.executable, str(BENCH / "http_floor.py"), "--listen", "127.0.0.1:{port}"],
    ),
    Candidate(
        "uvicorn",
        "uvicorn, bare ASGI app (uvloop, httptools)",
        [sys.executable, "-m", "uvicorn", "http_apps:asgi_ok", "--app-dir", str(BENCH),
         "--host", "127.0.0.1", "--port", "{port}", "--loop", "uvloop", "--http", "httptools",
         "--workers", "1", "--no-access-log", "--log-level", "warning", "--lifespan", "off"],
    ),
    Candidate(
        "granian_asgi",
        "granian, bare ASGI app",
        [sys.executable, "-m", "granian", "--interface", "asgi", *_GRANIAN,
         "--host", "127.0.0.1", "--port", "{port}", "http_apps:asgi_ok"],
    ),
    Candidate(
        "granian_rsgi",
        "granian, bare RSGI app",
        [sys.executable, "-m", "granian", "--interface", "rsgi", *_GRANIAN,
         "--host", "127.0.0.1", "--port", "{port}", "http_apps:rsgi_ok"],
    ),
]  # fmt: skip


@dataclass(frozen=True)
class Running:
    candidate: Candidate
    proc: Proc
    port: int
    listen_port: int  # Envoy's listener for it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def listener(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"


@dataclass(frozen=True)
class RunInfo:
    when: str
    wall_min: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


def start_upstream(stack: Stack, tmp: Path) -> tuple[Proc, int]:
    """Start bench/http_floor.py on a port of its choosing (read from its port file)."""
    port_file = tmp / "upstream.port"
    argv = [sys.executable, str(BENCH / "http_floor.py"), "--listen", "127.0.0.1:0"]
    argv += ["--port-file", str(port_file)]
    proc = stack.start(Proc("upstream", argv, tmp / "upstream.log", WORK_CPU))
    port = wait_until(
        lambda: proc.alive() and port_file.exists() and port_file.read_text().strip(),
        30,
        "the upstream's port file",
    )
    return proc, int(port)


def start_candidate(stack: Stack, tmp: Path, candidate: Candidate) -> Running:
    """Start `candidate` pinned to the work CPU (not yet ready)."""
    port = free_port()
    argv = [part.replace("{port}", str(port)) for part in candidate.argv]
    proc = stack.start(Proc(candidate.key, argv, tmp / f"{candidate.key}.log", WORK_CPU))
    return Running(candidate, proc, port, free_port())


def ext_authz_counts(admin: str, key: str) -> dict[str, int]:
    """Envoy's ext_authz counters (ok, denied, error, ...) of `key`'s listener."""
    status, body = http_get(f"{admin}/stats?filter=^http\\.ingress_{key}\\.ext_authz\\.")
    if status != 200:
        raise RuntimeError(f"Envoy admin /stats answered {status}")
    found = re.findall(rf"^http\.ingress_{key}\.ext_authz\.(\w+): (\d+)$", body.decode(), re.M)
    return {name: int(value) for name, value in found}


def through_envoy(url: str, admin: str, key: str, headers: Sequence[str]) -> Load:
    """wrk on Envoy's listener `url` for candidate `key`. Every ext_authz outcome but ``ok``
    (denied, error, ...) counts as failed; fewer ``ok`` than answers means Envoy did not ask
    the candidate, and raises RuntimeError."""

    def run(scratch: Path, seconds: int) -> LoadResult:
        before = ext_authz_counts(admin, key)
        result = wrk_load(url, headers, CONNECTIONS)(scratch, seconds)
        after = ext_authz_counts(admin, key)
        delta = {name: after[name] - before.get(name, 0) for name in after}
        if delta.get("ok", 0) < result.requests:
            raise RuntimeError(
                f"{key}: {result.requests} answers through Envoy but only {delta.get('ok', 0)} "
                f"ext_authz OKs ({delta}): the candidate was not asked"
            )
        refused = sum(n for name, n in delta.items() if name != "ok")
        return replace(result, failures=result.failures + refused)

    return run


def start_all(stack: Stack, tmp: Path) -> tuple[list[Running], Proc, str]:
    """Start the upstream, the candidates and Envoy, wait until each answers 200 (through
    Envoy: with one ext_authz OK counted); return the candidates, Envoy and its admin URL."""
    upstream, upstream_port = start_upstream(stack, tmp)
    running = [start_candidate(stack, tmp, c) for c in CANDIDATES]
    admin_port = free_port()
    config = tmp / "envoy.yaml"
    servers = {r.candidate.key: (r.listen_port, r.port) for r in running}
    config.write_text(http_ext_authz(servers, admin_port=admin_port, upstream_port=upstream_port))
    argv = [envoy_binary(), "-c", str(config), "--concurrency", "1", "--disable-hot-restart"]
    argv += ["--log-level", "warn"]
    envoy = stack.start(Proc("envoy", argv, tmp / "envoy.log", ENVOY_CPU))
    admin = f"http://127.0.0.1:{admin_port}"
    upstream.wait_ready(ready(f"http://127.0.0.1:{upstream_port}/"))
    for run in running:
        run.proc.wait_ready(ready(run.url + reference.PATH))
    envoy.wait_ready(ready(f"{admin}/ready"))
    for run in running:
        before = ext_authz_counts(admin, run.candidate.key).get("ok", 0)
        status, body = http_get(run.listener + reference.PATH)
        after = ext_authz_counts(admin, run.candidate.key).get("ok", 0)
        if status != 200 or after != before + 1:
            raise RuntimeError(
                f"through Envoy to {run.candidate.key}: {status} {body[:200]!r}, "
                f"ext_authz OKs {before} -> {after}"
            )
    log(
        "preflight ok: every candidate answers 200, directly and as Envoy's ext_authz server "
        f"(Envoy on CPU {ENVOY_CPU}; candidates, upstream and wrk on CPU {WORK_CPU})"
    )
    return running, envoy, admin


def scenarios_of(
    run: Running, envoy: Proc, admin: str, headers: Sequence[str]
) -> tuple[Scenario, Scenario]:
    """`run`'s candidate through Envoy, and directly."""
    key, label = run.candidate.key, run.candidate.label
    load = through_envoy(run.listener, admin, key, headers)
    return (
        Scenario(f"envoy-{key}", f"Envoy → {label}", load, run.proc, envoy),
        Scenario(f"direct-{key}", label, wrk_load(run.url, headers, CONNECTIONS), run.proc),
    )


# --------------------------------------------------------------------------------- report


def _values(scenario: Scenario, name: str) -> list[float]:
    return [float(v) for v in (getattr(s, name) for s in scenario.samples) if v is not None]


def _ratio_row(label: str, ratios: Sequence[Sequence[float]]) -> str:
    return f"| {label} | " + " | ".join(report.ratio_text(r) for r in ratios) + " |"


def _rps(sample: Sample) -> float:
    return sample.rps


def _server_us(sample: Sample) -> float | None:
    return sample.server_us


def _envoy_us(sample: Sample) -> float | None:
    return sample.envoy_us


def render(runs: list[tuple[Candidate, Scenario, Scenario]], info: RunInfo) -> str:
    """The markdown report of the measured `runs` (candidate, through Envoy, direct)."""
    rows = [
        f"| {c.key}: {c.label} | {report.spread(_values(e, 'rps'))} "
        f"| {report.spread(_values(e, 'envoy_us'))} | {report.spread(_values(e, 'server_us'), 1)} "
        f"| {report.spread(_values(d, 'rps'))} | {report.spread(_values(d, 'server_us'), 1)} "
        f"| {sum(s.failures for s in [*e.samples, *d.samples])} |"
        for c, e, d in runs
    ]
    baseline, base_envoy, base_direct = runs[0]
    ratio_rows = [
        _ratio_row(
            c.key,
            [
                report.paired(e, base_envoy, _rps),
                report.paired(e, base_envoy, _envoy_us),
                report.paired(e, base_envoy, _server_us),
                report.paired(d, base_direct, _rps),
                report.paired(d, base_direct, _server_us),
            ],
        )
        for c, e, d in runs[1:]
    ]
    by_rps = sorted(runs, key=lambda r: report.median(_values(r[1], "rps")), reverse=True)
    (best, best_e, _), (second, second_e, _) = by_rps[0], by_rps[1]
    by_cpu = sorted(runs, key=lambda r: report.median(_values(r[1], "server_us")))
    (lean, lean_e, _), (lean2, lean2_e, _) = by_cpu[0], by_cpu[1]
    loads = [s.load1 for _, e, d in runs for s in [*e.samples, *d.samples]]
    mode = "BENCH_QUICK=1 " if QUICK else ""
    lines = [
        "# HTTP ext_authz floors: which event loop the HTTP door is built on",
        "",
        f"`{mode}python bench/http_candidates.py` on {info.when}, {info.wall_min:.1f} min. "
        f"{ROUNDS} rounds x {DURATION_S} s per measurement, interleaved (every measurement "
        "once per round, the order reversed on odd rounds). Medians, with min-max over the "
        "rounds; ratios are the medians of each round's pair.",
        "",
        "| candidate | via Envoy: req/s | Envoy CPU µs/req | candidate CPU µs/req "
        "| direct: req/s | candidate CPU µs/req | failed |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Ratios against `{baseline.key}` (each round's pair):",
        "",
        "| candidate | via Envoy: req/s | Envoy CPU/req | candidate CPU/req "
        "| direct: req/s | candidate CPU/req |",
        "|---|---|---|---|---|---|",
        *ratio_rows,
        "",
        f"- Most req/s through Envoy: **{best.key}**, "
        f"{report.ratio_text(report.paired(best_e, second_e, _rps))} the next ({second.key}).",
        f"- Least candidate CPU per request through Envoy: **{lean.key}**; the next "
        f"({lean2.key}) spends {report.ratio_text(report.paired(lean2_e, lean_e, _server_us))} "
        "as much.",
        "",
        "## How it ran",
        "",
        f"- One Envoy `--concurrency 1` pinned to CPU {ENVOY_CPU}: one listener per candidate, "
        "the connection manager of `authz_server.envoy_config.render_bootstrap`, its ext_authz "
        "filter with `http_service` to the candidate (HTTP/1.1 cluster, 1 s timeout, "
        "`failure_mode_allow: false`), then a route to an upstream (another "
        "bench/http_floor.py). Every run checks Envoy's `ext_authz.ok` counter grew by at least "
        "the answers wrk counted; any `ext_authz.denied`/`error` counts as failed.",
        f"- The candidates, the upstream and wrk pinned to CPU {WORK_CPU} (taskset).",
        f"- Load: `wrk -t1 -c{CONNECTIONS} -d{DURATION_S}s --latency -H 'Authorization: Bearer "
        "<RS256 JWT>' http://127.0.0.1:<port>/api/orders?page=2`, on Envoy's listener and "
        "directly on the candidate.",
        "- CPU per request: utime + stime of the process and its children from /proc/PID/stat "
        "over the run, divided by the answers wrk counted (granian runs a worker process "
        "under its main one: both counted).",
        "- Candidates: " + "; ".join(f"`{c.key}`: `{_command(c)}`" for c in CANDIDATES) + ".",
        "",
        "## Machine and versions",
        "",
        f"- {os.cpu_count()} CPUs, shared. Load average (1, 5, 15 min) before: "
        f"{_load(info.load_before)}; after: {_load(info.load_after)}; 1-min load at the end "
        f"of each run: median {report.median(loads):.1f}, max {max(loads):.1f}.",
        *report.versions(),
        "- "
        + ", ".join(
            f"{name} {importlib.metadata.version(name)}"
            for name in ("uvloop", "httptools", "uvicorn", "granian")
        ),
        "",
    ]
    return "\n".join(lines)


def _load(values: tuple[float, float, float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _command(candidate: Candidate) -> str:
    argv = ["python", *candidate.argv[1:]]
    return " ".join(part.replace(str(BENCH), "bench") for part in argv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the Stack stops every process it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if loadgen.missing_tools():
        log("wrk is missing: `make bench-tools` installs it")
        return 2
    started = time.monotonic()
    load_before = os.getloadavg()
    key = devkeys.generate_key("RSA", kid="bench")
    headers = [f"Authorization: Bearer {key.sign(reference.claims(0))}"]
    with tempfile.TemporaryDirectory(prefix="http-candidates-") as tmp_dir, Stack() as stack:
        tmp = Path(tmp_dir)
        running, envoy, admin = start_all(stack, tmp)
        runs = [(r.candidate, *scenarios_of(r, envoy, admin, headers)) for r in running]
        scenarios = [s for _, e, d in runs for s in (e, d)]
        run_rounds(scenarios, tmp / "unused", warm_up=True, rounds=ROUNDS, duration_s=DURATION_S)
    info = RunInfo(
        when=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        wall_min=(time.monotonic() - started) / 60,
        load_before=load_before,
        load_after=os.getloadavg(),
    )
    report.write(render(runs, info), args.output, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
