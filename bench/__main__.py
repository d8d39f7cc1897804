"""``make bench`` (``python -m bench``): every scenario, rounds, one report.

1. bench.scenarios.envoy starts the processes (Envoy, the floors, authz-server), checks every
   path, and returns the scenarios: through one Envoy core, direct gRPC, credential kinds.
2. bench.harness.rounds runs them in interleaved rounds, then p99 at half the floor's maximum.
3. With every other process stopped: bench.scenarios.scoping and bench.scenarios.tracing, each
   in process and in servers of its own.
4. bench.report renders the table, the targets and their verdicts, the machine and versions,
   and writes it to bench/results/latest.md (``--output`` to write elsewhere) and stdout.

BENCH_QUICK=1: 2 rounds of 2 s and shorter scoping and tracing runs, a smoke run of a few
minutes for development; its numbers are not results, so its report goes to a temporary file
(authz-bench-quick.md in the temporary directory) unless ``--output`` names one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.harness import loadgen
from bench.harness.procs import Stack
from bench.harness.rounds import log, run_rounds
from bench.scenarios import envoy, scoping, tracing
from bench.scenarios.envoy import DURATION_S, QUICK, ROUNDS

RESULTS = Path(__file__).resolve().parent / "results" / "latest.md"
# A quick run's numbers are not results: by default it never replaces latest.md.
QUICK_RESULTS = Path(tempfile.gettempdir()) / "authz-bench-quick.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = QUICK_RESULTS if QUICK else RESULTS
    parser.add_argument(
        "--output",
        type=Path,
        default=default,
        help=f"where the report goes (default: {RESULTS}; with BENCH_QUICK=1: {QUICK_RESULTS})",
    )
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the Stack stops every process it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    missing = loadgen.missing_tools()
    if missing:
        packages = " ".join(missing)
        log(f"missing load generators; `make bench` installs them: apt-get install -y {packages}")
        return 2
    started = time.monotonic()
    timing = {"rounds": ROUNDS, "duration_s": DURATION_S, "warmup_s": envoy.WARMUP_S}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="authz-bench-") as tmp_dir, Stack() as stack:
        tmp = Path(tmp_dir)
        scratch = tmp / "h2load-requests.log"
        setup = envoy.build(envoy.Bench(stack, tmp))
        run_rounds(setup.scenarios, scratch, warm_up=True, **timing)
        by_key = {scenario.key: scenario for scenario in setup.scenarios}
        floor_max = report.median([sample.rps for sample in by_key["envoy-floor"].samples])
        half = envoy.half_load(setup, floor_max / 2)
        log(f"half load: {floor_max / 2:.0f} req/s through Envoy, floor then authz-server")
        run_rounds(half, scratch, warm_up=False, **timing)
    # In process and two servers of its own, once every other process has stopped.
    log("scoping: 50 workloads x 20 policies against 1 workload (bench/scenarios/scoping.py)")
    scoping_section = scoping.run(
        rounds=5 if QUICK else 15,
        budget=0.05 if QUICK else 0.1,
        server_calls=300 if QUICK else 1000,
        cpus=envoy.WORK_CPU,
        command="BENCH_QUICK=1 make bench" if QUICK else "make bench",
    )
    log("tracing: off, 1% and 100% sampling (bench/scenarios/tracing.py)")
    tracing_result = tracing.run(
        calls=500 if QUICK else 2000,
        rounds=3 if QUICK else 5,
        command="BENCH_QUICK=1 make bench" if QUICK else "make bench",
    )
    text = report.render(
        report.Run(
            scenarios=setup.scenarios,
            half_load=half,
            half_rate=floor_max / 2,
            workers_supported=setup.workers,
            quick=QUICK,
            rounds=ROUNDS,
            duration_s=DURATION_S,
            wall_s=time.monotonic() - started,
            load_before=load_before,
            load_after=os.getloadavg(),
            new_tokens=(envoy.NEW_TOKENS, envoy.NEW_TOKEN_CACHE),
            placement=(envoy.ENVOY_CPU, envoy.WORK_CPU, envoy.ALL_CPUS),
            loads=(
                envoy.WRK_CONNECTIONS,
                envoy.H2_CLIENTS,
                envoy.H2_STREAMS,
                envoy.HALF_LOAD_CLIENTS,
            ),
            scoping=scoping_section,
            tracing=tracing_result.section,
            tracing_ratios=tracing_result.ratios,
        )
    )
    report.write(text, args.output, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
