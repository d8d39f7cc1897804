"""The gRPC listener under oversized input: a clean gRPC error or a clean deny, and a server
that keeps answering; with grpcio's defaults and with each ``server.grpc`` limit configured."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from authz_server.config import load as config
from authz_server.server import AuthzServer
from authz_server.tools import devkeys
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for, write_config

KEY = devkeys.generate_key("EC-P256", kid="limits")


@pytest.fixture(scope="module")
def key() -> devkeys.SigningKey:
    return KEY


def _start(directory: Path, server_section: str = "") -> AuthzServer:
    (directory / "jwks.json").write_text(json.dumps(devkeys.jwks(KEY)))
    text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
{server_section}
providers: [{{issuer: {ISSUER}, audiences: [{AUDIENCE}], jwksFile: jwks.json}}]
policies:
  - name: signed-in
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""
    running = AuthzServer(
        config.load(write_config(directory, text)), listen="127.0.0.1:0", http_listen=None
    )
    running.start()
    return running


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthzServer]:
    running = _start(tmp_path_factory.mktemp("limits"))
    try:
        yield running
    finally:
        running.stop(grace=1)


# Each limit low enough to reach in a test, high enough for an ordinary Check.
RECEIVE_LIMIT = 64 << 10
METADATA_LIMIT = 2048


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthzServer]:
    running = _start(
        tmp_path_factory.mktemp("configured-limits"),
        f"server:\n  grpc: {{maxReceiveMessageBytes: {RECEIVE_LIMIT}, maxConcurrentStreams: 1, "
        f"maxMetadataBytes: {METADATA_LIMIT}}}",
    )
    try:
        yield running
    finally:
        running.stop(grace=1)


def check(
    server: AuthzServer,
    headers: dict[str, str],
    body: str = "",
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


def signed_in(server: AuthzServer, key: devkeys.SigningKey) -> int:
    """The status code of a Check with a valid token: 0 while the server answers as usual."""
    token = key.sign(claims_for(Clock().now))
    code: int = check(server, {"authorization": f"Bearer {token}"}).status.code
    return code


def test_a_check_past_the_configured_message_limit_is_a_clean_grpc_error(
    limited: AuthzServer, key: devkeys.SigningKey
) -> None:
    check(limited, {}, body="x" * (RECEIVE_LIMIT - 1024))  # under it: an ordinary answer
    with pytest.raises(grpc.RpcError) as raised:
        check(limited, {}, body="x" * RECEIVE_LIMIT)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert signed_in(limited, key) == 0


def test_metadata_past_the_configured_limit_is_refused_every_time(
    limited: AuthzServer, key: devkeys.SigningKey
) -> None:
    request = external_auth_pb2.CheckRequest()
    with grpc.insecure_channel(f"127.0.0.1:{limited.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        stub.Check(request, timeout=20, metadata=(("x-padding", "p" * (METADATA_LIMIT // 2)),))
        # One limit, not grpcio's default of random refusals between a soft and a hard one.
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as raised:
                stub.Check(request, timeout=20, metadata=(("x-padding", "p" * METADATA_LIMIT),))
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert signed_in(limited, key) == 0


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _literal(name: str, value: str) -> bytes:
    """One HPACK header field, literal without indexing, no Huffman (RFC 7541 6.2.2)."""
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


_SETTINGS, _HEADERS, _RST_STREAM = 0x4, 0x1, 0x3
_ACK, _END_HEADERS = 0x1, 0x4
_REFUSED_STREAM = 0x7


def _read_frame(sock: socket.socket) -> tuple[int, int, int, bytes]:
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        return data

    head = exactly(9)
    length = int.from_bytes(head[:3], "big")
    stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
    return head[3], head[4], stream, exactly(length)


def test_streams_past_the_configured_limit_are_refused_and_the_connection_lives(
    limited: AuthzServer, key: devkeys.SigningKey
) -> None:
    # grpcio clients (and Envoy) honour the limit the server announces, so a client that
    # ignores it is written here frame by frame: two Checks opened at once on one connection.
    call = b"".join(
        _literal(name, value)
        for name, value in (
            (":method", "POST"), (":scheme", "http"), (":authority", "authz"),
            (":path", "/envoy.service.auth.v3.Authorization/Check"),
            ("content-type", "application/grpc"), ("te", "trailers"),
        )
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", limited.grpc_port), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(_SETTINGS, 0, 0))
        while True:  # the server's settings, acknowledged: from then on its limit holds
            kind, flags, _, payload = _read_frame(sock)
            if kind == _SETTINGS and not flags & _ACK:
                assert (3).to_bytes(2, "big") + (1).to_bytes(4, "big") in payload
                sock.sendall(_frame(_SETTINGS, _ACK, 0))
                break
        sock.sendall(
            _frame(_HEADERS, _END_HEADERS, 1, call) + _frame(_HEADERS, _END_HEADERS, 3, call)
        )
        while True:
            kind, _, stream, payload = _read_frame(sock)
            if kind == _RST_STREAM:
                break
        assert (stream, int.from_bytes(payload, "big")) == (3, _REFUSED_STREAM)
    assert signed_in(limited, key) == 0


def test_clients_that_honour_the_stream_limit_just_wait_their_turn(
    limited: AuthzServer, key: devkeys.SigningKey
) -> None:
    token = key.sign(claims_for(Clock().now))
    with grpc.insecure_channel(f"127.0.0.1:{limited.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        request = external_auth_pb2.CheckRequest(
            attributes=attribute_context_pb2.AttributeContext(
                request=attribute_context_pb2.AttributeContext.Request(
                    http=attribute_context_pb2.AttributeContext.HttpRequest(
                        method="GET", path="/orders", headers={"authorization": f"Bearer {token}"}
                    )
                )
            )
        )
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: stub.Check(request, timeout=20), range(16)))
    assert [answer.status.code for answer in answers] == [0] * 16
