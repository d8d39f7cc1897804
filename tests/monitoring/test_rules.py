"""The alert rules under promtool: they load (`promtool check rules`), and each alert fires on
the series it is about and stays quiet on a nearby case (`promtool test rules`).

The cases are written here, one function per alert; the test writes them as promtool's unit
test file beside a copy of the rules and runs promtool on it. Expected annotations are the
source's own, with ``$labels`` filled in, so a template that names a label the alert does not
carry fails (promtool would print ``<no value>``).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring.prometheus import MONITORING, generator, tool

RULES = MONITORING / "rules.yaml"
POD = {"namespace": "authz-system", "job": "authz-server", "instance": "10.0.0.1:9090"}
POD_B = {**POD, "instance": "10.0.0.2:9090"}
SERVICE = {k: POD[k] for k in ("namespace", "job")}


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    selector = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def _alert(name: str) -> Any:
    (alert,) = [a for a in generator().ALERTS if a.name == name]
    return alert


def render(template: str, labels: dict[str, str]) -> str:
    """``template`` with ``{{ $labels.x }}`` filled in; KeyError for a label not there."""
    return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], template)


def fires(alert: str, at: str, *label_sets: dict[str, str]) -> dict[str, Any]:
    """At ``at``, ``alert`` fires exactly once per label set (none: it does not fire)."""
    source = _alert(alert)
    expected = []
    for labels in label_sets:
        expected.append(
            {
                "exp_labels": {**labels, "severity": source.severity},
                "exp_annotations": {
                    "summary": render(source.summary, labels),
                    "description": render(source.description, labels),
                },
            }
        )
    return {"eval_time": at, "alertname": alert, "exp_alerts": expected}


def quiet(alert: str, at: str) -> dict[str, Any]:
    return fires(alert, at)


def case_group(*inputs: dict[str, str], tests: list[dict[str, Any]]) -> dict[str, Any]:
    return {"interval": "1m", "input_series": list(inputs), "alert_rule_test": tests}


# ---------------------------------------------------------------------------- the cases


def key_set_refresh_failing() -> list[dict[str, Any]]:
    corp = {**POD, "provider": "corp"}
    return [
        # Failing since minute 1: 900s stale at 16m (not yet "more than"), 960s at 17m.
        case_group(
            series("authz_jwks_stale_seconds", corp, "0 0 60+60x20"),
            series("authz_jwks_stale_seconds", {**POD, "provider": "ok"}, "0x22"),
            tests=[
                quiet("AuthzKeySetRefreshFailing", "16m"),
                fires("AuthzKeySetRefreshFailing", "17m", {**SERVICE, "provider": "corp"}),
            ],
        )
    ]


def keys_near_max_stale() -> list[dict[str, Any]]:
    corp = {**POD, "provider": "corp"}
    return [
        # maxStale 30m; stale since 0: 80% exactly at 24m, past it at 25m. The other pod is
        # fresh: the alert speaks for the stalest pod.
        case_group(
            series("authz_jwks_stale_seconds", corp, "0+60x30"),
            series("authz_jwks_max_stale_seconds", corp, "1800x30"),
            series("authz_jwks_stale_seconds", {**POD_B, "provider": "corp"}, "0x30"),
            series("authz_jwks_max_stale_seconds", {**POD_B, "provider": "corp"}, "1800x30"),
            tests=[
                quiet("AuthzKeysNearMaxStale", "24m"),
                fires("AuthzKeysNearMaxStale", "25m", {**SERVICE, "provider": "corp"}),
            ],
        )
    ]


def provider_without_keys() -> list[dict[str, Any]]:
    corp = {**POD, "provider": "corp"}
    return [
        # Keys gone at 2m: pending for a minute, firing at 3m; a provider with one key is fine.
        case_group(
            series("authz_jwks_keys", corp, "2 2 0x10"),
            series("authz_jwks_keys", {**POD, "provider": "ok"}, "1x12"),
            tests=[
                quiet("AuthzProviderWithoutKeys", "2m"),
                fires("AuthzProviderWithoutKeys", "3m", corp),
            ],
        )
    ]


def introspection_failing() -> list[dict[str, Any]]:
    opaque = {**POD, "provider": "opaque"}
    calls = "authz_introspection_calls_total"
    return [
        # 10 calls a minute answered; from 2m on, 1 a minute times out (10% > 5%): pending
        # for 5 minutes after the rate window sees it. Another provider with 1 failure in 100
        # a minute (1%) stays quiet.
        case_group(
            series(calls, {**opaque, "result": "active"}, "0+10x20"),
            series(calls, {**opaque, "result": "timeout"}, "0 0 0+1x18"),
            series(calls, {**POD, "provider": "ok", "result": "active"}, "0+100x20"),
            series(calls, {**POD, "provider": "ok", "result": "http_error"}, "0+1x20"),
            tests=[
                quiet("AuthzIntrospectionFailing", "4m"),
                fires("AuthzIntrospectionFailing", "12m", {**SERVICE, "provider": "opaque"}),
            ],
        )
    ]


def config_reload_refused() -> list[dict[str, Any]]:
    return [
        # Loaded at 1000s; a change refused at 3m: firing after 5 minutes.
        case_group(
            series("authz_config_last_reload_success_timestamp_seconds", POD, "1000x20"),
            series("authz_config_last_reload_failure_timestamp_seconds", POD, "0 0 0 1200x17"),
            tests=[
                quiet("AuthzConfigReloadRefused", "7m"),
                fires("AuthzConfigReloadRefused", "8m", POD),
            ],
        ),
        # Refused, then fixed a minute later: never fires.
        case_group(
            series(
                "authz_config_last_reload_success_timestamp_seconds", POD, "1000 1000 1000 1260x17"
            ),
            series("authz_config_last_reload_failure_timestamp_seconds", POD, "0 0 0 1200x17"),
            tests=[quiet("AuthzConfigReloadRefused", "10m")],
        ),
    ]


def config_diverged() -> list[dict[str, Any]]:
    def info(pod: dict[str, str], digest: str, values: str) -> dict[str, str]:
        return series("authz_config_info", {**pod, "hash": digest}, values)

    return [
        # Pod B moves to bbbb at 2m (aaaa drops to 0, as under --workers); pod A stays.
        case_group(
            info(POD, "aaaa", "1x30"),
            info(POD_B, "aaaa", "1 1 0x28"),
            info(POD_B, "bbbb", "_ _ 1x28"),
            tests=[
                quiet("AuthzConfigDiverged", "16m"),
                fires("AuthzConfigDiverged", "17m", SERVICE),
            ],
        ),
        # A rollout: pod A follows at 10m, before 15 minutes pass.
        case_group(
            info(POD, "aaaa", "1x10 0x20"),
            info(POD, "bbbb", "_x10 1x20"),
            info(POD_B, "aaaa", "1 1 0x28"),
            info(POD_B, "bbbb", "_ _ 1x28"),
            tests=[quiet("AuthzConfigDiverged", "25m")],
        ),
    ]


def _checks(job: str, reason: str, allow: str, deny: str) -> list[dict[str, str]]:
    labels = {**POD, "job": job, "provider": "corp", "door": "grpc"}
    return [
        series(
            "authz_checks_total",
            {**labels, "decision": "allow", "reason": "allowed", "policy": "api"},
            allow,
        ),
        series(
            "authz_checks_total",
            {**labels, "decision": "deny", "reason": reason, "policy": ""},
            deny,
        ),
    ]


# 10 Checks/s allowed; denials at 0.1/s for an hour, then 5/s (1% -> 33%).
ALLOWED = "0+600x120"
JUMP = "0+6x60 660+300x59"
# 7/s allowed, 3/s denied all along (30%, no jump).
STEADY_ALLOWED, STEADY_DENIED = "0+420x120", "0+180x120"
# The same jump on 0.05 allowed/s: too little traffic to judge.
QUIET_ALLOWED, QUIET_JUMP = "0+3x120", "0x60 6+6x59"


def deny_ratio_jump() -> list[dict[str, Any]]:
    return [
        case_group(
            *_checks("authz-server", "no_allow_policy_matched", ALLOWED, JUMP),
            tests=[
                quiet("AuthzDenyRatioJump", "58m"),
                fires("AuthzDenyRatioJump", "70m", SERVICE),
            ],
        ),
        case_group(
            *_checks("authz-server", "policy_denied", STEADY_ALLOWED, STEADY_DENIED),
            *_checks("authz-quiet", "policy_denied", QUIET_ALLOWED, QUIET_JUMP),
            tests=[quiet("AuthzDenyRatioJump", "70m")],
        ),
    ]


def unauthenticated_jump() -> list[dict[str, Any]]:
    return [
        # A key rotation the server missed: unknown_kid jumps (401).
        case_group(
            *_checks("authz-server", "unknown_kid", ALLOWED, JUMP),
            tests=[fires("AuthzUnauthenticatedJump", "70m", SERVICE)],
        ),
        # The same jump of 403s is a deny-ratio jump, not a 401 one.
        case_group(
            *_checks("authz-server", "policy_denied", ALLOWED, JUMP),
            tests=[quiet("AuthzUnauthenticatedJump", "70m")],
        ),
    ]


def _histogram(job: str, le_counts: dict[str, int]) -> list[dict[str, str]]:
    labels = {**POD, "job": job, "decision": "allow", "door": "grpc"}
    return [
        series("authz_check_duration_seconds_bucket", {**labels, "le": le}, f"0+{count}x20")
        for le, count in le_counts.items()
    ]


def check_latency_high() -> list[dict[str, Any]]:
    # 1000 Checks a minute; 5% between 250ms and 500ms: p99 about 450ms.
    slow = {"0.001": 950, "0.25": 950, "0.5": 1000, "1.0": 1000, "+Inf": 1000}
    # 0.5% there: p99 about 220ms, under the 250ms budget.
    fine = {"0.001": 950, "0.25": 995, "0.5": 1000, "1.0": 1000, "+Inf": 1000}
    return [
        case_group(
            *_histogram("authz-server", slow),
            *_histogram("authz-fine", fine),
            tests=[
                quiet("AuthzCheckLatencyHigh", "10m"),
                fires("AuthzCheckLatencyHigh", "12m", SERVICE),
            ],
        ),
        case_group(
            *_histogram("authz-server", fine), tests=[quiet("AuthzCheckLatencyHigh", "12m")]
        ),
    ]


def no_checks() -> list[dict[str, Any]]:
    count = "authz_check_duration_seconds_count"
    labels = {"decision": "allow", "door": "grpc"}
    pod_c = {**POD, "instance": "10.0.0.3:9090"}
    return [
        case_group(
            series(count, {**POD, **labels}, "0x40"),  # never a Check
            series(count, {**POD_B, **labels}, "0+100x40"),  # busy
            series(count, {**pod_c, **labels}, "0+10x5 50x35"),  # idle since 5m: not 25m yet
            tests=[
                quiet("AuthzNoChecks", "15m"),
                fires("AuthzNoChecks", "20m", POD),
            ],
        )
    ]


def worker_restarting() -> list[dict[str, Any]]:
    return [
        case_group(
            series("authz_worker_restarts_total", POD, "0 0 0 1x30"),
            series("authz_worker_restarts_total", POD_B, "0x33"),
            tests=[
                quiet("AuthzWorkerRestarting", "2m"),
                fires("AuthzWorkerRestarting", "5m", POD),
                # 15 minutes after the restart, with none since: quiet again.
                quiet("AuthzWorkerRestarting", "20m"),
            ],
        )
    ]


def replay_cache_unavailable() -> list[dict[str, Any]]:
    fapi = {**POD, "provider": "fapi", "door": "grpc", "decision": "deny", "policy": ""}
    return [
        # Redis down from minute 5 on: 503s for two minutes before it fires; other 401s of
        # DPoP (a replayed proof) never make it fire.
        case_group(
            series(
                "authz_checks_total", {**fapi, "reason": "replay_cache_unavailable"}, "0x5 0+60x15"
            ),
            series("authz_checks_total", {**fapi, "reason": "dpop_proof_replayed"}, "0+30x20"),
            tests=[
                quiet("AuthzReplayCacheUnavailable", "6m"),
                fires("AuthzReplayCacheUnavailable", "9m", {**SERVICE, "provider": "fapi"}),
            ],
        ),
        case_group(
            series("authz_checks_total", {**fapi, "reason": "dpop_proof_replayed"}, "0+30x20"),
            tests=[quiet("AuthzReplayCacheUnavailable", "15m")],
        ),
    ]


CASES = {
    "AuthzKeySetRefreshFailing": key_set_refresh_failing,
    "AuthzKeysNearMaxStale": keys_near_max_stale,
    "AuthzProviderWithoutKeys": provider_without_keys,
    "AuthzIntrospectionFailing": introspection_failing,
    "AuthzConfigReloadRefused": config_reload_refused,
    "AuthzConfigDiverged": config_diverged,
    "AuthzDenyRatioJump": deny_ratio_jump,
    "AuthzUnauthenticatedJump": unauthenticated_jump,
    "AuthzCheckLatencyHigh": check_latency_high,
    "AuthzNoChecks": no_checks,
    "AuthzWorkerRestarting": worker_restarting,
    "AuthzReplayCacheUnavailable": replay_cache_unavailable,
}


# ------------------------------------------------------------------------------- the tests


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def test_promtool_accepts_the_rules_file() -> None:
    result = run([tool("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(generator().ALERTS)} rules found" in result.stdout


def test_every_alert_has_a_firing_case_and_a_quiet_nearby_case() -> None:
    assert sorted(CASES) == sorted(a.name for a in generator().ALERTS)
    for alert, cases in CASES.items():
        evaluations = [t for group in cases() for t in group["alert_rule_test"]]
        assert {t["alertname"] for t in evaluations} == {alert}, alert
        assert any(t["exp_alerts"] for t in evaluations), f"{alert}: no case where it fires"
        assert any(not t["exp_alerts"] for t in evaluations), f"{alert}: no case where it does not"


def test_every_alert_fires_on_its_case_and_not_on_the_nearby_one(tmp_path: Path) -> None:
    # NOTE: one promtool run for all the cases (about 0.5s each as separate runs); a failure
    # names the alert and the evaluation time.
    (tmp_path / "rules.yaml").write_text(RULES.read_text())
    tests = [group for cases in CASES.values() for group in cases()]
    unit = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit, sort_keys=False))
    result = run([tool("promtool"), "test", "rules", "test.yaml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_annotations_use_labels_only_and_every_alert_says_what_to_do() -> None:
    for alert in generator().ALERTS:
        for text in (alert.summary, alert.description):
            templates = re.findall(r"\{\{.*?\}\}", text, flags=re.DOTALL)
            assert all(re.fullmatch(r"\{\{\s*\$labels\.\w+\s*\}\}", t) for t in templates), text
        assert alert.severity in ("warning", "critical")
        assert len(alert.description) > 150, f"{alert.name}: say what to do"


def test_a_missing_promtool_fails_the_tests_saying_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(AssertionError, match=r"`promtool` not found.*make monitoring-tools"):
        tool("promtool")
