"""The attack catalogue for credentials that are not JWTs: opaque tokens (introspected at a
real endpoint) and API keys, next to a JWT provider on the same header. Every case is a 401
with its reason, never an allow, never an exception, and nothing reaches a party it is not
for (an API key never goes to the IdP)."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from authz_server import errors
from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.errors import ConfigError
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey, b64url_encode
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for, write_config
from tests.introspection_idp import CLIENT_SECRET, IntrospectionServer

IDP_ISSUER = "https://idp.example.com"
API_KEY = secrets.token_urlsafe(32)


def keys_file(*entries: tuple[str, str]) -> str:
    lines = "".join(
        f"  - {{sub: {sub}, sha256: {hashlib.sha256(key.encode()).hexdigest()}}}\n"
        for sub, key in entries
    )
    return "keys:\n" + lines


@dataclass
class World:
    service: AuthorizationService
    engine: Engine
    idp: IntrospectionServer
    key: SigningKey
    clock: Clock
    directory: Path

    def check(self, **headers: str) -> tuple[int, str]:
        decision = self.service.check(
            RequestAttributes(method="GET", path="/", host="api.test", headers=headers)
        )
        return decision.status, decision.reason


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    key = devkeys.generate_key("EC-P256", kid="ec")
    jwks = json.dumps(json.dumps(devkeys.jwks(key)))
    (tmp_path / "client-secret").write_text(CLIENT_SECRET)
    (tmp_path / "keys.yaml").write_text(keys_file(("acme", API_KEY)))
    clock = Clock()
    with IntrospectionServer() as idp:
        text = f"""apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: jwt
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {jwks}
  - name: opaque
    issuer: {IDP_ISSUER}
    introspection: {{endpoint: {idp.endpoint}, clientId: c, clientSecretFile: client-secret}}
  - name: keys
    issuer: apikeys.example.com
    apiKeys: {{file: keys.yaml}}
    fromHeaders: [{{name: x-api-key}}]
policies:
  - name: callers
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""
        engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
        for cache in engine.caches.values():
            assert cache.refresh()
        yield World(AuthorizationService(engine), engine, idp, key, clock, tmp_path)


def _segment(obj: object) -> str:
    return b64url_encode(json.dumps(obj).encode())


def _active(world: World, **claims: object) -> str:
    token = secrets.token_urlsafe(32)
    world.idp.active(token, **claims)
    return token


# (case, the header it goes in, how to make it, the reason, whether the IdP may be asked)
CASES: list[tuple[str, str, Callable[[World], str], str, bool]] = [
    (
        "a JWT-looking token that is not a JWT goes to the IdP, which does not know it",
        "authorization",
        lambda w: "Bearer eyJhbGciOiJFUzI1NiJ9.eyJub3QganNvbg.c2lnbmF0dXJl",
        errors.TOKEN_INACTIVE,
        True,
    ),
    (
        "an unsigned JWT naming our JWT issuer stays a JWT, refused as one",
        "authorization",
        lambda w: "Bearer " + f"{_segment({'alg': 'none'})}.{_segment(claims_for(w.clock()))}.",
        errors.UNSUPPORTED_ALGORITHM,
        False,
    ),
    (
        "a JWT forged for our JWT issuer is not rescued by introspection",
        "authorization",
        lambda w: "Bearer " + w.key.sign(claims_for(w.clock()))[:-6] + "AAAAAA",
        errors.INVALID_SIGNATURE,
        False,
    ),
    (
        "a token of 100 KB is refused before the IdP is asked",
        "authorization",
        lambda w: "Bearer " + "A" * 100_000,
        errors.MALFORMED_TOKEN,
        False,
    ),
    (
        "an API key of 100 KB is refused before any hashing",
        "x-api-key",
        lambda w: "k" * 100_000,
        errors.MALFORMED_API_KEY,
        False,
    ),
    (
        "the key minus its last character (compared whole, never by prefix)",
        "x-api-key",
        lambda w: API_KEY[:-1],
        errors.UNKNOWN_API_KEY,
        False,
    ),
    (
        "the key with a character more",
        "x-api-key",
        lambda w: API_KEY + "A",
        errors.UNKNOWN_API_KEY,
        False,
    ),
    (
        "the key in another case",
        "x-api-key",
        lambda w: API_KEY.swapcase(),
        errors.UNKNOWN_API_KEY,
        False,
    ),
    (
        "the key's first half",
        "x-api-key",
        lambda w: API_KEY[:21],
        errors.UNKNOWN_API_KEY,
        False,
    ),
    (
        "a key with a control character",
        "x-api-key",
        lambda w: API_KEY[:20] + "\x00" + API_KEY[20:],
        errors.MALFORMED_API_KEY,
        False,
    ),
    (
        "the IdP's active opaque token sent as an API key is never sent to the IdP",
        "x-api-key",
        _active,
        errors.UNKNOWN_API_KEY,
        False,
    ),
    (
        "an active answer naming another issuer",
        "authorization",
        lambda w: "Bearer " + _active(w, iss="https://impostor.example.com"),
        errors.INVALID_ISSUER,
        True,
    ),
]


@pytest.mark.parametrize("attack", CASES, ids=[c[0] for c in CASES])
def test_every_credential_attack_is_refused_with_its_reason(
    world: World,
    caplog: pytest.LogCaptureFixture,
    attack: tuple[str, str, Callable[[World], str], str, bool],
) -> None:
    case, header, make, reason, asks_idp = attack
    value = make(world)
    with caplog.at_level(logging.DEBUG):
        assert world.check(**{header: value}) == (401, reason), case
    assert (world.idp.call_count() > 0) == asks_idp
    secret = value.removeprefix("Bearer ")
    assert secret[-16:] not in caplog.text


def test_a_keys_file_with_a_duplicate_hash_is_refused_at_load_and_at_reload(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    keys = world.directory / "keys.yaml"
    other = secrets.token_urlsafe(32)
    keys.write_text(keys_file(("acme", API_KEY), ("mallory", API_KEY), ("new", other)))
    with pytest.raises(ConfigError) as caught:
        config.load(world.directory / "config.yaml")
    assert "keys[1].sha256: duplicate: the same key as keys[0]" in str(caught.value)
    cache = world.engine.caches["keys"]
    with caplog.at_level(logging.WARNING):
        assert not cache.refresh()  # the running server keeps its last good keys
    assert world.check(**{"x-api-key": API_KEY}) == (200, "allowed")
    assert world.check(**{"x-api-key": other}) == (401, errors.UNKNOWN_API_KEY)
    assert "duplicate" in caplog.text
