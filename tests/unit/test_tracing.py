"""Tracing of Checks through the real SDK and OTLP exporters into a real OTLP receiver
(tests/otlp.py): the span's parent (W3C, B3 single and multi), its attributes and what it
never holds, token cache hit and miss, the decision log's trace ids, a key-set refresh the
Check waited for (a child span, and the fetch carrying traceparent), an exporter that is
down or hangs (Checks answered, spans dropped and counted), and refused OTEL_* values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.config.specs import DecisionLogSpec
from authz_server.errors import WouldWait
from authz_server.ops.metrics import Metrics
from authz_server.ops.tracing import SPAN_NAME, Tracing, TracingError
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.e2e.harness import free_port, wait_until
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for, write_config
from tests.introspection_idp import CLIENT_ID, CLIENT_SECRET, IntrospectionServer
from tests.otlp import OtlpReceiver
from tests.redis_server import PASSWORD as REDIS_PASSWORD
from tests.redis_server import running_redis
from tests.unit import test_sender_constrained as sender
from tests.unit.test_decision_log import Captured

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
POLICIES = """
policies:
  - name: read
    rules:
      - from: [{source: {requestPrincipals: ["*"]}}]
        to: [{operation: {methods: ["GET"], paths: ["/api/*"]}}]
"""


def _engine(tmp_path: Path, clock: Clock, provider: str) -> Engine:
    text = f"apiVersion: authz-server/v1\nkind: AuthzConfig\nproviders:\n{provider}\n{POLICIES}"
    engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    return engine


def _inline_provider(key: SigningKey) -> str:
    jwks = json.dumps(json.dumps(devkeys.jwks(key)))
    return f"""  - name: main
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {jwks}
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]"""


@pytest.fixture
def build(tmp_path: Path, clock: Clock, rsa_key: SigningKey) -> Callable[..., AuthorizationService]:
    """A service over one inline-keys provider (or ``provider``), traced by ``tracing``."""

    def make(tracing: Tracing, provider: str | None = None, **options: Any) -> AuthorizationService:
        engine = _engine(tmp_path, clock, provider or _inline_provider(rsa_key))
        return AuthorizationService(engine, tracing=tracing, **options)

    return make


@pytest.fixture
def captured(request: pytest.FixtureRequest) -> Iterator[Captured]:
    out = Captured(f"test.tracing.{request.node.name}")
    yield out
    for decision_log in out.logs:
        decision_log.close()
    out.logger.handlers.clear()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # milliseconds: batches leave soon
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    return monkeypatch


def _tracing(env: pytest.MonkeyPatch, endpoint: str, protocol: str, **extra: str) -> Tracing:
    env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    for name, value in extra.items():
        env.setenv(name, value)
    return Tracing.from_environment()


@pytest.fixture
def traced(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, otel_env: pytest.MonkeyPatch,
    receiver: OtlpReceiver,
) -> Iterator[tuple[AuthorizationService, Tracing]]:  # fmt: skip
    tracing = _tracing(otel_env, receiver.http_endpoint, "http/protobuf")
    service = AuthorizationService(
        _engine(tmp_path, clock, _inline_provider(rsa_key)), tracing=tracing
    )
    yield service, tracing
    assert tracing.shutdown()


def _request(token: str | None = None, **headers: str) -> RequestAttributes:
    all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    return RequestAttributes(method="GET", host="api.test", path="/api/orders", headers=all_headers)


def test_a_check_is_one_server_span_child_of_the_w3c_parent_with_what_was_decided(
    traced: tuple[AuthorizationService, Tracing],
    receiver: OtlpReceiver,
    make_token: Callable[..., str],
) -> None:
    service, _ = traced
    token = make_token(sub="alice", email="alice@example.com")
    parent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    decision = service.check(_request(token, traceparent=parent, tracestate="vendor=abc"))
    assert decision.allowed
    [span] = receiver.wait_for(lambda s: len(s) == 1, "one span")
    assert span.span.name == SPAN_NAME
    assert span.span.kind == span.span.SPAN_KIND_SERVER
    assert (span.trace_id, span.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert span.span.trace_state == "vendor=abc"
    assert span.attributes == {
        "authz.decision": "allow",
        "authz.status": 200,
        "authz.reason": "allowed",
        "authz.door": "grpc",
        "authz.authenticated": True,
        "authz.policy": "read",
        "authz.provider": "main",
        "authz.credential.kind": "jwt_header",
        "authz.token_cache": "miss",
    }
    assert span.resource["service.name"] == "authz-server"
    everything = receiver.all_bytes()
    for secret in (token, token.split(".")[1], token.split(".")[2], "alice", "example.com"):
        assert secret.encode() not in everything


def test_a_denial_says_why_and_a_repeated_token_is_a_cache_hit(
    traced: tuple[AuthorizationService, Tracing],
    receiver: OtlpReceiver,
    make_token: Callable[..., str],
    clock: Clock,
) -> None:
    service, _ = traced
    assert service.check(_request()).status == 401
    token = make_token()
    service.check(_request(token))
    clock.advance(1)
    service.check(_request(token))
    spans = receiver.wait_for(lambda s: len(s) == 3, "three spans")
    by_order = sorted(spans, key=lambda s: s.span.start_time_unix_nano)
    assert by_order[0].attributes["authz.reason"] == "missing_credentials"
    assert by_order[0].attributes["authz.credential.kind"] == "none"
    assert "authz.token_cache" not in by_order[0].attributes
    assert [s.attributes["authz.token_cache"] for s in by_order[1:]] == ["miss", "hit"]
    # No incoming context: each Check starts its own trace.
    assert len({s.trace_id for s in spans}) == 3
    assert all(s.parent_span_id == "" for s in spans)


@pytest.mark.parametrize(
    "headers",
    [
        {"b3": f"{TRACE_ID}-{PARENT_ID}-1"},
        {"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_ID, "x-b3-sampled": "1"},
    ],
    ids=["b3-single", "b3-multi"],
)
def test_b3_headers_make_the_span_join_their_trace_over_otlp_grpc(
    build: Callable[..., AuthorizationService],
    otel_env: pytest.MonkeyPatch,
    receiver: OtlpReceiver,
    headers: dict[str, str],
) -> None:
    tracing = _tracing(otel_env, receiver.grpc_endpoint, "grpc")
    service = build(tracing)
    try:
        service.check(RequestAttributes(path="/api/x", headers=headers))
        [span] = receiver.wait_for(lambda s: len(s) == 1, "one span over gRPC")
    finally:
        assert tracing.shutdown()
    assert (span.trace_id, span.parent_span_id) == (TRACE_ID, PARENT_ID)


def test_the_decision_log_line_carries_the_trace_and_span_ids(
    build: Callable[..., AuthorizationService],
    otel_env: pytest.MonkeyPatch,
    receiver: OtlpReceiver,
    captured: Captured,
) -> None:
    tracing = _tracing(otel_env, receiver.http_endpoint, "http/protobuf")
    service = build(tracing, decision_log=captured.log(DecisionLogSpec()))
    try:
        service.check(_request(traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01"))
        [span] = receiver.wait_for(lambda s: len(s) == 1, "one span")
    finally:
        assert tracing.shutdown()
    [line] = captured.entries()
    assert (line["trace_id"], line["span_id"]) == (TRACE_ID, span.span_id)


def test_an_unsampled_check_has_no_span_and_its_log_line_no_trace_ids(
    build: Callable[..., AuthorizationService],
    otel_env: pytest.MonkeyPatch,
    receiver: OtlpReceiver,
    captured: Captured,
) -> None:
    tracing = _tracing(
        otel_env, receiver.http_endpoint, "http/protobuf", OTEL_TRACES_SAMPLER="always_off"
    )
    service = build(tracing, decision_log=captured.log(DecisionLogSpec()))
    service.check(_request())
    assert tracing.shutdown()
    assert receiver.spans() == []
    [line] = captured.entries()
    assert "trace_id" not in line


class _JwksWithHeaders(BaseHTTPRequestHandler):
    server: Any

    def do_GET(self) -> None:
        self.server.seen.append(dict(self.headers.items()))
        threading.Event().wait(getattr(self.server, "delay", 0.0))  # a slow IdP
        body = json.dumps(self.server.jwks).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


def test_a_key_set_refresh_the_check_waited_for_is_a_child_span_and_carries_traceparent(
    build: Callable[..., AuthorizationService],
    rsa_key: SigningKey,
    otel_env: pytest.MonkeyPatch,
    receiver: OtlpReceiver,
    make_token: Callable[..., str],
) -> None:
    idp = ThreadingHTTPServer(("127.0.0.1", 0), _JwksWithHeaders)
    idp.seen = []  # type: ignore[attr-defined]
    old_key = devkeys.generate_key("EC-P256", kid="old-1")
    idp.jwks = devkeys.jwks(old_key)  # type: ignore[attr-defined]
    threading.Thread(target=idp.serve_forever, daemon=True).start()
    tracing = _tracing(otel_env, receiver.http_endpoint, "http/protobuf")
    try:
        provider = f"""  - name: main
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksUri: http://127.0.0.1:{idp.server_address[1]}/jwks.json"""
        service = build(tracing, provider)
        assert "traceparent" not in {k.lower() for k in idp.seen[0]}  # the start-up load
        # The IdP rotates in a key the server has not seen: the Check waits for the refresh.
        idp.jwks = {"keys": devkeys.jwks(old_key)["keys"] + devkeys.jwks(rsa_key)["keys"]}  # type: ignore[attr-defined]
        assert service.check(_request(make_token())).allowed
        spans = receiver.wait_for(lambda s: len(s) == 2, "the Check and its refresh")
    finally:
        assert tracing.shutdown()
        idp.shutdown()
        idp.server_close()
    [check] = [s for s in spans if s.span.name == SPAN_NAME]
    [refresh] = [s for s in spans if s.span.name == "authz.jwks.refresh"]
    assert (refresh.trace_id, refresh.parent_span_id) == (check.trace_id, check.span_id)
    assert refresh.attributes == {"authz.outcome": "key_found"}
    fetch = {k.lower(): v for k, v in idp.seen[-1].items()}  # type: ignore[attr-defined]
    version, trace_id, parent_id, flags = fetch["traceparent"].split("-")
    assert (version, trace_id, parent_id) == ("00", check.trace_id, check.span_id)
    assert int(flags, 16) & 1  # sampled


