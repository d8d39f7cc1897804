"""End to end: the dashboard and the alert rules against a real Prometheus scraping the server.

One story, run once for the module: the server under ``--workers 2`` behind a real Envoy;
Envoy traffic with valid, forged, malformed and missing tokens, allowed, denied and
dry-run-denied, and DPoP requests while the replay cache's Redis is away (503); a
configuration reload; a key set outage (the JWKS endpoint answers 500); a refused reload.
Prometheus scrapes every second with the rules file loaded. Then every query of the dashboard
and every alert expression goes through Prometheus' HTTP query API: each must parse and return
data, so a query that names a metric or a label the server does not export fails here.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from authz_server.tools import devkeys
from tests.e2e.harness import TOKEN_LEDGER, wait_until
from tests.helpers import claims_for
from tests.monitoring.prometheus import MONITORING, dashboard_exprs, for_grafana, rule_exprs
from tests.monitoring.stack import (
    JOB,
    NAMESPACE,
    PROVIDER,
    REFUSED,
    MonitoredStack,
    monitored_stack,
)

pytestmark = pytest.mark.e2e

DASHBOARD = json.loads((MONITORING / "dashboard.json").read_text())
RULES = yaml.safe_load((MONITORING / "rules.yaml").read_text())
# What Grafana puts in place of the dashboard's variables; 5m spans the whole story.
VARIABLES = {"$__rate_interval": "5m", "$namespace": NAMESPACE, "$job": JOB}
_COMPARISON = re.compile(r" (==|!=|>=|<=|>|<) (?!bool )")


def probe(expr: str) -> str:
    """``expr`` with every comparison made a ``bool`` one: instead of the series the alert
    fires for, every series it compares (1 where it would fire, 0 where not)."""
    return _COMPARISON.sub(r" \1 bool ", expr)


def panel(title: str) -> list[str]:
    """The queries of the dashboard panel ``title``, variables replaced."""
    exprs = [
        for_grafana(expr, VARIABLES) for name, expr in dashboard_exprs(DASHBOARD) if name == title
    ]
    assert exprs, f"no panel {title!r}"
    return exprs


@dataclass
class Story:
    stack: MonitoredStack
    digest: str
    statuses: dict[str, list[int]]

    def series(self, expr: str) -> dict[str, float]:
        """{the labels of each series, as text: value} of ``expr`` now."""
        return {
            ",".join(f"{k}={v}" for k, v in sorted(s["metric"].items())): float(s["value"][1])
            for s in self.stack.prometheus.vector(expr)
        }

    def by(self, label: str, expr: str) -> dict[str, float]:
        return {
            s["metric"].get(label, ""): float(s["value"][1])
            for s in self.stack.prometheus.vector(expr)
        }


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    workdir = tmp_path_factory.mktemp("monitoring-e2e")
    with monitored_stack(workdir) as stack:
        prometheus = stack.prometheus
        valid = stack.token()
        forged = devkeys.generate_key("RSA", kid="monitoring").sign(claims_for(time.time()))
        traffic: dict[str, tuple[str, str | None, int]] = {
            "allowed": ("/api/orders", valid, 6),
            "dry-run denied": ("/api/admin", valid, 3),
            "no policy": ("/other", valid, 3),
            "forged": ("/api/orders", forged, 3),
            "malformed": ("/api/orders", "not-a-jwt", 2),
            "missing": ("/api/orders", None, 3),
        }
        # One of each first: rate() sees a counter move only after its first sample, so
        # Prometheus scrapes every new series before the rest of the traffic.
        statuses = {name: [stack.status(path, token)] for name, (path, token, _) in traffic.items()}
        # A DPoP request while the replay cache's Redis is away: 503, the others unaffected.
        statuses["replay cache down"] = [stack.dpop_status("/api/orders")]
        prometheus.wait_for(f'count(authz_checks_total{{job="{JOB}"}}) == 6')
        prometheus.wait_for(f'authz_dry_run_total{{job="{JOB}", would="deny"}}')
        for name, (path, token, count) in traffic.items():
            statuses[name] += [stack.status(path, token) for _ in range(count - 1)]
        statuses["replay cache down"] += [stack.dpop_status("/api/orders") for _ in range(2)]
        # Opaque tokens (one active, asked once then cached; new ones while the IdP fails:
        # 503) and an API key. As above, each new series is scraped before it moves again.
        opaque = secrets.token_urlsafe(32)
        TOKEN_LEDGER.saw_token(opaque)
        stack.idp.active(opaque, iss="https://idp.monitoring", sub="svc")

        def with_opaque(token: str) -> int:
            return stack.status_with("/api/orders", {"x-opaque-token": token})

        statuses["opaque token"] = [with_opaque(opaque)]
        prometheus.wait_for(f'authz_introspection_cache_misses_total{{job="{JOB}"}}')
        # NOTE: each worker process has its own cache: a few requests make sure that some
        # land on a worker that already asked.
        statuses["opaque token"] += [with_opaque(opaque) for _ in range(4)]
        prometheus.wait_for(f'authz_introspection_cache_hits_total{{job="{JOB}"}}')
        statuses["opaque token"] += [with_opaque(opaque) for _ in range(4)]
        statuses["api key"] = [
            stack.status_with("/api/orders", {"x-api-key": stack.api_key}) for _ in range(3)
        ]
        stack.idp.fail(status=500)
        statuses["idp failing"] = [with_opaque(secrets.token_urlsafe(32))]
        prometheus.wait_for(
            f'authz_checks_total{{job="{JOB}", reason="introspection_unavailable"}}'
        )
        statuses["idp failing"].append(with_opaque(secrets.token_urlsafe(32)))
        stack.idp.recover()
        prometheus.wait_for(
            f'authz_introspection_calls_total{{job="{JOB}", result="http_error"}} >= 2'
        )
        digest = stack.reload_and_wait(stack.config_text(["/api/admin*", "/api/internal*"]))
        stack.break_key_set()
        statuses["allowed on stale keys"] = [stack.status("/api/orders", valid) for _ in range(3)]
        stack.refuse(REFUSED)
        # The refused reload came last: once Prometheus has it, it has everything before.
        prometheus.wait_for(
            "authz_config_last_reload_failure_timestamp_seconds"
            " > authz_config_last_reload_success_timestamp_seconds"
        )
        yield Story(stack, digest, statuses)


def test_the_story_happened_as_told(story: Story) -> None:
    assert story.statuses == {
        "allowed": [200] * 6,
        "dry-run denied": [200] * 3,
        "no policy": [403] * 3,
        "forged": [401] * 3,
        "malformed": [401] * 2,
        "missing": [401] * 3,
        "allowed on stale keys": [200] * 3,
        "replay cache down": [503] * 3,
        "opaque token": [200] * 9,
        "api key": [200] * 3,
        "idp failing": [503] * 2,
    }


def test_every_dashboard_query_parses_and_returns_data(story: Story) -> None:
    queries = [(title, for_grafana(expr, VARIABLES)) for title, expr in dashboard_exprs(DASHBOARD)]
    assert len(queries) >= 20
    for title, expr in queries:
        answer = story.stack.prometheus.query(expr)
        assert answer["status"] == "success", f"{title}: {expr}: {answer.get('error')}"

    def empty() -> list[str]:
        return [f"{t}: {e}" for t, e in queries if not story.stack.prometheus.vector(e)]

    # NOTE: polled, in case a series born late still lacks the second sample rate() needs.
    try:
        wait_until(lambda: not empty(), timeout=15, interval=0.5, what="data for every panel")
    except AssertionError:
        pytest.fail("dashboard queries without data:\n" + "\n".join(empty()))


def test_every_alert_expression_parses_and_sees_the_series_it_compares(story: Story) -> None:
    alerts = rule_exprs(RULES)
    assert len(alerts) == 12
    blind = []
    for name, expr in alerts:
        answer = story.stack.prometheus.query(expr)
        assert answer["status"] == "success", f"{name}: {expr}: {answer.get('error')}"
        if not story.stack.prometheus.vector(probe(expr)):
            blind.append(f"{name}: {probe(expr)}")
    assert not blind, "alert expressions that see no series:\n" + "\n".join(blind)


def test_probe_turns_every_comparison_into_a_bool_one() -> None:
    assert probe("a > 0.8") == "a > bool 0.8"
    assert probe('x{a="b"} == 0 and y >= bool 2') == 'x{a="b"} == bool 0 and y >= bool 2'
    assert probe('rate(x{a=~"b"}[5m])\n  > 2 * y') == 'rate(x{a=~"b"}[5m])\n  > bool 2 * y'


def test_the_refused_reload_fires_the_reload_alert_condition(story: Story) -> None:
    (expr,) = [e for n, e in rule_exprs(RULES) if n == "AuthzConfigReloadRefused"]
    assert story.by("job", expr).keys() == {JOB}
    assert story.by("refused", panel("Pods whose last reload was refused")[0]) == {"": 1}


def test_prometheus_evaluates_every_rule_without_error(story: Story) -> None:
    def health() -> dict[str, tuple[str, str]]:
        groups = story.stack.prometheus.api("rules")["data"]["groups"]
        return {
            rule["name"]: (rule["health"], rule.get("lastError", ""))
            for group in groups
            for rule in group["rules"]
        }

    names = {name for name, _ in rule_exprs(RULES)}
    wait_until(
        lambda: health().keys() == names and all(h == "ok" for h, _ in health().values()),
        timeout=15,
        interval=0.5,
        what=f"every rule evaluated: {health()}",
    )


def test_dashboard_variables_find_the_namespace_and_the_job(story: Story) -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["namespace"]["definition"] == "label_values(authz_config_info, namespace)"
    prometheus = story.stack.prometheus
    namespaces = prometheus.api("label/namespace/values", **{"match[]": "authz_config_info"})
    assert namespaces["data"] == [NAMESPACE]
    jobs = prometheus.api(
        "label/job/values", **{"match[]": f'authz_config_info{{namespace=~"{NAMESPACE}"}}'}
    )
    assert jobs["data"] == [JOB]


def test_the_decision_panels_show_each_kind_of_request(story: Story) -> None:
    decisions = story.series(panel("Decisions per second")[0])
    reasons = {key.split("reason=")[1] for key in decisions}
    assert reasons == {
        "allowed",
        "no_allow_policy_matched",
        "invalid_signature",
        "malformed_token",
        "missing_credentials",
        "replay_cache_unavailable",
        "introspection_unavailable",
    }
    assert all(rate > 0 for rate in decisions.values()), decisions
    assert story.by("policy", panel("Dry-run: would deny, per policy")[0])["block-admin"] > 0
    doors = story.by("door", panel("Checks per second by door")[0])
    assert doors["grpc"] > 0 and doors["http"] == 0
    (deny_ratio,) = story.by("", panel("Deny ratio")[0]).values()
    assert 0.2 < deny_ratio < 0.7  # after the first of each: 8 of 18 Checks
    (hit_ratio,) = story.by("", panel("Token cache hit ratio")[0]).values()
    assert hit_ratio > 0  # the same valid token, again and again
    p50, p90, p99 = (story.by("", expr)[""] for expr in panel("Check latency"))
    assert 0 < p50 <= p90 <= p99 < 1


def test_the_credential_panels_show_introspection_and_api_keys(story: Story) -> None:
    calls = story.by("result", panel("Introspection calls by result")[0])
    assert set(calls) == {"active", "http_error"} | ({"inactive"} & set(calls))
    assert story.by("provider", panel("API keys loaded")[0]) == {"keys": 1}
    (hit_ratio,) = story.by("provider", panel("Introspection cache hit ratio")[0]).values()
    assert 0 < hit_ratio < 1  # the active token asked once, then answered from the cache


def test_the_key_set_panels_show_the_outage(story: Story) -> None:
    failures = story.by("provider", panel("Key set fetch failures")[0])
    assert failures[PROVIDER] > 0
    stale = story.by("provider", panel("Staleness, share of maxStale")[0])
    assert 0 < stale[PROVIDER] < 0.5  # seconds of a 10m maxStale: still serving
    assert story.by("provider", panel("Usable keys")[0]) == {PROVIDER: 1}
    age = story.by("provider", panel("Key set age")[0])
    assert age[PROVIDER] > 0


def test_the_configuration_and_process_panels_show_the_reload_and_the_processes(
    story: Story,
) -> None:
    assert story.by("hash", panel("Configuration in force")[0]) == {story.digest: 1}
    reloads = story.by("result", panel("Configuration reloads")[0])
    assert reloads["success"] > 0 and reloads["failure"] > 0
    # No worker died here (tests/e2e/test_workers.py kills one): the panel shows a 0.
    assert list(story.by("instance", panel("Worker restarts")[0]).values()) == [0]
    (cpu,) = story.by("instance", panel("CPU per pod")[0]).values()
    assert cpu > 0
    (memory,) = story.by("instance", panel("Memory per pod")[0]).values()
    assert memory > 3 * 20e6  # a supervisor and two workers, each a Python with grpc loaded
