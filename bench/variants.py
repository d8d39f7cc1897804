"""Variants of the gRPC door, measured side by side: `make bench-variants` (issue 9, "Lower the
floor itself, and measure each step").

Three groups, every variant a process of its own, all on 127.0.0.1 with ports picked at run time
and every process stopped by its PID (the processes, loads and measurements of envoy_bench.py):

  threads  direct gRPC (h2load -c10 -m10, as `make bench`) to the floor and to authz-server with
           ``server.threads`` = 1, 2, 4, 8, 16; the server and h2load pinned to CPU 1.
  socket   through Envoy (``--concurrency 1`` on CPU 0, wrk on CPU 1 as `make bench`): authz-server
           and the floor reached over TCP (127.0.0.1) and over a Unix domain socket (a ``pipe``
           address in Envoy's cluster, ``--listen unix:PATH`` on the server).
  options  direct gRPC to the floor (the default thread count) with one grpc core channel
           argument added per row, and the floor on grpc.aio (one confirming row).

Each round runs every variant once (the order reversed on odd rounds) so a busy moment of the
shared machine falls on all of them alike. Ratios are taken within a round, each variant against
its group's baseline (the default thread count; TCP; the floor with no extra option), and
reported as the median with min-max over rounds: a ratio whose min-max stays on one side of 1
is beyond the machine's noise. Server CPU per Check: utime + stime from /proc/PID/stat over the
measured window divided by the Checks answered.

Writes bench/results/variants.md (or --output) and prints it. BENCH_QUICK=1: a ~2 min smoke run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import loadgen
import reference
import report
from envoy_bench import (
    ALL_CPUS,
    CHECK_PATH,
    ENVOY_CPU,
    GRPC_HEADERS,
    H2_CLIENTS,
    H2_STREAMS,
    WORK_CPU,
    WRK_CONNECTIONS,
    Bench,
    Envoy,
    Sample,
    Scenario,
    Server,
    grpc_allows,
    grpc_load,
    log,
    measure,
    ready,
    wrk_load,
)
from procs import Proc, Stack, free_port, http_get, wait_until

from authz_server.specs import ServerSpec

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "variants.md"
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
# On a shared machine, more short rounds give steadier ratios than a few long ones.
DURATION_S = 2
ROUNDS = 2 if QUICK else 7
WARMUP_S = 0 if QUICK else 1
THREADS = (1, 2, 4, 8, 16)
STARTUP_S = 180
DEFAULT_THREADS = ServerSpec().threads
# Envoy sends no HTTP/2 PING unless its cluster sets connection_keepalive (unset in the
# bootstrap we ship), so a server keepalive that fits it pings rarely and bears any client ping.
ENVOY_KEEPALIVE: tuple[tuple[str, int | str], ...] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_ping_strikes", 0),
)
# One row each, on the floor: grpc core channel arguments (include/grpc/impl/channel_arg_names.h).
# "latency" is not a row: the header says the default, "blend", is the same as "latency".
OPTIONS: tuple[tuple[str, str, tuple[tuple[str, int | str], ...]], ...] = (
    ("streams100", "max_concurrent_streams 100", (("grpc.max_concurrent_streams", 100),)),
    ("throughput", "optimization_target throughput",
     (("grpc.optimization_target", "throughput"),)),
    ("no-compression", "per_message_compression 0", (("grpc.per_message_compression", 0),)),
    ("minimal-stack", "minimal_stack 1 (optional filters off)", (("grpc.minimal_stack", 1),)),
    ("no-bdp", "http2.bdp_probe 0", (("grpc.http2.bdp_probe", 0),)),
    ("no-channelz", "enable_channelz 0", (("grpc.enable_channelz", 0),)),
    ("keepalive", "keepalive 60 s / 20 s, ping strikes off (fits Envoy's no-PING default)",
     ENVOY_KEEPALIVE),
)  # fmt: skip


def server_threads_config(threads: int) -> str:
    """An AuthzConfig document that sets only ``server.threads`` (appended to the Istio YAML)."""
    return f"""
