"""Signing keys and hand-made tokens for demos and tests.

Built on `cryptography` alone, so the tokens the server verifies are never produced by the
library it verifies them with. Besides honest tokens (`SigningKey.sign`), this module crafts
the classic attack tokens: `alg: none` (`unsigned_token`) and HMAC tokens keyed with a public
key (`hmac_token`, the RS256/HS256 confusion attack).

Nothing here is meant for production keys: private keys are kept unencrypted in memory and
written as unencrypted PEM.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hmac as _hmac
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

__all__ = [
    "KEEP_KID",
    "KEY_KINDS",
    "SigningKey",
    "b64url_decode",
    "b64url_encode",
    "generate_key",
    "hmac_token",
    "jwks",
    "load_pem_key",
    "unsigned_token",
]

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP_KID = _Keep.KEEP
"""Default of `SigningKey.sign(kid=...)`: put the key's own kid in the header."""

KEY_KINDS = ("RSA", "RSA-1024", "RSA-3072", "EC-P256", "EC-P384", "Ed25519")

_RSA_BITS = {"RSA": 2048, "RSA-1024": 1024, "RSA-3072": 3072}
_EC_CURVES: dict[str, tuple[ec.EllipticCurve, str, str]] = {
    # kind: (curve, JWK crv, default alg)
    "EC-P256": (ec.SECP256R1(), "P-256", "ES256"),
    "EC-P384": (ec.SECP384R1(), "P-384", "ES384"),
}
_SHA_BY_BITS: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_EC_ALGS: dict[str, type[hashes.HashAlgorithm]] = {
    "ES256": hashes.SHA256,
    "ES384": hashes.SHA384,
    "ES512": hashes.SHA512,
}


def b64url_encode(data: bytes) -> str:
    """Return base64url of `data` without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Return the bytes of unpadded base64url `text`; raises `binascii.Error` if malformed."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _uint_bytes(value: int, length: int | None = None) -> bytes:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return value.to_bytes(size, "big")


def _json_segment(obj: Mapping[str, Any]) -> str:
    return b64url_encode(json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def _kind_of(key: PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        bits = key.key_size
        return "RSA" if bits == 2048 else f"RSA-{bits}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        for kind, (curve, _crv, _alg) in _EC_CURVES.items():
            if key.curve.name == curve.name:
                return kind
        raise ValueError(f"unsupported EC curve {key.curve.name}")
    return "Ed25519"


@dataclass(frozen=True)
class SigningKey:
    """A private key with the kid it publishes under.

    `kind` is one of `KEY_KINDS` (or `RSA-<bits>` for an RSA key loaded from PEM).
    """

    kind: str
    kid: str
    private_key: PrivateKey

    @property
    def default_alg(self) -> str:
        """The JWS algorithm used by `sign` when none is given: RS256, ES256, ES384 or EdDSA."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return "RS256"
        if isinstance(self.private_key, ec.EllipticCurvePrivateKey):
            return _EC_CURVES[self.kind][2]
        return "EdDSA"

    def private_pem(self) -> bytes:
        """Return the private key as unencrypted PKCS#8 PEM."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> bytes:
        """Return the public key as SubjectPublicKeyInfo PEM (the HS256 confusion secret)."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_jwk(self) -> dict[str, str]:
        """Return the public key as a JWK (RFC 7517/7518/8037) with kid, use "sig" and alg."""
        members = _public_members(self.private_key)
        jwk = {"kty": members.pop("kty"), "kid": self.kid, "use": "sig", "alg": self.default_alg}
        jwk.update(members)
        return jwk

    def thumbprint(self) -> str:
        """Return the RFC 7638 SHA-256 JWK thumbprint of the public key, base64url."""
        return _thumbprint(self.private_key)

    def sign(
        self,
        claims: Mapping[str, Any],
        *,
        alg: str | None = None,
        headers: Mapping[str, Any] | None = None,
        kid: str | _Keep | None = KEEP_KID,
    ) -> str:
        """Return a compact JWS of `claims` signed with this key.

        The header holds `alg` (default `default_alg`), `typ: JWT` and the kid: this key's
        unless `kid` is given; `kid=None` leaves it out. `headers` is merged in last, so it can
        also lie about `alg` or `typ`. Raises ValueError if `alg` does not fit the key type.
        """
        alg = alg or self.default_alg
        header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
        chosen_kid = self.kid if kid is KEEP_KID else kid
        if chosen_kid is not None:
            header["kid"] = chosen_kid
        if headers:
            header.update(headers)
        signing_input = f"{_json_segment(header)}.{_json_segment(claims)}"
        signature = self._signature(alg, signing_input.encode("ascii"))
        return f"{signing_input}.{b64url_encode(signature)}"

    def _signature(self, alg: str, data: bytes) -> bytes:
        key = self.private_key
        if alg[:2] in ("RS", "PS") and alg[2:] in _SHA_BY_BITS:
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError(f"{alg} needs an RSA key, not {self.kind}")
            digest = _SHA_BY_BITS[alg[2:]]()
            pad: padding.AsymmetricPadding
            if alg.startswith("RS"):
                pad = padding.PKCS1v15()
            else:
                # RFC 7518 section 3.5: MGF1 with the same hash, salt as long as the digest.
                pad = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            return key.sign(data, pad, digest)
        if alg in _EC_ALGS:
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{alg} needs an EC key, not {self.kind}")
            der = key.sign(data, ec.ECDSA(_EC_ALGS[alg]()))
            r, s = decode_dss_signature(der)
            # NOTE: JWS wants fixed-size big-endian r || s (RFC 7518 section 3.4), not DER.
            size = (key.curve.key_size + 7) // 8
            return _uint_bytes(r, size) + _uint_bytes(s, size)
        if alg == "EdDSA":
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise ValueError(f"EdDSA needs an Ed25519 key, not {self.kind}")
            return key.sign(data)
        raise ValueError(f"unsupported signing algorithm {alg!r}")


