"""Metrics: what a Check records, config and reload series, the scrape-time engine view, and
the exposition text. Every test reads values back from its own fresh CollectorRegistry."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from authz_server import errors
from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.keys.keyset import JWKSCache
from authz_server.keys.sources import source_for
from authz_server.ops.metrics import CHECK_BUCKETS, Metrics, SupervisorCollector
from authz_server.responses import Decision
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.e2e.harness import wait_until
from tests.helpers import AUDIENCE, ISSUER, Clock, write_config

POLICIES = """
policies:
  - name: read
    rules:
      - from: [{source: {requestPrincipals: ["*"]}}]
        to: [{operation: {methods: ["GET"], paths: ["/api/*"]}}]
  - name: no-internal
    action: DENY
    rules:
      - to: [{operation: {paths: ["/api/internal*"]}}]
"""


def config_text(providers: str, policies: str = POLICIES) -> str:
    return f"apiVersion: authz-server/v1\nkind: AuthzConfig\nproviders:{providers}\n{policies}"


def inline_provider(key: SigningKey, name: str = "main", issuer: str = ISSUER) -> str:
    jwks = json.dumps(json.dumps(devkeys.jwks(key)))
    return f"""
  - name: {name}
    issuer: {issuer}
    audiences: [{AUDIENCE}]
    jwks: {jwks}