---
apiVersion: authz-server/v1
kind: AuthzConfig
server: {{threads: {threads}}}
"""


# --------------------------------------------------------------------------- the processes


def start_ours(bench: Bench, name: str, threads: int, listen: str) -> Server:
    """authz-server with the reference configuration and `threads`, gRPC on `listen`."""
    istio = reference.istio_config(bench.jwks_a, bench.jwks_b)
    config_path = bench.file(f"{name}.yaml", istio + server_threads_config(threads))
    http_port = free_port()
    argv = [sys.executable, "-m", "authz_server", "serve", "--config", str(config_path)]
    argv += ["--listen", listen, "--metrics-listen", f"127.0.0.1:{http_port}"]
    proc = Proc(name, argv, bench.tmp / f"{name}.log", WORK_CPU, pin_late=True)
    bench.stack.start(proc)
    return Server(proc, listen, f"http://127.0.0.1:{http_port}")


def start_floor(bench: Bench, name: str, listen: str, extra: Sequence[str]) -> Proc:
    argv = [sys.executable, str(BENCH / "floor_server.py"), "--listen", listen, *extra]
    proc = Proc(name, argv, bench.tmp / f"{name}.log", WORK_CPU, pin_late=True)
    return bench.stack.start(proc)


def floor_ready(proc: Proc, listen: str) -> Server:
    """Wait for a floor's ``port N`` line; its address is 127.0.0.1:N, or `listen` if unix:."""

    def port() -> int | None:
        for line in proc.log_path.read_text().splitlines():
            if line.startswith("port "):
                return int(line.split()[1])
        return None

    # A generous wait: some twenty Python servers start at once on a busy 2-CPU machine.
    found = wait_until(lambda: proc.alive() and port(), STARTUP_S, f"{proc.name}'s port")
    return Server(proc, listen if listen.startswith("unix:") else f"127.0.0.1:{found}", "")


def option_args(options: Sequence[tuple[str, int | str]]) -> list[str]:
    return [arg for key, value in options for arg in ("--option", f"{key}={value}")]


# ------------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Group:
    """Variants compared with one baseline, round by round."""

    key: str
    title: str
    baseline: Scenario
    variants: list[Scenario]  # the baseline among them, in the order shown


@dataclass(frozen=True)
class Setup:
    groups: list[Group]
    order: list[Scenario]  # each scenario once, in the order a round runs them