@pytest.mark.parametrize("where", ["closed port", "hanging receiver"])
def test_an_exporter_down_or_hanging_never_delays_checks_and_dropped_spans_are_counted(
    build: Callable[..., AuthorizationService],
    otel_env: pytest.MonkeyPatch,
    make_token: Callable[..., str],
    where: str,
) -> None:
    with OtlpReceiver(hang=True) as hanging:
        endpoint = (
            f"http://127.0.0.1:{free_port()}" if where == "closed port" else hanging.grpc_endpoint
        )
        tracing = _tracing(
            otel_env,
            endpoint,
            "grpc",
            OTEL_BSP_MAX_QUEUE_SIZE="16",
            OTEL_BSP_MAX_EXPORT_BATCH_SIZE="8",
        )
        metrics = Metrics(CollectorRegistry())
        metrics.watch_tracing(tracing.counts_by_outcome)
        service = build(tracing)
        token = make_token()
        service.check(_request(token))
        if where == "hanging receiver":
            # An export is under way and will not return while the Checks below run.
            wait_until(lambda: hanging.calls >= 1, what="an export the receiver holds")
        answers = [service.check(_request(token)).status for _ in range(200)]
        assert answers == [200] * 200
        assert hanging.calls <= 1  # the SDK's one export thread is still held, if anywhere
        dropped = {"outcome": "dropped"}
        wait_until(
            lambda: (
                (metrics.registry.get_sample_value("authz_tracing_spans_total", dropped) or 0)
                >= 201 - 16
            ),
            what="spans dropped and counted",
        )
        assert (
            metrics.registry.get_sample_value("authz_tracing_spans_total", {"outcome": "exported"})
            == 0
        )
        tracing.shutdown(timeout=0.5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "lots"),
    ],
)
def test_a_bad_otel_variable_is_refused_naming_it(
    otel_env: pytest.MonkeyPatch, name: str, value: str
) -> None:
    otel_env.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    otel_env.setenv(name, value)
    with pytest.raises(TracingError, match=name):
        Tracing.from_environment()