"""


def request(token: str | None = None, path: str = "/api/orders") -> RequestAttributes:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return RequestAttributes(method="GET", host="api.test", path=path, headers=headers)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def make_service(tmp_path: Path, clock: Clock, metrics: Metrics, text: str) -> AuthorizationService:
    engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    service = AuthorizationService(engine, metrics=metrics)
    metrics.watch_engine(lambda: service.engine)
    return service


@pytest.fixture
def service(
    tmp_path: Path, clock: Clock, metrics: Metrics, rsa_key: SigningKey
) -> AuthorizationService:
    return make_service(tmp_path, clock, metrics, config_text(inline_provider(rsa_key)))


def checks(
    registry: CollectorRegistry, decision: str, reason: str, provider: str, policy: str
) -> float | None:
    return registry.get_sample_value(
        "authz_checks_total",
        {
            "decision": decision,
            "reason": reason,
            "provider": provider,
            "policy": policy,
            "door": "grpc",
        },
    )


def test_checks_are_counted_by_decision_reason_provider_and_policy(
    service: AuthorizationService, registry: CollectorRegistry, make_token: Callable[..., str]
) -> None:
    token = make_token()
    assert service.check(request(token)).allowed
    assert service.check(request(token, path="/api/orders/7")).allowed
    assert not service.check(request(token, path="/api/internal/x")).allowed
    assert service.check(request()).status == 401

    assert checks(registry, "allow", "allowed", "main", "read") == 2
    assert checks(registry, "deny", errors.POLICY_DENIED, "main", "no-internal") == 1
    assert checks(registry, "deny", errors.MISSING_CREDENTIALS, "", "") == 1
    duration = "authz_check_duration_seconds"
    assert (
        registry.get_sample_value(f"{duration}_count", {"decision": "allow", "door": "grpc"}) == 2
    )
    assert registry.get_sample_value(f"{duration}_count", {"decision": "deny", "door": "grpc"}) == 2
    assert (
        registry.get_sample_value(
            f"{duration}_bucket", {"decision": "allow", "door": "grpc", "le": "1.0"}
        )
        == 2
    )
    assert (
        registry.get_sample_value(f"{duration}_sum", {"decision": "allow", "door": "grpc"}) or 0
    ) > 0


def test_no_label_carries_request_controlled_values(
    service: AuthorizationService, registry: CollectorRegistry, make_token: Callable[..., str]
) -> None:
    service.check(request(make_token(sub="mallory-sub"), path="/api/orders/secret-path"))
    service.check(request(make_token(sub="x", exp=1), path="/api/unique-path"))
    for family in registry.collect():
        if not family.name.startswith("authz_"):
            continue
        for sample in family.samples:
            values = " ".join(sample.labels.values())
            assert "mallory" not in values and "path" not in values and "rsa-1" not in values
    assert checks(registry, "deny", errors.TOKEN_EXPIRED, "main", "") == 1


def test_histogram_buckets_resolve_below_a_millisecond(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    assert CHECK_BUCKETS[0] == 0.00005 and CHECK_BUCKETS[-1] == 1.0
    decision = Decision(allowed=True, status=200, reason="allowed", provider="main", policy="p")
    metrics.record(decision, 0.00018)
    bucket = "authz_check_duration_seconds_bucket"
    assert (
        registry.get_sample_value(bucket, {"decision": "allow", "door": "grpc", "le": "0.00015"})
        == 0
    )
    assert (
        registry.get_sample_value(bucket, {"decision": "allow", "door": "grpc", "le": "0.0002"})
        == 1
    )
    assert (
        registry.get_sample_value(bucket, {"decision": "allow", "door": "grpc", "le": "+Inf"}) == 1
    )


def test_repeated_label_sets_reuse_their_bound_children(metrics: Metrics) -> None:
    allowed = Decision(allowed=True, status=200, reason="allowed", provider="main", policy="read")
    denied = Decision(allowed=False, status=401, reason=errors.TOKEN_EXPIRED, provider="main")
    dry = Decision(
        allowed=True, status=200, reason="allowed", dry_run=(("strict", "deny"), ("new", "allow"))
    )
    for _ in range(50):
        metrics.record(allowed, 0.0001)
    metrics.exposition()  # a scrape adds the batched counts into the collectors
    assert len(metrics._children) == 1
    child = metrics._children[("allow", "allowed", "main", "read", "grpc")]
    for _ in range(50):
        metrics.record(allowed, 0.0001)
        metrics.record(denied, 0.0001)
        metrics.record(dry, 0.0001)
    metrics.exposition()
    assert len(metrics._children) == 3
    assert metrics._children[("allow", "allowed", "main", "read", "grpc")] is child
    assert len(metrics._dry_children) == 2


def test_every_check_recorded_before_a_scrape_is_in_it_from_any_thread(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """Checks are counted in per-thread batches: a scrape right after N Checks sees N, on
    every thread (running or finished), in the counter and in the histogram, scrape after
    scrape."""
    allowed = Decision(allowed=True, status=200, reason="allowed", provider="main", policy="read")
    labels = {"decision": "allow", "reason": "allowed", "provider": "main", "policy": "read"}
    duration = {"decision": "allow", "door": "http"}
    recorded, go = threading.Barrier(3), threading.Event()

    def check_on_a_thread(n: int) -> None:
        for _ in range(n):
            metrics.record(allowed, 0.00012, "http")
        recorded.wait(5)
        go.wait(5)  # still running at the first scrape
        metrics.record(allowed, 0.3, "http")

    threads = [threading.Thread(target=check_on_a_thread, args=(n,)) for n in (100, 250)]
    for thread in threads:
        thread.start()
    recorded.wait(5)
    for _ in range(7):
        metrics.record(allowed, 2.0, "http")  # this thread too, past the last bucket
    checks = "authz_checks_total"
    assert registry.get_sample_value(checks, {**labels, "door": "http"}) == 357
    assert registry.get_sample_value(checks, {**labels, "door": "grpc"}) is None
    bucket = "authz_check_duration_seconds_bucket"
    assert registry.get_sample_value(bucket, {**duration, "le": "0.0001"}) == 0
    assert registry.get_sample_value(bucket, {**duration, "le": "0.00015"}) == 350
    assert registry.get_sample_value(bucket, {**duration, "le": "1.0"}) == 350
    assert registry.get_sample_value(bucket, {**duration, "le": "+Inf"}) == 357
    go.set()
    for thread in threads:
        thread.join(5)
    # The second scrape adds only what grew, including the finished threads' last Checks.
    text = metrics.exposition().decode()
    assert 'authz_checks_total{decision="allow",door="http",policy="read"' in text
    assert registry.get_sample_value(checks, {**labels, "door": "http"}) == 359
    assert registry.get_sample_value(bucket, {**duration, "le": "0.5"}) == 352
    assert registry.get_sample_value(bucket, {**duration, "le": "+Inf"}) == 359
    total = registry.get_sample_value("authz_check_duration_seconds_sum", duration) or 0
    assert total == pytest.approx(350 * 0.00012 + 2 * 0.3 + 7 * 2.0)
    assert len(metrics._tallies) == 1  # the finished threads' tallies were added and let go


def test_dry_run_verdicts_are_counted_without_enforcing(
    tmp_path: Path,
    clock: Clock,
    metrics: Metrics,
    rsa_key: SigningKey,
    make_token: Callable[..., str],
) -> None:
    policies = (
        POLICIES
        + """
  - name: block-orders
    action: DENY
    dryRun: true
    rules: [{to: [{operation: {paths: ["/api/orders"]}}]}]
