"""JSON Web Key Sets: parsing into ready-to-use verification keys, and keeping them fresh.

``KeySet.from_jwks`` turns a JWKS document into ``VerificationKey`` objects, each holding one
prebuilt verify function per algorithm its key can serve, so that a Check never parses a key:
each is ``cryptography``'s verify on a public key object built once, with its padding and hash.
Keys that cannot be used safely are skipped with a log line. ``JWKSCache`` owns one provider's
current ``KeySet`` and replaces it atomically when a refresh succeeds; a failed refresh keeps
the last good keys.
"""

from __future__ import annotations

import base64
import contextvars
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

log = logging.getLogger("authz_server.jwks")

VerifyFn = Callable[[bytes, bytes], bool]

MIN_RSA_BITS = 2048
_EC_CURVE_ALG = {"P-256": "ES256", "P-384": "ES384"}
_EC_CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
# The hash of each algorithm (RFC 7518 3.1): the last three digits name it.
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
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


def _pkcs1_verifier(public_key: rsa.RSAPublicKey, alg: str) -> VerifyFn:
    """RS256/384/512: RSASSA-PKCS1-v1_5 (RFC 7518 3.3)."""
    pad = padding.PKCS1v15()
    digest = _HASHES[alg[2:]]()

    def verify(message: bytes, signature: bytes) -> bool:
        try:
            public_key.verify(signature, message, pad, digest)
        except (InvalidSignature, ValueError):
            return False
        return True

    return verify


def _ecdsa_verifier(public_key: ec.EllipticCurvePublicKey, alg: str) -> VerifyFn:
    """ES256/384: a JWS carries R || S, each exactly the curve's size in bytes (RFC 7518
    3.4); anything else (a DER signature, a short or padded one) does not verify."""
    size = (public_key.curve.key_size + 7) // 8
    algorithm = ec.ECDSA(_HASHES[alg[2:]]())

    def verify(message: bytes, signature: bytes) -> bool:
        if len(signature) != 2 * size:
            return False
        r = int.from_bytes(signature[:size], "big")
        s = int.from_bytes(signature[size:], "big")
        try:
            public_key.verify(encode_dss_signature(r, s), message, algorithm)
        except (InvalidSignature, ValueError):
            return False
        return True

    return verify


def _pss_verifier(public_key: rsa.RSAPublicKey, alg: str) -> VerifyFn:
    digest = _HASHES[alg[2:]]()
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
    verifiers: Mapping[str, VerifyFn] = field(compare=False)
    # What makes two loads "the same key": kid, type, public material, declared alg and use.
    fingerprint: str = ""


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
                verifiers[alg] = _pkcs1_verifier(public, alg)
    elif kty == "EC":
        crv = jwk.get("crv")
        ec_alg = _EC_CURVE_ALG.get(crv) if isinstance(crv, str) else None
        if ec_alg is None:
            raise UnusableKeyError(f"unsupported EC curve {crv!r}")
        fitting = (ec_alg,)
        x, y = _b64url_int(jwk.get("x"), "x"), _b64url_int(jwk.get("y"), "y")
        try:
            # NOTE: refuses a point that is not on the curve (an invalid-curve attack's key).
            ec_public = ec.EllipticCurvePublicNumbers(x, y, _EC_CURVES[str(crv)]).public_key()
        except ValueError as exc:
            raise UnusableKeyError(f"invalid EC key: {exc}") from None
        if ec_alg in allowed_algs:
            verifiers[ec_alg] = _ecdsa_verifier(ec_public, ec_alg)
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
    members = ("kty", "kid", "crv", "n", "e", "x", "y", "alg", "use")
    fingerprint = json.dumps([jwk.get(m) for m in members], sort_keys=True, default=str)
    return VerificationKey(kid=kid, kty=str(kty), verifiers=verifiers, fingerprint=fingerprint)