def test_the_resource_says_which_worker_and_honours_otel_service_name(
    otel_env: pytest.MonkeyPatch, receiver: OtlpReceiver
) -> None:
    otel_env.setenv("OTEL_SERVICE_NAME", "edge-authz")
    otel_env.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod")
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.http_endpoint)
    tracing = Tracing.from_environment(worker=3)
    try:
        attributes = dict(tracing.provider.resource.attributes)
    finally:
        assert tracing.shutdown()
    assert attributes["service.name"] == "edge-authz"
    assert attributes["deployment.environment"] == "prod"
    assert attributes["authz.worker"] == 3
    assert str(attributes["service.instance.id"]).endswith("/worker-3")


def test_parentbased_traceidratio_samples_roots_at_the_ratio_and_follows_a_parent(
    build: Callable[..., AuthorizationService],
    otel_env: pytest.MonkeyPatch,
    receiver: OtlpReceiver,
) -> None:
    tracing = _tracing(
        otel_env,
        receiver.http_endpoint,
        "http/protobuf",
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0.25",
    )
    service = build(tracing)
    try:
        for _ in range(400):
            service.check(_request())
        sampled_parent = f"00-{TRACE_ID}-{PARENT_ID}-01"
        unsampled_parent = f"00-{'1' * 32}-{PARENT_ID}-00"
        for _ in range(20):
            service.check(_request(traceparent=sampled_parent))
            service.check(_request(traceparent=unsampled_parent))
    finally:
        assert tracing.shutdown()
    spans = receiver.spans()
    roots = [s for s in spans if s.parent_span_id == ""]
    assert 40 <= len(roots) <= 160  # 100 expected; outside this once in millions of runs
    children = [s for s in spans if s.parent_span_id]
    assert len(children) == 20
    assert {s.trace_id for s in children} == {TRACE_ID}


