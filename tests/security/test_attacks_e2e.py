"""A sample of the attack catalogue through a real Envoy, to both doors: the client gets the
401 and reason the catalogue says, the upstream never sees the request, the server logs no
traceback and stays ready."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from authz_server.devkeys import b64url_encode
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
