"""The gRPC listener under oversized input: a clean gRPC error or a clean deny, and a server
that keeps answering."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from authz_server import config, devkeys
from authz_server.server import AuthzServer
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for, write_config


@pytest.fixture(scope="module")
def key() -> devkeys.SigningKey:
    return devkeys.generate_key("EC-P256", kid="limits")


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, key: devkeys.SigningKey
) -> Iterator[AuthzServer]:
    directory = tmp_path_factory.mktemp("limits")
    (directory / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
    text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
providers: [{{issuer: {ISSUER}, audiences: [{AUDIENCE}], jwksFile: jwks.json}}]
policies:
  - name: signed-in
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""
    running = AuthzServer(
        config.load(write_config(Path(directory), text)), listen="127.0.0.1:0", http_listen=None
    )
    running.start()
    try:
        yield running
    finally:
        running.stop(grace=1)


def check(
    server: AuthzServer, headers: dict[str, str], body: str = ""
) -> external_auth_pb2.CheckResponse:
    ctx = attribute_context_pb2.AttributeContext
    request = external_auth_pb2.CheckRequest(
        attributes=ctx(
            request=ctx.Request(
                http=ctx.HttpRequest(method="GET", path="/orders", headers=headers, body=body)
            )
        )
    )
    with grpc.insecure_channel(
        f"127.0.0.1:{server.grpc_port}", options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        answer: external_auth_pb2.CheckResponse = external_auth_pb2_grpc.AuthorizationStub(
            channel
        ).Check(request, timeout=20)
        return answer


def test_a_check_request_past_the_message_limit_is_a_clean_grpc_error(
    server: AuthzServer, key: devkeys.SigningKey
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        check(server, {}, body="x" * (5 << 20))  # grpcio's default receive limit is 4 MiB
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    token = key.sign(claims_for(Clock().now))
    assert check(server, {"authorization": f"Bearer {token}"}).status.code == 0


def test_a_huge_header_map_and_a_huge_token_are_clean_denials(
    server: AuthzServer, key: devkeys.SigningKey
) -> None:
    many = {f"x-h{i}": "v" * 100 for i in range(10_000)}  # 10,000 headers, about 1 MB
    assert check(server, many).status.code == 16  # UNAUTHENTICATED: no token
    huge = check(server, {"authorization": "Bearer " + "a" * (1 << 20)})
    assert huge.status.code == 16
    assert json.loads(huge.denied_response.body)["reason"] == "malformed_token"
    token = key.sign(claims_for(Clock().now))
    assert check(server, {"authorization": f"Bearer {token}"}).status.code == 0