def test_w3c_context_wins_over_b3_when_a_request_carries_both(
    traced: tuple[AuthorizationService, Tracing], receiver: OtlpReceiver
) -> None:
    service, _ = traced
    service.check(
        _request(
            traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01",
            b3=f"{'2' * 32}-{'3' * 16}-1",
        )
    )
    [span] = receiver.wait_for(lambda s: len(s) == 1, "one span")
    assert (span.trace_id, span.parent_span_id) == (TRACE_ID, PARENT_ID)


def test_a_malformed_traceparent_falls_back_to_b3_and_without_either_a_new_trace(
    traced: tuple[AuthorizationService, Tracing], receiver: OtlpReceiver
) -> None:
    service, _ = traced
    service.check(_request(traceparent="00-not-a-context-01", b3=f"{TRACE_ID}-{PARENT_ID}-1"))
    service.check(_request(traceparent="00-not-a-context-01"))
    spans = receiver.wait_for(lambda s: len(s) == 2, "two spans")
    joined = [s for s in spans if s.trace_id == TRACE_ID]
    assert [s.parent_span_id for s in joined] == [PARENT_ID]
    [fresh] = [s for s in spans if s.trace_id != TRACE_ID]
    assert fresh.parent_span_id == ""


def test_serve_refuses_to_start_naming_a_bad_otel_variable(tmp_path: Path) -> None:
    jwks = json.dumps(json.dumps(devkeys.jwks(devkeys.generate_key("EC-P256", kid="k"))))
    path = tmp_path / "config.yaml"
    path.write_text(
        f"apiVersion: authz-server/v1\nkind: AuthzConfig\nproviders:\n"
        f"  - {{name: main, issuer: {ISSUER}, jwks: {jwks}}}\n{POLICIES}"
    )
    env = dict(os.environ, OTEL_TRACES_SAMPLER="sometimes")
    done = subprocess.run(
        [sys.executable, "-m", "authz_server", "serve", "--config", str(path), "--tracing",
         "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "OTEL_TRACES_SAMPLER='sometimes'" in done.stderr


def test_a_check_decided_again_after_would_wait_keeps_one_span_that_the_fetch_names(
    build: Callable[..., AuthorizationService],
    rsa_key: SigningKey,
    otel_env: pytest.MonkeyPatch,
    receiver: OtlpReceiver,
    make_token: Callable[..., str],
) -> None:
    idp = ThreadingHTTPServer(("127.0.0.1", 0), _JwksWithHeaders)
    idp.daemon_threads = True
    old_key = devkeys.generate_key("EC-P256", kid="old-1")
    idp.seen, idp.jwks = [], devkeys.jwks(old_key)  # type: ignore[attr-defined]
    threading.Thread(target=idp.serve_forever, daemon=True).start()
    tracing = _tracing(otel_env, receiver.http_endpoint, "http/protobuf")
    try:
        provider = f"""  - name: main
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksUri: http://127.0.0.1:{idp.server_address[1]}/jwks.json"""
        service = build(tracing, provider)
        idp.jwks = {"keys": devkeys.jwks(old_key)["keys"] + devkeys.jwks(rsa_key)["keys"]}  # type: ignore[attr-defined]
        idp.delay = 0.3  # type: ignore[attr-defined]
        request = _request(make_token())
        # The event loop's first try (the HTTP door): the refresh starts, the Check would wait.
        with pytest.raises(WouldWait):
            service.check(request, wait="defer")
        assert service.check(request).allowed  # ...decided again where it may wait
        spans = receiver.wait_for(lambda s: len(s) == 2, "the Check and its refresh")
    finally:
        assert tracing.shutdown()
        idp.shutdown()
        idp.server_close()
    [check] = [s for s in spans if s.span.name == SPAN_NAME]
    [refresh] = [s for s in spans if s.span.name == "authz.jwks.refresh"]
    assert refresh.parent_span_id == check.span_id
    fetch = {k.lower(): v for k, v in idp.seen[-1].items()}  # type: ignore[attr-defined]
    assert fetch["traceparent"].split("-")[1:3] == [check.trace_id, check.span_id]


def test_the_start_line_says_where_spans_go_without_credentials_in_the_endpoint(
    otel_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://otel:s3cret@127.0.0.1:{free_port()}")
    otel_env.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    otel_env.setenv("OTEL_TRACES_SAMPLER_ARG", "0.01")
    with caplog.at_level("INFO", logger="authz_server.tracing"):
        tracing = Tracing.from_environment()
    tracing.shutdown(timeout=0.5)
    [line] = [r.getMessage() for r in caplog.records if r.name == "authz_server.tracing"]
    assert line.startswith("tracing on: OTLP http/protobuf to 127.0.0.1:")
    assert "sampler parentbased_traceidratio (0.01 of Checks without a parent)" in line
    assert "s3cret" not in line


def test_an_introspection_call_is_a_child_span_and_carries_the_checks_traceparent(
    tmp_path: Path, clock: Clock, otel_env: pytest.MonkeyPatch, receiver: OtlpReceiver
) -> None:
    (tmp_path / "client-secret").write_text(CLIENT_SECRET)
    tracing = _tracing(otel_env, receiver.http_endpoint, "http/protobuf")
    with IntrospectionServer() as idp:
        idp.active("opaque-token-1", sub="partner", client_id="acme")
        provider = f"""  - name: opaque
    issuer: https://idp.test
    introspection:
      endpoint: {idp.endpoint}
      clientId: {CLIENT_ID}
      clientSecretFile: client-secret
    fromHeaders: [{{name: authorization, prefix: "Bearer "}}]"""
        try:
            service = AuthorizationService(_engine(tmp_path, clock, provider), tracing=tracing)
            assert service.check(_request("opaque-token-1")).allowed
            spans = receiver.wait_for(lambda s: len(s) == 2, "the Check and its call")
        finally:
            assert tracing.shutdown()
    [check] = [s for s in spans if s.span.name == SPAN_NAME]
    [call] = [s for s in spans if s.span.name == "authz.introspection.call"]
    assert (call.trace_id, call.parent_span_id) == (check.trace_id, check.span_id)
    assert call.attributes == {"authz.outcome": "active"}
    version, trace_id, parent_id, _ = idp.calls[-1].traceparent.split("-")
    assert (version, trace_id, parent_id) == ("00", check.trace_id, check.span_id)


def test_a_redis_replay_check_is_a_child_span_with_its_outcome(
    tmp_path: Path,
    clock: Clock,
    rsa_key: SigningKey,
    otel_env: pytest.MonkeyPatch,
    receiver: OtlpReceiver,
) -> None:
    client = devkeys.generate_key("EC-P256")
    (tmp_path / "redis-password").write_text(REDIS_PASSWORD)
    tracing = _tracing(otel_env, receiver.http_endpoint, "http/protobuf")
    with running_redis(tmp_path) as redis:
        provider = sender._provider(rsa_key, "fapi", ISSUER, "dpop: {mode: optional}")
        server = f"  replayCache:\n    redis: {{url: '{redis.url}', passwordFile: redis-password}}"
        text = (
            f"apiVersion: authz-server/v1\nkind: AuthzConfig\nserver:\n{server}\n"
            f"providers:{provider}\n{sender.POLICIES}"
        )
        engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
        for cache in engine.caches.values():
            assert cache.refresh()
        service = AuthorizationService(engine, tracing=tracing)
        token = rsa_key.sign(claims_for(clock.now, cnf={"jkt": client.thumbprint()}))
        proof = sender._proof(client, token, clock.now)
        try:
            assert service.check(sender._dpop_request(token, proof)).allowed
            assert not service.check(sender._dpop_request(token, proof)).allowed
            spans = receiver.wait_for(lambda s: len(s) == 4, "two Checks and their Redis calls")
        finally:
            assert tracing.shutdown()
            engine.close()
    checks = {s.span_id: s for s in spans if s.span.name == SPAN_NAME}
    redis_spans = [s for s in spans if s.span.name == "authz.replay_cache.redis"]
    assert sorted(s.attributes["authz.outcome"] for s in redis_spans) == ["new", "replayed"]
    for span in redis_spans:
        assert span.parent_span_id in checks
        assert span.trace_id == checks[span.parent_span_id].trace_id
