"""Key sets: unusable keys are skipped with a reason; a failed refresh keeps the good keys."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz_server.config.specs import ASYMMETRIC_ALGORITHMS
from authz_server.keys.keyset import JWKSCache, KeySet
from authz_server.keys.sources import FileSource, InlineSource, UrlSource
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.e2e.harness import JWKSServer

ALL = frozenset(ASYMMETRIC_ALGORITHMS)


def test_each_usable_key_serves_the_algorithms_of_its_type(
    rsa_key: SigningKey, ec_key: SigningKey, ed_key: SigningKey
) -> None:
    rsa_jwk = rsa_key.public_jwk()
    del rsa_jwk["alg"]
    keyset = KeySet.from_jwks({"keys": [rsa_jwk, ec_key.public_jwk(), ed_key.public_jwk()]}, ALL)
    assert set(keyset.by_kid["rsa-1"].verifiers) == {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
    }
    assert set(keyset.by_kid["ec-1"].verifiers) == {"ES256"}
    assert set(keyset.by_kid["ed-1"].verifiers) == {"EdDSA"}
    assert keyset.skipped == ()


def test_declared_alg_narrows_the_key_and_allow_list_narrows_further(rsa_key: SigningKey) -> None:
    keyset = KeySet.from_jwks(devkeys.jwks(rsa_key), ALL)
    assert set(keyset.by_kid["rsa-1"].verifiers) == {"RS256"}
    keyset = KeySet.from_jwks(devkeys.jwks(rsa_key), frozenset({"ES256"}))
    assert keyset.by_kid["rsa-1"].verifiers == {}


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda jwk: jwk.update(use="enc"), "use 'enc'"),
        (lambda jwk: jwk.update(kty="oct", k="c2VjcmV0"), "unsupported key type 'oct'"),
        (lambda jwk: jwk.update(alg="ES256"), "does not fit key type RSA"),
        (lambda jwk: jwk.pop("n"), "missing or non-string 'n'"),
    ],
)
def test_unusable_rsa_keys_are_skipped_with_a_reason(
    rsa_key: SigningKey,
    ec_key: SigningKey,
    mutate: object,
    why: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = rsa_key.public_jwk()
    mutate(bad)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, "authz_server.jwks"):
        keyset = KeySet.from_jwks({"keys": [bad, ec_key.public_jwk()]}, ALL)
    assert [k.kid for k in keyset.keys] == ["ec-1"]
    assert why in keyset.skipped[0]
    assert why in caplog.text


def test_rsa_key_below_2048_bits_is_skipped() -> None:
    weak = devkeys.generate_key("RSA-1024", kid="weak")
    keyset = KeySet.from_jwks(devkeys.jwks(weak), ALL)
    assert keyset.keys == () and "1024 bits" in keyset.skipped[0]


def test_unsupported_curve_and_duplicate_kid_are_skipped(ec_key: SigningKey) -> None:
    p521 = {"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"}
    twin = devkeys.generate_key("EC-P256", kid=ec_key.kid).public_jwk()
    keyset = KeySet.from_jwks({"keys": [ec_key.public_jwk(), p521, twin]}, ALL)
    assert [k.kid for k in keyset.keys] == ["ec-1"]
    assert any("P-521" in s for s in keyset.skipped)
    assert any("duplicate kid" in s for s in keyset.skipped)


def test_an_ec_key_whose_point_is_off_its_curve_is_skipped(ec_key: SigningKey) -> None:
    # An invalid-curve attack's key: verifying with it could leak nothing here (public keys
    # only), but a key that is not a point of its curve is no key at all.
    jwk = ec_key.public_jwk()
    y = int.from_bytes(devkeys.b64url_decode(jwk["y"]), "big")
    jwk["y"] = devkeys.b64url_encode(((y + 1) % 2**256).to_bytes(32, "big"))
    for allowed in (ALL, frozenset({"RS256"})):
        keyset = KeySet.from_jwks({"keys": [jwk]}, allowed)
        assert keyset.keys == () and "invalid EC key" in keyset.skipped[0]


def _message_and_signature(key: SigningKey, alg: str) -> tuple[bytes, bytes]:
    head, _, signature = key.sign({"sub": "alice"}, alg=alg).rpartition(".")
    return head.encode(), devkeys.b64url_decode(signature)


@pytest.mark.parametrize(("kind", "alg"), [("EC-P256", "ES256"), ("EC-P384", "ES384")])
def test_an_ecdsa_signature_verifies_only_as_r_and_s_of_the_curves_size(
    kind: str, alg: str
) -> None:
    key = devkeys.generate_key(kind, kid="ec")
    verify = KeySet.from_jwks(devkeys.jwks(key), ALL).by_kid["ec"].verifiers[alg]
    message, signature = _message_and_signature(key, alg)
    assert verify(message, signature)
    size = len(signature) // 2
    r, s = signature[:size], signature[size:]
    wider = b"\x00" + r + b"\x00" + s  # the same integers, each one byte longer
    assert not verify(message, wider)
    assert not verify(message, signature[:-1])
    assert not verify(message + b"x", signature)


def test_an_rsa_signature_with_a_leading_zero_byte_does_not_verify(rsa_key: SigningKey) -> None:
    # The same integer, one byte longer: RFC 8017 8.2.2 wants exactly the modulus' length.
    verify = KeySet.from_jwks(devkeys.jwks(rsa_key), ALL).by_kid["rsa-1"].verifiers["RS256"]
    message, signature = _message_and_signature(rsa_key, "RS256")
    assert verify(message, signature)
    assert not verify(message, b"\x00" + signature)
    assert not verify(message, signature[1:])


@pytest.mark.parametrize("document", [[], {"keys": "nope"}, {"no": "keys"}])
def test_a_document_that_is_not_a_jwks_is_refused(document: object) -> None:
    with pytest.raises(ValueError, match="not a JWKS"):
        KeySet.from_jwks(document, ALL)


@pytest.fixture
def idp(rsa_key: SigningKey) -> Iterator[JWKSServer]:
    with JWKSServer(devkeys.jwks(rsa_key)) as server:
        yield server


def url_cache(idp: JWKSServer) -> JWKSCache:
    source = UrlSource(idp.jwks_url, timeout=2, ssl_context=None)
    return JWKSCache(provider="idp", allowed_algs=ALL, source=source)


def test_cache_loads_from_url_and_keeps_last_good_keys_when_the_idp_fails(
    idp: JWKSServer, rsa_key: SigningKey
) -> None:
    cache = url_cache(idp)
    assert cache.refresh()
    good = cache.keyset
    assert good is not None and "rsa-1" in good.by_kid
    failures = [
        {"status": 500, "body": b"oops"},
        {"status": 200, "body": b"<html>not json"},
        {"status": 200, "body": b'{"keys": []}'},
        {"close_connection": True},
    ]
    for failure in failures:
        idp.set_failure(**failure)  # type: ignore[arg-type]
        assert not cache.refresh(), failure
        assert cache.keyset is good
        assert cache.last_error
    idp.clear_failure()
    assert cache.refresh() and cache.last_error is None


def test_cache_with_a_dead_idp_has_no_keys_and_says_why() -> None:
    source = UrlSource("http://127.0.0.1:9/jwks", timeout=1, ssl_context=None)
    cache = JWKSCache(provider="dead", allowed_algs=ALL, source=source)
    assert not cache.refresh()
    assert cache.keyset is None and cache.last_error


def test_cache_from_file_picks_up_a_rotated_key_on_refresh(
    tmp_path: Path, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(devkeys.jwks(rsa_key)))
    cache = JWKSCache(provider="file", allowed_algs=ALL, source=FileSource(path))
    assert cache.refresh()
    path.write_text(json.dumps(devkeys.jwks(ec_key)))
    assert cache.refresh()
    assert cache.keyset is not None and set(cache.keyset.by_kid) == {"ec-1"}


def test_an_invalid_rsa_key_is_skipped_and_its_neighbours_kept(rsa_key: SigningKey) -> None:
    broken = rsa_key.public_jwk() | {"kid": "broken", "e": "Ag"}  # e = 2 is not a valid RSA key
    keyset = KeySet.from_jwks({"keys": [broken, rsa_key.public_jwk()]}, ALL)
    assert [k.kid for k in keyset.keys] == ["rsa-1"]
    assert "broken" not in keyset.by_kid and keyset.skipped


def test_any_exception_while_fetching_keeps_the_keys(rsa_key: SigningKey) -> None:
    import http.client

    class FlakySource(InlineSource):
        remote = True
        calls = 0

        def load(self, allowed_algs: frozenset[str], origin: str) -> tuple[KeySet, float | None]:
            FlakySource.calls += 1
            if FlakySource.calls > 1:
                raise http.client.LineTooLong("header line")
            return super().load(allowed_algs, origin)

    source = FlakySource(json.dumps(devkeys.jwks(rsa_key)))
    cache = JWKSCache(provider="p", allowed_algs=ALL, source=source)
    assert cache.refresh()
    good = cache.keyset
    assert not cache.refresh()
    assert cache.keyset is good and "LineTooLong" in (cache.last_error or "")