"""
    )
    service = make_service(
        tmp_path, clock, metrics, config_text(inline_provider(rsa_key), policies)
    )
    token = make_token()
    assert service.check(request(token)).allowed  # would deny, but only in dry run
    assert service.check(request(token)).allowed
    assert service.check(request(token, path="/api/other")).allowed
    registry = metrics.registry
    dry = "authz_dry_run_total"
    assert registry.get_sample_value(dry, {"policy": "block-orders", "would": "deny"}) == 2
    assert registry.get_sample_value(dry, {"policy": "block-orders", "would": "allow"}) == 1
    assert checks(registry, "allow", "allowed", "main", "read") == 3


def test_config_loaded_sets_the_info_gauge_for_the_current_hash_only(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.config_loaded("aaaa", reload=False)
    assert registry.get_sample_value("authz_config_info", {"hash": "aaaa"}) == 1
    # Both results exist from the start, at 0, so that the first failure is an increase.
    for result in ("success", "failure"):
        assert registry.get_sample_value("authz_config_reloads_total", {"result": result}) == 0
    first = registry.get_sample_value("authz_config_last_reload_success_timestamp_seconds")
    assert first is not None and first > 1e9

    metrics.config_loaded("bbbb", reload=True)
    assert registry.get_sample_value("authz_config_info", {"hash": "aaaa"}) is None
    assert registry.get_sample_value("authz_config_info", {"hash": "bbbb"}) == 1
    assert registry.get_sample_value("authz_config_reloads_total", {"result": "success"}) == 1
    last = registry.get_sample_value("authz_config_last_reload_success_timestamp_seconds")
    assert last is not None and last >= first


def test_reload_failures_are_counted_apart_from_successes(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    def last(result: str) -> float:
        value = registry.get_sample_value(f"authz_config_last_reload_{result}_timestamp_seconds")
        assert value is not None
        return value

    metrics.config_loaded("aaaa", reload=False)
    assert last("failure") == 0
    metrics.config_rejected()
    # The last attempt was refused: the reload alert compares these two.
    assert last("failure") >= last("success") > 0
    metrics.config_rejected()
    metrics.config_loaded("bbbb", reload=True)
    assert registry.get_sample_value("authz_config_reloads_total", {"result": "failure"}) == 2
    assert registry.get_sample_value("authz_config_reloads_total", {"result": "success"}) == 1
    # A refused configuration leaves the info gauge on the one in force.
    assert registry.get_sample_value("authz_config_info", {"hash": "bbbb"}) == 1


def test_scrape_time_collector_reads_token_cache_and_key_sets_of_a_real_engine(
    tmp_path: Path,
    metrics: Metrics,
    rsa_key: SigningKey,
    ec_key: SigningKey,
    make_token: Callable[..., str],
) -> None:
    jwks_file = tmp_path / "partner.json"
    jwks_file.write_text(json.dumps(devkeys.jwks(ec_key)))
    partner = f"""
  - name: partner
    issuer: https://partner.test
    jwksFile: {jwks_file.name}
"""
    down = """
  - name: down
    issuer: https://down.test
    jwksUri: http://127.0.0.1:9/jwks.json
    timeout: 200ms
