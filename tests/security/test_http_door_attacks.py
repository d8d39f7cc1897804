"""Attacks on the HTTP door itself (a client that reaches its port, or Envoy forwarding
what a client sent): bodies and pipelined requests never count as head bytes (no unsolicited
431 after a valid answer), and a client that pipelines and never reads its answers holds
bounded memory and is closed. (HEAD denials through Envoy: test_attacks_e2e.)"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest

from authz_server.doors.http import _MAX_PIPELINED, _NAMES_KEPT, _PARSE_SLICE, HttpDoor
from authz_server.server import AuthzServer
from authz_server.tools.devkeys import SigningKey
from tests.unit.test_http_door import (  # noqa: F401 (server and token are fixtures)
    Client,
    ask,
    poll,
    read_response,
    request,
    server,
    start_server,
    token,
)

BIG_BODY_LIMITS = """
  httpAuthz:
    maxRequestLineBytes: 256
    maxHeaderBytes: 1024
    maxBodyBytes: 200000
"""


def post(path: str, body: bytes, bearer: str | None = None) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: api.test", f"Content-Length: {len(body)}"]
    if bearer is not None:
        head.append(f"Authorization: Bearer {bearer}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize("pipelined", [False, True], ids=["alone", "pipelined"])
def test_a_body_under_the_limit_gets_one_answer_and_the_connection_stays_usable(
    tmp_path: Path,
    rsa_key: SigningKey,
    token: str,  # noqa: F811 (the imported fixture)
    pipelined: bool,
) -> None:
    # A body (and requests after it) are not head bytes: 100 KB under maxBodyBytes is far
    # past the head limit (1280 bytes) and must not draw a "request head too large" 431.
    running = start_server(tmp_path, rsa_key, limits=BIG_BODY_LIMITS)
    client = Client(running.http_authz_port)
    try:
        big = post("/orders", b"x" * 100_000)
        if pipelined:
            client.send(big + request("/orders", token) + big)
            assert [client.response()[0] for _ in range(3)] == [401, 200, 401]
        else:
            client.send(big)
            status, headers, _ = client.response()
            assert status == 401 and "connection" not in headers
        # The next answer on the connection is the one to the next request (no stray 431).
        client.send(request("/orders", token))
        status, headers, _ = client.response()
        assert (status, headers.get("connection")) == (200, None)
        client.send(post("/orders", b"y" * 100_000, token))
        assert client.response()[0] == 200
    finally:
        client.close()
        running.stop(grace=1)


def test_a_head_that_never_ends_after_an_answered_request_is_refused(
    tmp_path: Path,
    rsa_key: SigningKey,
    token: str,  # noqa: F811 (the imported fixture)
) -> None:
    # The bound on what an unfinished head can make the door hold still holds when it
    # follows a request with a body.
    running = start_server(tmp_path, rsa_key, limits=BIG_BODY_LIMITS)
    client = Client(running.http_authz_port)
    try:
        client.send(post("/orders", b"x" * 1000, token) + b"GET /orders HTTP/1.1\r\nx-a: ")
        assert client.response()[0] == 200
        for _ in range(2):  # 2 x 1000 bytes of one header that never ends: past 1280
            client.send(b"v" * 1000)
        status, headers, _ = client.response()
        assert (status, headers["connection"]) == (431, "close")
        assert client.closed_by_server()
    finally:
        client.close()
        running.stop(grace=1)


PATIENT_LIMITS = """
  httpAuthz:
    requestTimeout: 30s
"""
# What the door may hold in answers for a client that does not read them: the transport's
# high-water mark (64 KiB) and one read's worth of answers.
WRITE_BOUND = 512 * 1024


def pipeline_without_reading(port: int, data: bytes) -> tuple[socket.socket, threading.Thread]:
    """A connection with a tiny receive buffer that sends ``data`` (in pieces, each within
    a bounded time) and never reads: the sender thread ends when all is sent or a send stalls."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(1.0)

    def send() -> None:
        with contextlib.suppress(OSError):  # a stalled send times out: the door stopped reading
            for start in range(0, len(data), 65536):
                sock.sendall(data[start : start + 65536])

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sock, sender


