"""The e2e session's last word: no token the tests sent appears, even in part, in anything a
server they started wrote (see ``TokenLedger``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from authz_server.tools.devkeys import SigningKey
from tests.e2e.harness import TOKEN_LEDGER


@pytest.fixture(scope="session", autouse=True)
def no_token_reaches_server_output() -> Iterator[None]:
    """Every token signed from here to the end of the session is remembered (tokens sent over
    HTTP are too, by ``http_request``); at the end, the outputs examined hold none of them."""
    sign = SigningKey.sign

    def sign_and_remember(key: SigningKey, *args: Any, **kwargs: Any) -> str:
        token = sign(key, *args, **kwargs)
        TOKEN_LEDGER.saw_token(token)
        return token

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SigningKey, "sign", sign_and_remember)
        yield
    assert not TOKEN_LEDGER.leaks, "\n".join(TOKEN_LEDGER.leaks)