def build(bench: Bench) -> Setup:
    """Start every process and check each path answers as it must; return the groups."""
    socket_dir = bench.tmp
    ours = {n: start_ours(bench, f"ours-t{n}", n, f"127.0.0.1:{free_port()}") for n in THREADS}
    ours_uds = start_ours(bench, "ours-uds", DEFAULT_THREADS, f"unix:{socket_dir}/ours.sock")
    floor_procs: dict[str, tuple[Proc, str]] = {}

    def floor(name: str, listen: str, extra: Sequence[str]) -> None:
        floor_procs[name] = (start_floor(bench, name, listen, extra), listen)

    for n in THREADS:
        floor(f"floor-t{n}", "127.0.0.1:0", ["--threads", str(n)])
    floor("floor-uds", f"unix:{socket_dir}/floor.sock", [])
    for key, _, options in OPTIONS:
        floor(f"floor-{key}", "127.0.0.1:0", option_args(options))
    floor("floor-aio", "127.0.0.1:0", ["--aio"])

    floors = {name: floor_ready(proc, listen) for name, (proc, listen) in floor_procs.items()}
    for server in [*ours.values(), ours_uds]:
        server.proc.wait_ready(ready(f"{server.http}/readyz"), STARTUP_S)
    envoys = {
        "ours-tcp": bench.envoy("envoy-ours-tcp", "ext_authz", ours[DEFAULT_THREADS].grpc_address),
        "ours-uds": bench.envoy("envoy-ours-uds", "ext_authz", ours_uds.grpc_address),
        "floor-tcp": bench.envoy(
            "envoy-floor-tcp", "ext_authz", floors[f"floor-t{DEFAULT_THREADS}"].grpc_address
        ),
        "floor-uds": bench.envoy("envoy-floor-uds", "ext_authz", floors["floor-uds"].grpc_address),
    }
    for envoy in envoys.values():
        envoy.proc.wait_ready(ready(f"{envoy.admin}/ready"))
    bench.stack.pin_all()
    log(f"every process is ready and pinned (Envoy: CPU {ENVOY_CPU}, servers: CPU {WORK_CPU})")

    preflight(bench, [*ours.values(), ours_uds, *floors.values()], envoys)
    frame = bench.file("check.bin", reference.grpc_frame(reference.check_request(bench.token)))
    auth = [f"Authorization: Bearer {bench.token}"]

    def metrics(server: Server) -> str:
        return f"{server.http}/metrics"

    def direct(key: str, label: str, server: Server, metrics_url: str | None = None) -> Scenario:
        return Scenario(key, label, grpc_load(server.grpc_address, frame, WORK_CPU), server.proc,
                        metrics_url=metrics_url)  # fmt: skip

    def through(
        key: str, label: str, envoy: Envoy, server: Server, metrics_url: str | None
    ) -> Scenario:
        return Scenario(key, label, wrk_load(envoy.url, auth), server.proc, envoy.proc,
                        metrics_url)  # fmt: skip

    ours_threads = [
        direct(f"ours-t{n}", f"authz-server, {n} thread{'s' if n > 1 else ''}", ours[n],
               metrics(ours[n]))
        for n in THREADS
    ]  # fmt: skip
    floor_threads = [
        direct(f"floor-t{n}", f"floor, {n} thread{'s' if n > 1 else ''}", floors[f"floor-t{n}"])
        for n in THREADS
    ]
    default_index = THREADS.index(DEFAULT_THREADS)
    floor_base = floor_threads[default_index]
    option_rows = [
        direct(f"opt-{key}", f"floor, {label}", floors[f"floor-{key}"]) for key, label, _ in OPTIONS
    ]
    option_rows.append(direct("opt-aio", "floor on grpc.aio (one event loop)", floors["floor-aio"]))
    ours_tcp = through("envoy-ours-tcp", "Envoy → authz-server over TCP", envoys["ours-tcp"],
                       ours[DEFAULT_THREADS], metrics(ours[DEFAULT_THREADS]))  # fmt: skip
    ours_uds_row = through("envoy-ours-uds", "Envoy → authz-server over a Unix socket",
                           envoys["ours-uds"], ours_uds, metrics(ours_uds))  # fmt: skip
    floor_tcp = through("envoy-floor-tcp", "Envoy → floor over TCP", envoys["floor-tcp"],
                        floors[f"floor-t{DEFAULT_THREADS}"], None)  # fmt: skip
    floor_uds = through("envoy-floor-uds", "Envoy → floor over a Unix socket",
                        envoys["floor-uds"], floors["floor-uds"], None)  # fmt: skip

    default_label = f"the default, {DEFAULT_THREADS} threads"
    groups = [
        Group("threads-ours", f"Direct gRPC → authz-server by server.threads (vs {default_label})",
              ours_threads[default_index], ours_threads),
        Group("threads-floor", f"Direct gRPC → floor by thread count (vs {default_label})",
              floor_base, floor_threads),
        Group("options", f"Direct gRPC → floor with one server option (vs none, "
              f"{DEFAULT_THREADS} threads)", floor_base, [floor_base, *option_rows]),
        Group("socket-ours", "Through Envoy → authz-server: Unix socket vs TCP",
              ours_tcp, [ours_tcp, ours_uds_row]),
        Group("socket-floor", "Through Envoy → floor: Unix socket vs TCP",
              floor_tcp, [floor_tcp, floor_uds]),
    ]  # fmt: skip
    # Pairs that are compared sit close together in a round: each baseline in the middle of its
    # group (the floor's default-thread run serves the thread and the option groups).
    floor_others = [s for s in floor_threads if s is not floor_base]
    half = len(option_rows) // 2
    order = [*ours_threads, *floor_others, *option_rows[:half], floor_base,
             *option_rows[half:], ours_tcp, ours_uds_row, floor_tcp, floor_uds]  # fmt: skip
    return Setup(groups, order)


