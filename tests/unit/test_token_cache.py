"""The verified-token cache and the verifier's claim rules around it.

A hit skips the signature check (proved by counting verify calls) but never the time checks;
entries end at maxTtl, at the LRU bound, and the moment their key leaves the key set.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from authz_server import errors
from authz_server.config import load as config
from authz_server.config.load import Provider
from authz_server.config.specs import ASYMMETRIC_ALGORITHMS, ProviderSpec
from authz_server.credentials.jwt import ProviderRuntime, TokenVerifier
from authz_server.credentials.token_cache import TokenCache
from authz_server.errors import AuthenticationError
from authz_server.keys.keyset import JWKSCache, KeySet, VerificationKey, VerifyFn
from authz_server.keys.sources import UrlSource
from authz_server.service import Engine
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.e2e.harness import JWKSServer
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for, write_config

ALL = frozenset(ASYMMETRIC_ALGORITHMS)


@pytest.fixture(autouse=True)
def _join_refresh_threads() -> Iterator[None]:
    """Unknown-kid refreshes run in their own threads; none may outlive its test."""
    yield
    for thread in threading.enumerate():
        if thread.name.startswith("jwks-kid-"):
            thread.join(5)
            assert not thread.is_alive(), f"{thread.name} still running"


class CountingSource:
    """Keys whose verify functions count their calls: a cache hit must not call them."""

    description = "counting source"
    remote = True
    watched = False

    def __init__(self, *keys: SigningKey) -> None:
        self.document: Mapping[str, Any] = devkeys.jwks(*keys)
        self.calls = 0

    def _counted(self, verify: VerifyFn) -> VerifyFn:
        def counted(message: bytes, signature: bytes) -> bool:
            self.calls += 1
            return verify(message, signature)

        return counted

    def load(self, allowed_algs: frozenset[str], origin: str) -> tuple[KeySet, float | None]:
        parsed = KeySet.from_jwks(self.document, allowed_algs, origin)
        keys = tuple(
            VerificationKey(
                kid=k.kid,
                kty=k.kty,
                verifiers={a: self._counted(v) for a, v in k.verifiers.items()},
            )
            for k in parsed.keys
        )
        return KeySet(keys=keys, by_kid={k.kid: k for k in keys if k.kid}), None

    def changed(self) -> bool:
        return False


def runtime(keys: JWKSCache, *, name: str = "p", **spec: Any) -> ProviderRuntime:
    fields: dict[str, Any] = {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks": '{"keys": []}'}
    fields.update(spec)
    return ProviderRuntime.build(Provider(spec=ProviderSpec(**fields), name=name, origin="t"), keys)


def counting_cache(*keys: SigningKey, clock: Clock) -> tuple[CountingSource, JWKSCache]:
    source = CountingSource(*keys)
    cache = JWKSCache(provider="p", allowed_algs=ALL, source=source, clock=clock)
    assert cache.refresh()
    return source, cache


def reason_of(verifier: TokenVerifier, token: str, scope: tuple[ProviderRuntime, ...]) -> str:
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(token, scope)
    return caught.value.reason


# ------------------------------------------------------------------------------- hits


def test_a_hit_skips_the_signature_check(rsa_key: SigningKey, clock: Clock) -> None:
    source, keys = counting_cache(rsa_key, clock=clock)
    scope = (runtime(keys),)
    cache = TokenCache(clock=clock)
    verifier = TokenVerifier(clock, cache=cache)
    token = rsa_key.sign(claims_for(clock.now))
    first = verifier.verify(token, scope)
    assert source.calls == 1 and (cache.hits, cache.misses) == (0, 1)
    for _ in range(5):
        assert verifier.verify(token, scope) is first
    assert source.calls == 1 and (cache.hits, cache.misses) == (5, 1)
    assert len(cache) == 1


def test_a_hit_still_checks_expiry_with_the_providers_skew(
    rsa_key: SigningKey, clock: Clock
) -> None:
    source, keys = counting_cache(rsa_key, clock=clock)
    scope = (runtime(keys, clockSkew="30s"),)
    verifier = TokenVerifier(clock, cache=TokenCache(clock=clock))
    token = rsa_key.sign(claims_for(clock.now, exp=int(clock.now) + 60))
    verifier.verify(token, scope)
    clock.advance(60 + 29)
    assert verifier.verify(token, scope).subject == "alice"
    clock.advance(1)
    assert reason_of(verifier, token, scope) == errors.TOKEN_EXPIRED
    assert source.calls == 1  # refused on the hit, without verifying again


def test_a_hit_still_checks_not_before(rsa_key: SigningKey, clock: Clock) -> None:
    source, keys = counting_cache(rsa_key, clock=clock)
    scope = (runtime(keys, clockSkew="0s"),)
    verifier = TokenVerifier(clock, cache=TokenCache(clock=clock))
    token = rsa_key.sign(claims_for(clock.now, nbf=int(clock.now)))
    verifier.verify(token, scope)
    clock.advance(-5)  # the host clock stepped back
    assert reason_of(verifier, token, scope) == errors.TOKEN_NOT_YET_VALID
    assert source.calls == 1


def test_an_entry_lives_at_most_max_ttl(rsa_key: SigningKey, clock: Clock) -> None:
    source, keys = counting_cache(rsa_key, clock=clock)
    scope = (runtime(keys),)
    cache = TokenCache(max_ttl=10.0, clock=clock)
    verifier = TokenVerifier(clock, cache=cache)
    token = rsa_key.sign(claims_for(clock.now))
    verifier.verify(token, scope)
    clock.advance(10)
    verifier.verify(token, scope)
    assert source.calls == 1
    clock.advance(0.5)
    verifier.verify(token, scope)
    assert source.calls == 2 and len(cache) == 1


def test_the_cache_is_a_bounded_lru_that_counts_evictions(
    rsa_key: SigningKey, clock: Clock
) -> None:
    source, keys = counting_cache(rsa_key, clock=clock)
    scope = (runtime(keys),)
    cache = TokenCache(max_entries=3, clock=clock)
    verifier = TokenVerifier(clock, cache=cache)
    tokens = [rsa_key.sign(claims_for(clock.now, sub=f"user-{n}")) for n in range(5)]
    for token in tokens[:3]:
        verifier.verify(token, scope)
    verifier.verify(tokens[0], scope)  # now the most recently used
    verifier.verify(tokens[3], scope)  # evicts tokens[1], the least recently used
    assert len(cache) == 3 and cache.evictions == 1
    calls = source.calls
    verifier.verify(tokens[0], scope)
    assert source.calls == calls
    verifier.verify(tokens[1], scope)  # was evicted: verified again, evicting tokens[2]
    assert source.calls == calls + 1 and cache.evictions == 2
    assert (cache.hits, cache.misses) == (2, 5)


def test_max_entries_zero_disables_the_cache(rsa_key: SigningKey, clock: Clock) -> None:
    source, keys = counting_cache(rsa_key, clock=clock)
    scope = (runtime(keys),)
    cache = TokenCache(max_entries=0, clock=clock)
    verifier = TokenVerifier(clock, cache=cache)
    token = rsa_key.sign(claims_for(clock.now))
    for _ in range(3):
        verifier.verify(token, scope)
    assert source.calls == 3
    assert len(cache) == 0 and (cache.hits, cache.misses, cache.evictions) == (0, 0, 0)


def test_scopes_with_other_providers_do_not_share_entries(
    rsa_key: SigningKey, clock: Clock
) -> None:
    source, keys = counting_cache(rsa_key, clock=clock)
    lenient = (runtime(keys, name="lenient"),)
    strict = (runtime(keys, name="strict", audiences=["billing-api"]),)
    cache = TokenCache(clock=clock)
    verifier = TokenVerifier(clock, cache=cache)
    token = rsa_key.sign(claims_for(clock.now))
    assert verifier.verify(token, lenient).provider == "lenient"
    assert reason_of(verifier, token, strict) == errors.INVALID_AUDIENCE
    assert cache.hits == 0 and len(cache) == 1
    assert verifier.verify(token, lenient).provider == "lenient"
    assert cache.hits == 1 and source.calls == 2


def test_cache_key_is_a_digest_per_scope_never_the_token() -> None:
    token = "header.payload.signature"
    key = TokenCache.digest(token, b"scope-1")
    assert len(key) == 32 + len(b"scope-1") and token.encode() not in key
    assert key == TokenCache.digest(token, b"scope-1")
    assert key != TokenCache.digest(token, b"scope-2")
    assert key != TokenCache.digest(token + "x", b"scope-1")


def test_the_size_cap_is_checked_before_the_cache(rsa_key: SigningKey, clock: Clock) -> None:
    _, keys = counting_cache(rsa_key, clock=clock)
    scope = (runtime(keys),)
    cache = TokenCache(clock=clock)
    token = rsa_key.sign(claims_for(clock.now))
    assert TokenVerifier(clock, cache=cache, max_token_bytes=len(token)).verify(token, scope)
    small = TokenVerifier(clock, cache=cache, max_token_bytes=len(token) - 1)
    assert reason_of(small, token, scope) == errors.MALFORMED_TOKEN
    assert cache.hits == 0


# ------------------------------------------------------------------ keys leaving the set


@pytest.fixture
def idp(rsa_key: SigningKey, ec_key: SigningKey) -> Iterator[JWKSServer]:
    with JWKSServer(devkeys.jwks(rsa_key, ec_key)) as server:
        yield server


def url_keys(idp: JWKSServer, clock: Clock) -> JWKSCache:
    source = UrlSource(idp.jwks_url, timeout=2, ssl_context=None)
    keys = JWKSCache(provider="idp", allowed_algs=ALL, source=source, clock=clock)
    assert keys.refresh()
    return keys


def test_a_removed_key_stops_validating_cached_tokens_at_once(
    idp: JWKSServer, rsa_key: SigningKey, ec_key: SigningKey, clock: Clock
) -> None:
    keys = url_keys(idp, clock)
    scope = (runtime(keys),)
    cache = TokenCache(clock=clock)
    verifier = TokenVerifier(clock, cache=cache, unknown_kid_wait=2)
    token = rsa_key.sign(claims_for(clock.now))
    verifier.verify(token, scope)
    verifier.verify(token, scope)
    assert cache.hits == 1
    idp.set_jwks(devkeys.jwks(ec_key))
    assert keys.refresh()  # no listener: the entry is still stored, but must not be served
    assert reason_of(verifier, token, scope) == errors.UNKNOWN_KID
    assert cache.hits == 1


def test_purge_frees_the_entries_of_a_removed_key(
    idp: JWKSServer, rsa_key: SigningKey, ec_key: SigningKey, clock: Clock
) -> None:
    keys = url_keys(idp, clock)
    scope = (runtime(keys),)
    cache = TokenCache(clock=clock)
    verifier = TokenVerifier(clock, cache=cache)
    for n in range(3):
        verifier.verify(rsa_key.sign(claims_for(clock.now, sub=f"user-{n}")), scope)
    other_keys = url_keys(idp, clock)
    other = TokenCache(clock=clock)
    TokenVerifier(clock, cache=other).verify(rsa_key.sign(claims_for(clock.now)), scope)
    assert len(cache) == 3
    idp.set_jwks(devkeys.jwks(ec_key))
    assert keys.refresh()
    assert cache.purge(other_keys) == 0  # another provider's key set: not ours to purge
    assert cache.purge(keys) == 3 and len(cache) == 0


def test_the_engine_wiring_purges_on_refresh(
    idp: JWKSServer, rsa_key: SigningKey, ec_key: SigningKey, clock: Clock
) -> None:
    keys = url_keys(idp, clock)
    cache = TokenCache(clock=clock)
    keys.listeners.append(cache.purge)  # as service.Engine wires it
    verifier = TokenVerifier(clock, cache=cache)
    verifier.verify(rsa_key.sign(claims_for(clock.now)), (runtime(keys),))
    idp.set_jwks(devkeys.jwks(ec_key))
    assert keys.refresh()
    assert len(cache) == 0


def test_a_key_replaced_under_the_same_kid_does_not_validate_old_tokens(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    keys = url_keys(idp, clock)
    scope = (runtime(keys),)
    verifier = TokenVerifier(clock, cache=TokenCache(clock=clock))
    token = rsa_key.sign(claims_for(clock.now))
    verifier.verify(token, scope)
    idp.set_jwks(devkeys.jwks(devkeys.generate_key("RSA", kid=rsa_key.kid)))
    assert keys.refresh()
    assert reason_of(verifier, token, scope) == errors.INVALID_SIGNATURE


def test_keyless_provider_never_serves_cached_tokens(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    keys = url_keys(idp, clock)
    scope = (runtime(keys),)
    cache = TokenCache(clock=clock)
    verifier = TokenVerifier(clock, cache=cache, unknown_kid_wait=2)
    token = rsa_key.sign(claims_for(clock.now))
    verifier.verify(token, scope)
    keys.keyset = None  # as tick() leaves it after maxStale
    idp.set_failure(status=503)
    with pytest.raises(errors.DependencyError):
        verifier.verify(token, scope)
    assert cache.hits == 0


def test_a_refresh_that_keeps_the_key_keeps_its_cached_tokens(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    keys = url_keys(idp, clock)
    cache = TokenCache(clock=clock)
    keys.listeners.append(cache.purge)
    verifier = TokenVerifier(clock, cache=cache)
    scope = (runtime(keys),)
    token = rsa_key.sign(claims_for(clock.now))
    verifier.verify(token, scope)
    assert keys.refresh()  # the IdP serves the same set
    assert len(cache) == 1
    verifier.verify(token, scope)
    assert cache.hits == 1


# ------------------------------------------------------------------------ claim rules


def _sign(key: SigningKey, now: float, **claims: Any) -> str:
    payload = claims_for(now)
    payload.update(claims)  # unlike claims_for, a None here is kept as JSON null
    return key.sign(payload)


@pytest.mark.parametrize(
    ("required", "claims", "ok"),
    [
        ({"tenant": None}, {"tenant": "acme"}, True),
        ({"tenant": None}, {"tenant": ""}, True),
        ({"tenant": None}, {}, False),
        ({"tenant": None}, {"tenant": None}, False),
        ({"tenant": "acme"}, {"tenant": "acme"}, True),
        ({"tenant": "acme"}, {"tenant": "Acme"}, False),
        ({"tenant": "acme"}, {}, False),
        ({"groups": "admin"}, {"groups": ["dev", "admin"]}, True),
        ({"groups": "admin"}, {"groups": ["dev"]}, False),
        ({"groups": "admin"}, {"groups": []}, False),
        ({"admin": True}, {"admin": True}, True),
        ({"admin": True}, {"admin": 1}, False),
        ({"admin": True}, {"admin": "true"}, False),
        ({"admin": True}, {"admin": [False, True]}, True),
        ({"level": 1}, {"level": 1}, True),
        ({"level": 1}, {"level": True}, False),
        ({"level": 1}, {"level": "1"}, False),
        ({"tenant": "1"}, {"tenant": 1}, False),
        ({"tenant": "acme", "admin": True}, {"tenant": "acme"}, False),
        ({"tenant": "acme", "admin": True}, {"tenant": "acme", "admin": True}, True),
    ],
)
def test_required_claims_are_present_or_equal_type_exactly(
    rsa_key: SigningKey,
    clock: Clock,
    required: dict[str, Any],
    claims: dict[str, Any],
    ok: bool,
) -> None:
    _, keys = counting_cache(rsa_key, clock=clock)
    scope = (runtime(keys, requiredClaims=required),)
    assert scope[0].required_claims == tuple(required.items())
    assert [type(v) for _, v in scope[0].required_claims] == [type(v) for v in required.values()]
    verifier = TokenVerifier(clock, cache=TokenCache(clock=clock))
    token = _sign(rsa_key, clock.now, **claims)
    if ok:
        assert verifier.verify(token, scope).subject == "alice"
    else:
        assert reason_of(verifier, token, scope) == errors.MISSING_CLAIM


def test_require_expiration_false_accepts_and_caches_a_token_without_exp(
    rsa_key: SigningKey, clock: Clock
) -> None:
    source, keys = counting_cache(rsa_key, clock=clock)
    token = rsa_key.sign(claims_for(clock.now, exp=None))
    cache = TokenCache(max_ttl=600.0, clock=clock)
    verifier = TokenVerifier(clock, cache=cache)
    assert reason_of(verifier, token, (runtime(keys),)) == errors.MISSING_CLAIM
    lenient = (runtime(keys, requireExpiration=False),)
    assert verifier.verify(token, lenient).subject == "alice"
    calls = source.calls
    clock.advance(599)
    assert verifier.verify(token, lenient).subject == "alice"
    assert cache.hits == 1 and source.calls == calls
    clock.advance(2)  # past maxTtl: verified again, not trusted forever
    verifier.verify(token, lenient)
    assert source.calls == calls + 1


def test_require_expiration_false_still_refuses_an_expired_token(
    rsa_key: SigningKey, clock: Clock
) -> None:
    _, keys = counting_cache(rsa_key, clock=clock)
    token = rsa_key.sign(claims_for(clock.now, exp=int(clock.now) - 120))
    verifier = TokenVerifier(clock)
    lenient = (runtime(keys, requireExpiration=False),)
    assert reason_of(verifier, token, lenient) == errors.TOKEN_EXPIRED


def test_yaml_settings_reach_the_cache_and_the_verifier(
    tmp_path: Path, rsa_key: SigningKey, clock: Clock
) -> None:
    jwks = json.dumps(json.dumps(devkeys.jwks(rsa_key)))
    text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
server:
  maxTokenBytes: 300
  tokenCache: {{maxEntries: 2, maxTtl: 90s}}
providers:
  - name: main
    issuer: {ISSUER}
    jwks: {jwks}
    requireExpiration: false
    requiredClaims: {{admin: true, level: 1, tenant: "1", team: null}}
policies: [{{name: allow-all, rules: [{{}}]}}]
"""
    engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
    assert engine.verifier.max_token_bytes == 300
    assert (engine.token_cache.max_entries, engine.token_cache.max_ttl) == (2, 90.0)
    (provider,) = engine.providers
    assert not provider.require_expiration
    required = dict(provider.required_claims)
    assert required == {"admin": True, "level": 1, "tenant": "1", "team": None}
    assert [type(v) for v in required.values()] == [bool, int, str, type(None)]
    assert engine.caches["main"].refresh()
    token = rsa_key.sign(claims_for(clock.now, admin=True, level=1, tenant="1", team="x"))
    assert len(token) > 300
    reason = reason_of(engine.verifier, token, engine.providers)
    assert reason == errors.MALFORMED_TOKEN


def test_an_entry_is_only_a_hit_for_the_same_providers_object(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    keys = url_keys(idp, clock)
    cache = TokenCache(clock=clock)
    verifier = TokenVerifier(clock, cache=cache)
    token = rsa_key.sign(claims_for(clock.now))
    lenient = (runtime(keys),)
    verifier.verify(token, lenient)
    strict = (runtime(keys, audiences=["someone-else"]),)
    with pytest.raises(AuthenticationError):
        verifier.verify(token, strict)  # never another scope's cached identity
    verifier.verify(token, lenient)
    assert cache.hits == 1
