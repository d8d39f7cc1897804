"""Tracing end to end: real Envoy with its own tracer (``envoy.tracers.opentelemetry``) and our
server (``serve --tracing``) export to one real OTLP receiver (tests/otlp.py). One request
gives Envoy's span and ours in one trace, ours a descendant of Envoy's, with the documented
attributes and no byte of the token anywhere in what was exported. Without Envoy tracing, B3
headers from the client make our span join the client's trace. An exporter that hangs never
holds a Check; the spans it cannot take are counted on /metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_server.ops.tracing import SPAN_NAME
from authz_server.tools import devkeys
from authz_server.tools.envoy_config import render_bootstrap
from tests.e2e.harness import (
    DOORS,
    AuthzServerProcess,
    EchoUpstream,
    EnvoyProcess,
    JWKSServer,
    door_setup,
    free_port,
    http_request,
    wait_until,
)
from tests.helpers import AUDIENCE, ISSUER, claims_for, grpc_check_code
from tests.otlp import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.e2e

CONFIG = """
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: main
    issuer: {issuer}
    audiences: [{audience}]
    jwksUri: {jwks_url}
    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
policies:
  - name: api
    rules:
      - from: [{{source: {{requestPrincipals: ["*"]}}}}]
        to: [{{operation: {{paths: ["/api/*"]}}}}]
