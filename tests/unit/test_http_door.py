"""The HTTP door in-process, over real sockets: Envoy's HTTP ext_authz contract, keep-alive and
pipelining, every limit (400/408/413/414/431), slow and vanishing clients, attributes the door
cannot know, and the door's label in metrics."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from authz_server.config import load as config
from authz_server.doors.http import HttpDoor, _Connection
from authz_server.server import AuthzServer
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.helpers import (
    AUDIENCE,
    ISSUER,
    Clock,
    RecordingTransport,
    claims_for,
    grpc_check_code,
    write_config,
)

LIMITS = """
  httpAuthz:
    pathPrefix: {prefix}
    maxRequestLineBytes: 256
    maxHeaders: 12
    maxHeaderBytes: 1024
    maxBodyBytes: 16
    requestTimeout: 1s
    idleTimeout: 2s
    maxConnections: 4
"""

CONFIG = """
apiVersion: authz-server/v1
kind: AuthzConfig
server:
  realm: door-test
{limits}
providers:
  - issuer: {issuer}
    audiences: [{audience}]
    jwksFile: jwks.json
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
policies:
  - name: no-admin
    action: DENY
    rules: [{{to: [{{operation: {{paths: ["/admin/*"]}}}}]}}]
  - name: authenticated
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
{extra}
"""


def start_server(
    tmp_path: Path,
    key: SigningKey,
    *,
    prefix: str = '""',
    extra: str = "",
    listen: str = "",
    limits: str = "",
) -> AuthzServer:
    """A server whose door has LIMITS, or ``limits`` (the ``httpAuthz`` block) instead."""
    (tmp_path / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
    text = CONFIG.format(
        limits=limits or LIMITS.format(prefix=prefix), issuer=ISSUER, audience=AUDIENCE, extra=extra
    )
    server = AuthzServer(
        config.load(write_config(tmp_path, text)),
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        http_authz_listen=listen or "127.0.0.1:0",
    )
    server.start()
    return server


@pytest.fixture
def server(tmp_path: Path, rsa_key: SigningKey) -> Iterator[AuthzServer]:
    running = start_server(tmp_path, rsa_key)
    try:
        yield running
    finally:
        running.stop(grace=1)


@pytest.fixture
def token(rsa_key: SigningKey) -> str:
    return rsa_key.sign(claims_for(Clock().now))


Response = tuple[int, dict[str, str], bytes]


def read_response(stream: BinaryIO) -> Response:
    """One HTTP/1.1 response from ``stream``: (status, headers, body)."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