@dataclass(frozen=True)
class KeySet:
    """An immutable set of verification keys, indexed by ``kid``."""

    keys: tuple[VerificationKey, ...]
    by_kid: Mapping[str, VerificationKey] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    # A set that holds no verification keys by nature (an API keys table, an introspection
    # provider's marker): loaded, hence ready, even when ``keys`` is empty.
    may_be_empty: ClassVar[bool] = False

    @property
    def summary(self) -> str:
        """What was loaded, for the log: ``3 key(s)``."""
        return f"{len(self.keys)} key(s)"

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

    def reusing(self, previous: KeySet | None) -> KeySet:
        """This set, with each key that ``previous`` already held (same fingerprint) replaced
        by the previous object, so that tokens verified by an unchanged key stay cached."""
        if previous is None:
            return self
        old = {k.fingerprint: k for k in previous.keys if k.fingerprint}
        keys = tuple(old.get(k.fingerprint, k) if k.fingerprint else k for k in self.keys)
        return KeySet(keys=keys, by_kid={k.kid: k for k in keys if k.kid}, skipped=self.skipped)

    def candidates(self, kid: str | None, alg: str) -> list[VerificationKey]:
        """Keys to try for a token: the one its ``kid`` names, else the keys without a kid that
        serve ``alg`` (as Envoy does); a token without kid tries every key serving ``alg``."""
        if kid is not None:
            key = self.by_kid.get(kid)
            if key is not None:
                return [key]
            return [k for k in self.keys if not k.kid and alg in k.verifiers]
        return [k for k in self.keys if alg in k.verifiers]


def _kid_of(jwk: object) -> object:
    return jwk.get("kid") if isinstance(jwk, dict) else None