def preflight(bench: Bench, servers: Sequence[Server], envoys: dict[str, Envoy]) -> None:
    """Every server allows the bench request over gRPC and every Envoy answers 200."""
    request = reference.check_request(bench.token)
    frame = bench.file("preflight.bin", reference.grpc_frame(request))
    for server in servers:
        if not server.grpc_address.startswith("unix:"):  # nghttp speaks TCP only
            url = f"http://{server.grpc_address}{CHECK_PATH}"
            grpc_status = loadgen.grpc_status_of_one_call(url, frame, GRPC_HEADERS)
            if grpc_status != "0":
                raise RuntimeError(f"{server.proc.name}: grpc-status {grpc_status!r}, expected 0")
        if not grpc_allows(server.grpc_address, request):
            raise RuntimeError(f"{server.proc.name}: the bench request was not allowed")
    bearer = {"Authorization": f"Bearer {bench.token}"}
    for name, envoy in envoys.items():
        status, body = http_get(envoy.url + reference.PATH, bearer)
        if status != 200:
            raise RuntimeError(f"Envoy {name}: the bench request answered {status}: {body[:300]!r}")
    log("preflight ok: every gRPC server allows the request, every Envoy answers 200")


# --------------------------------------------------------------------------------- rounds


def run_rounds(order: list[Scenario], scratch: Path) -> None:
    if WARMUP_S:
        for scenario in order:
            measure(scenario, scratch, WARMUP_S, record=False)
    for index in range(ROUNDS):
        for scenario in order if index % 2 == 0 else order[::-1]:
            sample = measure(scenario, scratch, DURATION_S)
            log(
                f"round {index + 1}/{ROUNDS} {scenario.key:<18} {sample.rps:8.0f} req/s  "
                f"server {sample.server_us or 0:5.0f} µs/Check  load {sample.load1:4.1f}  "
                f"failures {sample.failures}"
            )


# --------------------------------------------------------------------------------- report


def spread(values: Sequence[float], digits: int = 0) -> str:
    """'median (min-max)'."""
    if not values:
        return "-"
    form = f"{{:,.{digits}f}}"
    mid = form.format(report.median(values))
    return f"{mid} ({form.format(min(values))}-{form.format(max(values))})"


def per_round(
    variant: Scenario, baseline: Scenario, value: Callable[[Sample], float | None]
) -> list[float]:
    """variant / baseline of `value`, one ratio per round both ran."""
    ratios = []
    for mine, theirs in zip(variant.samples, baseline.samples, strict=False):
        a, b = value(mine), value(theirs)
        if a is not None and b:
            ratios.append(a / b)
    return ratios


def verdict(ratios: Sequence[float], lower_is_better: bool) -> str:
    """'better' / 'worse' when every round's ratio falls on one side of 1, else 'noise'; with
    how many rounds came out better."""
    if len(ratios) < 2:
        return ""
    wins = sum(1 for r in ratios if (r < 1 if lower_is_better else r > 1))
    if wins == len(ratios):
        word = "better"
    elif wins == 0:
        word = "worse"
    else:
        word = "noise"
    return f"{word} ({wins}/{len(ratios)} better)"


def group_table(group: Group) -> list[str]:
    envoy = any(s.envoy is not None for s in group.variants)
    head = "| variant | req/s | server µs/Check |"
    rule = "|---|---:|---:|"
    if envoy:
        head += " Envoy µs/req |"
        rule += "---:|"
    head += " p99 ms | CPU/Check ratio | req/s ratio | failures |"
    rule += "---:|---:|---:|---:|"
    lines = [f"### {group.title}", "", head, rule]
    for scenario in group.variants:
        samples = scenario.samples
        row = f"| {scenario.label} | {spread([s.rps for s in samples])} | "
        row += f"{spread([s.server_us for s in samples if s.server_us is not None])} |"
        if envoy:
            row += f" {spread([s.envoy_us for s in samples if s.envoy_us is not None])} |"
        row += f" {spread([s.p99_ms for s in samples], 2)} |"
        if scenario is group.baseline:
            row += " baseline | baseline |"
        else:
            cpu = per_round(scenario, group.baseline, lambda s: s.server_us)
            rps = per_round(scenario, group.baseline, lambda s: s.rps)
            row += f" {spread(cpu, 2)} {verdict(cpu, True)} |"
            row += f" {spread(rps, 2)} {verdict(rps, False)} |"
        row += f" {sum(s.failures for s in samples)} |"
        lines.append(row)
    return [*lines, ""]


