"""devkeys: tokens it signs verify with `cryptography` directly; its JWKs are well formed."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey, b64url_decode, generate_key

CLAIMS = {"iss": "https://issuer.test", "sub": "alice", "aud": "api", "exp": 2_000_000_000}
_HASHES = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    # RSA generation is the slow part; one key per kind for the whole module.
    return {kind: generate_key(kind) for kind in ("RSA", "EC-P256", "EC-P384", "Ed25519")}


def _split(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    header_b64, payload_b64, sig_b64 = token.split(".")
    header = json.loads(b64url_decode(header_b64))
    payload = json.loads(b64url_decode(payload_b64))
    return header, payload, f"{header_b64}.{payload_b64}".encode(), b64url_decode(sig_b64)


def _verify(key: SigningKey, token: str) -> dict[str, Any]:
    """Verify `token` with the public key using cryptography primitives only; return claims."""
    header, payload, signing_input, sig = _split(token)
    alg = header["alg"]
    public = key.private_key.public_key()
    if alg[:2] in ("RS", "PS"):
        assert isinstance(public, rsa.RSAPublicKey)
        digest = _HASHES[alg[2:]]
        pad: padding.AsymmetricPadding = (
            padding.PKCS1v15()
            if alg.startswith("RS")
            else padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        )
        public.verify(sig, signing_input, pad, digest)
    elif alg.startswith("ES"):
        assert isinstance(public, ec.EllipticCurvePublicKey)
        size = (public.curve.key_size + 7) // 8
        assert len(sig) == 2 * size
        der = encode_dss_signature(
            int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
        )
        public.verify(der, signing_input, ec.ECDSA(_HASHES[alg[2:]]))
    else:
        assert alg == "EdDSA"
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(sig, signing_input)
    return payload


@pytest.mark.parametrize(
    ("kind", "alg"),
    [
        ("RSA", "RS256"),
        ("RSA", "RS384"),
        ("RSA", "RS512"),
        ("RSA", "PS256"),
        ("RSA", "PS384"),
        ("RSA", "PS512"),
        ("EC-P256", "ES256"),
        ("EC-P384", "ES384"),
        ("Ed25519", "EdDSA"),
    ],
)
def test_signed_token_verifies_with_the_public_key(
    keys: dict[str, SigningKey], kind: str, alg: str
) -> None:
    key = keys[kind]
    token = key.sign(CLAIMS, alg=alg)
    header, _, _, _ = _split(token)
    assert header == {"alg": alg, "typ": "JWT", "kid": key.kid}
    assert _verify(key, token) == CLAIMS


@pytest.mark.parametrize(
    ("kind", "alg"),
    [("RSA", "RS256"), ("EC-P256", "ES256"), ("EC-P384", "ES384"), ("Ed25519", "EdDSA")],
)
def test_default_alg_follows_the_key_kind(keys: dict[str, SigningKey], kind: str, alg: str) -> None:
    key = keys[kind]
    assert key.default_alg == alg
    assert _split(key.sign(CLAIMS))[0]["alg"] == alg


def test_tampered_payload_fails_verification(keys: dict[str, SigningKey]) -> None:
    key = keys["RSA"]
    header_b64, _, sig_b64 = key.sign(CLAIMS).split(".")
    forged_payload = devkeys.b64url_encode(json.dumps({**CLAIMS, "sub": "root"}).encode())
    with pytest.raises(InvalidSignature):
        _verify(key, f"{header_b64}.{forged_payload}.{sig_b64}")


def test_rsa_jwk_has_minimal_unpadded_modulus_and_exponent(keys: dict[str, SigningKey]) -> None:
    key = keys["RSA"]
    jwk = key.public_jwk()
    assert set(jwk) == {"kty", "kid", "use", "alg", "n", "e"}
    assert (jwk["kty"], jwk["use"], jwk["alg"], jwk["kid"]) == ("RSA", "sig", "RS256", key.kid)
    assert jwk["e"] == "AQAB"
    assert "=" not in jwk["n"]
    numbers = key.private_key.public_key().public_numbers()
    assert isinstance(numbers, rsa.RSAPublicNumbers)
    assert int.from_bytes(b64url_decode(jwk["n"]), "big") == numbers.n
    assert len(b64url_decode(jwk["n"])) == 256


@pytest.mark.parametrize(
    ("kind", "crv", "size"), [("EC-P256", "P-256", 32), ("EC-P384", "P-384", 48)]
)
def test_ec_jwk_has_fixed_size_coordinates(
    keys: dict[str, SigningKey], kind: str, crv: str, size: int
) -> None:
    key = keys[kind]
    jwk = key.public_jwk()
    assert set(jwk) == {"kty", "kid", "use", "alg", "crv", "x", "y"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("EC", crv, key.default_alg)
    numbers = key.private_key.public_key().public_numbers()
    assert isinstance(numbers, ec.EllipticCurvePublicNumbers)
    assert b64url_decode(jwk["x"]) == numbers.x.to_bytes(size, "big")
    assert b64url_decode(jwk["y"]) == numbers.y.to_bytes(size, "big")


def test_ed25519_jwk_is_okp(keys: dict[str, SigningKey]) -> None:
    jwk = keys["Ed25519"].public_jwk()
    assert set(jwk) == {"kty", "kid", "use", "alg", "crv", "x"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("OKP", "Ed25519", "EdDSA")
    assert len(b64url_decode(jwk["x"])) == 32


def test_default_kid_is_the_rfc7638_thumbprint() -> None:
    key = generate_key("EC-P256")
    jwk = key.public_jwk()
    canonical = json.dumps(
        {"crv": jwk["crv"], "kty": "EC", "x": jwk["x"], "y": jwk["y"]}, separators=(",", ":")
    )
    expected = devkeys.b64url_encode(hashlib.sha256(canonical.encode()).digest())
    assert key.kid == key.thumbprint() == expected


def test_kid_can_be_replaced_or_removed_and_headers_merged(keys: dict[str, SigningKey]) -> None:
    key = keys["EC-P256"]
    assert _split(key.sign(CLAIMS, kid="other"))[0]["kid"] == "other"
    assert "kid" not in _split(key.sign(CLAIMS, kid=None))[0]
    header = _split(key.sign(CLAIMS, headers={"jku": "https://evil.test/jwks", "typ": "at+jwt"}))[0]
    assert header == {
        "alg": "ES256",
        "typ": "at+jwt",
        "kid": key.kid,
        "jku": "https://evil.test/jwks",
    }


def test_alg_that_does_not_fit_the_key_is_refused(keys: dict[str, SigningKey]) -> None:
    with pytest.raises(ValueError, match="RSA key"):
        keys["EC-P256"].sign(CLAIMS, alg="RS256")
    with pytest.raises(ValueError, match="unsupported"):
        keys["RSA"].sign(CLAIMS, alg="HS256")


def test_pem_round_trip_keeps_kind_kid_and_public_key(keys: dict[str, SigningKey]) -> None:
    for kind, key in keys.items():
        loaded = devkeys.load_pem_key(key.private_pem(), kid=key.kid)
        assert (loaded.kind, loaded.kid) == (kind, key.kid)
        assert loaded.public_jwk() == key.public_jwk()
        assert _verify(key, loaded.sign(CLAIMS)) == CLAIMS


def test_unsigned_token_has_alg_none_and_empty_signature() -> None:
    token = devkeys.unsigned_token(CLAIMS, headers={"kid": "k1"})
    header, payload, _, sig = _split(token)
    assert token.endswith(".")
    assert header == {"alg": "none", "typ": "JWT", "kid": "k1"}
    assert payload == CLAIMS
    assert sig == b""


def test_hmac_token_is_keyed_with_the_given_secret(keys: dict[str, SigningKey]) -> None:
    secret = keys["RSA"].public_pem()
    token = devkeys.hmac_token(CLAIMS, secret, kid=keys["RSA"].kid)
    header, payload, signing_input, sig = _split(token)
    assert header == {"alg": "HS256", "typ": "JWT", "kid": keys["RSA"].kid}
    assert payload == CLAIMS
    assert hmac.compare_digest(sig, hmac.new(secret, signing_input, hashlib.sha256).digest())
    with pytest.raises(ValueError, match="HMAC"):
        devkeys.hmac_token(CLAIMS, secret, alg="RS256")


def test_jwks_lists_every_public_key(keys: dict[str, SigningKey]) -> None:
    key_set = devkeys.jwks(keys["RSA"], keys["Ed25519"])
    assert [k["kid"] for k in key_set["keys"]] == [keys["RSA"].kid, keys["Ed25519"].kid]
    assert all("d" not in k for k in key_set["keys"])


@pytest.mark.parametrize(("kind", "bits"), [("RSA-1024", 1024), ("RSA-3072", 3072)])
def test_rsa_sizes(kind: str, bits: int) -> None:
    key = generate_key(kind, kid="k")
    private = key.private_key
    assert isinstance(private, rsa.RSAPrivateKey)
    assert private.key_size == bits
    assert key.kind == kind
    assert _verify(key, key.sign(CLAIMS)) == CLAIMS


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown key kind"):
        generate_key("DSA")
