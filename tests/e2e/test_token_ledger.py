"""The ledger behind the session-end check that no server output holds a piece of a token."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from authz_server.tools import devkeys
from tests.e2e.harness import TokenLedger
from tests.helpers import claims_for

CLEAN = (
    '{"time": "2026-11-29T23:38:47.793Z", "logger": "authz_server.decision", "message": '
    '"allow GET /orders -> 200 allowed", "principal": "https://issuer.test/alice", '
    '"request_id": "33828fd8-b2c5-445a-a223-258e6cb6908a", "config": "606d99f47aa32028"}\n'
)


@pytest.fixture
def token() -> str:
    return devkeys.generate_key("EC-P256", kid="ledger").sign(claims_for(time.time()))


def test_output_without_a_token_piece_is_clean(token: str) -> None:
    ledger = TokenLedger()
    ledger.saw_token(token)
    ledger.examine("clean", CLEAN + f"kid=ledger {token[:10]}\n")  # less than 16 characters
    assert (ledger.outputs, ledger.leaks) == (1, [])


@pytest.mark.parametrize(
    "leak",
    [
        lambda t: t,
        lambda t: t.rsplit(".", 1)[1],  # the signature
        lambda t: t.rsplit(".", 1)[0],  # header.payload
        lambda t: "…" + t.rsplit(".", 1)[1][:20] + "…",  # cut short
        lambda t: "%3D" + t.rsplit(".", 1)[1][-17:],  # the end, in a longer run
    ],
    ids=["whole", "signature", "header.payload", "signature start", "signature end"],
)
def test_a_token_piece_in_output_is_a_leak(token: str, leak: Callable[[str], str]) -> None:
    ledger = TokenLedger()
    ledger.saw_token(token)
    ledger.examine("server.log", CLEAN + f'"message": "{leak(token)}"\n')
    assert ledger.leaks and all(line.startswith("server.log holds") for line in ledger.leaks)


def test_tokens_sent_in_a_query_or_a_cookie_are_known_too(token: str) -> None:
    other = devkeys.generate_key("EC-P256", kid="other").sign(claims_for(time.time()))
    ledger = TokenLedger()
    ledger.saw_request(f"http://127.0.0.1/x?page=2&access_token={token}", {})
    ledger.saw_request("http://127.0.0.1/x", {"Cookie": f"session={other}; theme=dark"})
    ledger.examine("a", token.rsplit(".", 1)[1])
    ledger.examine("b", other.rsplit(".", 1)[1])
    assert len(ledger.leaks) == 2


def test_padding_like_pieces_are_not_known() -> None:
    ledger = TokenLedger()
    ledger.saw_token("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9." + "A" * 86)
    ledger.examine("server.log", "kid " + "A" * 40)
    assert ledger.leaks == []