class Client:
    """A raw connection to the door: what is sent is exactly what the test writes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.stream = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> Response:
        return read_response(self.stream)

    def closed_by_server(self) -> bool:
        """True when the server closed the connection (EOF) before ``timeout``."""
        return self.stream.read(1) == b""

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def request(path: str = "/orders", token: str | None = None, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: api.test"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ask(server: AuthzServer, data: bytes) -> Response:
    client = Client(server.http_authz_port)
    try:
        client.send(data)
        return client.response()
    finally:
        client.close()


def poll(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ------------------------------------------------------------------------------ contract


def test_allow_is_200_with_identity_headers_and_the_headers_envoy_must_remove(
    server: AuthzServer, token: str
) -> None:
    status, headers, body = ask(server, request("/orders", token, "x-user: root", "x_user: root"))
    assert (status, body) == (200, b"")
    assert headers["x-user"] == "alice"
    removed = headers["x-envoy-auth-headers-to-remove"].split(",")
    assert "authorization" in removed  # the token does not reach the upstream
    assert "x_user" in removed  # nor a client-sent underscore twin of an identity header
    assert "x-user" not in removed  # set, not removed: Envoy overwrites the client's copy


def test_denials_carry_the_same_status_challenge_and_body_as_the_grpc_door(
    server: AuthzServer, token: str
) -> None:
    status, headers, body = ask(server, request("/orders"))
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="door-test"'
    assert json.loads(body) == {"error": "unauthorized", "reason": "missing_credentials"}

    head, _, signature = token.rpartition(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    status, headers, body = ask(server, request("/orders", f"{head}.{flipped}"))
    assert status == 401
    assert 'error_description="invalid signature"' in headers["www-authenticate"]
    assert json.loads(body)["reason"] == "invalid_signature"

    status, headers, body = ask(server, request("/admin/keys", token))
    assert status == 403
    assert "www-authenticate" not in headers
    assert json.loads(body) == {"error": "forbidden", "reason": "policy_denied"}


def test_a_head_denial_has_the_get_headers_and_no_body(server: AuthzServer, token: str) -> None:
    _, get_headers, get_body = ask(server, request("/orders"))
    client = Client(server.http_authz_port)
    try:
        head = request("/orders").replace(b"GET ", b"HEAD ", 1)
        client.send(head + request("/orders", token))
        status_line = client.stream.readline()
        headers: dict[str, str] = {}
        while (line := client.stream.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        assert status_line.split()[1] == b"401"
        assert headers == get_headers  # content-length included: what GET would get
        assert len(get_body) == int(headers["content-length"]) > 0
        assert client.response()[0] == 200  # the next bytes are the next answer, no body
    finally:
        client.close()


def test_keep_alive_and_pipelined_requests_are_answered_in_order(
    server: AuthzServer, token: str
) -> None:
    client = Client(server.http_authz_port)
    try:
        client.send(request("/orders", token))
        assert client.response()[0] == 200
        # Three requests in one write: three answers, in the order asked.
        client.send(request("/admin/x", token) + request("/orders") + request("/orders", token))
        assert [client.response()[0] for _ in range(3)] == [403, 401, 200]
    finally:
        client.close()


def test_connection_close_is_honoured(server: AuthzServer, token: str) -> None:
    client = Client(server.http_authz_port)
    try:
        client.send(request("/orders", token, "Connection: close"))
        status, headers, _ = client.response()
        assert (status, headers["connection"]) == (200, "close")
        assert client.closed_by_server()
    finally:
        client.close()


def test_an_upgrade_request_is_answered_then_the_connection_closes(
    server: AuthzServer, token: str
) -> None:
    """Nothing after an Upgrade request's head is HTTP/1.1 the door could read: its answer
    closes the connection, and a request pipelined behind it is never answered; a request
    answered before it on the same connection is not held back."""
    client = Client(server.http_authz_port)
    try:
        upgrade = request("/orders", token, "Connection: Upgrade", "Upgrade: websocket")
        client.send(request("/admin/x", token) + upgrade + request("/orders", token))
        assert client.response()[0] == 403
        status, headers, _ = client.response()
        assert (status, headers["connection"]) == (200, "close")
        assert client.closed_by_server()
    finally:
        client.close()


def test_while_draining_requests_behind_the_closing_answer_are_not_decided(
    server: AuthzServer, token: str
) -> None:
    """Draining, every answer closes its connection: requests pipelined behind it in the same
    read get no answer, and are not decided either (no metric or decision log line counts a
    Check nobody was told). Driven by hand: the door's loop is not involved."""
    door = HttpDoor(server.service, server.settings.server.http_authz, listen="127.0.0.1:0")
    door.loop_time = lambda: 1.0  # type: ignore[method-assign]
    door.draining = True
    connection, transport = _Connection(door), RecordingTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received(
        request("/orders", token) + request("/orders", token) + request("/admin/x", token)
    )
    assert len(transport.out) == 1 and transport.out[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close" in transport.out[0] and transport.closed
    registry = server.metrics.registry
    count = "authz_check_duration_seconds_count"
    assert registry.get_sample_value(count, {"decision": "allow", "door": "http"}) == 1
    assert registry.get_sample_value(count, {"decision": "deny", "door": "http"}) == 0


def test_a_path_prefix_is_removed_and_a_request_without_it_is_refused(
    tmp_path: Path, rsa_key: SigningKey, token: str
) -> None:
    running = start_server(tmp_path, rsa_key, prefix="/authz")
    try:
        assert ask(running, request("/authz/orders", token))[0] == 200
        # The DENY rule on /admin/* sees the path without the prefix.
        assert ask(running, request("/authz/admin/x", token))[0] == 403
        status, headers, body = ask(running, request("/orders", token))
        assert status == 400
        assert "pathPrefix" in json.loads(body)["reason"]
        assert headers["connection"] == "close"
    finally:
        running.stop(grace=1)


def test_the_door_serves_a_unix_socket(tmp_path: Path, rsa_key: SigningKey, token: str) -> None:
    path = tmp_path / "door.sock"
    running = start_server(tmp_path, rsa_key, listen=f"unix:{path}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(request("/orders", token))
            assert read_response(sock.makefile("rb"))[0] == 200
    finally:
        running.stop(grace=1)
    assert not path.exists()  # removed on stop


# -------------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /orders HTTP/1.1\r\nHost: api.test\r\nBad Header\r\n\r\n", 400),
        (request("/" + "a" * 300), 414),
        (request("/orders", None, *[f"x-h{i}: v" for i in range(20)]), 431),
        (request("/orders", None, "x-big: " + "v" * 2000), 431),
        (
            b"POST /orders HTTP/1.1\r\nHost: api.test\r\nContent-Length: 100\r\n\r\n" + b"x" * 100,
            413,
        ),
    ],
    ids=["garbage", "bad-header", "long-target", "many-headers", "big-header", "big-body"],
)
def test_bad_or_oversized_requests_get_a_clean_error_and_the_connection_is_closed(
    server: AuthzServer, token: str, data: bytes, status: int
) -> None:
    client = Client(server.http_authz_port)
    try:
        client.send(data)
        got, headers, body = client.response()
        assert (got, headers["connection"]) == (status, "close")
        assert json.loads(body)["error"] == "bad_request"
        assert client.closed_by_server()
    finally:
        client.close()
    assert ask(server, request("/orders", token))[0] == 200  # and the door is healthy


