"""JWT verification: compact JWS in, ``Identity`` out, or an ``AuthenticationError`` with a reason.

The algorithm comes from the provider's allow-list, never from the token alone: the header's
``alg`` must be allowed *and* served by the key. ``jku``, ``x5u``, ``jwk`` and ``x5c`` headers
are never followed. The signature is checked before any claim is trusted.
"""

from __future__ import annotations

import binascii
import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from authz_server import errors, request_trace
from authz_server.config.load import Provider
from authz_server.credentials.token_cache import CachedToken, TokenCache
from authz_server.errors import AuthenticationError, DependencyError, WouldWait
from authz_server.identity import DEFAULT_SPACE_DELIMITED, Identity
from authz_server.keys.keyset import JWKSCache, VerificationKey

MAX_TOKEN_BYTES = 8192


@dataclass(frozen=True)
class ProviderRuntime:
    """A provider with what verification needs precomputed."""

    provider: Provider
    keys: JWKSCache
    algorithms: frozenset[str]
    audiences: frozenset[str]
    clock_skew: float
    space_delimited: frozenset[str]
    require_expiration: bool = True
    required_claims: tuple[tuple[str, str | int | bool | None], ...] = ()
    keeps_payload: bool = False

    @property
    def name(self) -> str:
        return self.provider.name

    @property
    def issuer(self) -> str:
        return self.provider.spec.issuer

    @classmethod
    def build(cls, provider: Provider, keys: JWKSCache) -> ProviderRuntime:
        spec = provider.spec
        return cls(
            provider=provider,
            keys=keys,
            algorithms=frozenset(spec.algorithms),
            audiences=frozenset(spec.audiences),
            clock_skew=spec.clock_skew,
            space_delimited=DEFAULT_SPACE_DELIMITED | frozenset(spec.space_delimited_claims),
            require_expiration=spec.require_expiration,
            required_claims=tuple(spec.required_claims.items()),
            keeps_payload=spec.output_payload_to_header is not None,
        )


# Unpadded base64url only (RFC 7515 2): a lenient decoder would accept many spellings of one
# signature, which defeats token digests and deny-lists. "+", "/" and "=" map to a character
# strict mode refuses.
_B64URL_TO_STD = bytes.maketrans(b"-_+/=", b"+/!!!")


_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Bits of the last character that encode nothing, by the length mod 4 (RFC 4648 3.5).
_UNUSED_BITS = {2: 0x0F, 3: 0x03}


def _b64decode(segment: str) -> bytes:
    """Strict base64url: one spelling per value. The last character's unused bits must be
    zero (else 15 of every 16 spellings of one signature would verify, each a cache entry)."""
    raw = segment.encode("ascii")  # UnicodeEncodeError is a ValueError
    rest = len(raw) % 4
    if rest == 1:
        raise ValueError("impossible base64url length")
    if rest and _B64URL_ALPHABET.find(raw[-1:]) & _UNUSED_BITS[rest]:
        raise ValueError("non-canonical base64url")
    return binascii.a2b_base64(
        raw.translate(_B64URL_TO_STD) + b"=" * (-len(raw) % 4), strict_mode=True
    )


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which of two "sub" keys wins: a signed token must mean one thing.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return obj


# NOTE: built once; json.loads(..., parse_constant=) would build a decoder per call (~2 us).
_JSON = json.JSONDecoder(parse_constant=_no_constants, object_pairs_hook=_object_without_duplicates)


_scan_json: Callable[[str, int], tuple[Any, int]] = _JSON.scan_once  # type: ignore[attr-defined]


def _json_object(segment: str) -> Any:
    text = _b64decode(segment).decode("utf-8")
    # NOTE: the decoder's scanner straight away when the text is one value from its first
    # character to its last (what every IdP sends); else ``decode``, which skips whitespace
    # around the value and raises for anything else. Same value either way, ~1 us less.
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:
        return _JSON.decode(text)
    if end != len(text):
        return _JSON.decode(text)
    return value


def _malformed(detail: str) -> AuthenticationError:
    return AuthenticationError(errors.MALFORMED_TOKEN, detail)


_NOT_JSON = (ValueError, binascii.Error, UnicodeDecodeError, RecursionError)
# Headers kept decoded, by their base64url text: an issuer's tokens share one header per key,
# so decoding it again for each new token is wasted. Past this many, start over.
_HEADERS_KEPT = 256


