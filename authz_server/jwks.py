"""JSON Web Key Sets: parsing into ready-to-use verification keys, and keeping them fresh.

``KeySet.from_jwks`` turns a JWKS document into ``VerificationKey`` objects, each holding one
prebuilt verify function per algorithm its key can serve, so that a Check never parses a key.
Keys that cannot be used safely are skipped with a log line. ``JWKSCache`` owns one provider's
current ``KeySet`` and replaces it atomically when a refresh succeeds; a failed refresh keeps
the last good keys.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519, padding, rsa
from jose import jwk as jose_jwk

log = logging.getLogger("authz_server.jwks")

VerifyFn = Callable[[bytes, bytes], bool]

MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 1 << 20
_EC_CURVE_ALG = {"P-256": "ES256", "P-384": "ES384"}
_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_PSS_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "PS256": hashes.SHA256,
    "PS384": hashes.SHA384,
    "PS512": hashes.SHA512,
}


class UnusableKeyError(ValueError):
    """A JWK that cannot be used; the message says why."""


def _b64url_int(value: object, name: str) -> int:
    return int.from_bytes(_b64url_bytes(value, name), "big")


def _b64url_bytes(value: object, name: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise UnusableKeyError(f"missing or non-string {name!r}")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        raise UnusableKeyError(f"{name!r} is not base64url") from None


def _jose_verifier(jwk: Mapping[str, Any], alg: str) -> VerifyFn:
    key = jose_jwk.construct(dict(jwk), alg)

    def verify(message: bytes, signature: bytes) -> bool:
        try:
            return bool(key.verify(message, signature))
        except Exception:  # a malformed signature is just a failed verification
            return False

    return verify


def _pss_verifier(public_key: rsa.RSAPublicKey, alg: str) -> VerifyFn:
    hash_cls = _PSS_HASHES[alg]
    digest = hash_cls()
    pad = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)

    def verify(message: bytes, signature: bytes) -> bool:
        try:
            public_key.verify(signature, message, pad, digest)
        except (InvalidSignature, ValueError):
            return False
        return True

    return verify


def _eddsa_verifier(public_key: ed25519.Ed25519PublicKey | ed448.Ed448PublicKey) -> VerifyFn:
    def verify(message: bytes, signature: bytes) -> bool:
        try:
            public_key.verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    return verify


@dataclass(frozen=True)
class VerificationKey:
    """One usable public key: its ``kid`` (may be empty) and a verify function per algorithm."""

    kid: str
    kty: str
    verifiers: Mapping[str, VerifyFn]


def build_key(jwk: Mapping[str, Any], allowed_algs: frozenset[str]) -> VerificationKey:
    """Return a VerificationKey for ``jwk`` serving the algorithms it fits among ``allowed_algs``.

    Raises UnusableKeyError with the reason when the key cannot be used safely.
    """
    kty = jwk.get("kty")
    kid = jwk.get("kid", "")
    if not isinstance(kid, str):
        raise UnusableKeyError("'kid' must be a string")
    if jwk.get("use") not in (None, "sig"):
        raise UnusableKeyError(f"use {jwk.get('use')!r} is not 'sig'")
    declared = jwk.get("alg")
    verifiers: dict[str, VerifyFn] = {}
    if kty == "RSA":
        n, e = _b64url_int(jwk.get("n"), "n"), _b64url_int(jwk.get("e"), "e")
        if n.bit_length() < MIN_RSA_BITS:
            raise UnusableKeyError(f"RSA key of {n.bit_length()} bits is below {MIN_RSA_BITS}")
        fitting: tuple[str, ...] = _RSA_ALGS
        try:
            public = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError as exc:
            raise UnusableKeyError(f"invalid RSA key: {exc}") from None
        for alg in (a for a in _RSA_ALGS if a in allowed_algs):
            if alg.startswith("PS"):
                verifiers[alg] = _pss_verifier(public, alg)
            else:
                verifiers[alg] = _jose_verifier({"kty": "RSA", "n": jwk["n"], "e": jwk["e"]}, alg)
    elif kty == "EC":
        crv = jwk.get("crv")
        ec_alg = _EC_CURVE_ALG.get(crv) if isinstance(crv, str) else None
        if ec_alg is None:
            raise UnusableKeyError(f"unsupported EC curve {crv!r}")
        fitting = (ec_alg,)
        _b64url_bytes(jwk.get("x"), "x")
        _b64url_bytes(jwk.get("y"), "y")
        if ec_alg in allowed_algs:
            ec_jwk = {"kty": "EC", "crv": crv, "x": jwk["x"], "y": jwk["y"]}
            try:
                verifiers[ec_alg] = _jose_verifier(ec_jwk, ec_alg)
            except Exception as exc:
                raise UnusableKeyError(f"invalid EC key: {exc}") from None
    elif kty == "OKP":
        crv = jwk.get("crv")
        raw = _b64url_bytes(jwk.get("x"), "x")
        okp: ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
        try:
            if crv == "Ed25519":
                okp = ed25519.Ed25519PublicKey.from_public_bytes(raw)
            elif crv == "Ed448":
                okp = ed448.Ed448PublicKey.from_public_bytes(raw)
            else:
                raise UnusableKeyError(f"unsupported OKP curve {crv!r}")
        except ValueError as exc:
            raise UnusableKeyError(f"invalid OKP key: {exc}") from None
        fitting = ("EdDSA",)
        if "EdDSA" in allowed_algs:
            verifiers["EdDSA"] = _eddsa_verifier(okp)
    else:
        raise UnusableKeyError(f"unsupported key type {kty!r}")
    if declared is not None:
        if declared not in fitting:
            raise UnusableKeyError(f"alg {declared!r} does not fit key type {kty}")
        verifiers = {a: v for a, v in verifiers.items() if a == declared}
    return VerificationKey(kid=kid, kty=str(kty), verifiers=verifiers)


@dataclass(frozen=True)
class KeySet:
    """An immutable set of verification keys, indexed by ``kid``."""

    keys: tuple[VerificationKey, ...]
    by_kid: Mapping[str, VerificationKey] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()

    @classmethod
    def from_jwks(
        cls, document: object, allowed_algs: frozenset[str], origin: str = "JWKS"
    ) -> KeySet:
        """Parse a JWKS document. Unusable keys are skipped and logged; raises ValueError when
        the document itself is not a JWKS."""
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError('not a JWKS document: expected {"keys": [...]}')
        keys: list[VerificationKey] = []
        by_kid: dict[str, VerificationKey] = {}
        skipped: list[str] = []
        for index, jwk in enumerate(document["keys"]):
            label = f"{origin} key #{index}"
            try:
                if not isinstance(jwk, dict):
                    raise UnusableKeyError("not a JSON object")
                key = build_key(jwk, allowed_algs)
            except Exception as exc:  # one bad key never spoils the set
                why = str(exc) if isinstance(exc, UnusableKeyError) else f"invalid key: {exc!r}"
                skipped.append(f"{label}: {why}")
                log.warning("skipping %s (kid=%r): %s", label, _kid_of(jwk), why)
                continue
            if key.kid and key.kid in by_kid:
                skipped.append(f"{label}: duplicate kid {key.kid!r}")
                log.warning("skipping %s: duplicate kid %r (first wins)", label, key.kid)
                continue
            keys.append(key)
            if key.kid:
                by_kid[key.kid] = key
        return cls(keys=tuple(keys), by_kid=by_kid, skipped=tuple(skipped))

    def candidates(self, kid: str | None, alg: str) -> list[VerificationKey]:
        """Keys to try for a token: the one named by ``kid``, or every key that serves ``alg``."""
        if kid is not None:
            key = self.by_kid.get(kid)
            return [key] if key is not None else []
        return [k for k in self.keys if alg in k.verifiers]


def _kid_of(jwk: object) -> object:
    return jwk.get("kid") if isinstance(jwk, dict) else None


def fetch_jwks(url: str, timeout: float) -> object:
    """GET ``url`` and return its parsed JSON. Raises OSError or ValueError on any failure."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
        body = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"response larger than {MAX_JWKS_BYTES} bytes")
    return json.loads(body)