"""
    settings = config.load(
        write_config(tmp_path, config_text(inline_provider(rsa_key) + partner + down))
    )
    key_clock = Clock(start=1000.0)
    caches = {
        p.name: JWKSCache(
            provider=p.name,
            allowed_algs=frozenset(p.spec.algorithms),
            source=source_for(p),
            clock=key_clock,
        )
        for p in settings.providers
    }
    engine = Engine(settings, caches)
    assert caches["main"].refresh() and caches["partner"].refresh()
    assert not caches["down"].refresh()
    jwks_file.write_text("{not json")
    key_clock.advance(42)
    assert not caches["partner"].refresh()  # keeps its keys, now stale

    service = AuthorizationService(engine, metrics=metrics)
    registry = metrics.registry
    current: list[Engine | None] = [None]
    metrics.watch_engine(lambda: current[0])
    assert registry.get_sample_value("authz_token_cache_hits_total") is None  # no engine yet
    current[0] = service.engine

    token = make_token()
    for _ in range(3):
        assert service.check(request(token)).allowed
    assert registry.get_sample_value("authz_token_cache_hits_total") == 2
    assert registry.get_sample_value("authz_token_cache_misses_total") == 1
    assert registry.get_sample_value("authz_token_cache_entries") == 1
    assert registry.get_sample_value("authz_token_cache_evictions_total") == 0

    def sample(name: str, provider: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"provider": provider, **labels})

    fetches = "authz_jwks_fetches_total"
    assert sample(fetches, "main", result="success") == 1
    assert sample(fetches, "main", result="failure") == 0
    assert sample(fetches, "partner", result="success") == 1
    assert sample(fetches, "partner", result="failure") == 1
    assert sample(fetches, "down", result="failure") == 1
    assert sample("authz_jwks_keys", "main") == 1
    assert sample("authz_jwks_keys", "partner") == 1
    assert sample("authz_jwks_keys", "down") == 0
    assert sample("authz_jwks_stale_seconds", "main") == 0
    assert sample("authz_jwks_stale_seconds", "partner") == 42
    assert sample("authz_jwks_stale_seconds", "down") == 0
    # maxStale beside the staleness, so an alert can say "80% of the way to 503s".
    assert sample("authz_jwks_max_stale_seconds", "partner") == 86400
    last = sample("authz_jwks_last_success_timestamp_seconds", "main")
    assert last is not None and last > 1e9
    assert sample("authz_jwks_last_success_timestamp_seconds", "down") is None


def test_exposition_is_valid_prometheus_text(
    service: AuthorizationService, metrics: Metrics, make_token: Callable[..., str]
) -> None:
    metrics.config_loaded("cafe", reload=False)
    service.check(request(make_token()))
    service.check(request())
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    for name, kind in {
        "authz_check_duration_seconds": "histogram",
        "authz_checks": "counter",
        "authz_config_info": "gauge",
        "authz_token_cache_hits": "counter",
        "authz_jwks_keys": "gauge",
        "process_cpu_seconds": "counter",
        "python_info": "gauge",
        "python_gc_objects_collected": "counter",
    }.items():
        assert families[name].type == kind, name
    allowed = [
        s
        for s in families["authz_checks"].samples
        if s.name == "authz_checks_total" and s.labels["decision"] == "allow"
    ]
    assert [(s.labels, s.value) for s in allowed] == [
        (
            {
                "decision": "allow",
                "reason": "allowed",
                "provider": "main",
                "policy": "read",
                "door": "grpc",
            },
            1.0,
        )
    ]


def test_standard_process_and_python_collectors_are_registered(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    assert registry.get_sample_value("process_cpu_seconds_total") is not None
    assert (registry.get_sample_value("process_resident_memory_bytes") or 0) > 0
    gc = registry.get_sample_value("python_gc_objects_collected_total", {"generation": "0"})
    assert gc is not None
    assert any(f.name == "python_info" for f in registry.collect())


def test_supervisor_reports_restarts_and_the_cpu_and_memory_of_its_workers() -> None:
    """Under --workers the process collectors are off: the supervisor's collector counts the
    workers' CPU and memory, and keeps an exited worker's CPU (no counter reset on a restart)."""
    # NOTE: burns 0.2 s of its own CPU whatever the processor's speed (a fixed sum took less
    # than the 0.05 s awaited below on a fast core, and the test timed out).
    burn = (
        "import sys, time\n"
        "start = time.process_time()\n"
        "while time.process_time() - start < 0.2: pass\n"
        "sys.stdin.read()"
    )
    worker = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE)
    restarts = [0]
    pids = [worker.pid]
    registry = CollectorRegistry()
    registry.register(SupervisorCollector(lambda: restarts[0], lambda: pids))

    def worker_cpu() -> float:
        fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    try:
        wait_until(lambda: worker_cpu() >= 0.05, timeout=20, what="the worker's CPU")
        own = resource.getrusage(resource.RUSAGE_SELF)
        with_worker = registry.get_sample_value("process_cpu_seconds_total")
        assert with_worker is not None
        assert with_worker >= own.ru_utime + own.ru_stime + worker_cpu() - 0.01
        memory = registry.get_sample_value("process_resident_memory_bytes")
        worker_rss = int(Path(f"/proc/{worker.pid}/statm").read_text().split()[1])
        assert memory is not None and memory > worker_rss * os.sysconf("SC_PAGE_SIZE")
    finally:
        assert worker.stdin is not None
        worker.stdin.close()
        worker.wait(10)
    # The supervisor reaped it and restarted another: its CPU stays in the total.
    pids.clear()
    restarts[0] = 1
    assert (registry.get_sample_value("process_cpu_seconds_total") or 0) >= with_worker
    assert registry.get_sample_value("authz_worker_restarts_total") == 1
