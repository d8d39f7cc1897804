"""A sample of the attack catalogue through a real Envoy, to both doors: the client gets the
401 and reason the catalogue says, the upstream never sees the request, the server logs no
traceback and stays ready."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from authz_server.tools.devkeys import b64url_encode
from tests.e2e.harness import http_request
from tests.e2e.test_envoy_e2e import Stack, reason, stack, token  # noqa: F401 (the fixture)
from tests.helpers import claims_for
from tests.security.test_token_attacks import hs_token, raw_token, segment

pytestmark = pytest.mark.e2e


def _claims(**overrides: object) -> dict[str, object]:
    return claims_for(time.time(), **overrides)


SAMPLE: list[tuple[str, Callable[[Stack], str], str]] = [
    ("alg none", lambda s: raw_token({"alg": "none"}, _claims(), b""), "unsupported_algorithm"),
    ("HS256 with the public key", lambda s: hs_token("HS256", s.keys["RS256"].public_pem(), _claims(), "rsa-1"), "unsupported_algorithm"),
    ("kid path traversal", lambda s: s.keys["RS256"].sign(_claims(), kid="../../etc/passwd"), "unknown_kid"),
    ("ES256 r = s = 0", lambda s: f"{segment({'alg': 'ES256', 'kid': 'ec-1'})}.{segment(_claims())}.{b64url_encode(bytes(64))}", "invalid_signature"),
    ("two segments", lambda s: token(s).rpartition(".")[0], "malformed_token"),
    ("exp 1e308", lambda s: s.keys["RS256"].sign(_claims(exp=1e308)), "malformed_token"),
    ("oversized", lambda s: s.keys["RS256"].sign(_claims(pad="x" * 9000)), "malformed_token"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make", "expected"), SAMPLE, ids=[c[0] for c in SAMPLE])
def test_attacks_through_envoy_are_refused_with_their_reason(
    stack: Stack,  # noqa: F811 (the imported fixture)
    case: str,
    make: Callable[[Stack], str],
    expected: str,
) -> None:
    status, headers, body = stack.get("/api/orders", make(stack))
    assert (status, reason(body)) == (401, expected), case
    assert headers["www-authenticate"].startswith('Bearer realm="e2e", error="invalid_token"')
    assert stack.upstream.requests == []


def test_the_server_logged_no_traceback_and_is_ready_after_the_attacks(
    stack: Stack,  # noqa: F811 (the imported fixture)
) -> None:
    for _, make, _ in SAMPLE:
        stack.get("/api/orders", make(stack))
    log = stack.server.log_text()
    assert "Traceback" not in log
    status, _, body = http_request(f"{stack.server.http_url}/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    assert stack.get("/api/orders", token(stack))[0] == 200


def test_no_token_sent_appears_in_the_server_output(
    stack: Stack,  # noqa: F811 (the imported fixture)
) -> None:
    # Valid, invalid, anonymous-scheme and query tokens, allowed and denied, through Envoy;
    # then not even a token's signature segment may be in anything the server wrote.
    sent = [token(stack), token(stack, groups=["admin"]), *(make(stack) for _, make, _ in SAMPLE)]
    for value in sent:
        stack.get("/api/orders", value)
        stack.get(f"/public/info?access_token={value}")
        stack.get_raw("/public/info", {"Authorization": f"Token {value}"})
    log = stack.server.log_text()
    assert '"decision"' in log  # the decision log did write lines for these requests
    for value in sent:
        for piece in value.split("."):
            if len(piece) >= 16:
                assert piece not in log, f"a token piece of {len(piece)} chars is in the log"


def read_answer(stream: Any, *, head: bool) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from ``stream``: (status, headers, body); a HEAD's has no body."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b"" if head else stream.read(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def test_head_denials_are_bodiless_and_keep_the_connections_to_the_server(
    stack: Stack,  # noqa: F811 (the imported fixture)
) -> None:
    # A HEAD denial with a body broke Envoy's connection to the HTTP door after every HEAD
    # (the body is bytes after a complete answer): a client could force connection churn.
    _, get_headers, get_body = stack.get("/api/orders")
    port = int(stack.envoy_url.rpartition(":")[2])
    before = stack.envoy.stats("cluster.authz.")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = sock.makefile("rb")
        for _ in range(5):
            sock.sendall(b"HEAD /api/orders HTTP/1.1\r\nHost: shop.example.com\r\n\r\n")
            status, headers, _ = read_answer(stream, head=True)
            # What GET would get, without its body: the next bytes are the next answer.
            assert status == 401
            assert headers["www-authenticate"] == get_headers["www-authenticate"]
            assert int(headers.get("content-length", len(get_body))) == len(get_body)
        get = f"GET /api/orders HTTP/1.1\r\nHost: shop.example.com\r\nAuthorization: Bearer {token(stack)}"
        sock.sendall(f"{get}\r\n\r\n".encode())
        assert read_answer(stream, head=False)[0] == 200
        stream.close()
    after = stack.envoy.stats("cluster.authz.")
    opened = after["cluster.authz.upstream_cx_total"] - before["cluster.authz.upstream_cx_total"]
    assert opened <= 1, f"Envoy opened {opened} connections to the server for 6 checks"
    for counter in ("upstream_cx_protocol_error", "upstream_cx_destroy_remote"):
        name = f"cluster.authz.{counter}"
        assert after.get(name, 0) == before.get(name, 0), name