def write_buffers(door: HttpDoor) -> list[tuple[int, bool, int]]:
    """(bytes in its transport's write buffer, whether it reads, requests parsed and waiting
    for their answer) per connection of ``door``."""
    return door.call(
        lambda: [
            (c.transport.get_write_buffer_size(), c.transport.is_reading(), len(c.pending))
            for c in door.connections
            if c.transport is not None
        ]
    )


def test_a_pipelining_client_that_never_reads_holds_bounded_memory_and_loses_nothing(
    tmp_path: Path,
    rsa_key: SigningKey,
    token: str,  # noqa: F811 (the imported fixture)
) -> None:
    # 1 MB of pipelined requests is ~6 MB of 401 answers: the door must stop reading (and
    # answering) while the client's answers pile up, not buffer them all.
    running = start_server(tmp_path, rsa_key, limits=PATIENT_LIMITS)
    door = running.http_door
    assert door is not None
    one = request("/orders")
    count = 1_000_000 // len(one)
    sock, sender = pipeline_without_reading(
        running.http_authz_port, one * count + request("/orders", token)
    )
    # Parsed ahead: the pipelining bound and what one parse slice of these requests holds.
    waiting_bound = _MAX_PIPELINED + _PARSE_SLICE // len(one) + 1
    try:
        seen: list[tuple[int, bool, int]] = []

        def stopped_reading_or_too_much() -> bool:
            buffers = write_buffers(door)
            seen.extend(buffers)
            return any(not reading or size > WRITE_BOUND for size, reading, _ in buffers)

        poll(stopped_reading_or_too_much, "the door to stop reading", timeout=20)
        assert max(size for size, _, _ in seen) <= WRITE_BOUND, f"answers buffered: {seen[-1]}"
        assert max(waiting for _, _, waiting in seen) <= waiting_bound
        # While the client does not read, the door stays stopped and bounded.
        for _ in range(5):
            ((size, reading, waiting),) = write_buffers(door)
            assert size <= WRITE_BOUND and not reading and waiting <= waiting_bound
        # Once the client reads, every request is answered, in order.
        sock.settimeout(10)
        stream = sock.makefile("rb")
        statuses = [read_response(stream)[0] for _ in range(count + 1)]
        assert statuses == [401] * count + [200]
        stream.close()
    finally:
        sock.close()
        sender.join(15)
        running.stop(grace=1)
    assert not sender.is_alive()


def test_a_client_that_stops_reading_is_closed_after_the_request_timeout(
    server: AuthzServer,  # noqa: F811 (the imported fixture)
) -> None:
    door = server.http_door
    assert door is not None
    one = request("/orders")
    sock, sender = pipeline_without_reading(server.http_authz_port, one * (1_000_000 // len(one)))
    try:
        poll(lambda: any(not r for _, r, _ in write_buffers(door)), "the door to stop reading")
        # requestTimeout 1s, checked every second: its answers were not taken, it is closed.
        poll(lambda: not door.call(lambda: len(door.connections)), "the door to close it")
    finally:
        sock.close()
        sender.join(15)
    assert not sender.is_alive()
    assert ask(server, request("/orders"))[0] == 401  # the door serves the others


def test_made_up_header_names_never_grow_the_doors_name_table_past_its_bound(
    server: AuthzServer,  # noqa: F811 (the imported fixture)
    token: str,  # noqa: F811 (the imported fixture)
) -> None:
    """The door keeps the lower-case form of the header names it meets (Envoy sends the same
    few); a client inventing names on every request fills that table to its bound and no
    further, and every name is still read, in any case, past the bound."""
    door = server.http_door
    assert door is not None
    client = Client(server.http_authz_port)
    try:
        for batch in range(6):
            requests = b"".join(
                request(
                    "/orders", None, f"X-Made-Up-{batch}-{n}: 1", f"AuThOrIzAtIoN: Bearer {token}"
                )
                for n in range(64)
            )
            client.send(requests)
            assert [client.response()[0] for _ in range(64)] == [200] * 64
        assert len(door.header_names) == _NAMES_KEPT
        # Past the bound: a name never seen before, and a repeated one in two spellings,
        # are read as ever (two Authorization headers with two tokens are refused).
        client.send(request("/orders", None, f"Authorization: Bearer {token}", "X-New: 1"))
        assert client.response()[0] == 200
        client.send(
            request("/orders", None, f"Authorization: Bearer {token}", "AUTHORIZATION: Bearer x")
        )
        assert client.response()[0] == 401
    finally:
        client.close()