def decode_segments(token: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Split and decode a compact JWS without verifying it.

    Returns (header, payload, segments). Raises AuthenticationError(malformed_token).
    """
    segments = token.split(".")
    if len(segments) == 5:
        raise _malformed("encrypted tokens (JWE) are not supported")
    if len(segments) != 3:
        raise _malformed("a JWT is three dot-separated base64url segments")
    try:
        header = _json_object(segments[0])
        payload = _json_object(segments[1])
    except _NOT_JSON:
        raise _malformed("header or payload is not base64url-encoded JSON") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise _malformed("header and payload must be JSON objects")
    return header, payload, segments


def _decode_payload(segment: str) -> dict[str, Any]:
    """The payload segment as a JSON object. Raises AuthenticationError(malformed_token)."""
    try:
        payload = _json_object(segment)
    except _NOT_JSON:
        raise _malformed("header or payload is not base64url-encoded JSON") from None
    if not isinstance(payload, dict):
        raise _malformed("header and payload must be JSON objects")
    return payload


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _numeric(payload: Mapping[str, Any], claim: str) -> float | None:
    value = payload.get(claim)
    if value is None:
        return None
    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
        return float(value)  # the usual case: whole seconds
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _malformed(f"claim {claim!r} must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise _malformed(f"claim {claim!r} is out of range") from None
    if not math.isfinite(number):
        raise _malformed(f"claim {claim!r} must be finite")
    # As Envoy's jwt_authn reads them: seconds in a signed 64-bit count. `exp: 1e308`, signed
    # for real, would otherwise be a token that never expires.
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise _malformed(f"claim {claim!r} is out of range")
    return number


def _check_times(exp: float | None, nbf: float | None, skew: float, now: float) -> None:
    # RFC 7519 4.1.4: the token must be used *before* its expiry.
    if exp is not None and now >= exp + skew:
        raise AuthenticationError(errors.TOKEN_EXPIRED, "the token has expired")
    if nbf is not None and now + skew < nbf:
        raise AuthenticationError(errors.TOKEN_NOT_YET_VALID, "the token is not valid yet")


def check_times(exp: float | None, nbf: float | None, skew: float, now: float) -> None:
    """Raise AuthenticationError (token_expired, token_not_yet_valid) unless ``now`` is
    within [nbf, exp) give or take ``skew``: what a cached credential is checked against."""
    _check_times(exp, nbf, skew, now)


def _claim_equals(value: Any, expected: str | int | bool) -> bool:
    # NOTE: type-exact, so that `true` never equals `1` and `"1"` never equals `1`.
    if isinstance(value, list):
        return any(_claim_equals(item, expected) for item in value)
    return type(value) is type(expected) and value == expected


# Whether a Check may wait for a key-set refresh its token needs (an unknown kid, a provider
# without keys): "yes", up to unknownKidWait (a thread of its own); "defer", raise WouldWait
# when a refresh is under way (an event loop: decide again where waiting is allowed); "no",
# decide now without it (no waiting slot left).
WaitMode = Literal["yes", "defer", "no"]


class TokenVerifier:
    """Verifies tokens against the providers whose issuer they name, through the cache."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        cache: TokenCache | None = None,
        unknown_kid_wait: float = 0.5,
        max_token_bytes: int = MAX_TOKEN_BYTES,
        max_waiting: int = 4,
    ) -> None:
        self._clock = clock
        self.cache = cache
        self.unknown_kid_wait = unknown_kid_wait
        self.max_token_bytes = max_token_bytes
        # NOTE: a hanging IdP must not hold every Check thread: beyond this many, Checks that
        # need a refresh trigger it but do not wait for it.
        self._waiting = threading.BoundedSemaphore(max(1, max_waiting))
        # NOTE: read-only once stored (never handed out); a race between two stores is harmless.
        self._headers: dict[str, dict[str, Any]] = {}

    @property
    def waiting(self) -> threading.BoundedSemaphore:
        """The slots of Checks that may wait on an identity provider (a key-set refresh, an
        introspection call): beyond them, a Check does not wait."""
        return self._waiting

    def verify(
        self,
        token: str,
        providers: Sequence[ProviderRuntime],
        scope: bytes | None = None,
        *,
        wait: WaitMode = "yes",
        cache_key: bytes | None = None,
    ) -> Identity:
        """Verify ``token`` for one of ``providers`` (those reading the location it came from).

        ``scope`` names what verification depends on (``credentials.verification_scope``);
        cached results are shared only within one scope (default: this providers object).

        Returns the Identity. Raises AuthenticationError (401 reasons) or DependencyError when
        the issuer has no keys. ``wait`` says whether a key-set refresh the token needs may be
        waited for (``WaitMode``). ``cache_key``: ``TokenCache.digest(token, scope)`` when
        the caller has it already.
        """
        if len(token) > self.max_token_bytes:
            raise _malformed(f"token longer than {self.max_token_bytes} bytes")
        if scope is None:
            scope = id(providers).to_bytes(8, "little")
        entry_key = b""
        if self.cache is not None:
            entry_key = TokenCache.digest(token, scope) if cache_key is None else cache_key
            hit = self.cache.get(entry_key)
            if hit is not None and hit.scope == scope:
                _check_times(hit.exp, hit.nbf, hit.skew, self._clock())
                return hit.identity
        segments = token.split(".")
        if len(segments) != 3:
            decode_segments(token)  # raises its reason (a JWE, a wrong count)
        header = self._header(segments[0])
        payload = _decode_payload(segments[1])
        issuer = payload.get("iss")
        candidates = [p for p in providers if p.issuer == issuer]
        if not candidates:
            raise AuthenticationError(errors.INVALID_ISSUER, "no provider for this issuer")
        first_error: AuthenticationError | DependencyError | None = None
        for provider in candidates:
            try:
                identity, key, exp, nbf = self._verify_for(
                    provider, header, payload, segments, wait
                )
            except (AuthenticationError, DependencyError) as exc:
                first_error = first_error or exc
                continue
            if self.cache is not None:
                # NOTE: positional, in CachedToken's order: keywords cost a named tuple ~1 us.
                stored_at = self._clock()
                entry = CachedToken(
                    identity, scope, key, provider.keys, exp, nbf, provider.clock_skew, stored_at
                )
                self.cache.put(entry_key, entry)
            return identity
        assert first_error is not None
        raise first_error

    def _header(self, segment: str) -> dict[str, Any]:
        """The header ``segment`` decoded, once per distinct text. Raises
        AuthenticationError(malformed_token)."""
        header = self._headers.get(segment)
        if header is not None:
            return header
        try:
            decoded = _json_object(segment)
        except _NOT_JSON:
            raise _malformed("header or payload is not base64url-encoded JSON") from None
        if not isinstance(decoded, dict):
            raise _malformed("header and payload must be JSON objects")
        if len(self._headers) >= _HEADERS_KEPT:
            self._headers.clear()
        self._headers[segment] = decoded
        return decoded

    def _refresh(self, cache: JWKSCache, kid: str | None, wait: WaitMode) -> bool:
        if wait == "no":
            return cache.refresh_for_kid(kid, 0.0)
        if wait == "defer":
            # Start (or join) the refresh without waiting; only a load under way is worth
            # waiting for, elsewhere.
            if cache.refresh_for_kid(kid, 0.0):
                return True
            if cache.refreshing:
                raise WouldWait
            return False
        if not self._waiting.acquire(blocking=False):
            return cache.refresh_for_kid(kid, 0.0)
        trace = request_trace.current.get()
        started = time.time_ns() if trace is not None else 0
        found = False
        try:
            found = cache.refresh_for_kid(kid, self.unknown_kid_wait)
            return found
        finally:
            self._waiting.release()
            if trace is not None:
                outcome = request_trace.KEY_FOUND if found else request_trace.KEY_NOT_FOUND
                trace.waited("jwks.refresh", started, time.time_ns(), outcome)

    def _keys_for(
        self, provider: ProviderRuntime, kid: str | None, alg: str, wait: WaitMode
    ) -> Sequence[VerificationKey]:
        cache = provider.keys
        if cache.keyset is None:
            # Maybe the IdP is back: one refresh per minRefreshInterval, shared.
            self._refresh(cache, None, wait)
        keyset = cache.keyset
        if keyset is None:
            raise DependencyError(errors.JWKS_UNAVAILABLE, f"no keys for {provider.name}")
        if kid is not None and kid not in keyset.by_kid and self._refresh(cache, kid, wait):
            keyset = cache.keyset or keyset  # a rotated key: refresh first (kid-less keys last)
        keys = keyset.candidates(kid, alg)
        if not keys:
            raise AuthenticationError(errors.UNKNOWN_KID, "no key matches the token's kid")
        return keys

    def _verify_for(
        self,
        provider: ProviderRuntime,
        header: Mapping[str, Any],
        payload: Mapping[str, Any],
        segments: list[str],
        wait: WaitMode,
    ) -> tuple[Identity, VerificationKey, float | None, float | None]:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in provider.algorithms:
            raise AuthenticationError(
                errors.UNSUPPORTED_ALGORITHM, f"alg {str(alg)[:16]!r} is not allowed"
            )
        if "crit" in header:
            raise AuthenticationError(errors.MALFORMED_TOKEN, "unsupported 'crit' header")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _malformed("'kid' must be a string")
        keyset = provider.keys.keyset
        known = keyset.by_kid.get(kid) if keyset is not None and kid is not None else None
        # The usual token names a key we hold: that key alone (what ``_keys_for`` answers).
        keys = (known,) if known is not None else self._keys_for(provider, kid, alg, wait)
        try:
            signature = _b64decode(segments[2])
        except (ValueError, binascii.Error):
            raise _malformed("signature is not base64url") from None
        signing_input = f"{segments[0]}.{segments[1]}".encode("ascii")
        for key in keys:
            verify = key.verifiers.get(alg)
            if verify is None:
                raise AuthenticationError(
                    errors.UNSUPPORTED_ALGORITHM, f"key does not serve alg {alg}"
                )
            if verify(signing_input, signature):
                break
        else:
            raise AuthenticationError(errors.INVALID_SIGNATURE, "signature does not verify")
        identity, exp, nbf = self._check_claims(provider, payload, segments[1])
        return identity, key, exp, nbf

    def identity_from_claims(
        self, provider: ProviderRuntime, claims: Mapping[str, Any]
    ) -> tuple[Identity, float | None, float | None]:
        """The identity that ``claims`` (vouched for by other means than a signature: an
        introspection answer) give for ``provider``, checked as a JWT's payload is: times
        with the skew, audiences, required claims. Returns (identity, exp, nbf); raises
        AuthenticationError."""
        return self._check_claims(provider, claims, "")

    def _check_claims(
        self, provider: ProviderRuntime, payload: Mapping[str, Any], payload_segment: str
    ) -> tuple[Identity, float | None, float | None]:
        exp = _numeric(payload, "exp")
        if exp is None and provider.require_expiration:
            raise AuthenticationError(
                errors.MISSING_CLAIM,
                "the token has no 'exp'",
                description="required claim 'exp' missing",
            )
        nbf = _numeric(payload, "nbf")
        iat = _numeric(payload, "iat")
        # A token issued in the future is not valid yet either (beyond the skew).
        nbf = iat if nbf is None else nbf if iat is None else max(nbf, iat)
        _check_times(exp, nbf, provider.clock_skew, self._clock())
        aud = payload.get("aud")
        audiences: tuple[str, ...]
        if isinstance(aud, str):
            audiences = (aud,)
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            audiences = tuple(aud)
        elif aud is None:
            audiences = ()
        else:
            raise _malformed("claim 'aud' must be a string or a list of strings")
        if provider.audiences and provider.audiences.isdisjoint(audiences):
            raise AuthenticationError(errors.INVALID_AUDIENCE, "audience not accepted")
        for name, expected in provider.required_claims:
            value = payload.get(name)
            # NOTE: the claim's name comes from configuration; its value is never quoted.
            if value is None:
                raise AuthenticationError(
                    errors.MISSING_CLAIM,
                    f"required claim {name!r} is missing",
                    description=f"required claim '{name}' missing",
                )
            if expected is not None and not _claim_equals(value, expected):
                raise AuthenticationError(
                    errors.MISSING_CLAIM,
                    f"required claim {name!r} has another value",
                    description=f"required claim '{name}' does not have the required value",
                )
        sub = payload.get("sub", "")
        azp = payload.get("azp")
        # NOTE: positional, in Identity's field order (provider, issuer, subject, claims,
        # audiences, presenter, payload_segment, space_delimited): keywords cost ~1 us here,
        # once per new token.
        identity = Identity(
            provider.name,
            provider.issuer,
            sub if isinstance(sub, str) else json.dumps(sub),
            payload,
            audiences,
            azp if isinstance(azp, str) else None,
            payload_segment if provider.keeps_payload else "",
            provider.space_delimited,
        )
        return identity, exp, nbf