def _public_members(key: PrivateKey) -> dict[str, str]:
    """Return the required public JWK members (RFC 7638 section 3.2), in lexical order."""
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        return {
            "e": b64url_encode(_uint_bytes(numbers.e)),
            "kty": "RSA",
            "n": b64url_encode(_uint_bytes(numbers.n)),
        }
    if isinstance(key, ec.EllipticCurvePrivateKey):
        point = key.public_key().public_numbers()
        size = (key.curve.key_size + 7) // 8
        crv = _EC_CURVES[_kind_of(key)][1]
        return {
            "crv": crv,
            "kty": "EC",
            "x": b64url_encode(_uint_bytes(point.x, size)),
            "y": b64url_encode(_uint_bytes(point.y, size)),
        }
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(raw)}


def _thumbprint(key: PrivateKey) -> str:
    canonical = json.dumps(_public_members(key), separators=(",", ":"), sort_keys=True)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def generate_key(kind: str = "RSA", kid: str | None = None) -> SigningKey:
    """Return a fresh key of `kind` (one of `KEY_KINDS`; "RSA" is 2048 bits).

    Without `kid`, the key's RFC 7638 thumbprint is its kid. Raises ValueError on unknown kind.
    """
    key: PrivateKey
    if kind in _RSA_BITS:
        key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS[kind])
    elif kind in _EC_CURVES:
        key = ec.generate_private_key(_EC_CURVES[kind][0])
    elif kind == "Ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown key kind {kind!r}; expected one of {', '.join(KEY_KINDS)}")
    return SigningKey(kind=kind, kid=kid or _thumbprint(key), private_key=key)


def load_pem_key(pem: bytes, kid: str | None = None) -> SigningKey:
    """Return the SigningKey for an unencrypted PEM private key (RSA, EC P-256/P-384, Ed25519).

    Without `kid`, the thumbprint is used. Raises ValueError on unreadable or unsupported keys.
    """
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    return SigningKey(kind=_kind_of(key), kid=kid or _thumbprint(key), private_key=key)


def unsigned_token(claims: Mapping[str, Any], headers: Mapping[str, Any] | None = None) -> str:
    """Return an `alg: none` token with an empty signature (`header.payload.`)."""
    header: dict[str, Any] = {"alg": "none", "typ": "JWT"}
    if headers:
        header.update(headers)
    return f"{_json_segment(header)}.{_json_segment(claims)}."


def hmac_token(
    claims: Mapping[str, Any], secret: bytes, alg: str = "HS256", kid: str | None = None
) -> str:
    """Return an HS256/HS384/HS512 token keyed with `secret`.

    Pass `SigningKey.public_pem()` (or the JWK JSON) as `secret` to craft the algorithm
    confusion attack. Raises ValueError on another `alg`.
    """
    bits = alg[2:] if alg.startswith("HS") else ""
    if bits not in _SHA_BY_BITS:
        raise ValueError(f"unsupported HMAC algorithm {alg!r}")
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{_json_segment(header)}.{_json_segment(claims)}"
    mac = _hmac.HMAC(secret, _SHA_BY_BITS[bits]())
    mac.update(signing_input.encode("ascii"))
    return f"{signing_input}.{b64url_encode(mac.finalize())}"


def jwks(*keys: SigningKey) -> dict[str, list[dict[str, str]]]:
    """Return the JWK Set `{"keys": [...]}` of the public halves of `keys`."""
    return {"keys": [key.public_jwk() for key in keys]}


def dpop_proof(
    key: SigningKey,
    *,
    method: str,
    url: str,
    access_token: str | None = None,
    iat: float | None = None,
    jti: str | None = None,
    nonce: str | None = None,
    alg: str | None = None,
) -> str:
    """Return a DPoP proof (RFC 9449 4.2) for ``method`` and ``url`` signed with ``key``, its
    public JWK in the header; ``ath`` when an access token is given. ``iat`` defaults to now,
    ``jti`` to 128 random bits."""
    claims: dict[str, Any] = {
        "jti": jti or b64url_encode(secrets.token_bytes(16)),
        "htm": method,
        "htu": url,
        "iat": int(time.time() if iat is None else iat),
    }
    if access_token is not None:
        claims["ath"] = b64url_encode(hashlib.sha256(access_token.encode("ascii")).digest())
    if nonce is not None:
        claims["nonce"] = nonce
    headers = {"typ": "dpop+jwt", "jwk": _public_members(key.private_key)}
    return key.sign(claims, alg=alg, headers=headers, kid=None)
