"""Scenarios and rounds: the measuring loop every run through Envoy or direct gRPC shares.

A `Scenario` is one load (a function running a load generator for some seconds) with the
processes whose CPU it charges (the server, Envoy) and, for authz-server, its /metrics URL: every
Check must be an allow, and the token cache's hits and misses are counted. `measure` runs it once
and keeps a `Sample`; `run_rounds` runs every scenario once per round, the order reversed on odd
rounds, so a busy moment of the shared machine falls on all of them alike. `bench.report` reads
the samples.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.harness.loadgen import LoadResult
from bench.harness.procs import Proc, http_get, machine_cpu

Load = Callable[[Path, int], LoadResult]  # (h2load log file, seconds) -> result


_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:5.0f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    failures: int  # non-2xx, socket errors, failed streams, and Checks the server denied
    server_us: float | None  # server CPU per request
    envoy_us: float | None  # Envoy CPU per request
    load1: float  # the machine's 1-minute load average when the run ended
    other_cpus: float = 0.0  # CPUs' worth used by processes the bench did not start, meanwhile
    steal_cpus: float = 0.0  # CPUs' worth the hypervisor gave other guests, meanwhile


@dataclass
class Scenario:
    key: str
    label: str
    load: Load
    server: Proc | None = None
    envoy: Proc | None = None
    metrics_url: str | None = None  # authz-server's /metrics: every Check must be an allow
    after: Callable[[LoadResult], None] | None = None
    samples: list[Sample] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0


def scrape(url: str) -> dict[str, float]:
    """Allowed and denied Checks and token cache hits/misses from authz-server's /metrics."""
    status, body = http_get(url)
    if status != 200:
        raise RuntimeError(f"{url} answered {status}")
    totals = {"allow": 0.0, "deny": 0.0, "hits": 0.0, "misses": 0.0}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "authz_checks_total":
                totals[sample.labels["decision"]] += sample.value
            elif sample.name == "authz_token_cache_hits_total":
                totals["hits"] += sample.value
            elif sample.name == "authz_token_cache_misses_total":
                totals["misses"] += sample.value
    return totals


def measure(scenario: Scenario, scratch: Path, seconds: int, *, record: bool = True) -> Sample:
    """Run `scenario`'s load once for `seconds`; return its sample (kept when `record`)."""
    before = scrape(scenario.metrics_url) if scenario.metrics_url else None
    server0 = scenario.server.cpu_seconds() if scenario.server else 0.0
    envoy0 = scenario.envoy.cpu_seconds() if scenario.envoy else 0.0
    machine0, started = machine_cpu(), time.monotonic()
    result = scenario.load(scratch, seconds)
    other_cpus, steal_cpus = machine_cpu().other_cpus(machine0, time.monotonic() - started)
    server1 = scenario.server.cpu_seconds() if scenario.server else 0.0
    envoy1 = scenario.envoy.cpu_seconds() if scenario.envoy else 0.0
    failures = result.failures
    if scenario.metrics_url and before is not None:
        after = scrape(scenario.metrics_url)
        failures += int(after["deny"] - before["deny"])
        if record:
            scenario.cache_hits += int(after["hits"] - before["hits"])
            scenario.cache_misses += int(after["misses"] - before["misses"])
    if scenario.after is not None:
        scenario.after(result)
    per_request = 1e6 / max(result.requests, 1)
    sample = Sample(
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        requests=result.requests,
        failures=failures,
        server_us=(server1 - server0) * per_request if scenario.server else None,
        envoy_us=(envoy1 - envoy0) * per_request if scenario.envoy else None,
        load1=os.getloadavg()[0],
        other_cpus=other_cpus,
        steal_cpus=steal_cpus,
    )
    if record:
        scenario.samples.append(sample)
    return sample


def run_rounds(
    scenarios: list[Scenario],
    scratch: Path,
    *,
    warm_up: bool,
    rounds: int,
    duration_s: int,
    warmup_s: int = 1,
) -> None:
    """Optionally warm every scenario up (`warmup_s` each, not recorded); then `rounds`
    rounds, each running every scenario for `duration_s`, the order reversed on odd rounds."""
    if warm_up:
        for scenario in scenarios:
            measure(scenario, scratch, warmup_s, record=False)
    for index in range(rounds):
        for scenario in scenarios if index % 2 == 0 else scenarios[::-1]:
            sample = measure(scenario, scratch, duration_s)
            cpu = f"server {sample.server_us:5.0f} µs/req" if sample.server_us is not None else ""
            log(
                f"round {index + 1}/{rounds} {scenario.key:<15} {sample.rps:8.0f} req/s  "
                f"p99 {sample.p99_ms:7.2f} ms  {cpu}  failures {sample.failures}  "
                f"other CPUs {sample.other_cpus:.2f}"
            )
