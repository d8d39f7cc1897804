"""`make bench`'s report: every target of issue 24 in one table, with its ratio, its rounds
and its verdict, and the machine's load in the header (bench/report.py, from samples made
here: no process is started)."""

from __future__ import annotations

import re
from pathlib import Path

from bench import report
from bench.harness.loadgen import LoadResult
from bench.harness.procs import Proc
from bench.harness.rounds import Sample, Scenario
from bench.scenarios.profile import RATE, Spied, collapse, profile_table

# scenario key -> per round (req/s, server µs, Envoy µs, p99 ms)
ROUNDS: dict[str, list[tuple[float, float | None, float | None, float]]] = {
    "envoy-floor": [(7000, 120, 110, 5.0), (7200, 118, 108, 5.2)],
    "envoy-ours": [(3900, 230, 150, 8.0), (4000, 226, 155, 8.4)],
    "envoy-ours-new": [(2000, 460, 170, 20.0), (1900, 452, 175, 21.0)],
    "envoy-http-floor": [(13000, 9, 70, 3.0), (13500, 10, 72, 3.3)],
    "envoy-ours-http": [(12600, 16, 76, 3.5), (12800, 17, 78, 3.6)],
    "envoy-no-auth": [(44000, None, 22, 1.5), (45000, None, 21, 1.5)],
    "envoy-jwt-rbac": [(13000, None, 74, 2.1), (13400, None, 73, 2.2)],
    "direct-floor": [(7000, 126, None, 30.0), (7100, 124, None, 31.0)],
    "direct-ours": [(4500, 200, None, 29.0), (4600, 210, None, 28.0)],
    "direct-1p": [(4300, 210, None, 30.0), (4400, 205, None, 31.0)],
    "direct-1000p": [(4200, 216, None, 30.0), (4300, 214, None, 29.0)],
    "direct-creds-jwt": [(4200, 200, None, 30.0), (4300, 210, None, 30.0)],
    "direct-creds-introspected": [(4400, 190, None, 28.0), (4400, 200, None, 28.0)],
    "direct-creds-apikey": [(4600, 260, None, 29.0), (4600, 270, None, 29.0)],
    "workers1": [(2400, 480, None, 63.0), (2450, 470, None, 62.0)],
    "workers2": [(6200, 270, None, 41.0), (6300, 260, None, 40.0)],
    "half-floor": [(3600, 112, 96, 4.0), (3600, 110, 95, 4.2)],
    "half-ours": [(3600, 220, 138, 4.5), (3600, 224, 140, 5.6)],
}


def _scenario(key: str) -> Scenario:
    def never(_: Path, __: int) -> LoadResult:
        raise AssertionError("the report runs no load")

    proc = Proc(key, ["true"], Path("/dev/null"), None)
    first = ROUNDS[key][0]
    scenario = Scenario(
        key,
        key,
        never,
        server=proc if first[1] is not None else None,
        envoy=proc if first[2] is not None else None,
    )
    for number, (rps, server, envoy, p99) in enumerate(ROUNDS[key]):
        scenario.samples.append(
            Sample(rps, p99 / 2, p99, int(rps * 5), 0, server, envoy, 3.0 + number, 0.4, 0.01)
        )
    return scenario


def _render() -> str:
    scenarios = [_scenario(key) for key in ROUNDS if not key.startswith("half-")]
    return report.render(
        report.Run(
            scenarios=scenarios,
            half_load=[_scenario("half-floor"), _scenario("half-ours")],
            half_rate=3600,
            workers_supported=True,
            quick=True,
            rounds=2,
            duration_s=5,
            wall_s=60,
            load_before=(0.5, 0.6, 0.7),
            load_after=(2.5, 1.6, 0.9),
            new_tokens=(1500, 1000),
            placement=("0", "1", "0,1"),
            loads=(16, 10, 10, 16),
            tracing_ratios=[1.02, 1.08, 1.04],
        )
    )