def test_a_slow_client_gets_408_and_is_closed(server: AuthzServer, token: str) -> None:
    client = Client(server.http_authz_port)
    try:
        client.send(b"GET /orders HTTP/1.1\r\nHost: api.te")  # ... and nothing more
        started = time.monotonic()
        status, headers, _ = client.response()
        assert (status, headers["connection"]) == (408, "close")
        assert time.monotonic() - started < 5  # requestTimeout 1s, checked every second
        assert client.closed_by_server()
    finally:
        client.close()
    assert ask(server, request("/orders", token))[0] == 200


def test_silent_and_idle_connections_are_closed(server: AuthzServer, token: str) -> None:
    door = server.http_door
    assert door is not None
    silent = Client(server.http_authz_port)  # never sends a byte: gets 408 after requestTimeout
    idle = Client(server.http_authz_port)
    try:
        idle.send(request("/orders", token))
        assert idle.response()[0] == 200
        assert silent.response()[0] == 408
        assert idle.closed_by_server()  # idleTimeout 2s after its answer
        poll(lambda: door.call(lambda: len(door.connections)) == 0, "no connection left")
    finally:
        silent.close()
        idle.close()


def test_clients_vanishing_mid_request_leave_the_door_healthy(
    server: AuthzServer, token: str
) -> None:
    door = server.http_door
    assert door is not None
    for cut in (10, 40, len(request("/orders", token)) - 3):
        client = Client(server.http_authz_port)
        client.send(request("/orders", token)[:cut])
        client.close()
    poll(lambda: door.call(lambda: len(door.connections)) == 0, "the cut connections to go")
    assert ask(server, request("/orders", token))[0] == 200


def test_connections_past_the_cap_are_closed_at_once(server: AuthzServer, token: str) -> None:
    door = server.http_door
    assert door is not None
    held = [Client(server.http_authz_port) for _ in range(4)]  # maxConnections: 4
    try:
        poll(lambda: door.call(lambda: len(door.connections)) == 4, "four connections")
        extra = Client(server.http_authz_port)
        try:
            assert extra.closed_by_server()
        finally:
            extra.close()
        held[0].send(request("/orders", token))
        assert held[0].response()[0] == 200  # the connections inside the cap are served
    finally:
        for client in held:
            client.close()


# ---------------------------------------------------------- what the door cannot know


UNKNOWABLE = """
  - name: no-port-8080
    action: DENY
    rules: [{to: [{operation: {ports: ["8080"]}}]}]
  - name: office
    rules: [{from: [{source: {ipBlocks: ["10.0.0.0/8"]}}], to: [{operation: {paths: ["/office"]}}]}]
"""