class _Flight:
    """One key-set load in progress; everyone who needs it waits on ``done``."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


class KeySource(Protocol):
    """Where a provider's keys come from (``keys.sources`` has the kinds: a URL, OIDC discovery,
    a file, inline keys, a shared secret)."""

    description: str
    remote: bool  # False for inline keys, which never change
    watched: bool  # a local file, polled for changes

    def load(self, allowed_algs: frozenset[str], origin: str) -> tuple[KeySet, float | None]: ...

    def changed(self) -> bool: ...


class JWKSCache:
    """One provider's current key set and its lifecycle.

    - ``refresh()`` loads once (single-flight: concurrent callers share one load).
    - ``tick()`` is the background step: refresh when due (``refreshInterval``, or the
      response's ``max-age`` within ``[minRefreshInterval, refreshInterval]``, jittered), when
      a watched file changed, and drop keys that have been stale for longer than ``maxStale``.
    - ``refresh_for_kid(kid, wait)``: a token names a key we lack; one refresh at most per
      ``minRefreshInterval``, shared by all such requests, each waiting at most ``wait``.
    A failed load never replaces good keys; retries back off from 1s up to ``refreshInterval``.
    """

    def __init__(
        self,
        *,
        provider: str,
        allowed_algs: frozenset[str],
        source: KeySource,
        refresh_interval: float = 300.0,
        min_refresh_interval: float = 30.0,
        max_stale: float = 86400.0,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = lambda: random.uniform(0.85, 1.0),  # noqa: S311
    ) -> None:
        self.provider = provider
        self.allowed_algs = allowed_algs
        self.source = source
        self.refresh_interval = refresh_interval
        self.min_refresh_interval = min(min_refresh_interval, refresh_interval)
        self.max_stale = max_stale
        self._clock = clock
        self._jitter = jitter
        self.listeners: list[Callable[[JWKSCache], object]] = []
        self.keyset: KeySet | None = None
        self.removed_keys = False
        self.last_error: str | None = None
        self.last_success: float | None = None  # on ``clock``
        self.last_success_wall: float | None = None  # unix time, for metrics
        self.fetches: dict[str, int] = {"success": 0, "failure": 0}
        self.next_refresh = 0.0
        self._failures = 0
        self._last_kid_refresh: float | None = None
        self._lock = threading.Lock()
        self._flight: _Flight | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when next_refresh moves or on stop
        self._thread: threading.Thread | None = None

    def stale_for(self) -> float:
        """Seconds since the last successful load (0 when fresh or never loaded)."""
        if self.last_success is None or self._failures == 0:
            return 0.0
        return max(0.0, self._clock() - self.last_success)

    # ---------------------------------------------------------------- loading

    def _join_or_start(self) -> tuple[_Flight, bool]:
        with self._lock:
            if self._flight is not None:
                return self._flight, False
            self._flight = _Flight()
            return self._flight, True

    def _fly(self, flight: _Flight) -> None:
        try:
            flight.ok = self._load()
        finally:
            with self._lock:
                self._flight = None
            flight.done.set()

    def refresh(self) -> bool:
        """Load the key set now, or join a load in progress. True when it succeeded."""
        flight, owner = self._join_or_start()
        if owner:
            self._fly(flight)
        else:
            flight.done.wait()
        return flight.ok

    def refresh_for_kid(self, kid: str | None, wait: float) -> bool:
        """A token names ``kid`` (or the provider has no keys): refresh if allowed, wait at most
        ``wait``. Returns True when the key is now known (or, for None, when keys exist)."""
        if self._has(kid):
            return True
        with self._lock:
            flight = self._flight
            if flight is None:
                now = self._clock()
                if (
                    self._last_kid_refresh is not None
                    and now - self._last_kid_refresh < self.min_refresh_interval
                ):
                    return False
                self._last_kid_refresh = now
                flight = self._flight = _Flight()
                # In a copy of the request's context: the fetch carries its trace context.
                threading.Thread(
                    target=contextvars.copy_context().run,
                    args=(self._fly, flight),
                    name=f"jwks-kid-{self.provider}",
                    daemon=True,
                ).start()
        flight.done.wait(wait)
        return self._has(kid)

    @property
    def refreshing(self) -> bool:
        """A key-set load is under way."""
        return self._flight is not None

    def _has(self, kid: str | None) -> bool:
        keyset = self.keyset
        return keyset is not None and (kid is None or kid in keyset.by_kid)

    def _load(self) -> bool:
        origin = f"{self.provider} JWKS"
        try:
            keyset, age = self.source.load(self.allowed_algs, origin)
            if not keyset.keys and not keyset.may_be_empty:
                raise ValueError("the key set has no usable keys")
            keyset = keyset.reusing(self.keyset)
        except Exception as exc:  # any failure (even http.client's) keeps the old keys
            self._failed(f"{type(exc).__name__}: {exc}"[:300])
            return False
        now = self._clock()
        interval = self.refresh_interval if age is None else age
        interval = min(max(interval, self.min_refresh_interval), self.refresh_interval)
        self.next_refresh = now + interval * self._jitter()
        self._wake.set()
        self.fetches["success"] += 1
        self._failures = 0
        self.last_error = None
        self.last_success = now
        self.last_success_wall = time.time()
        self._publish(keyset)
        log.info(
            "provider %s: loaded %s from %s (next refresh in %.0fs)",
            self.provider,
            keyset.summary,
            self.source.description,
            self.next_refresh - now,
        )
        return True

    def _failed(self, error: str) -> None:
        self.fetches["failure"] += 1
        self._failures += 1
        self.last_error = error
        backoff = min(2.0 ** min(self._failures - 1, 16), self.refresh_interval)
        self.next_refresh = self._clock() + backoff
        self._wake.set()
        log.warning(
            "provider %s: key set load from %s failed (%s); %s; retry in %.0fs",
            self.provider,
            self.source.description,
            error,
            f"serving the last good keys, stale for {self.stale_for():.0f}s"
            if self.keyset is not None
            else "no keys: its tokens get 503",
            backoff,
        )

    def _publish(self, keyset: KeySet | None) -> None:
        old = self.keyset
        # Whether a key this set held is gone (listeners purge only then).
        self.removed_keys = old is not None and (
            keyset is None or not all(any(k is n for n in keyset.keys) for k in old.keys)
        )
        self.keyset = keyset
        for listener in tuple(self.listeners):  # a reload may edit the list meanwhile
            try:
                listener(self)
            except Exception:
                log.exception("provider %s: key set listener failed", self.provider)

    # ------------------------------------------------------------ background

    def tick(self) -> None:
        """One background step; returns at once when nothing is due."""
        now = self._clock()
        with self._lock:
            # NOTE: decided under the lock, and never while a load is in flight, so keys that
            # an unknown-kid refresh just brought are not dropped as stale.
            drop = (
                self._flight is None
                and self.keyset is not None
                and self.source.remote
                and self._failures > 0  # keys are stale only once a refresh has failed
                and self.last_success is not None
                and now - self.last_success > self.max_stale
            )
        if drop:
            log.error(
                "provider %s: keys stale for more than %.0fs (maxStale): dropping them; "
                "its tokens get 503 until %s answers",
                self.provider,
                self.max_stale,
                self.source.description,
            )
            self._publish(None)
        if self.source.remote and (now >= self.next_refresh or self.source.changed()):
            self.refresh()

    def _seconds_to_next_tick(self) -> float:
        now = self._clock()
        wake = self.next_refresh
        if self.keyset is not None and self.last_success is not None and self._failures:
            wake = min(wake, self.last_success + self.max_stale + 0.001)
        if self.source.watched:
            wake = min(wake, now + 1.0)  # files are polled each second
        return min(max(wake - now, 0.05), 3600.0)

    def start(self) -> None:
        """Run ``tick`` in a daemon thread until ``stop``."""
        if not self.source.remote or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"jwks-{self.provider}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            # NOTE: an on-demand load (unknown kid) may move next_refresh: it sets _wake.
            self._wake.wait(self._seconds_to_next_tick())
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.tick()
            except Exception:  # the refresher must never die
                log.exception("provider %s: key set refresh step failed", self.provider)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