class JWKSCache:
    """One provider's current key set, loaded from an inline document, a file or a URL.

    ``keyset`` is None until a first load succeeds. A failed refresh never replaces good keys.
    """

    def __init__(
        self,
        *,
        provider: str,
        allowed_algs: frozenset[str],
        inline: str | None = None,
        file: Path | None = None,
        url: str | None = None,
        timeout: float = 5.0,
        refresh_interval: float = 300.0,
        fetch: Callable[[str, float], object] = fetch_jwks,
        clock: Callable[[], float] = time.monotonic,
        on_update: Callable[[], None] | None = None,
    ) -> None:
        self.provider = provider
        self.allowed_algs = allowed_algs
        self.inline = inline
        self.file = file
        self.url = url
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        self._fetch = fetch
        self._clock = clock
        self.on_update = on_update
        self.keyset: KeySet | None = None
        self.last_error: str | None = None
        self.last_success: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def source(self) -> str:
        return self.url or (str(self.file) if self.file else "inline jwks")

    @property
    def is_remote(self) -> bool:
        return self.inline is None

    def _load_document(self) -> object:
        if self.inline is not None:
            return json.loads(self.inline)
        if self.file is not None:
            return json.loads(self.file.read_bytes())
        assert self.url is not None
        return self._fetch(self.url, self.timeout)

    def refresh(self) -> bool:
        """Load the key set once. Returns True on success; on failure keeps the old keys."""
        try:
            keyset = KeySet.from_jwks(
                self._load_document(), self.allowed_algs, origin=f"{self.provider} JWKS"
            )
            if not keyset.keys:
                raise ValueError("the key set has no usable keys")
        except Exception as exc:  # any failure (even http.client's) keeps the old keys
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning(
                "provider %s: JWKS load from %s failed (%s); %s",
                self.provider,
                self.source,
                self.last_error,
                "keeping the last good keys" if self.keyset else "no keys yet",
            )
            return False
        had_keys = self.keyset is not None
        self.keyset = keyset
        self.last_error = None
        self.last_success = self._clock()
        if not had_keys and self.on_update is not None:
            self.on_update()
        log.info(
            "provider %s: loaded %d key(s) from %s", self.provider, len(keyset.keys), self.source
        )
        return True

    def start(self) -> None:
        """Refresh in a background thread every ``refresh_interval`` (sooner while keyless)."""
        if not self.is_remote or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"jwks-{self.provider}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        retry = 0.5
        while not self._stop.is_set():
            wait = self.refresh_interval if self.keyset is not None else retry
            if self._stop.wait(wait):
                return
            ok = self.refresh()
            retry = 0.5 if ok else min(retry * 2, 30.0, self.refresh_interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
