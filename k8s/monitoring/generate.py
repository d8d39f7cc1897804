"""The one source of k8s/monitoring/: the Grafana dashboard and the alert rules.

Edit the panels and alerts here, then write the files (``make monitoring`` also runs promtool)::

    python k8s/monitoring/generate.py           # write the files below
    python k8s/monitoring/generate.py --check   # exit 1 when a file is not what this source makes

``rules.yaml`` is a plain Prometheus rules file (``rule_files:``); ``prometheusrule.yaml`` holds
the same groups as a prometheus-operator ``PrometheusRule``, so the two cannot drift.

Expressions are written for ``tests/monitoring/``: every one is run against a real Prometheus
scraping a real server. Alert conditions compare with `` > ``, `` >= ``, `` == `` (spaced), so
the test can turn each comparison into a ``bool`` one and see every series the alert looks at.
Annotations use ``$labels`` only, never ``$value``, so promtool's unit tests can state them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------ thresholds

# The Check p99 budget: a fraction of Envoy's ext_authz timeout (the examples use 1s; Istio's
# default is 600ms), so the alert fires before Envoy starts answering 403/503 on its own.
CHECK_P99_BUDGET_SECONDS = 0.25
# Keys still served this long after refreshes started failing: the IdP is down or unreachable.
KEYS_STALE_WARNING_SECONDS = 900
# Share of maxStale after which the keys are about to be dropped (then 503s).
MAX_STALE_SHARE = 0.8
# A ratio "jumps" when its 5m value is above FACTOR x its 1h value + MARGIN, on enough traffic.
JUMP_FACTOR = 2
JUMP_MARGIN = 0.05
MIN_CHECKS_PER_SECOND = 0.2

# The reasons that are answered 401 (docs/reference.md, "Reasons"; a test keeps them equal).
UNAUTHENTICATED_REASONS = (
    "missing_credentials",
    "ambiguous_credentials",
    "ambiguous_cookie",
    "ambiguous_query",
    "malformed_token",
    "unsupported_algorithm",
    "unknown_kid",
    "invalid_signature",
    "token_expired",
    "token_not_yet_valid",
    "invalid_issuer",
    "invalid_audience",
    "missing_claim",
    "token_inactive",
    "malformed_api_key",
    "unknown_api_key",
    "api_key_expired",
    # Sender-constrained tokens (docs/sender-constrained.md).
    "invalid_dpop_proof",
    "dpop_proof_replayed",
    "use_dpop_nonce",
    "bound_token_without_proof",
    "certificate_mismatch",
)
# Share of an introspection provider's calls that fail (no usable answer: its tokens get 503).
INTROSPECTION_FAILURE_SHARE = 0.05

# -------------------------------------------------------------------------------- alerts


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str


def _ratio(selector: str, window: str, by: str = "namespace, job") -> str:
    """Share of Checks matching ``selector`` over ``window``, per ``by``."""
    return (
        f"sum by ({by}) (rate(authz_checks_total{{{selector}}}[{window}]))"
        f" / sum by ({by}) (rate(authz_checks_total[{window}]))"
    )


def _jump(selector: str) -> str:
    """The 5m share of ``selector`` against its own 1h baseline, on enough traffic."""
    return (
        f"({_ratio(selector, '5m')})\n"
        f"  > {JUMP_FACTOR} * ({_ratio(selector, '1h')}) + {JUMP_MARGIN}\n"
        f"and sum by (namespace, job) (rate(authz_checks_total[5m])) > {MIN_CHECKS_PER_SECOND}"
    )


_UNAUTHENTICATED = 'reason=~"' + "|".join(UNAUTHENTICATED_REASONS) + '"'

ALERTS = (
    Alert(
        name="AuthzKeySetRefreshFailing",
        expr=(
            "max by (namespace, job, provider) (authz_jwks_stale_seconds)"
            f" > {KEYS_STALE_WARNING_SECONDS}"
        ),
        for_="0m",
        severity="warning",
        summary="Keys of provider {{ $labels.provider }} have not refreshed for 15 minutes",
        description=(
            "authz-server ({{ $labels.namespace }}/{{ $labels.job }}) cannot load the key set "
            "of provider {{ $labels.provider }}: it keeps serving the last good keys, and drops "
            "them when maxStale passes (then that provider's tokens get 503). The server logs "
            "say why ('key set load from ... failed'): the IdP is down, or egress, DNS or its "
            "CA (caFile) is wrong. A key the IdP rotated in meanwhile is unknown: its tokens get "
            "401 unknown_kid."
        ),
    ),
    Alert(
        name="AuthzKeysNearMaxStale",
        expr=(
            "max by (namespace, job, provider) "
            "(authz_jwks_stale_seconds / authz_jwks_max_stale_seconds)"
            f" > {MAX_STALE_SHARE}"
        ),
        for_="0m",
        severity="critical",
        summary=(
            "Keys of provider {{ $labels.provider }} are stale, past 80% of maxStale: 503s are near"
        ),
        description=(
            "The key set of provider {{ $labels.provider }} has not refreshed for more than "
            "80% of its maxStale ({{ $labels.namespace }}/{{ $labels.job }}). When maxStale "
            "passes, the keys are dropped: every token of that provider gets 503 "
            "jwks_unavailable and the pods turn unready. Restore the IdP or the path to it now "
            "(the server logs name the error); raising maxStale and reloading buys time."
        ),
    ),
    Alert(
        name="AuthzProviderWithoutKeys",
        expr="authz_jwks_keys == 0",
        for_="1m",
        severity="critical",
        summary="Provider {{ $labels.provider }} has no keys on {{ $labels.instance }}: 503s",
        description=(
            "Tokens of provider {{ $labels.provider }} get 503 jwks_unavailable on "
            "{{ $labels.instance }} and the pod is unready: its keys never loaded, or stayed "
            "stale past maxStale. /readyz on the pod's side port names the error; see "
            "docs/troubleshooting.md, '/readyz says not ready'."
        ),
    ),
    Alert(
        name="AuthzIntrospectionFailing",
        expr=(
            "sum by (namespace, job, provider) "
            '(rate(authz_introspection_calls_total{result!~"active|inactive"}[5m]))\n'
            "  / sum by (namespace, job, provider) (rate(authz_introspection_calls_total[5m]))"
            f"\n  > {INTROSPECTION_FAILURE_SHARE}"
        ),
        for_="5m",
        severity="critical",
        summary="Introspection for provider {{ $labels.provider }} is failing: 503s",
        description=(
            "More than 5% of the calls authz-server ({{ $labels.namespace }}/{{ $labels.job }}) "
            "makes to the introspection endpoint of provider {{ $labels.provider }} get no "
            "usable answer, so opaque tokens not in the cache get 503 introspection_unavailable "
            "(other providers keep working). authz_introspection_calls_total's result label "
            "says how (timeout, unreachable, http_error, redirect, bad_response, busy); the "
            "server logs name the endpoint. Check the IdP, egress to it, its CA (caFile) and "
            "the client secret."
        ),
    ),
    Alert(
        name="AuthzConfigReloadRefused",
        expr=(
            "authz_config_last_reload_failure_timestamp_seconds"
            " > authz_config_last_reload_success_timestamp_seconds"
        ),
        for_="5m",
        severity="warning",
        summary="{{ $labels.instance }} refused its new configuration and serves the old one",
        description=(
            "The last configuration change that {{ $labels.instance }} saw was refused, so it "
            "keeps serving the previous one, and a pod that restarts now will not start. The "
            "server log names the document, field and problem; "
            "`authz-server validate --config <file>` shows the same. Fix the ConfigMap; the "
            "alert clears at the next successful reload."
        ),
    ),
    Alert(
        name="AuthzConfigDiverged",
        expr=(
            "count by (namespace, job) "
            "(count by (namespace, job, hash) (authz_config_info == 1)) > 1"
        ),
        for_="15m",
        severity="warning",
        summary="Pods of {{ $labels.namespace }}/{{ $labels.job }} run different configurations",
        description=(
            "For 15 minutes the pods have not agreed on the configuration in force "
            "(authz_config_info{hash}): some refused the newest (see AuthzConfigReloadRefused) "
            "or a rollout is stuck, so the same request can be decided differently by two "
            "pods. The dashboard's 'Configuration in force' panel shows which hash each pod has."
        ),
    ),
    Alert(
        name="AuthzDenyRatioJump",
        expr=_jump('decision="deny"'),
        for_="5m",
        severity="warning",
        summary="Denials jumped on {{ $labels.namespace }}/{{ $labels.job }}",
        description=(
            "The share of denied Checks over 5 minutes is more than twice its 1-hour baseline "
            "(plus 5 points). A policy change, a new client, or an attack: the dashboard's "
            "'Denials per second by policy' panel names the policy and reason; the decision "
            "log has each request. An intended change becomes the new baseline within an hour."
        ),
    ),
    Alert(
        name="AuthzUnauthenticatedJump",
        expr=_jump(_UNAUTHENTICATED),
        for_="5m",
        severity="warning",
        summary="401s jumped on {{ $labels.namespace }}/{{ $labels.job }}",
        description=(
            "The share of Checks answered 401 over 5 minutes is more than twice its 1-hour "
            "baseline (plus 5 points). After an IdP key rotation look for unknown_kid or "
            "invalid_signature (keys not refreshed: see the key set panels); token_expired "
            "points at clocks or clients; missing_credentials at a gateway or client dropping "
            "the Authorization header. The 'Decisions per second' panel splits them by reason."
        ),
    ),
    Alert(
        name="AuthzCheckLatencyHigh",
        expr=(
            "histogram_quantile(0.99, sum by (namespace, job, le) "
            "(rate(authz_check_duration_seconds_bucket[5m])))"
            f" > {CHECK_P99_BUDGET_SECONDS}"
        ),
        for_="10m",
        severity="warning",
        summary=(
            f"Check p99 above {CHECK_P99_BUDGET_SECONDS * 1000:g}ms on "
            "{{ $labels.namespace }}/{{ $labels.job }}"
        ),
        description=(
            "99% of Checks should be decided well within Envoy's ext_authz timeout; past it, "
            "Envoy answers on its own (403, or 503 with failure_mode_allow false). Look at CPU "
            "per pod (scale out or add --workers), at key set refreshes that requests wait for "
            "(an unknown kid), and at the token cache hit ratio."
        ),
    ),
    Alert(
        name="AuthzNoChecks",
        expr=(
            "sum by (namespace, job, instance) (rate(authz_check_duration_seconds_count[10m])) == 0"
        ),
        for_="15m",
        severity="warning",
        summary="{{ $labels.instance }} is up but has decided no Check for 25 minutes",
        description=(
            "The pod is scraped, so it runs, but Envoy sends it nothing: the ext_authz cluster "
            "or Istio extension provider points elsewhere, a NetworkPolicy blocks port 9001, "
            "or the AuthorizationPolicy with action CUSTOM no longer selects the gateway. "
            "Envoy's stats (ext_authz ok/denied/error) say whether it asks at all. A service "
            "that is idle at times will fire this then: silence it, or drop the rule."
        ),
    ),
    Alert(
        name="AuthzReplayCacheUnavailable",
        expr=(
            "sum by (namespace, job, provider) "
            '(rate(authz_checks_total{reason="replay_cache_unavailable"}[5m])) > 0'
        ),
        for_="2m",
        severity="critical",
        summary=(
            "DPoP requests of provider {{ $labels.provider }} get 503: the replay cache "
            "cannot answer"
        ),
        description=(
            "{{ $labels.namespace }}/{{ $labels.job }} refuses DPoP requests of provider "
            "{{ $labels.provider }} with 503 replay_cache_unavailable (fail closed); other "
            "requests pass. With server.replayCache.redis, the Redis is down, slower than its "
            "timeout, or refuses the password: /readyz on the side port says which "
            "(replayCache). Without Redis, the in-process cache is full (maxEntries): raise it "
            "or shorten dpop.proofLifetime. See docs/sender-constrained.md."
        ),
    ),
    Alert(
        name="AuthzWorkerRestarting",
        expr="increase(authz_worker_restarts_total[15m]) > 0",
        for_="0m",
        severity="warning",
        summary="A worker process of {{ $labels.instance }} died and was restarted",
        description=(
            "Under --workers the supervisor restarts a worker that exits (a delay doubles up "
            "to 30s if it keeps dying). The log says 'worker N (pid P) exited with code C'; "
            "code -9 is usually the OOM killer: compare process_resident_memory_bytes with "
            "the container's memory limit."
        ),
    ),
)

GROUP = "authz-server"


def rule_groups() -> list[dict[str, Any]]:
    """The rule groups, as Prometheus and prometheus-operator both read them."""
    return [
        {
            "name": GROUP,
            "rules": [
                {
                    "alert": a.name,
                    "expr": a.expr,
                    "for": a.for_,
                    "labels": {"severity": a.severity},
                    "annotations": {"summary": a.summary, "description": a.description},
                }
                for a in ALERTS
            ],
        }
    ]


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else ">" if len(value) > 80 else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

_HEADER = "# Generated by k8s/monitoring/generate.py from its ALERTS; edit there, not here.\n"


def _yaml(document: Any) -> str:
    return _HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


def render_rules() -> str:
    """``rules.yaml``: the plain Prometheus rules file."""
    return _yaml({"groups": rule_groups()})


def render_prometheusrule() -> str:
    """``prometheusrule.yaml``: the same groups as a prometheus-operator PrometheusRule."""
    return _yaml(
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {
                "name": "authz-server",
                "namespace": "authz-system",
                "labels": {"app.kubernetes.io/name": "authz-server"},
            },
            "spec": {"groups": rule_groups()},
        }
    )


# ------------------------------------------------------------------------------ dashboard

# Every query selects the dashboard's namespace and job.
SEL = 'namespace=~"$namespace", job=~"$job"'
RATE = "$__rate_interval"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def m(name: str, extra: str = "") -> str:
    """``name{<dashboard selector>, extra}``."""
    return f"{name}{{{SEL}{', ' + extra if extra else ''}}}"


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    width: int = 12
    kind: str = "timeseries"
    stacked: bool = False
    thresholds: tuple[tuple[float, str], ...] = ()
    main: bool = False  # drawn by `make dashboard-preview`


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _quantile(q: float, by: str = "le") -> str:
    return (
        f"histogram_quantile({q}, sum by ({by}) "
        f"(rate({m('authz_check_duration_seconds_bucket')}[{RATE}])))"
    )


def _hit_ratio() -> str:
    hits = f"sum(rate({m('authz_token_cache_hits_total')}[{RATE}]))"
    misses = f"sum(rate({m('authz_token_cache_misses_total')}[{RATE}]))"
    return f"{hits} / ({hits} + {misses})"


DENIED = m("authz_checks_total", 'decision="deny"')
WOULD_DENY = m("authz_dry_run_total", 'would="deny"')
FETCH_FAILURES = m("authz_jwks_fetches_total", 'result="failure"')

INTROSPECTION_CALLS = m("authz_introspection_calls_total")


def _introspection_hit_ratio() -> str:
    hits = f"sum by (provider) (rate({m('authz_introspection_cache_hits_total')}[{RATE}]))"
    misses = f"sum by (provider) (rate({m('authz_introspection_cache_misses_total')}[{RATE}]))"
    return f"{hits} / ({hits} + {misses})"


ROWS = (
    Row(
        "Decisions",
        (
            Panel(
                "Decisions per second",
                "Checks decided per second, by decision and reason (allowed, or why denied: "
                "docs/reference.md lists the reasons).",
                (
                    Target(
                        f"sum by (decision, reason) (rate({m('authz_checks_total')}[{RATE}]))",
                        "{{decision}} {{reason}}",
                    ),
                ),
                unit="reqps",
                stacked=True,
                main=True,
            ),
            Panel(
                "Check latency",
                "Time to decide one Check in the server (p50, p90, p99 from "
                "authz_check_duration_seconds); keep p99 well under Envoy's ext_authz timeout.",
                tuple(Target(_quantile(q), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)),
                unit="s",
                main=True,
            ),
            Panel(
                "Deny ratio",
                "Share of Checks denied (401, 403, 503 and 500 together).",
                (
                    Target(
                        f"sum(rate({DENIED}[{RATE}]))"
                        f" / sum(rate({m('authz_checks_total')}[{RATE}]))",
                        "denied",
                    ),
                ),
                unit="percentunit",
                width=8,
            ),
            Panel(
                "Denials per second by policy",
                "Denied Checks per second by deciding policy and reason; an empty policy is a "
                "token that failed verification (401) before any policy ran.",
                (
                    Target(
                        f"sum by (policy, reason) (rate({DENIED}[{RATE}]))",
                        "{{policy}} {{reason}}",
                    ),
                ),
                unit="reqps",
                width=8,
            ),
            Panel(
                "Dry-run: would deny, per policy",
                "Requests that a dryRun policy would have denied, per second: what enforcing "
                "it would change. The requests themselves were decided by the other policies.",
                (
                    Target(
                        f"sum by (policy) (rate({WOULD_DENY}[{RATE}]))",
                        "{{policy}}",
                    ),
                ),
                unit="reqps",
                width=8,
            ),
            Panel(
                "Checks per second by door",
                "Checks per second through each door: gRPC (Envoy's grpc_service, Istio's "
                "envoyExtAuthzGrpc) and HTTP (http_service, envoyExtAuthzHttp).",
                (
                    Target(
                        f"sum by (door) (rate({m('authz_check_duration_seconds_count')}[{RATE}]))",
                        "{{door}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Check latency p99 by door",
                "p99 of the time to decide one Check, per door (no line: no Checks there).",
                (Target(_quantile(0.99, "door, le"), "{{door}}"),),
                unit="s",
            ),
        ),
    ),
    Row(
        "Key sets",
        (
            Panel(
                "Key set age",
                "Seconds since the provider's keys last loaded, on the pod that loaded them "
                "longest ago. Healthy: a saw-tooth below refreshInterval.",
                (
                    Target(
                        "time() - min by (provider) "
                        f"({m('authz_jwks_last_success_timestamp_seconds')})",
                        "{{provider}}",
                    ),
                ),
                unit="s",
                width=6,
            ),
            Panel(
                "Staleness, share of maxStale",
                "0 while refreshes succeed; while they fail, the time since the last good load "
                "as a share of maxStale. At 100% the keys are dropped and tokens get 503.",
                (
                    Target(
                        "max by (provider) "
                        f"({m('authz_jwks_stale_seconds')} / {m('authz_jwks_max_stale_seconds')})",
                        "{{provider}}",
                    ),
                ),
                unit="percentunit",
                width=6,
                thresholds=((0.0, "green"), (0.5, "orange"), (MAX_STALE_SHARE, "red")),
                main=True,
            ),
            Panel(
                "Usable keys",
                "Keys the provider's set holds, on the pod with the fewest; 0 means its tokens "
                "get 503 and the pod is unready.",
                (Target(f"min by (provider) ({m('authz_jwks_keys')})", "{{provider}}"),),
                width=6,
                thresholds=((0.0, "red"), (1.0, "green")),
            ),
            Panel(
                "Key set fetch failures",
                "Failed key set loads per second (all pods), by provider. The last good keys "
                "keep serving meanwhile.",
                (
                    Target(
                        f"sum by (provider) (rate({FETCH_FAILURES}[{RATE}]))",
                        "{{provider}}",
                    ),
                ),
                unit="reqps",
                width=6,
                main=True,
            ),
        ),
    ),
    Row(
        "Opaque tokens and API keys",
        (
            Panel(
                "Introspection calls by result",
                "Calls to each introspection provider's IdP per second (all pods), by result: "
                "active, inactive, or how it failed (its tokens then get 503).",
                (
                    Target(
                        f"sum by (provider, result) (rate({INTROSPECTION_CALLS}[{RATE}]))",
                        "{{provider}} {{result}}",
                    ),
                ),
                unit="reqps",
                width=6,
            ),
            Panel(
                "Introspection latency p99",
                "p99 of a call to the IdP, per provider; keep it well below the provider's "
                "introspection timeout.",
                (
                    Target(
                        "histogram_quantile(0.99, sum by (provider, le) (rate("
                        f"{m('authz_introspection_duration_seconds_bucket')}[{RATE}])))",
                        "{{provider}}",
                    ),
                ),
                unit="s",
                width=6,
            ),
            Panel(
                "Introspection cache hit ratio",
                "Share of opaque-token Checks answered from the cache (cacheTtl bounds how long "
                "a revoked token still passes).",
                (Target(_introspection_hit_ratio(), "{{provider}}"),),
                unit="percentunit",
                width=6,
            ),
            Panel(
                "API keys loaded",
                "Keys in each apiKeys provider's keys file, on the pod with the fewest (a bad "
                "file keeps the last good keys: see key set fetch failures).",
                (Target(f"min by (provider) ({m('authz_api_keys')})", "{{provider}}"),),
                width=6,
            ),
        ),
    ),
    Row(
        "Caches and configuration",
        (
            Panel(
                "Token cache hit ratio",
                "Share of token verifications answered by the verified-token cache (a hit "
                "skips the signature check, never the time checks or the policies).",
                (Target(_hit_ratio(), "hit ratio"),),
                unit="percentunit",
                width=6,
                main=True,
            ),
            Panel(
                "Configuration reloads",
                "Reloads per interval by result; a failure leaves the old configuration "
                "serving (the log names the field).",
                (
                    Target(
                        f"sum by (result) (increase({m('authz_config_reloads_total')}[{RATE}]))",
                        "{{result}}",
                    ),
                ),
                width=6,
                kind="bars",
            ),
            Panel(
                "Configuration in force",
                "Pods per configuration hash (authz_config_info); two hashes for long means "
                "some pods refused or missed the newest.",
                (Target(f"count by (hash) ({m('authz_config_info')} == 1)", "{{hash}}"),),
                width=6,
            ),
            Panel(
                "Pods whose last reload was refused",
                "Pods whose most recent configuration change was refused: they serve the "
                "previous configuration (alert AuthzConfigReloadRefused).",
                (
                    Target(
                        f"sum({m('authz_config_last_reload_failure_timestamp_seconds')}"
                        f" > bool {m('authz_config_last_reload_success_timestamp_seconds')})",
                        "refused",
                    ),
                ),
                width=6,
                thresholds=((0.0, "green"), (1.0, "red")),
            ),
        ),
    ),
    Row(
        "Process",
        (
            Panel(
                "CPU per pod",
                "CPU cores used by each pod's server (all worker processes under --workers).",
                (
                    Target(
                        f"sum by (instance) (rate({m('process_cpu_seconds_total')}[{RATE}]))",
                        "{{instance}}",
                    ),
                ),
                width=6,
                main=True,
            ),
            Panel(
                "Memory per pod",
                "Resident memory of each pod's server (all worker processes under --workers).",
                (
                    Target(
                        f"sum by (instance) ({m('process_resident_memory_bytes')})",
                        "{{instance}}",
                    ),
                ),
                unit="bytes",
                width=6,
            ),
            Panel(
                "Worker restarts",
                "Worker processes that died and were restarted (--workers only; no data "
                "without workers).",
                (
                    Target(
                        f"sum by (instance) (increase({m('authz_worker_restarts_total')}[{RATE}]))",
                        "{{instance}}",
                    ),
                ),
                width=6,
                kind="bars",
            ),
            Panel(
                "Decision log lines dropped",
                "Decision log lines lost per second: the queue was full or the destination "
                "failed (Checks are never slowed by the log).",
                (
                    Target(
                        "sum by (instance) "
                        f"(rate({m('authz_decision_log_dropped_total')}[{RATE}]))",
                        "{{instance}}",
                    ),
                ),
                unit="reqps",
                width=6,
            ),
        ),
    ),
)


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": "All", "value": "$__all"},
        "sort": 1,
        "hide": 0,
    }


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    custom: dict[str, Any] = {"drawStyle": "bars" if panel.kind == "bars" else "line"}
    if panel.stacked:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults: dict[str, Any] = {"unit": panel.unit, "custom": custom}
    if panel.thresholds:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [
                {"color": color, "value": None if i == 0 else value}
                for i, (value, color) in enumerate(panel.thresholds)
            ],
        }
        defaults["custom"]["thresholdsStyle"] = {"mode": "line"}
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t.expr}
            | ({"legendFormat": t.legend} if t.legend else {})
            for i, t in enumerate(panel.targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard (JSON model)."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row in ROWS:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel(panel, len(panels) + 1, x, y))
            x += panel.width
        y += 8
    return {
        "uid": "authz-server",
        "title": "authz-server",
        "description": (
            "Envoy external authorization server: decisions, latency, key sets, caches, "
            "configuration, process. Generated by k8s/monitoring/generate.py."
        ),
        "tags": ["authz-server", "envoy", "ext_authz"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timezone": "",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                },
                _variable("namespace", "Namespace", "label_values(authz_config_info, namespace)"),
                _variable(
                    "job",
                    "Job",
                    'label_values(authz_config_info{namespace=~"$namespace"}, job)',
                ),
            ]
        },
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render_dashboard() -> str:
    """``dashboard.json``."""
    return json.dumps(dashboard(), indent=2) + "\n"


# ---------------------------------------------------------------------------------- files

OUTPUTS = {
    "dashboard.json": render_dashboard,
    "rules.yaml": render_rules,
    "prometheusrule.yaml": render_prometheusrule,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    stale = []
    for name, render in OUTPUTS.items():
        path = HERE / name
        text = render()
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        sys.stderr.write(
            f"out of date with k8s/monitoring/generate.py: {', '.join(stale)}; "
            "run `python k8s/monitoring/generate.py`\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