def _targets(text: str) -> dict[str, list[str]]:
    """The rows of the 'Targets (issue 24)' table: target name -> its cells."""
    section = text.split("## Targets (issue 24)", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| **")]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    return {row[0].strip("*"): row for row in cells}


def test_every_target_of_issue_24_is_a_row_with_ratio_rounds_and_verdict() -> None:
    targets = _targets(_render())
    assert list(targets) == [
        "H2",
        "In-proxy parity, req/s",
        "In-proxy parity, CPU",
        "P1",
        "P2, req/s",
        "P2, p99",
        "New token",
        "Introspection",
        "API key",
        "Tracing 1%",
    ]
    # HTTP door 16, 17 µs over the floor's 9, 10: 1.78x and 1.70x, median 1.74x: met.
    assert targets["H2"][3:] == ["1.74x", "1.70-1.78", "**met**"]
    # The HTTP door (not the gRPC door) against jwt_authn + RBAC: 12600/13000, 12800/13400.
    assert targets["In-proxy parity, req/s"][3:] == ["0.96x", "0.96-0.97", "**met**"]
    # (76 + 16) / 74 and (78 + 17) / 73: Envoy's and the server's CPU together.
    assert targets["In-proxy parity, CPU"][3:] == ["1.27x", "1.24-1.30", "**met**"]
    assert targets["P1"][3:] == ["1.64x", "1.59-1.69", "**missed**"]
    assert targets["P2, req/s"][5] == "**missed**"
    # p99 margins over the floor's: +0.5 and +1.4 ms, median +0.95 ms.
    assert targets["P2, p99"][3:] == ["+0.95 ms", "+0.50 to +1.40 ms", "**met**"]
    assert targets["New token"][3:] == ["2.00x", "2.00-2.00", "**missed**"]
    assert targets["Introspection"][5] == "**met**"
    assert targets["API key"][3:] == ["1.29x", "1.29-1.30", "**missed**"]
    assert targets["Tracing 1%"][3:] == ["1.04x", "1.02-1.08", "**met**"]


def test_the_header_states_the_machines_load_before_the_targets() -> None:
    text = _render()
    header = text.split("## Targets (issue 24)", 1)[0]
    assert re.search(r"1-min load average 0\.50 before, 2\.50 after", header)
    assert "processes this bench did not start used a median of 0.40 CPUs" in header
    assert "0.01 (max 0.01) as steal" in header


def test_half_load_below_the_rate_asked_for_gives_no_verdict() -> None:
    scenarios = [_scenario(key) for key in ROUNDS if not key.startswith("half-")]
    run = report.Run(
        scenarios=scenarios,
        half_load=[_scenario("half-floor"), _scenario("half-ours")],
        half_rate=5000,  # asked for more than the 3,600 req/s reached
        workers_supported=False,
        quick=True,
        rounds=2,
        duration_s=5,
        wall_s=60,
        load_before=(0.5, 0.6, 0.7),
        load_after=(2.5, 1.6, 0.9),
        new_tokens=(1500, 1000),
        placement=("0", "1", "0,1"),
        loads=(16, 10, 10, 16),
    )
    targets = _targets(report.render(run))
    assert targets["P2, p99"][5] == "inconclusive: rate not reached"
    assert "Tracing 1%" not in targets  # not measured in this run: no row pretends it was


def test_a_profile_counts_self_and_cumulative_samples_by_module_and_function() -> None:
    raw = [
        "Thread.run (threading.py:982);_serve (grpc/_server.py:1200);"
        "check (authz_server/service.py:90);_decide (authz_server/service.py:120) 6",
        "Thread.run (threading.py:982);_serve (grpc/_server.py:1210) 3",
        # The same function twice on one stack counts once in its cumulative samples.
        "Thread.run (threading.py:982);check (authz_server/service.py:90);"
        "check (authz_server/service.py:95) 1",
        "py-spy> a line that is not a stack",
    ]
    profile = collapse(raw)
    assert profile.samples == 10
    assert profile.self_counts == {
        "authz_server.service:_decide": 6,
        "grpc._server:_serve": 3,
        "authz_server.service:check": 1,
    }
    assert profile.cumulative["authz_server.service:check"] == 7
    assert profile.cumulative["grpc._server:_serve"] == 9
    # 10 samples over 2 requests: each sample is 1/RATE s of GIL time.
    ours = Spied(profile, requests=2, errors=0)
    floor = Spied(collapse(["Thread.run (threading.py:982);_serve (grpc/_server.py:1) 4"]), 2, 0)
    table = profile_table(ours, floor, "floor")
    per_sample = 1e6 / RATE / 2
    assert table[2] == (
        f"| 60.0% | 60.0% | {6 * per_sample:.1f} | 0.0 | `authz_server.service:_decide` |"
    )
    assert table[3] == (
        f"| 30.0% | 90.0% | {3 * per_sample:.1f} | {4 * per_sample:.1f} | `grpc._server:_serve` |"
    )
    # The thread's entry, on every stack, is not listed as the top cumulative function.
    assert not any("threading:Thread.run" in line for line in table)
