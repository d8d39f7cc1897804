"""Shared fixtures: real keys (made once per session), tokens, a movable clock, configs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.helpers import Clock, claims_for


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="session")
def rsa_key() -> SigningKey:
    return devkeys.generate_key("RSA", kid="rsa-1")


@pytest.fixture(scope="session")
def ec_key() -> SigningKey:
    return devkeys.generate_key("EC-P256", kid="ec-1")


@pytest.fixture(scope="session")
def ed_key() -> SigningKey:
    return devkeys.generate_key("Ed25519", kid="ed-1")


@pytest.fixture
def make_token(rsa_key: SigningKey, clock: Clock) -> Callable[..., str]:
    """``make_token(**claims)``: an RS256 token from ``rsa_key`` with valid claims by default."""

    def make(*, key: SigningKey | None = None, alg: str | None = None, **claims: Any) -> str:
        return (key or rsa_key).sign(claims_for(clock.now, **claims), alg=alg)

    return make