def noise_lines(order: Sequence[Scenario]) -> list[str]:
    """How noisy the machine was: each variant's own req/s spread across rounds, load average."""
    spreads = []
    for scenario in order:
        rates = [s.rps for s in scenario.samples]
        if len(rates) > 1 and min(rates) > 0:
            spreads.append(max(rates) / min(rates))
    loads = [s.load1 for scenario in order for s in scenario.samples]
    if not spreads:
        return []
    return [
        "- Noise: one variant's req/s, max/min over its rounds: "
        f"median {report.median(spreads):.2f}, worst {max(spreads):.2f}. "
        "1-minute load average while measuring: "
        f"{min(loads):.1f}-{max(loads):.1f} (the machine has {os.cpu_count()} CPUs).",
    ]


def render(setup: Setup, *, wall_s: float, load_before: Sequence[float]) -> str:
    lines = [
        "# authz-server: gRPC door variants (`make bench-variants`)",
        "",
        f"{'Quick run (BENCH_QUICK=1): ' if QUICK else ''}{ROUNDS} rounds x {DURATION_S} s per "
        f"variant, interleaved (order reversed on odd rounds); {wall_s / 60:.1f} min in all. "
        "Medians with (min-max) over rounds. Ratios are variant / baseline taken within each "
        "round; `better`/`worse` when every round's ratio falls on the same side of 1, "
        "`noise` otherwise. Server CPU per Check = utime + stime of the server's process "
        "(/proc/PID/stat) over the window / Checks answered.",
        "",
        f"Placement: Envoy `--concurrency 1` on CPU {ENVOY_CPU}; servers and the load generator "
        f"on CPU {WORK_CPU} (both CPUs: {ALL_CPUS}). Direct: `h2load -c{H2_CLIENTS} "
        f"-m{H2_STREAMS}` POSTing one framed CheckRequest. Through Envoy: `wrk -t1 "
        f"-c{WRK_CONNECTIONS}` with a cached token. authz-server: the reference Istio "
        "configuration, default settings but `server.threads`. The floor: bench/floor_server.py "
        "(generic handler, raw bytes, one prebuilt OK).",
        "",
    ]
    for group in setup.groups:
        lines += group_table(group)
    lines += [
        "Not rows: `grpc.optimization_target latency` (grpc's channel_arg_names.h: the default, "
        "`blend`, is the same as `latency`); `grpc.max_concurrent_streams` below the client's "
        "in-flight streams (4 against h2load's 10 failed 16,526 streams in a 4 s smoke run: a "
        "refusal, not a saving; Envoy through one connection would queue or open more).",
        "",
    ]
    lines += [
        "## The machine",
        "",
        f"- 1-minute load average before: {load_before[0]:.1f}, after: {os.getloadavg()[0]:.1f}.",
        *noise_lines(setup.order),
        f"- Python {sys.version.split()[0]}, grpcio {grpc.__version__}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    missing = loadgen.missing_tools()
    if missing:
        log(f"missing load generators; `make bench-variants` installs them: {' '.join(missing)}")
        return 2
    started = time.monotonic()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="authz-variants-") as tmp_dir, Stack() as stack:
        tmp = Path(tmp_dir)
        setup = build(Bench(stack, tmp))
        run_rounds(setup.order, tmp / "h2load-requests.log")
    text = render(setup, wall_s=time.monotonic() - started, load_before=load_before)
    report.write(text, args.output, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
