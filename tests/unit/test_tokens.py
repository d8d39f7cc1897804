"""Token verification: every failure gets its own reason; the provider's allow-list rules."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from authz_server import errors
from authz_server.config.load import Provider
from authz_server.config.specs import ProviderSpec
from authz_server.credentials.jwt import ProviderRuntime, TokenVerifier
from authz_server.errors import AuthenticationError, DependencyError
from authz_server.service import make_cache
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for


def runtime(*keys: SigningKey, jwks: dict[str, Any] | None = None, **spec: Any) -> ProviderRuntime:
    document = jwks if jwks is not None else devkeys.jwks(*keys)
    fields: dict[str, Any] = {
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "jwks": json.dumps(document),
    }
    fields.update(spec)
    provider = Provider(spec=ProviderSpec(**fields), name="test", origin="test")
    cache = make_cache(provider)
    cache.refresh()
    return ProviderRuntime.build(provider, cache)


def reason_of(verify: Callable[[], object]) -> str:
    with pytest.raises(AuthenticationError) as caught:
        verify()
    return caught.value.reason


@pytest.fixture
def verifier(clock: Clock) -> TokenVerifier:
    return TokenVerifier(clock)


def test_valid_rs256_token_gives_identity_with_istio_principal(
    verifier: TokenVerifier, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    identity = verifier.verify(make_token(groups=["dev"], azp="cli"), [runtime(rsa_key)])
    assert identity.principal == f"{ISSUER}/alice"
    assert identity.audiences == (AUDIENCE,)
    assert identity.presenter == "cli"
    assert identity.claims["groups"] == ["dev"]
    assert identity.provider == "test"


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
def test_every_rsa_algorithm_verifies_with_a_key_that_declares_no_alg(
    verifier: TokenVerifier, rsa_key: SigningKey, clock: Clock, alg: str
) -> None:
    jwk = rsa_key.public_jwk()
    del jwk["alg"]
    token = rsa_key.sign(claims_for(clock.now), alg=alg)
    assert verifier.verify(token, [runtime(jwks={"keys": [jwk]})]).subject == "alice"


@pytest.mark.parametrize("kind", ["EC-P256", "EC-P384", "Ed25519"])
def test_ec_and_eddsa_tokens_verify(verifier: TokenVerifier, clock: Clock, kind: str) -> None:
    key = devkeys.generate_key(kind, kid=f"{kind}-1")
    token = key.sign(claims_for(clock.now))
    assert verifier.verify(token, [runtime(key)]).subject == "alice"


def test_key_declaring_rs256_does_not_verify_ps256(
    verifier: TokenVerifier, rsa_key: SigningKey, clock: Clock
) -> None:
    token = rsa_key.sign(claims_for(clock.now), alg="PS256")
    assert reason_of(lambda: verifier.verify(token, [runtime(rsa_key)])) == (
        errors.UNSUPPORTED_ALGORITHM
    )


def test_an_es256_token_naming_a_p384_key_is_refused(verifier: TokenVerifier, clock: Clock) -> None:
    # Both algorithms allowed, one kid: the key's curve decides, never the token's header.
    p384 = devkeys.generate_key("EC-P384", kid="ec")
    p256 = devkeys.generate_key("EC-P256", kid="ec")
    provider = runtime(p384, algorithms=["ES256", "ES384"])
    token = p256.sign(claims_for(clock.now))
    assert reason_of(lambda: verifier.verify(token, [provider])) == errors.UNSUPPORTED_ALGORITHM
    assert verifier.verify(p384.sign(claims_for(clock.now)), [provider]).subject == "alice"


def test_algorithm_outside_the_providers_allow_list_is_refused(
    verifier: TokenVerifier, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    provider = runtime(rsa_key, algorithms=["ES256"])
    assert reason_of(lambda: verifier.verify(make_token(), [provider])) == (
        errors.UNSUPPORTED_ALGORITHM
    )


def test_alg_none_is_refused(verifier: TokenVerifier, rsa_key: SigningKey, clock: Clock) -> None:
    token = devkeys.unsigned_token(claims_for(clock.now), headers={"kid": rsa_key.kid})
    assert reason_of(lambda: verifier.verify(token, [runtime(rsa_key)])) == (
        errors.UNSUPPORTED_ALGORITHM
    )


def test_hs256_signed_with_the_rsa_public_key_is_refused(
    verifier: TokenVerifier, rsa_key: SigningKey, clock: Clock
) -> None:
    for secret in (rsa_key.public_pem(), json.dumps(rsa_key.public_jwk()).encode()):
        token = devkeys.hmac_token(claims_for(clock.now), secret, kid=rsa_key.kid)
        assert reason_of(lambda t=token: verifier.verify(t, [runtime(rsa_key)])) == (
            errors.UNSUPPORTED_ALGORITHM
        )


def test_tampered_payload_fails_the_signature(
    verifier: TokenVerifier, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    header, _, signature = make_token().split(".")
    forged = base64.urlsafe_b64encode(
        json.dumps(claims_for(0, sub="root", exp=2**40)).encode()
    ).rstrip(b"=")
    token = f"{header}.{forged.decode()}.{signature}"
    assert reason_of(lambda: verifier.verify(token, [runtime(rsa_key)])) == errors.INVALID_SIGNATURE


def test_token_signed_by_another_key_with_the_same_kid_fails_the_signature(
    verifier: TokenVerifier, rsa_key: SigningKey, clock: Clock
) -> None:
    impostor = devkeys.generate_key("EC-P256", kid=rsa_key.kid)
    token = impostor.sign(claims_for(clock.now))
    provider = runtime(rsa_key, algorithms=["RS256", "ES256"])
    assert reason_of(lambda: verifier.verify(token, [provider])) == errors.UNSUPPORTED_ALGORITHM
    rsa_impostor = devkeys.generate_key("RSA", kid=rsa_key.kid)
    token = rsa_impostor.sign(claims_for(clock.now))
    assert reason_of(lambda: verifier.verify(token, [provider])) == errors.INVALID_SIGNATURE


def test_unknown_kid_is_refused(verifier: TokenVerifier, rsa_key: SigningKey, clock: Clock) -> None:
    token = rsa_key.sign(claims_for(clock.now), kid="rotated-away")
    assert reason_of(lambda: verifier.verify(token, [runtime(rsa_key)])) == errors.UNKNOWN_KID


def test_token_without_kid_tries_the_keys_that_serve_its_alg(
    verifier: TokenVerifier, rsa_key: SigningKey, ec_key: SigningKey, clock: Clock
) -> None:
    other = devkeys.generate_key("RSA", kid="rsa-2")
    token = rsa_key.sign(claims_for(clock.now), kid=None)
    assert verifier.verify(token, [runtime(other, ec_key, rsa_key)]).subject == "alice"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": -10_000}, errors.TOKEN_EXPIRED),
        ({"exp": None}, errors.MISSING_CLAIM),
        ({"nbf": 10_000}, errors.TOKEN_NOT_YET_VALID),
        ({"aud": "someone-else"}, errors.INVALID_AUDIENCE),
        ({"aud": ["a", "b"]}, errors.INVALID_AUDIENCE),
        ({"aud": None}, errors.INVALID_AUDIENCE),
        ({"iss": "https://evil.test"}, errors.INVALID_ISSUER),
        ({"iss": None}, errors.INVALID_ISSUER),
        ({"exp": "tomorrow"}, errors.MALFORMED_TOKEN),
        ({"aud": 42}, errors.MALFORMED_TOKEN),
    ],
)
def test_claim_failures_have_their_own_reason(
    verifier: TokenVerifier,
    rsa_key: SigningKey,
    clock: Clock,
    claims: dict[str, Any],
    reason: str,
) -> None:
    relative = {
        k: (int(clock.now) + v if k in ("exp", "nbf") and isinstance(v, int) else v)
        for k, v in claims.items()
    }
    token = rsa_key.sign(claims_for(clock.now, **relative))
    assert reason_of(lambda: verifier.verify(token, [runtime(rsa_key)])) == reason


def test_clock_skew_tolerates_a_just_expired_token_then_refuses_it(
    verifier: TokenVerifier, rsa_key: SigningKey, make_token: Callable[..., str], clock: Clock
) -> None:
    provider = runtime(rsa_key, clockSkew="30s")
    token = make_token()
    clock.advance(3600 + 29)
    assert verifier.verify(token, [provider]).subject == "alice"
    clock.advance(2)
    assert reason_of(lambda: verifier.verify(token, [provider])) == errors.TOKEN_EXPIRED


def test_audience_list_with_one_accepted_entry_passes(
    verifier: TokenVerifier, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    identity = verifier.verify(make_token(aud=["x", AUDIENCE]), [runtime(rsa_key)])
    assert identity.audiences == ("x", AUDIENCE)


def test_provider_without_audiences_accepts_any_audience(
    verifier: TokenVerifier, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    provider = runtime(rsa_key, audiences=[])
    assert verifier.verify(make_token(aud="anything"), [provider]).subject == "alice"


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "!!!.???.###",
        base64.urlsafe_b64encode(b"[1]").decode() + ".e30.sig",
        "x" * 9000,
        "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d",
    ],
)
def test_malformed_tokens_are_refused_as_malformed(
    verifier: TokenVerifier, rsa_key: SigningKey, token: str
) -> None:
    assert reason_of(lambda: verifier.verify(token, [runtime(rsa_key)])) == errors.MALFORMED_TOKEN


def test_crit_header_is_refused(verifier: TokenVerifier, rsa_key: SigningKey, clock: Clock) -> None:
    token = rsa_key.sign(claims_for(clock.now), headers={"crit": ["exp"], "exp": 1})
    assert reason_of(lambda: verifier.verify(token, [runtime(rsa_key)])) == errors.MALFORMED_TOKEN


def test_embedded_jwk_header_is_never_used(
    verifier: TokenVerifier, rsa_key: SigningKey, clock: Clock
) -> None:
    attacker = devkeys.generate_key("RSA", kid=rsa_key.kid)
    token = attacker.sign(claims_for(clock.now), headers={"jwk": attacker.public_jwk()})
    assert reason_of(lambda: verifier.verify(token, [runtime(rsa_key)])) == errors.INVALID_SIGNATURE


def test_provider_without_keys_fails_closed_with_dependency_error(
    verifier: TokenVerifier, make_token: Callable[..., str]
) -> None:
    spec = ProviderSpec(issuer=ISSUER, jwksUri="http://127.0.0.1:9/jwks.json")
    provider = Provider(spec=spec, name="down", origin="test")
    keyless = ProviderRuntime.build(provider, make_cache(provider))
    with pytest.raises(DependencyError) as caught:
        verifier.verify(make_token(), [keyless])
    assert caught.value.reason == errors.JWKS_UNAVAILABLE


def test_two_providers_with_one_issuer_accept_a_token_either_can_verify(
    verifier: TokenVerifier, rsa_key: SigningKey, ec_key: SigningKey, clock: Clock
) -> None:
    token = ec_key.sign(claims_for(clock.now))
    assert verifier.verify(token, [runtime(rsa_key), runtime(ec_key)]).subject == "alice"


def _with_payload(token: str, payload: str) -> str:
    head, _, sig = token.split(".")
    return f"{head}.{base64.urlsafe_b64encode(payload.encode()).rstrip(b'=').decode()}.{sig}"


@pytest.mark.parametrize(
    "payload",
    [
        '{"exp": NaN}',
        '{"exp": Infinity}',
        '{"nbf": -Infinity}',
        '{"exp": 1e400}',
        '{"exp": 1e308}',
        '{"exp": 9223372036854775808}',
        '{"iat": 1e19}',
        '{"nbf": -9223372036854775809}',
    ],
)
def test_time_claims_past_a_signed_64_bit_seconds_count_are_malformed(
    verifier: TokenVerifier, rsa_key: SigningKey, clock: Clock, payload: str
) -> None:
    # Signed for real: an IdP bug must not mint a token that never expires.
    import json as _json

    claims = claims_for(clock.now)
    body = _json.dumps(claims)[:-1] + ", " + payload[1:]
    header = base64.urlsafe_b64encode(
        _json.dumps({"alg": "RS256", "kid": rsa_key.kid}).encode()
    ).rstrip(b"=")
    segment = base64.urlsafe_b64encode(body.encode()).rstrip(b"=")
    signing_input = header + b"." + segment
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    private = rsa_key.private_key
    assert isinstance(private, rsa.RSAPrivateKey)
    signature = private.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    token = (signing_input + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()
    assert reason_of(lambda: verifier.verify(token, [runtime(rsa_key)])) == errors.MALFORMED_TOKEN


def test_deeply_nested_header_is_malformed_not_an_internal_error(
    verifier: TokenVerifier, rsa_key: SigningKey
) -> None:
    nested = base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).rstrip(b"=").decode()
    token = f"{nested}.e30.c2ln"
    assert reason_of(lambda: verifier.verify(token, [runtime(rsa_key)])) == errors.MALFORMED_TOKEN


@pytest.mark.parametrize("suffix", ["@@", "=", "==", "+", " x"])
def test_a_signature_spelled_differently_is_malformed(
    verifier: TokenVerifier, rsa_key: SigningKey, make_token: Callable[..., str], suffix: str
) -> None:
    token = make_token() + suffix
    assert reason_of(lambda: verifier.verify(token, [runtime(rsa_key)])) == errors.MALFORMED_TOKEN


def test_token_is_expired_at_its_exp_instant(
    verifier: TokenVerifier, rsa_key: SigningKey, make_token: Callable[..., str], clock: Clock
) -> None:
    provider = runtime(rsa_key, clockSkew="0s")
    token = make_token()
    clock.now = int(clock.now) + 3599
    assert verifier.verify(token, [provider]).subject == "alice"
    clock.now += 1
    assert reason_of(lambda: verifier.verify(token, [provider])) == errors.TOKEN_EXPIRED


def test_token_issued_in_the_future_is_not_yet_valid_beyond_the_skew(
    verifier: TokenVerifier, rsa_key: SigningKey, clock: Clock
) -> None:
    provider = runtime(rsa_key, clockSkew="30s")
    soon = rsa_key.sign(claims_for(clock.now, iat=int(clock.now) + 20))
    assert verifier.verify(soon, [provider]).subject == "alice"
    later = rsa_key.sign(claims_for(clock.now, iat=int(clock.now) + 120))
    assert reason_of(lambda: verifier.verify(later, [provider])) == errors.TOKEN_NOT_YET_VALID


def test_a_signature_with_non_zero_padding_bits_is_malformed(
    verifier: TokenVerifier, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    # An RS256 signature is 256 bytes: 342 base64url characters, the last one carrying 2 bits
    # of data and 4 unused bits. Every other value of those bits spells the same signature.
    token = make_token()
    head, _, signature = token.rpartition(".")
    assert len(signature) % 4 == 2
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    assert last & 0x0F == 0  # what we mint is canonical
    assert verifier.verify(token, [runtime(rsa_key)]).subject == "alice"
    for unused in range(1, 16):
        spelling = f"{head}.{signature[:-1]}{alphabet[last | unused]}"
        assert reason_of(lambda t=spelling: verifier.verify(t, [runtime(rsa_key)])) == (
            errors.MALFORMED_TOKEN
        )


def test_a_header_seen_before_is_still_judged_by_each_provider(
    verifier: TokenVerifier, rsa_key: SigningKey, clock: Clock
) -> None:
    # Headers are decoded once per distinct text; what the header says is checked every time.
    rs_only, es_only = runtime(rsa_key), runtime(rsa_key, algorithms=["ES256"])
    token = rsa_key.sign(claims_for(clock.now))
    assert verifier.verify(token, [rs_only]).subject == "alice"
    same_header = rsa_key.sign(claims_for(clock.now, sub="bob"))
    assert same_header.split(".")[0] == token.split(".")[0]
    assert reason_of(lambda: verifier.verify(same_header, [es_only])) == (
        errors.UNSUPPORTED_ALGORITHM
    )
    assert verifier.verify(same_header, [rs_only]).subject == "bob"


def test_many_distinct_headers_neither_grow_memory_nor_change_verdicts(
    verifier: TokenVerifier, rsa_key: SigningKey, clock: Clock
) -> None:
    provider = runtime(rsa_key)
    for n in range(600):
        token = rsa_key.sign(claims_for(clock.now), headers={"n": n})
        assert verifier.verify(token, [provider]).subject == "alice"
    forged = rsa_key.sign(claims_for(clock.now), headers={"n": 0}).rpartition(".")[0] + ".c2ln"
    assert reason_of(lambda: verifier.verify(forged, [provider])) == errors.INVALID_SIGNATURE
    assert len(verifier._headers) <= 256