"""
TRACE_ID = "80f198ee56343ba864fe8b2a57d3eff7"
CLIENT_SPAN = "e457b5a2e4d86bd1"
ENVOY_SERVICE = "envoy-ingress"


def _with_envoy_tracing(bootstrap: str, collector_port: int) -> str:
    """``bootstrap`` with Envoy's OpenTelemetry tracer on every request, exporting over OTLP
    gRPC to 127.0.0.1:``collector_port``."""
    config: dict[str, Any] = yaml.safe_load(bootstrap)
    resources = config["static_resources"]
    manager = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["tracing"] = {
        "random_sampling": {"value": 100},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otel"}, "timeout": "1s"},
                "service_name": ENVOY_SERVICE,
            },
        },
    }
    resources["clusters"].append(
        {
            "name": "otel",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": "otel",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": collector_port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
    )
    return yaml.safe_dump(config, sort_keys=False)


class Stack:
    def __init__(
        self, url: str, receiver: OtlpReceiver, key: devkeys.SigningKey, server: Any
    ) -> None:
        self.url = url
        self.receiver = receiver
        self.key = key
        self.server = server

    def token(self) -> str:
        return self.key.sign(claims_for(time.time(), sub="alice", email="alice@example.com"))


@contextmanager
def _stack(
    workdir: Path,
    door: str,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
    *,
    envoy_tracing: bool,
    otlp_endpoint: str | None = None,
    protocol: str = "grpc",
) -> Iterator[Stack]:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        otlp_endpoint or (receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint),
    )
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    key = devkeys.generate_key("RSA", kid="rsa-1")
    with JWKSServer(devkeys.jwks(key)) as jwks, EchoUpstream() as upstream:
        config = workdir / "config.yaml"
        config.write_text(CONFIG.format(issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks.jwks_url))
        grpc_port, http_port = free_port(), free_port()
        server_args, envoy_args = door_setup(
            door, grpc_port if door == "grpc" else free_port(), ["x-jwt-sub"]
        )
        with AuthzServerProcess(
            config,
            grpc_port,
            http_port,
            [*server_args, "--tracing"],
            log_path=workdir / "server.log",
            ready_path="/readyz",
        ) as server:
            listen, admin = free_port(), free_port()
            bootstrap = render_bootstrap(
                listen_port=listen, admin_port=admin, upstream_port=upstream.port, **envoy_args
            )
            if envoy_tracing:
                bootstrap = _with_envoy_tracing(bootstrap, receiver.grpc_port)
            with EnvoyProcess(bootstrap, admin, workdir / "envoy.log"):
                yield Stack(f"http://127.0.0.1:{listen}", receiver, key, server)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def _ancestors(span: ReceivedSpan, spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    by_id = {s.span_id: s for s in spans}
    chain: list[ReceivedSpan] = []
    current = by_id.get(span.parent_span_id)
    while current is not None and len(chain) < 20:
        chain.append(current)
        current = by_id.get(current.parent_span_id)
    return chain


@pytest.mark.parametrize("door", DOORS)
def test_envoy_span_and_ours_are_one_trace_ours_a_descendant_without_the_token(
    tmp_path: Path, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, door: str
) -> None:
    with _stack(tmp_path, door, receiver, monkeypatch, envoy_tracing=True) as stack:
        token = stack.token()
        status, _, _ = http_request(
            f"{stack.url}/api/orders", headers={"Authorization": f"Bearer {token}"}
        )
        assert status == 200

        def both(spans: list[ReceivedSpan]) -> bool:
            ours = [s for s in spans if s.span.name == SPAN_NAME]
            return bool(ours) and any(
                a.resource.get("service.name") == ENVOY_SERVICE for a in _ancestors(ours[0], spans)
            )

        try:
            spans = receiver.wait_for(both, "Envoy's span and ours in one trace", timeout=20)
        except AssertionError as error:
            seen = [
                (s.resource.get("service.name"), s.span.name, s.trace_id, s.span_id,
                 s.parent_span_id) for s in receiver.spans()
            ]  # fmt: skip
            raise AssertionError(f"{error}; spans received: {seen}") from None
    [ours] = [s for s in spans if s.span.name == SPAN_NAME]
    envoy_ancestors = [
        a for a in _ancestors(ours, spans) if a.resource.get("service.name") == ENVOY_SERVICE
    ]
    assert envoy_ancestors, "our span descends from Envoy's"
    assert {a.trace_id for a in envoy_ancestors} == {ours.trace_id}
    assert ours.resource["service.name"] == "authz-server"
    assert ours.attributes["authz.decision"] == "allow"
    assert ours.attributes["authz.policy"] == "api"
    assert ours.attributes["authz.provider"] == "main"
    assert ours.attributes["authz.door"] == door
    assert ours.attributes["authz.credential.kind"] == "jwt_header"
    assert ours.attributes["authz.token_cache"] == "miss"
    everything = receiver.all_bytes()
    header, payload, signature = token.split(".")
    for secret in (token, header, payload, signature, "alice", "example.com"):
        assert secret.encode() not in everything
    # The decision log line names the same trace.
    assert f'"trace_id": "{ours.trace_id}"' in stack.server.log_text()


def test_b3_headers_from_the_client_make_our_span_join_their_trace(
    tmp_path: Path, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _stack(
        tmp_path, "grpc", receiver, monkeypatch, envoy_tracing=False, protocol="http/protobuf"
    ) as stack:
        status, _, _ = http_request(
            f"{stack.url}/api/orders",
            headers={
                "Authorization": f"Bearer {stack.token()}",
                "X-B3-TraceId": TRACE_ID,
                "X-B3-SpanId": CLIENT_SPAN,
                "X-B3-Sampled": "1",
            },
        )
        assert status == 200
        [ours] = receiver.wait_for(lambda s: len(s) == 1, "our span over OTLP/HTTP")
    assert (ours.trace_id, ours.parent_span_id) == (TRACE_ID, CLIENT_SPAN)


@pytest.mark.parametrize("where", ["hanging receiver", "closed port"])
def test_an_exporter_down_or_hanging_never_holds_a_check_and_dropped_spans_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    closed = f"http://127.0.0.1:{free_port()}" if where == "closed port" else None
    with (
        OtlpReceiver(hang=True) as hanging,
        _stack(
            tmp_path, "grpc", hanging, monkeypatch, envoy_tracing=False, otlp_endpoint=closed
        ) as stack,
    ):
        headers = {"Authorization": f"Bearer {stack.token()}"}
        statuses = [
            http_request(f"{stack.url}/api/orders", headers=headers, timeout=2)[0]
            for _ in range(40)
        ]
        # Envoy's ext_authz timeout is 1s: a Check held by the exporter would be a 503.
        assert statuses == [200] * 40

        metrics_url = f"{stack.server.http_url}/metrics"

        def dropped() -> float:
            _, _, body = http_request(metrics_url)
            for line in body.decode().splitlines():
                if line.startswith('authz_tracing_spans_total{outcome="dropped"}'):
                    return float(line.split()[-1])
            return 0.0

        wait_until(lambda: dropped() >= 40 - 8 - 4, what="dropped spans on /metrics")


def test_every_worker_exports_and_its_resource_says_which(
    tmp_path: Path, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.grpc_endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    key = devkeys.generate_key("RSA", kid="rsa-1")
    with JWKSServer(devkeys.jwks(key)) as jwks:
        config = tmp_path / "config.yaml"
        config.write_text(CONFIG.format(issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks.jwks_url))
        with AuthzServerProcess(
            config,
            free_port(),
            free_port(),
            ["--workers", "2", "--tracing"],
            log_path=tmp_path / "server.log",
            ready_path="/readyz",
        ) as server:
            token = key.sign(claims_for(time.time()))
            # A new connection each: the kernel spreads them over the workers' sockets
            # (all 30 on one worker: one chance in 2**29).
            for _ in range(30):
                assert grpc_check_code(server.grpc_address, token, "/api/orders") == 0

            def workers_seen(spans: list[ReceivedSpan]) -> bool:
                return {s.resource.get("authz.worker") for s in spans} == {0, 1}

            spans = receiver.wait_for(workers_seen, "spans from both workers", timeout=20)
    by_worker = {s.resource["authz.worker"]: s.resource for s in spans}
    assert by_worker[0]["process.pid"] != by_worker[1]["process.pid"]
    for worker, resource in by_worker.items():
        assert str(resource["service.instance.id"]).endswith(f"/worker-{worker}")
        assert resource["service.name"] == "authz-server"
