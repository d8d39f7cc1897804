"""End to end: observability and live configuration, through a real Envoy.

What an operator sees while real Envoy traffic flows: `/metrics` counters moving by exactly the
requests sent, the JSON decision log (and what it must never contain), dry-run verdicts,
`/readyz`, and hot reload: a policy change under continuous traffic (no request fails; the
client-visible reload latency is printed, see `-s`), refused configurations, the Kubernetes
ConfigMap `..data` symlink swap, and SIGHUP.

Three servers: one observed (metrics, logs, dry-run, readiness), one reloaded (file config),
one on a ConfigMap-style directory (also `denyOnly` decision logs). Each sits behind its own
Envoy; stacks are shared per module/class and every wait is `wait_until` with a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from authz_server import errors
from authz_server.ops.reload import snapshot
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from authz_server.tools.envoy_config import render_bootstrap
from tests.e2e.harness import (
    AuthzServerProcess,
    EchoUpstream,
    EnvoyProcess,
    JWKSServer,
    free_port,
    http_request,
    wait_until,
)
from tests.helpers import AUDIENCE, ISSUER, claims_for

pytestmark = pytest.mark.e2e

DECISION_FIELDS = {
    "time",
    "level",
    "logger",
    "message",
    "decision",
    "status",
    "reason",
    "provider",
    "principal",
    "policy",
    "method",
    "host",
    "path",
    "source_ip",
    "request_id",
    "duration_us",
}
REASONS = {
    value
    for name, value in vars(errors).items()
    if name.isupper() and isinstance(value, str) and value.islower()
} | {"allowed"}


# ------------------------------------------------------------------------------ helpers


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def digest_of(text: str) -> str:
    """The hash `authz_config_info` shows for a one-file configuration."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_atomically(path: Path, text: str) -> float:
    """Write `path` the way editors and config tools do (temp file + rename).

    The temp file is a dotfile without a .yaml suffix, so a directory watcher never reads it.
    Returns the monotonic time right after the rename.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return time.monotonic()


@dataclass
class Scrape:
    """One `/metrics` exposition, parsed."""

    text: str
    samples: dict[str, list[tuple[dict[str, str], float]]]

    def value(self, name: str, **labels: str) -> float:
        """The sample `name` with exactly `labels` (0.0 when absent: a counter not yet born)."""
        for sample_labels, value in self.samples.get(name, []):
            if sample_labels == labels:
                return value
        return 0.0

    def labels(self, name: str) -> list[dict[str, str]]:
        return [sample_labels for sample_labels, _ in self.samples.get(name, [])]


def scrape(server: AuthzServerProcess) -> Scrape:
    status, headers, body = http_request(f"{server.http_url}/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return Scrape(text, samples)


def config_hashes(server: AuthzServerProcess) -> list[str]:
    """The `hash` labels of `authz_config_info` (polled while a reload may be switching)."""
    return [labels["hash"] for labels in scrape(server).labels("authz_config_info")]


def config_hash(server: AuthzServerProcess) -> str:
    hashes = config_hashes(server)
    assert len(hashes) == 1, hashes
    return hashes[0]


def reloads(server: AuthzServerProcess) -> tuple[float, float]:
    """(successes, failures) of `authz_config_reloads_total`."""
    metrics = scrape(server)
    return (
        metrics.value("authz_config_reloads_total", result="success"),
        metrics.value("authz_config_reloads_total", result="failure"),
    )


def log_records(server: AuthzServerProcess) -> list[dict[str, Any]]:
    """Every JSON line the server wrote (stdout and stderr share the log file)."""
    records = []
    for line in server.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def decision_lines(server: AuthzServerProcess) -> list[dict[str, Any]]:
    return [r for r in log_records(server) if r.get("logger") == "authz_server.decision"]


def lines_at(server: AuthzServerProcess, path: str) -> list[dict[str, Any]]:
    """The decision lines of requests to `path` (tests make each path unique)."""
    return [r for r in decision_lines(server) if r.get("path") == path]


@dataclass
class Stack:
    envoy_url: str
    server: AuthzServerProcess
    envoy: EnvoyProcess
    upstream: EchoUpstream
    config: Path
    key: SigningKey
    extra: dict[str, Any] = field(default_factory=dict)

    def request(
        self, path: str, token: str | None = None, timeout: float = 5, **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        return http_request(self.envoy_url + path, headers=all_headers, timeout=timeout)

    def status(self, path: str, token: str | None = None) -> int:
        return self.request(path, token)[0]

    def token(self, **claims: Any) -> str:
        """A token never sent before (random jti): its first use is a token cache miss."""
        return self.key.sign(claims_for(time.time(), jti=secrets.token_hex(8), **claims))


@contextmanager
def run_stack(workdir: Path, config: Path, key: SigningKey) -> Iterator[Stack]:
    """Our server on `config` (file or directory) behind a real Envoy and an echo upstream."""
    with ExitStack() as stack:
        upstream = stack.enter_context(EchoUpstream())
        server = stack.enter_context(
            AuthzServerProcess(
                config,
                free_port(),
                free_port(),
                log_path=workdir / "server.log",
                ready_path="/readyz",
            )
        )
        listen, admin = free_port(), free_port()
        bootstrap = render_bootstrap(
            listen_port=listen,
            admin_port=admin,
            authz_address=server.grpc_address,
            upstream_port=upstream.port,
        )
        envoy = stack.enter_context(EnvoyProcess(bootstrap, admin, workdir / "envoy.log"))
        yield Stack(
            envoy_url=f"http://127.0.0.1:{listen}",
            server=server,
            envoy=envoy,
            upstream=upstream,
            config=config,
            key=key,
        )


def native(
    provider: dict[str, Any],
    policies: list[dict[str, Any]],
    server: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "authz-server/v1",
        "kind": "AuthzConfig",
        "server": server or {},
        "providers": [provider],
        "policies": policies,
    }


def dump(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def inline_provider(key: SigningKey) -> dict[str, Any]:
    return {
        "name": "main",
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "jwks": json.dumps(devkeys.jwks(key)),
    }


SIGNED_IN_API = {
    "name": "api",
    "rules": [
        {
            "from": [{"source": {"requestPrincipals": ["*"]}}],
            "to": [{"operation": {"paths": ["/api/*"]}}],
        }
    ],
}


def deny_paths(name: str, *paths: str, dry_run: bool = False) -> dict[str, Any]:
    policy: dict[str, Any] = {"name": name, "action": "DENY"}
    if dry_run:
        policy["dryRun"] = True
    policy["rules"] = [{"to": [{"operation": {"paths": list(paths)}}]}]
    return policy


# ------------------------------------------------------- the observed stack (metrics, logs)

OBSERVED_POLICIES = [
    deny_paths("no-admin", "/api/admin/*"),
    deny_paths("dry-deny", "/api/dry/*", dry_run=True),
    SIGNED_IN_API,
]
ISTIO_DRY_RUN = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {
        "name": "istio-dry-deny",
        "namespace": "shop",
        "annotations": {"istio.io/dry-run": "true"},
    },
    "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/api/istio-dry/*"]}}]}]},
}
POLICY_NAMES = {"no-admin", "dry-deny", "api", "shop/istio-dry-deny"}


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("observed")
    key = devkeys.generate_key("EC-P256", kid="obs-1")
    other = devkeys.generate_key("EC-P256", kid="obs-2")  # a second key: authz_jwks_keys == 2
    with JWKSServer(devkeys.jwks(key, other)) as jwks:
        provider = {"name": "main", "issuer": ISSUER, "audiences": [AUDIENCE]}
        provider["jwksUri"] = jwks.jwks_url
        config = workdir / "config.yaml"
        config.write_text(
            dump(
                native(
                    provider,
                    OBSERVED_POLICIES,
                    {"realm": "obs", "decisionLog": {"claims": ["groups"]}},
                ),
                ISTIO_DRY_RUN,
            )
        )
        with run_stack(workdir, config, key) as stack:
            stack.extra["started"] = time.time()
            yield stack


def test_metrics_count_exactly_the_checks_envoy_made(observed: Stack) -> None:
    allowed, denied = 7, 4
    token = observed.token()
    before = scrape(observed.server)
    for _ in range(allowed):
        assert observed.status("/api/orders", token) == 200
    for _ in range(denied):
        assert observed.status("/api/admin/users", token) == 403
    after = scrape(observed.server)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    allow = {"decision": "allow", "reason": "allowed", "provider": "main", "policy": "api"}
    deny = {"decision": "deny", "reason": "policy_denied", "provider": "main", "policy": "no-admin"}
    allow["door"] = deny["door"] = "grpc"
    assert moved("authz_checks_total", **allow) == allowed
    assert moved("authz_checks_total", **deny) == denied
    total_before = sum(v for _, v in before.samples.get("authz_checks_total", []))
    total_after = sum(v for _, v in after.samples.get("authz_checks_total", []))
    assert total_after - total_before == allowed + denied  # nothing else was counted
    assert moved("authz_check_duration_seconds_count", decision="allow", door="grpc") == allowed
    assert moved("authz_check_duration_seconds_count", decision="deny", door="grpc") == denied
    # Sub-millisecond resolution: the 50 us .. 1 s buckets are all there.
    buckets = {
        labels["le"]
        for labels in after.labels("authz_check_duration_seconds_bucket")
        if labels["decision"] == "allow"
    }
    assert {"5e-05", "0.0001", "0.0005", "0.001", "1.0", "+Inf"} <= buckets

    # The same token every time: verified once, then served from the token cache.
    assert moved("authz_token_cache_misses_total") == 1
    assert moved("authz_token_cache_hits_total") == allowed + denied - 1
    assert after.value("authz_token_cache_entries") >= 1

    # The key set of the provider, loaded from the real JWKS URL.
    assert after.value("authz_jwks_keys", provider="main") == 2
    last = after.value("authz_jwks_last_success_timestamp_seconds", provider="main")
    assert observed.extra["started"] - 60 < last <= time.time()
    assert after.value("authz_jwks_fetches_total", provider="main", result="success") >= 1
    assert after.value("authz_jwks_stale_seconds", provider="main") == 0
    # Standard collectors are there too.
    assert after.value("process_resident_memory_bytes") > 0
    assert "python_gc_objects_collected_total" in after.samples


def test_no_metric_label_carries_request_controlled_data(observed: Stack) -> None:
    weird_path, weird_sub = unique("zzpath"), unique("zzsub")
    weird_header = unique("zzheader")
    token = observed.token(sub=weird_sub, groups=[unique("zzgroup")])
    status, _, _ = observed.request(
        f"/api/{weird_path}?{weird_path}=1", token, x_weird=weird_header
    )
    assert status == 200
    status, _, _ = observed.request(f"/nowhere/{weird_path}", observed.token(sub=weird_sub))
    assert status == 403  # denied, with reason no_allow_policy_matched: still no path label
    metrics = scrape(observed.server)
    for needle in (weird_path, weird_sub, weird_header, "zzgroup", "obs-1", token):
        assert needle not in metrics.text
    for labels in metrics.labels("authz_checks_total"):
        assert labels["decision"] in {"allow", "deny"}
        assert labels["reason"] in REASONS, labels
        assert labels["provider"] in {"", "main"}
        assert labels["policy"] in POLICY_NAMES | {""}
    for labels in metrics.labels("authz_dry_run_total"):
        assert labels["policy"] in POLICY_NAMES and labels["would"] in {"allow", "deny"}


def test_decision_log_has_one_line_per_decision_with_the_documented_fields(
    observed: Stack,
) -> None:
    server = observed.server
    email = unique("zzemail") + "@example.test"
    group = unique("zzgroup")
    token = observed.token(groups=["dev", group], email=email, name=unique("zzname"))
    allowed_path, denied_path = f"/api/{unique('allow')}", f"/api/admin/{unique('deny')}"
    anonymous_path = f"/api/{unique('anon')}"
    own_id, secret_query = unique("req-own"), unique("zzquery")

    status, _, _ = observed.request(
        f"{allowed_path}?q={secret_query}", token, x_request_id=own_id, cookie="session=zzcookie"
    )
    assert status == 200
    seen_id = observed.upstream.last_request().headers["x-request-id"]
    assert observed.request(denied_path, token, x_request_id=unique("req"))[0] == 403
    assert observed.request(anonymous_path, x_request_id=unique("req"))[0] == 401

    # NOTE: lines are written off the request thread, so a count taken before these requests
    # may miss the previous test's lines still queued: wait for these paths' lines instead.
    paths = (allowed_path, denied_path, anonymous_path)
    wait_until(lambda: all(lines_at(server, p) for p in paths), what="three decision lines")
    # Exactly one line per decision:
    [allow] = lines_at(server, allowed_path)  # the path without the query string
    [deny] = lines_at(server, denied_path)
    [anonymous] = lines_at(server, anonymous_path)
    # The request id is the x-request-id Envoy sent along. NOTE: the bootstrap does not set
    # preserve_external_request_id, so Envoy replaces a client's id with its own UUID.
    assert allow["request_id"] == seen_id
    ids = [line["request_id"] for line in (allow, deny, anonymous)]
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == 3
    for line in (allow, deny, anonymous):
        assert set(line) >= DECISION_FIELDS, set(line)
        assert line["level"] == "INFO"
        assert line["method"] == "GET"
        # The shipped Envoy config strips the port (strip_any_host_port).
        assert line["host"] == "127.0.0.1"
        assert line["source_ip"] == "127.0.0.1"
        assert isinstance(line["duration_us"], int | float) and 0 < line["duration_us"] < 1e6
        assert line["time"].endswith("Z")
    assert {k: allow[k] for k in ("decision", "status", "reason", "provider", "policy")} == {
        "decision": "allow",
        "status": 200,
        "reason": "allowed",
        "provider": "main",
        "policy": "api",
    }
    assert allow["principal"] == f"{ISSUER}/alice"
    assert allow["claims"] == {"groups": ["dev", group]}  # only the listed claim
    assert {k: deny[k] for k in ("decision", "status", "reason", "policy")} == {
        "decision": "deny",
        "status": 403,
        "reason": "policy_denied",
        "policy": "no-admin",
    }
    assert deny["claims"] == {"groups": ["dev", group]}
    assert anonymous["decision"] == "deny" and anonymous["status"] == 401
    assert anonymous["reason"] == "missing_credentials"
    assert anonymous["principal"] is None and "claims" not in anonymous

    # A token that fails verification is not logged either.
    head, payload, _ = observed.token(email=email).split(".")
    forged = f"{head}.{payload}.{observed.token().split('.')[2]}"
    forged_path = f"/api/{unique('forged')}"
    assert observed.request(forged_path, forged)[0] == 401
    [bad] = wait_until(lambda: lines_at(server, forged_path), what="the forged token's line")
    assert bad["reason"] == "invalid_signature" and bad["principal"] is None

    text = server.log_text()
    for secret in (token, forged, *token.split("."), forged.split(".")[2], "zzcookie"):
        assert secret not in text
    assert "Bearer" not in text
    assert email not in text and "zzname" not in text and secret_query not in text
    # The one listed claim appears only inside `claims` of decision lines.
    for record in log_records(server):
        if group in json.dumps(record):
            assert record["logger"] == "authz_server.decision"
            assert group in record["claims"]["groups"]
            assert group not in json.dumps({k: v for k, v in record.items() if k != "claims"})


def test_dry_run_policies_count_and_log_but_do_not_deny(observed: Stack) -> None:
    token = observed.token()
    before = scrape(observed.server)
    native_path, istio_path = f"/api/dry/{unique('x')}", f"/api/istio-dry/{unique('x')}"
    assert observed.status(native_path, token) == 200
    assert observed.status(istio_path, token) == 200
    after = scrape(observed.server)

    def moved(policy: str, would: str) -> float:
        return after.value("authz_dry_run_total", policy=policy, would=would) - before.value(
            "authz_dry_run_total", policy=policy, would=would
        )

    # Every dry-run policy gives a verdict on every request.
    assert moved("dry-deny", "deny") == 1 and moved("dry-deny", "allow") == 1
    assert moved("shop/istio-dry-deny", "deny") == 1
    assert moved("shop/istio-dry-deny", "allow") == 1
    allow = {"decision": "allow", "reason": "allowed", "provider": "main", "policy": "api"}
    allow["door"] = "grpc"
    moved_allow = after.value("authz_checks_total", **allow) - before.value(
        "authz_checks_total", **allow
    )
    assert moved_allow == 2

    [line] = wait_until(lambda: lines_at(observed.server, native_path), what="dry-run line")
    assert line["decision"] == "allow" and line["status"] == 200
    assert line["dry_run"] == {"dry-deny": "deny", "shop/istio-dry-deny": "allow"}
    [line] = wait_until(lambda: lines_at(observed.server, istio_path), what="istio dry-run line")
    assert line["decision"] == "allow"
    assert line["dry_run"] == {"dry-deny": "allow", "shop/istio-dry-deny": "deny"}


def test_readyz_reports_each_provider_and_healthz_is_alive(observed: Stack) -> None:
    status, headers, body = http_request(f"{observed.server.http_url}/readyz")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"ready": True, "providers": {"main": "ready"}}
    status, _, body = http_request(f"{observed.server.http_url}/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_startup_logs_the_config_hash_and_a_summary(observed: Stack) -> None:
    digest = config_hash(observed.server)
    assert digest == digest_of(observed.config.read_text())
    [line] = [r for r in log_records(observed.server) if "serving gRPC" in r.get("message", "")]
    assert digest in line["message"]
    assert "1 provider(s), 4 polic(ies)" in line["message"]


# ------------------------------------------------------------ hot reload of a config file


@dataclass
class Traffic:
    """Threads sending requests through Envoy until stopped (or `limit` seconds)."""

    stack: Stack
    path: str
    token: str
    threads: int = 3
    limit: float = 15.0
    # (started, finished, status or None, error or None)
    results: list[tuple[float, float, int | None, str | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        deadline = time.monotonic() + self.limit
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, args=(deadline,), name=f"traffic-{i}")
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(10)

    def _run(self, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            status: int | None = None
            error: str | None = None
            try:
                status = self.stack.request(self.path, self.token, timeout=3)[0]
            except Exception as exc:  # connection errors are results here
                error = repr(exc)
            with self._lock:
                self.results.append((started, time.monotonic(), status, error))

    def snapshot(self) -> list[tuple[float, float, int | None, str | None]]:
        with self._lock:
            return list(self.results)

    def count(self) -> int:
        with self._lock:
            return len(self.results)


def reload_config(key: SigningKey, *policies: dict[str, Any]) -> str:
    return dump(native(inline_provider(key), [*policies, SIGNED_IN_API], {"realm": "reload"}))


@pytest.fixture(scope="class")
def reloaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("reload")
    key = devkeys.generate_key("EC-P256", kid="reload-1")
    config = workdir / "config.yaml"
    config.write_text(reload_config(key))
    with run_stack(workdir, config, key) as stack:
        yield stack


class TestHotReload:
    @pytest.fixture
    def stack(self, reloaded: Stack) -> Stack:
        return reloaded

    def use(self, stack: Stack, text: str) -> None:
        """Put `text` in force (atomically) and wait until the server says it is."""
        write_atomically(stack.config, text)
        wait_until(
            lambda: config_hashes(stack.server) == [digest_of(text)],
            timeout=10,
            what=f"configuration {digest_of(text)} in force",
        )

    def test_policy_change_under_traffic_switches_decisions_without_failures(
        self, stack: Stack
    ) -> None:
        allow_all = reload_config(stack.key)
        freeze = reload_config(stack.key, deny_paths("freeze-orders", "/api/orders"))
        self.use(stack, allow_all)
        successes, failures = reloads(stack.server)
        old_hash = config_hash(stack.server)
        last_reload = scrape(stack.server).value(
            "authz_config_last_reload_success_timestamp_seconds"
        )
        token = stack.token()
        with Traffic(stack, "/api/orders", token) as traffic:
            wait_until(lambda: traffic.count() >= 30, what="traffic before the change")
            replaced = write_atomically(stack.config, freeze)

            def first_denial() -> float | None:
                ends = [end for _, end, status, _ in traffic.snapshot() if status == 403]
                return min(ends) if ends else None

            changed_at = wait_until(first_denial, timeout=10, what="the first 403")
            seen = traffic.count()
            wait_until(lambda: traffic.count() >= seen + 30, what="traffic after the change")
        results = traffic.snapshot()
        latency = changed_at - replaced
        print(
            f"\nreload latency (os.replace -> first changed decision through Envoy): "
            f"{latency * 1000:.0f} ms; {len(results)} requests across the switch"
        )

        failed = [r for r in results if r[2] not in (200, 403)]
        assert failed == [], failed[:5]
        assert all(status == 200 for _, end, status, _ in results if end < replaced)
        # Once a 403 came back, every request sent afterwards is a 403: no flapping.
        assert all(status == 403 for start, _, status, _ in results if start > changed_at)
        assert {status for _, _, status, _ in results} == {200, 403}
        assert latency < 5

        assert reloads(stack.server) == (successes + 1, failures)
        new_hash = config_hash(stack.server)
        assert new_hash != old_hash and new_hash == digest_of(freeze)
        assert (
            last_reload
            < scrape(stack.server).value("authz_config_last_reload_success_timestamp_seconds")
            <= time.time()
        )
        [line] = [
            r
            for r in log_records(stack.server)
            if r.get("logger") == "authz_server.server"
            and f"configuration {new_hash} in force" in r.get("message", "")
        ]
        assert "1 provider(s), 2 polic(ies)" in line["message"]

    def test_a_broken_config_is_refused_and_the_old_one_keeps_serving(self, stack: Stack) -> None:
        freeze = reload_config(stack.key, deny_paths("freeze-orders", "/api/orders"))
        self.use(stack, freeze)
        token = stack.token()
        assert stack.status("/api/orders", token) == 403
        assert stack.status("/api/other", token) == 200
        good_hash = config_hash(stack.server)
        successes, failures = reloads(stack.server)

        def refusals() -> list[dict[str, Any]]:
            return [
                r
                for r in log_records(stack.server)
                if r.get("logger") == "authz_server.reload" and "refused" in r.get("message", "")
            ]

        seen = len(refusals())
        write_atomically(stack.config, freeze + "\npolicies: [unclosed\n")
        wait_until(lambda: reloads(stack.server)[1] == failures + 1, what="YAML error refused")
        wait_until(lambda: len(refusals()) > seen, what="the YAML refusal's log line")
        line = refusals()[-1]
        assert line["level"] == "ERROR"
        assert "not valid YAML" in line["message"] and good_hash in line["message"]
        assert stack.status("/api/orders", token) == 403  # the old decisions continue
        assert stack.status("/api/other", token) == 200
        assert config_hash(stack.server) == good_hash

        unknown = freeze.replace("  action: DENY\n", "  action: DENY\n  frobnicate: true\n", 1)
        assert unknown != freeze
        write_atomically(stack.config, unknown)
        wait_until(lambda: reloads(stack.server)[1] == failures + 2, what="unknown field refused")
        wait_until(lambda: len(refusals()) > seen + 1, what="the unknown field's log line")
        line = refusals()[-1]
        assert "policies[0].frobnicate: unknown field" in line["message"], line["message"]
        assert stack.status("/api/orders", token) == 403
        assert config_hash(stack.server) == good_hash
        assert reloads(stack.server)[0] == successes

        fixed = reload_config(stack.key)  # and the fix changes the decision
        write_atomically(stack.config, fixed)
        wait_until(lambda: stack.status("/api/orders", token) == 200, what="the fix in force")
        assert config_hash(stack.server) == digest_of(fixed)
        assert reloads(stack.server) == (successes + 1, failures + 2)

    def test_sighup_reloads(self, stack: Stack) -> None:
        # Two configurations of exactly the same size: rewritten in place with the old mtime,
        # the file looks unchanged to the poller; only SIGHUP can make the server read it.
        quiet = reload_config(stack.key, deny_paths("freeze", "/api/zzzzzz"))
        frozen = reload_config(stack.key, deny_paths("freeze", "/api/orders"))
        assert len(quiet.encode()) == len(frozen.encode())
        self.use(stack, quiet)
        token = stack.token()
        assert stack.status("/api/orders", token) == 200
        successes, failures = reloads(stack.server)
        unchanged_hash = config_hash(stack.server)

        stack.server.signal(signal.SIGHUP)  # unchanged file: nothing to do, nothing counted
        assert http_request(f"{stack.server.http_url}/healthz")[0] == 200
        assert stack.status("/api/orders", token) == 200
        assert config_hash(stack.server) == unchanged_hash
        assert reloads(stack.server) == (successes, failures)

        before = os.stat(stack.config)
        seen_by_poller = snapshot(stack.config)
        with open(stack.config, "r+b") as file:
            file.write(frozen.encode())
        os.utime(stack.config, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert snapshot(stack.config) == seen_by_poller
        signalled = time.monotonic()
        stack.server.signal(signal.SIGHUP)
        wait_until(lambda: stack.status("/api/orders", token) == 403, what="SIGHUP reload")
        print(
            f"\nSIGHUP -> first changed decision through Envoy (no polling delay): "
            f"{(time.monotonic() - signalled) * 1000:.0f} ms"
        )
        assert config_hash(stack.server) == digest_of(frozen)
        # One reload: the SIGHUP with the unchanged file did not count as one.
        assert reloads(stack.server) == (successes + 1, failures)
        assert http_request(f"{stack.server.http_url}/healthz")[0] == 200


# --------------------------------------- a Kubernetes ConfigMap mount (and denyOnly logs)


def configmap_config(key: SigningKey, *policies: dict[str, Any]) -> str:
    server = {"realm": "cm", "decisionLog": {"denyOnly": True}}
    return dump(native(inline_provider(key), [*policies, SIGNED_IN_API], server))


def configmap_version(directory: Path, stamp: str, text: str) -> str:
    """What the kubelet writes first: a timestamped directory with the keys as files."""
    version = f"..{stamp}"
    (directory / version).mkdir()
    (directory / version / "config.yaml").write_text(text)
    return version


@pytest.fixture(scope="module")
def configmap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("configmap")
    key = devkeys.generate_key("EC-P256", kid="cm-1")
    mount = workdir / "mount"
    mount.mkdir()
    version = configmap_version(mount, "2026_11_28_00_00_00.000", configmap_config(key))
    (mount / "..data").symlink_to(version)
    (mount / "config.yaml").symlink_to("..data/config.yaml")
    with run_stack(workdir, mount, key) as stack:
        stack.extra["version"] = version
        yield stack


def test_configmap_symlink_swap_changes_the_decision(configmap: Stack) -> None:
    mount = configmap.config
    token = configmap.token()
    assert configmap.status("/api/orders", token) == 200
    successes, failures = reloads(configmap.server)
    old_hash = config_hash(configmap.server)

    text = configmap_config(configmap.key, deny_paths("freeze-orders", "/api/orders"))
    version = configmap_version(mount, "2026_11_28_00_05_00.000", text)
    (mount / "..data_tmp").symlink_to(version)
    os.replace(mount / "..data_tmp", mount / "..data")  # the atomic swap the kubelet does
    for old in (mount / configmap.extra["version"]).iterdir():  # then the old version goes
        old.unlink()
    (mount / configmap.extra["version"]).rmdir()
    configmap.extra["version"] = version

    wait_until(lambda: configmap.status("/api/orders", token) == 403, what="the swap in force")
    assert configmap.status("/api/other", token) == 200
    assert config_hash(configmap.server) == digest_of(text) != old_hash
    assert reloads(configmap.server) == (successes + 1, failures)


def test_deny_only_decision_log_skips_allowed_requests(configmap: Stack) -> None:
    group = unique("zzgroup")
    token = configmap.token(groups=[group])
    allowed = [f"/api/{unique('ok')}" for _ in range(3)]
    denied = [f"/nowhere/{unique('no')}" for _ in range(2)]
    for path in allowed:
        assert configmap.status(path, token) == 200
    for path in denied:
        assert configmap.status(path, token) == 403
    wait_until(lambda: all(lines_at(configmap.server, p) for p in denied), what="the deny lines")
    for path in denied:
        [line] = lines_at(configmap.server, path)
        assert line["decision"] == "deny" and line["reason"] == "no_allow_policy_matched"
        assert "claims" not in line  # no claims listed: none logged
    for path in allowed:
        assert lines_at(configmap.server, path) == []
    assert all(line["decision"] == "deny" for line in decision_lines(configmap.server))
    assert group not in configmap.server.log_text()