def test_clauses_on_attributes_the_door_never_receives_fail_closed_with_a_warning(
    tmp_path: Path,
    rsa_key: SigningKey,
    token: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="authz_server.server")
    running = start_server(tmp_path, rsa_key, extra=UNKNOWABLE)
    try:
        # A DENY on the destination port: the door does not know the port, so it denies.
        status, _, body = ask(running, request("/orders", token))
        assert (status, json.loads(body)["reason"]) == (403, "policy_denied")
        # The gRPC door is told the port (none here): the same request passes there.
        assert grpc_check_code(f"127.0.0.1:{running.grpc_port}", token, "/orders") == 0
    finally:
        running.stop(grace=1)
    warnings = [r.getMessage() for r in caplog.records if "HTTP door does not" in r.getMessage()]
    assert any("'no-port-8080'" in w and "to.operation.ports" in w for w in warnings), warnings
    assert any("'office'" in w and "from.source.ipBlocks" in w for w in warnings), warnings


def test_checks_through_the_door_are_counted_with_its_label(
    server: AuthzServer, token: str
) -> None:
    ask(server, request("/orders", token))
    ask(server, request("/orders"))
    registry = server.metrics.registry
    http_allowed = {"decision": "allow", "reason": "allowed", "policy": "authenticated"}
    provider = server.settings.providers[0].name
    assert (
        registry.get_sample_value(
            "authz_checks_total", {**http_allowed, "provider": provider, "door": "http"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "authz_checks_total", {**http_allowed, "provider": provider, "door": "grpc"}
        )
        is None
    )
    assert (
        registry.get_sample_value(
            "authz_check_duration_seconds_count", {"decision": "deny", "door": "http"}
        )
        == 1
    )


ATTRIBUTE_LIMITS = """
  httpAuthz:
    attributeHeaders: true
"""

CONNECTION_POLICIES = """
  - name: no-port-8080
    action: DENY
    rules: [{to: [{operation: {ports: ["8080"]}}]}]
  - name: office
    rules: [{from: [{source: {ipBlocks: ["10.0.0.0/8"]}}], to: [{operation: {paths: ["/office"]}}]}]
  - name: orders-service
    rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/orders"]}}],
             to: [{operation: {paths: ["/internal"]}}]}]
"""


def envoy_added(source: str, port: str, peer: str = "", sni: str = "") -> tuple[str, ...]:
    """The header lines Envoy adds with httpAuthz.attributeHeaders (its formatters, quoted)."""
    return (
        f'x-authz-source-ip: "{source}"',
        f'x-authz-peer-principal: "{peer}"',
        'x-authz-destination-ip: "10.0.0.5"',
        f'x-authz-destination-port: "{port}"',
        f'x-authz-sni: "{sni}"',
    )


def test_with_attribute_headers_the_door_decides_on_the_connection_as_the_grpc_door(
    tmp_path: Path, rsa_key: SigningKey, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="authz_server.server")
    running = start_server(tmp_path, rsa_key, limits=ATTRIBUTE_LIMITS, extra=CONNECTION_POLICIES)
    try:

        def decided(path: str, bearer: str | None, *extra: str) -> tuple[int, str | None]:
            status, _, body = ask(running, request(path, bearer, *extra))
            return status, json.loads(body)["reason"] if body else None

        # The DENY on port 8080 reads Envoy's port: other ports pass, 8080 is denied.
        assert decided("/orders", token, *envoy_added("192.0.2.1", "443")) == (200, None)
        assert decided("/orders", token, *envoy_added("192.0.2.1", "8080")) == (
            403,
            "policy_denied",
        )
        # ipBlocks and principals match what Envoy says of the connection (no token: only
        # these rules can allow).
        assert decided("/office", None, *envoy_added("10.1.2.3", "443"))[0] == 200
        assert decided("/office", None, *envoy_added("192.0.2.1", "443"))[0] == 401
        peer = "spiffe://cluster.local/ns/shop/sa/orders"
        assert decided("/internal", None, *envoy_added("192.0.2.1", "443", peer=peer))[0] == 200
        assert decided("/internal", None, *envoy_added("192.0.2.1", "443"))[0] == 401
        # Without Envoy's headers (an Envoy not configured for them) the port is unknown: the
        # DENY fails closed, as with the setting off.
        assert decided("/orders", token) == (403, "policy_denied")
    finally:
        running.stop(grace=1)
    warnings = [r.getMessage() for r in caplog.records if "HTTP door does not" in r.getMessage()]
    assert warnings == []  # nothing the policies read is out of the door's reach any more
