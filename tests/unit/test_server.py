"""The gRPC server in-process: Check over a real channel, health, reflection, side port, drain."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz_server.config import load as config
from authz_server.doors.grpc import to_attributes
from authz_server.server import AUTHORIZATION_SERVICE, AuthzServer
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for, write_config


@pytest.fixture
def running(tmp_path: Path, rsa_key: SigningKey) -> Iterator[AuthzServer]:
    (tmp_path / "jwks.json").write_text(json.dumps(devkeys.jwks(rsa_key)))
    text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksFile: jwks.json
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
policies:
  - name: authenticated
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""
    server = AuthzServer(
        config.load(write_config(tmp_path, text)), listen="127.0.0.1:0", http_listen="127.0.0.1:0"
    )
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=1)


@pytest.fixture
def channel(running: AuthzServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as chan:
        yield chan


def check_request(token: str | None, path: str = "/orders") -> external_auth_pb2.CheckRequest:
    ctx = attribute_context_pb2.AttributeContext
    headers = {"x-user": "forged"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return external_auth_pb2.CheckRequest(
        attributes=ctx(
            request=ctx.Request(
                http=ctx.HttpRequest(method="GET", host="api.test", path=path, headers=headers)
            )
        )
    )


def test_check_allows_with_headers_and_denies_with_401(
    channel: grpc.Channel, rsa_key: SigningKey
) -> None:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    token = rsa_key.sign(claims_for(Clock().now))
    ok = stub.Check(check_request(token), timeout=5)
    assert ok.status.code == 0
    assert [(h.header.key, h.header.value) for h in ok.ok_response.headers] == [("x-user", "alice")]
    assert ok.ok_response.headers[0].append_action == 2  # OVERWRITE_IF_EXISTS_OR_ADD
    assert "authorization" in ok.ok_response.headers_to_remove
    assert ok.dynamic_metadata.fields["principal"].string_value == f"{ISSUER}/alice"

    denied = stub.Check(check_request(None), timeout=5)
    assert denied.status.code == 16  # UNAUTHENTICATED
    assert denied.denied_response.status.code == 401
    assert json.loads(denied.denied_response.body)["reason"] == "missing_credentials"
    headers = {h.header.key: h.header.value for h in denied.denied_response.headers}
    assert headers["www-authenticate"].startswith("Bearer realm=")


def test_repeated_answers_are_identical_on_the_wire(
    channel: grpc.Channel, rsa_key: SigningKey
) -> None:
    raw = channel.unary_unary(f"/{AUTHORIZATION_SERVICE}/Check")
    token = rsa_key.sign(claims_for(Clock().now))
    allows = {raw(check_request(token).SerializeToString(), timeout=5) for _ in range(3)}
    denials = {raw(check_request(None).SerializeToString(), timeout=5) for _ in range(3)}
    assert len(allows) == len(denials) == 1
    (allow,), (denial,) = allows, denials
    assert external_auth_pb2.CheckResponse.FromString(allow).status.code == 0
    assert external_auth_pb2.CheckResponse.FromString(denial).denied_response.status.code == 401


def test_bytes_that_are_not_a_check_request_are_an_invalid_argument(
    channel: grpc.Channel,
) -> None:
    raw = channel.unary_unary(f"/{AUTHORIZATION_SERVICE}/Check")
    with pytest.raises(grpc.RpcError) as caught:
        raw(b"\xff\xff\xff not protobuf", timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "CheckRequest" in (caught.value.details() or "")


def test_health_is_serving_with_keys_and_not_serving_after_stop(
    running: AuthzServer, channel: grpc.Channel
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", AUTHORIZATION_SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    running.health.enter_graceful_shutdown()
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_the_authorization_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert AUTHORIZATION_SERVICE in names and "grpc.health.v1.Health" in names


def test_side_port_healthz_and_readyz(running: AuthzServer) -> None:
    base = f"http://127.0.0.1:{running.http_port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as reply:
        assert reply.status == 200
    with urllib.request.urlopen(f"{base}/readyz", timeout=5) as reply:
        body = json.loads(reply.read())
    assert body["ready"] is True and set(body["providers"].values()) == {"ready"}
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{base}/nope", timeout=5)
    caught.value.close()
    assert caught.value.code == 404


def test_raw_header_map_is_read_when_envoy_sends_it() -> None:
    ctx = attribute_context_pb2.AttributeContext
    from envoy.config.core.v3 import base_pb2

    header_map = base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key="X-A", raw_value=b"1"),
            base_pb2.HeaderValue(key="x-a", raw_value=b"2"),
        ]
    )
    request = external_auth_pb2.CheckRequest(
        attributes=ctx(request=ctx.Request(http=ctx.HttpRequest(header_map=header_map)))
    )
    assert dict(to_attributes(request).headers) == {"x-a": "1,2"}


def test_every_field_envoy_sends_reaches_the_policies_through_the_grpc_door() -> None:
    """The gRPC door reads peers, TLS session and context extensions when first asked for:
    each must still be what Envoy sent (a policy on a source IP, a peer principal, a port, SNI
    or a context extension decides on it)."""
    from envoy.config.core.v3 import address_pb2

    ctx = attribute_context_pb2.AttributeContext

    def peer(ip: str, port: int, principal: str, certificate: str = "") -> Any:
        address = address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=ip, port_value=port)
        )
        return ctx.Peer(address=address, principal=principal, certificate=certificate)

    http = ctx.HttpRequest(
        method="POST", host="api.example", path="", scheme="https", headers={"x-a": "1"}
    )
    request = external_auth_pb2.CheckRequest(
        attributes=ctx(
            source=peer("10.1.2.3", 40123, "spiffe://cluster.local/ns/a/sa/client", "PEM%20x"),
            destination=peer("10.9.8.7", 8443, "spiffe://cluster.local/ns/b/sa/api"),
            request=ctx.Request(http=http),
            context_extensions={"workload": "orders"},
            tls_session=ctx.TLSSession(sni="api.example"),
        )
    )
    read = to_attributes(request)
    assert (read.method, read.host, read.path, read.scheme, dict(read.headers)) == (
        "POST",
        "api.example",
        "/",
        "https",
        {"x-a": "1"},
    )
    assert (read.source_ip, read.source_port, read.peer_principal, read.client_certificate) == (
        "10.1.2.3",
        40123,
        "spiffe://cluster.local/ns/a/sa/client",
        "PEM%20x",
    )
    assert (read.destination_ip, read.destination_port, read.destination_principal) == (
        "10.9.8.7",
        8443,
        "spiffe://cluster.local/ns/b/sa/api",
    )
    assert (read.sni, dict(read.context_extensions), read.door) == (
        "api.example",
        {"workload": "orders"},
        "grpc",
    )
    assert str(read.source_address) == "10.1.2.3" and read.unknown == frozenset()
    empty = to_attributes(external_auth_pb2.CheckRequest())
    assert (empty.source_ip, empty.destination_port, empty.sni, empty.path) == ("", 0, "", "/")


def test_drain_reports_not_ready_while_still_answering_checks(
    running: AuthzServer, channel: grpc.Channel, rsa_key: SigningKey
) -> None:
    import threading

    from tests.e2e.harness import http_request, wait_until

    stopper = threading.Thread(target=running.stop, kwargs={"grace": 1, "drain_delay": 3})
    stopper.start()
    try:
        base = f"http://127.0.0.1:{running.http_port}"
        wait_until(lambda: http_request(f"{base}/readyz")[0] == 503, what="/readyz turns 503")
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        token = rsa_key.sign(claims_for(Clock().now))
        assert stub.Check(check_request(token), timeout=5).status.code == 0
    finally:
        stopper.join(timeout=10)


def test_liveness_stays_serving_while_a_provider_has_no_keys(tmp_path: Path) -> None:
    text = (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
        f"providers: [{{issuer: {ISSUER}, jwksUri: 'http://127.0.0.1:9/jwks', timeout: 200ms}}]\n"
        "policies: [{name: allow-all, rules: [{}]}]\n"
    )
    server = AuthzServer(
        config.load(write_config(tmp_path, text)), listen="127.0.0.1:0", http_listen="127.0.0.1:0"
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as chan:
            health = health_pb2_grpc.HealthStub(chan)
            ready = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            alive = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
        assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert alive.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace=1)


def test_rendered_allows_are_reused_per_identity_and_never_mixed(rsa_key: SigningKey) -> None:
    from authz_server.doors.grpc import Renderer
    from authz_server.responses import Decision, allow

    renderer = Renderer(allow_entries=8)
    alice = {"principal": "iss/alice", "claims": {"sub": "alice"}}
    bob = {"principal": "iss/bob", "claims": {"sub": "bob"}}

    def decision(who: dict[str, object], user: str) -> Decision:
        return allow(
            headers_to_set=(("x-user", user),),
            headers_to_remove=("authorization",),
            metadata=who,
            provider="p",
            principal=str(who["principal"]),
            policy=None,
        )

    first = renderer.wire(decision(alice, "alice"))
    assert renderer.wire(decision(alice, "alice")) is first
    other = external_auth_pb2.CheckResponse.FromString(renderer.wire(decision(bob, "bob")))
    assert other.dynamic_metadata.fields["principal"].string_value == "iss/bob"
    assert other.ok_response.headers[0].header.value == "bob"
    parsed = external_auth_pb2.CheckResponse.FromString(first)
    assert parsed.dynamic_metadata.fields["principal"].string_value == "iss/alice"
    # Same headers but another (equal-looking) metadata object: rebuilt, not reused.
    assert renderer.wire(decision(dict(alice), "alice")) is not first


def test_a_new_token_of_a_known_caller_is_answered_with_its_own_metadata() -> None:
    from authz_server.doors.grpc import Renderer
    from authz_server.responses import allow

    renderer = Renderer(allow_entries=8)
    claims: dict[str, object] = {"sub": "alice", "jti": "one", "exp": 1.5, "groups": ["a", "b"]}
    first = {"principal": "iss/alice", "claims": claims}
    second = {"principal": "iss/alice", "claims": {**claims, "jti": "two", "extra": None}}

    def answer(metadata: dict[str, object]) -> Any:
        decision = allow(
            headers_to_set=(("x-user", "alice"),),
            headers_to_remove=("authorization",),
            query_params_to_remove=("access_token",),
            metadata=metadata,
            provider="p",
            principal="iss/alice",
            policy=None,
        )
        built = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=0),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key="x-user", value="alice"),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                ],
                headers_to_remove=["authorization"],
                query_parameters_to_remove=["access_token"],
            ),
        )
        built.dynamic_metadata.update(metadata)
        return external_auth_pb2.CheckResponse.FromString(renderer.wire(decision)), built

    for metadata in (first, second, first):
        sent, built = answer(metadata)
        assert sent == built
    sent, _ = answer(second)
    assert sent.dynamic_metadata.fields["claims"].struct_value.fields["jti"].string_value == "two"


def test_a_full_renderer_starts_over_and_still_answers_each_caller_with_its_own() -> None:
    from authz_server.doors.grpc import Renderer
    from authz_server.responses import allow

    renderer = Renderer(allow_entries=4)
    callers = [{"principal": f"iss/u{n}", "claims": {"sub": f"u{n}"}} for n in range(10)]

    def principal(metadata: dict[str, object], user: str) -> str:
        decision = allow(
            headers_to_set=(("x-user", user),),
            headers_to_remove=("authorization",),
            metadata=metadata,
            provider="p",
            principal=str(metadata["principal"]),
            policy=None,
        )
        sent = external_auth_pb2.CheckResponse.FromString(renderer.wire(decision))
        assert sent.ok_response.headers[0].header.value == user
        return str(sent.dynamic_metadata.fields["principal"].string_value)

    for _ in range(2):
        for n, metadata in enumerate(callers):
            assert principal(metadata, f"u{n % 3}") == f"iss/u{n}"
    assert len(renderer._allows) <= 4 and len(renderer._bare_allows) <= 4


def test_readyz_says_when_the_replay_cache_cannot_answer_and_stays_ready(
    tmp_path: Path, rsa_key: SigningKey
) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(devkeys.jwks(rsa_key)))
    text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
server:
  replayCache: {{redis: {{url: "unix://{tmp_path}/no-redis.sock", timeout: 100ms}}}}
providers:
  - issuer: {ISSUER}
    jwksFile: jwks.json
    dpop: {{mode: optional}}
policies:
  - name: authenticated
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""
    server = AuthzServer(
        config.load(write_config(tmp_path, text)), listen="127.0.0.1:0", http_listen="127.0.0.1:0"
    )
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/readyz", timeout=5) as r:
            status, body = r.status, json.loads(r.read())
    finally:
        server.stop(grace=1)
    assert (status, body["ready"]) == (200, True)
    assert body["replayCache"].startswith("redis replay cache unreachable")
