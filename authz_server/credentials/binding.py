"""Sender-constrained tokens: the proof that the caller holds what its token is bound to.

- DPoP (RFC 9449): the request carries a proof JWT, signed by the key whose RFC 7638
  thumbprint the access token names in ``cnf.jkt``, for this method and URL, now, once.
- Certificate-bound tokens (RFC 8705): the token names in ``cnf["x5t#S256"]`` the SHA-256
  thumbprint of the client certificate the connection presented.

Pure functions (and a bounded cache of built proof keys): no I/O, no clock of their own, no
configuration loading. The replay cache a proof's ``jti`` goes into is ``replay``'s; the
service asks it after ``verify_dpop_proof``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from authz_server import errors
from authz_server.attributes import RequestAttributes, normalize_path
from authz_server.credentials.jwt import decode_segments
from authz_server.errors import AuthenticationError
from authz_server.keys.keyset import UnusableKeyError, VerificationKey, build_key

DPOP_TYP = "dpop+jwt"
# RFC 9449 4.2: asymmetric algorithms only; "none" and the HMAC family never.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
MAX_PROOF_BYTES = 8192
MAX_JTI_CHARS = 256
# The members whose presence makes a JWK a private (or symmetric) key (RFC 7517, RFC 7518 6).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# RFC 7638 3.2: the required members of each key type, the only ones hashed.
_THUMBPRINT_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE writes digests."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public JWK: its required members only, in lexical
    order, no whitespace. Raises ValueError for a key type or member it cannot hash."""
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None:
        raise ValueError(f"no thumbprint for key type {jwk.get('kty')!r}")
    canonical = {}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise ValueError(f"JWK member {name!r} must be a string")
        canonical[name] = value
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return b64url(hashlib.sha256(text.encode("utf-8")).digest())


def access_token_hash(token: str) -> str:
    """The proof's ``ath``: base64url(SHA-256(the access token's ASCII))."""
    return b64url(hashlib.sha256(token.encode("ascii", "replace")).digest())


def certificate_thumbprint(der: bytes) -> str:
    """RFC 8705 ``x5t#S256``: base64url(SHA-256(the certificate's DER))."""
    return b64url(hashlib.sha256(der).digest())


def certificate_der_from_pem(pem: str) -> bytes:
    """DER of the first certificate of a PEM text (Envoy sends it URL-encoded: decode first).

    Raises ValueError when there is none or it is not base64."""
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = pem.find(begin)
    stop = pem.find(end, start + len(begin))
    if start < 0 or stop < 0:
        raise ValueError("no PEM certificate")
    body = "".join(pem[start + len(begin) : stop].split())
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error:
        raise ValueError("the PEM certificate is not base64") from None


def envoy_certificate_der(url_encoded_pem: str) -> bytes:
    """DER of the client certificate from Envoy's ``attributes.source.certificate`` (the
    URL-encoded PEM that ``include_peer_certificate: true`` sends)."""
    return certificate_der_from_pem(unquote(url_encoded_pem))


def normalize_htu(url: str) -> str:
    """The comparable form of an HTTP URI without query or fragment (RFC 9449 4.3 step 9;
    RFC 3986 6.2.2 and 6.2.3): scheme and host lower case, the default port dropped,
    unreserved escapes decoded, dot segments resolved. Raises ValueError for a URI that is
    not absolute http(s), or that carries a query or fragment."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError("not an absolute http(s) URI")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("carries a query or fragment")
    if parts.username is not None or parts.password is not None:
        raise ValueError("carries user information")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        raise ValueError("invalid port") from None
    authority = host if port is None or str(port) == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    return f"{scheme}://{authority}{normalize_path(parts.path or '/')}"


def request_htu(scheme: str, authority: str, path: str, external_url: str | None = None) -> str:
    """The URI a client addressed, as a proof's ``htu`` names it, normalized.

    ``external_url`` (a provider's configured origin, for a server behind a load balancer
    whose scheme and host differ from Envoy's view) replaces scheme and authority, and
    prefixes its own path. Raises ValueError when no absolute URI can be formed."""
    path_only = path.split("?", 1)[0].split("#", 1)[0] or "/"
    if external_url:
        base = external_url.rstrip("/")
        return normalize_htu(base + (path_only if path_only.startswith("/") else "/" + path_only))
    return normalize_htu(f"{scheme or 'http'}://{authority}{path_only}")


@dataclass(frozen=True)
class DpopRules:
    """What a provider accepts of a DPoP proof (built once per provider at load)."""

    algorithms: frozenset[str]
    proof_lifetime: float = 60.0
    clock_skew: float = 0.0
    external_url: str | None = None


class ProofKeyCache:
    """Public keys built from proofs' ``jwk``, by thumbprint: a client signs every proof with
    the same key, and building it costs about a third of verifying a proof. Bounded: when full,
    the oldest entry goes. Only keys that built are kept; the signature is checked every time.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self._max = max_entries
        self._keys: dict[str, VerificationKey] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> VerificationKey | None:
        return self._keys.get(name)

    def put(self, name: str, key: VerificationKey) -> None:
        with self._lock:
            while len(self._keys) >= self._max:
                del self._keys[next(iter(self._keys))]
            self._keys[name] = key

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class VerifiedProof:
    """A DPoP proof that verified: the thumbprint of its key, its ``jti`` and ``iat``, and the
    ``nonce`` it carried (or None). The ``jti`` still has to pass the replay cache."""

    jkt: str
    jti: str
    iat: float
    nonce: str | None


def _invalid(detail: str) -> AuthenticationError:
    return AuthenticationError(errors.INVALID_DPOP_PROOF, detail, description=detail)


def _claim_string(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise _invalid(f"the proof's '{name}' is missing or not a string")
    return value


def verify_dpop_proof(
    proof: str,
    *,
    method: str,
    htu: str,
    access_token: str | None,
    now: float,
    rules: DpopRules,
    key_cache: ProofKeyCache | None = None,
) -> VerifiedProof:
    """Verify a DPoP proof JWT for a request (RFC 9449 4.3), all but the replay check.

    ``htu`` is the request's normalized URI (``request_htu``). ``access_token``, when the
    request presents one, must hash to the proof's ``ath``. ``key_cache`` keeps the public keys
    built from proofs (built with ``rules.algorithms``: one cache per rules). Returns the
    VerifiedProof; raises AuthenticationError(invalid_dpop_proof) naming the first check that
    failed.
    """
    if len(proof) > MAX_PROOF_BYTES:
        raise _invalid(f"the proof is longer than {MAX_PROOF_BYTES} bytes")
    try:
        header, payload, segments = decode_segments(proof)
    except AuthenticationError:
        raise _invalid("the proof is not a well-formed JWS") from None
    if header.get("typ") != DPOP_TYP:
        raise _invalid(f"the proof's 'typ' is not '{DPOP_TYP}'")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS or alg not in rules.algorithms:
        raise _invalid("the proof's 'alg' is not an allowed asymmetric algorithm")
    if "crit" in header:
        raise _invalid("the proof carries an unsupported 'crit' header")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise _invalid("the proof has no 'jwk' header")
    if _PRIVATE_MEMBERS.intersection(jwk):
        raise _invalid("the proof's 'jwk' holds private or symmetric key material")
    try:
        jkt = jwk_thumbprint(jwk)
        # The thumbprint names every member a key is built from but `alg`, which narrows it.
        cache_key = f"{jkt}|{jwk.get('alg')}"
        key = key_cache.get(cache_key) if key_cache is not None else None
        if key is None:
            key = build_key(
                {k: v for k, v in jwk.items() if k not in ("kid", "use")}, rules.algorithms
            )
            if key_cache is not None:
                key_cache.put(cache_key, key)
    except (UnusableKeyError, ValueError, KeyError):
        raise _invalid("the proof's 'jwk' is not a usable public key") from None
    verify = key.verifiers.get(alg)
    if verify is None:
        raise _invalid("the proof's 'jwk' does not serve its 'alg'")
    try:
        signature = base64.urlsafe_b64decode(segments[2] + "=" * (-len(segments[2]) % 4))
    except (ValueError, binascii.Error):
        raise _invalid("the proof's signature is not base64url") from None
    if not verify(f"{segments[0]}.{segments[1]}".encode("ascii"), signature):
        raise _invalid("the proof's signature does not verify with its 'jwk'")
    jti = _claim_string(payload, "jti")
    if len(jti) > MAX_JTI_CHARS:
        raise _invalid(f"the proof's 'jti' is longer than {MAX_JTI_CHARS} characters")
    if _claim_string(payload, "htm") != method:
        raise _invalid("the proof's 'htm' is not the request's method")
    try:
        proof_htu = normalize_htu(_claim_string(payload, "htu"))
    except ValueError as exc:
        raise _invalid(f"the proof's 'htu' is not usable: {exc}") from None
    if proof_htu != htu:
        raise _invalid("the proof's 'htu' is not the request's URI")
    iat = payload.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int | float) or not math.isfinite(iat):
        raise _invalid("the proof's 'iat' is missing or not a number")
    if iat > now + rules.clock_skew:
        raise _invalid("the proof's 'iat' is in the future")
    if iat < now - rules.proof_lifetime - rules.clock_skew:
        raise _invalid("the proof is too old ('iat' outside the proof lifetime)")
    if access_token is not None:
        ath = payload.get("ath")
        if not isinstance(ath, str) or not hmac.compare_digest(
            ath.encode(), access_token_hash(access_token).encode()
        ):
            raise _invalid("the proof's 'ath' is not the hash of the access token")
    nonce = payload.get("nonce")
    if nonce is not None and not isinstance(nonce, str):
        raise _invalid("the proof's 'nonce' is not a string")
    return VerifiedProof(jkt=jkt, jti=jti, iat=float(iat), nonce=nonce)


def token_confirmation(claims: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The token's confirmation (RFC 7800 ``cnf``): (``jkt``, ``x5t#S256``), each None when
    absent. Raises AuthenticationError(malformed_token) for a ``cnf`` of the wrong shape."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None, None
    if not isinstance(cnf, dict):
        raise AuthenticationError(errors.MALFORMED_TOKEN, "claim 'cnf' must be an object")
    jkt, x5t = cnf.get("jkt"), cnf.get("x5t#S256")
    if (jkt is not None and not isinstance(jkt, str)) or (
        x5t is not None and not isinstance(x5t, str)
    ):
        raise AuthenticationError(errors.MALFORMED_TOKEN, "'cnf' members must be strings")
    return jkt, x5t


def check_key_binding(token_jkt: str, proof: VerifiedProof) -> None:
    """The proof's key is the one the token is bound to. Raises AuthenticationError."""
    if not hmac.compare_digest(token_jkt.encode(), proof.jkt.encode()):
        raise _invalid("the proof's key is not the one the token is bound to ('cnf.jkt')")


def check_certificate_binding(token_x5t: str, presented_x5t: str | None) -> None:
    """The connection's client certificate (its ``x5t#S256``) is the one the token is bound to
    (RFC 8705 3). Raises AuthenticationError(certificate_mismatch) when none or another."""
    if presented_x5t is None:
        raise AuthenticationError(
            errors.CERTIFICATE_MISMATCH,
            "the token is bound to a client certificate and the request presented none",
            description="token bound to a client certificate",
        )
    if not hmac.compare_digest(token_x5t.encode(), presented_x5t.encode()):
        raise AuthenticationError(
            errors.CERTIFICATE_MISMATCH,
            "the client certificate is not the one the token is bound to",
            description="token bound to another client certificate",
        )


def _xfcc_elements(value: str) -> list[dict[str, str]]:
    """X-Forwarded-Client-Cert elements (comma-separated; ``key=value`` pairs separated by
    ``;``; values may be double-quoted, with commas and semicolons inside the quotes)."""
    elements: list[dict[str, str]] = []
    pairs: dict[str, str] = {}
    key, buf, quoted, in_value = "", "", False, False
    for char in value + ",":
        if quoted:
            if char == '"':
                quoted = False
            else:
                buf += char
        elif char == '"' and in_value:
            quoted = True
        elif char == "=" and not in_value:
            key, buf, in_value = buf.strip().lower(), "", True
        elif char in ";,":
            if in_value and key:
                pairs[key] = buf.strip()
            key, buf, in_value = "", "", False
            if char == ",":
                if pairs:
                    elements.append(pairs)
                pairs = {}
        else:
            buf += char
    return elements


def presented_certificate_thumbprint(request: RequestAttributes, trust_xfcc: bool) -> str | None:
    """The ``x5t#S256`` of the client certificate the request's connection presented: from
    Envoy's ``attributes.source.certificate``, else (when the configuration trusts the hop in
    front of Envoy) the last element of X-Forwarded-Client-Cert (``Hash=`` hex SHA-256 of the
    DER, or ``Cert=`` URL-encoded PEM). None when there is none, or it cannot be read."""
    try:
        if request.client_certificate:
            return certificate_thumbprint(envoy_certificate_der(request.client_certificate))
        if not trust_xfcc:
            return None
        header = request.headers.get("x-forwarded-client-cert")
        elements = _xfcc_elements(header) if header else []
        if not elements:
            return None
        last = elements[-1]  # appended by the nearest (trusted) hop
        if "hash" in last:
            return b64url(bytes.fromhex(last["hash"]))
        if "cert" in last:
            return certificate_thumbprint(envoy_certificate_der(last["cert"]))
    except ValueError:
        return None
    return None


class NonceSource:
    """Server nonces (RFC 9449 8) that every replica accepts without sharing memory: an HMAC of
    a shared secret and the time window, so any process with the secret derives the same
    nonce. A nonce of the current or the previous window is accepted."""

    def __init__(self, secret: bytes, period: float = 300.0) -> None:
        if len(secret) < 16:
            raise ValueError("the nonce secret must be at least 16 bytes")
        self._secret = secret
        self._period = period

    def _for_window(self, window: int) -> str:
        mac = hmac.new(self._secret, window.to_bytes(8, "big", signed=True), hashlib.sha256)
        return b64url(mac.digest()[:18])

    def current(self, now: float) -> str:
        """The nonce to hand out now (the ``DPoP-Nonce`` header)."""
        return self._for_window(int(now // self._period))

    def accepts(self, nonce: str | None, now: float) -> bool:
        """Whether ``nonce`` is the current or the previous window's."""
        if not nonce:
            return False
        window = int(now // self._period)
        return any(
            hmac.compare_digest(nonce.encode(), self._for_window(w).encode())
            for w in (window, window - 1)
        )


class ReplayCheck(Protocol):
    """What ``SenderConstraint`` needs of a replay cache (``replay.ReplayCache``)."""

    def first_use(self, key: str, ttl: float) -> bool: ...


@dataclass(frozen=True)
class SenderConstraint:
    """One provider's sender-constraint rules, built at load; ``check`` runs on every request
    whose token that provider verified (the token may come from the cache; its proof never
    does)."""

    provider: str
    dpop_mode: str
    dpop: DpopRules
    certificate_mode: str
    trust_forwarded_client_cert: bool
    # With dpop.nonce: where nonces come from (and are checked against); None: no nonce.
    nonces: NonceSource | None = field(default=None, compare=False, repr=False)
    proof_keys: ProofKeyCache = field(default_factory=ProofKeyCache, compare=False, repr=False)

    @cached_property
    def algs(self) -> str:
        """The ``algs`` a DPoP challenge advertises (joined once, on the first refusal)."""
        return " ".join(sorted(self.dpop.algorithms))

    def check(
        self,
        claims: Mapping[str, Any],
        *,
        token: str,
        presented_as_dpop: bool,
        request: RequestAttributes,
        now: float,
        replay: ReplayCheck,
    ) -> None:
        """Raise AuthenticationError (401) unless the request proves possession of what the
        token is bound to, as this provider's modes require; ReplayCacheUnavailable (503) when
        the replay cache cannot tell."""
        jkt, x5t = token_confirmation(claims)
        if self.dpop_mode != "disabled":
            if presented_as_dpop:
                self._check_dpop(jkt, token, request, now, replay)
            elif jkt is not None:
                raise AuthenticationError(
                    errors.BOUND_TOKEN_WITHOUT_PROOF,
                    "a DPoP-bound token (cnf.jkt) was presented without DPoP",
                    description="token is DPoP-bound: present it with a DPoP proof",
                )
            elif self.dpop_mode == "required":
                raise AuthenticationError(
                    errors.BOUND_TOKEN_WITHOUT_PROOF,
                    "this provider accepts DPoP-bound tokens only",
                    description="a DPoP-bound token is required",
                )
        if self.certificate_mode != "disabled":
            if x5t is not None:
                presented = presented_certificate_thumbprint(
                    request, self.trust_forwarded_client_cert
                )
                check_certificate_binding(x5t, presented)
            elif self.certificate_mode == "required":
                raise AuthenticationError(
                    errors.CERTIFICATE_MISMATCH,
                    "this provider accepts certificate-bound tokens only (no cnf x5t#S256)",
                    description="a certificate-bound token is required",
                )

    def _check_dpop(
        self,
        jkt: str | None,
        token: str,
        request: RequestAttributes,
        now: float,
        replay: ReplayCheck,
    ) -> None:
        proof = request.headers.get("dpop")
        if proof is None or not proof.strip():
            raise _invalid("the request has no DPoP header")
        if "," in proof:
            # Envoy joins repeated headers with ","; a JWS never holds one.
            raise _invalid("the request has more than one DPoP header")
        if jkt is None:
            raise _invalid("the token is not bound to a key (no cnf.jkt)")
        try:
            htu = request_htu(request.scheme, request.host, request.path, self.dpop.external_url)
        except ValueError:
            raise _invalid("the request's URI cannot be formed to compare with 'htu'") from None
        verified = verify_dpop_proof(
            proof.strip(),
            method=request.method,
            htu=htu,
            access_token=token,
            now=now,
            rules=self.dpop,
            key_cache=self.proof_keys,
        )
        check_key_binding(jkt, verified)
        if self.nonces is not None and not self.nonces.accepts(verified.nonce, now):
            # RFC 9449 9: answer with the nonce to use; the client retries with a new proof.
            raise AuthenticationError(
                errors.USE_DPOP_NONCE,
                "the proof carries no current server nonce"
                if verified.nonce is None
                else "the proof's nonce is not a current one of this server",
                description="a server nonce is required",
                headers=(("dpop-nonce", self.nonces.current(now)),),
            )
        # NOTE: kept as long as a proof with this iat could still be accepted.
        ttl = self.dpop.proof_lifetime + 2 * self.dpop.clock_skew + 1.0
        if not replay.first_use(replay_key(self.provider, verified.jkt, verified.jti), ttl):
            raise AuthenticationError(
                errors.DPOP_PROOF_REPLAYED,
                "the proof's jti was seen before",
                description="DPoP proof replayed",
            )


def replay_key(scope: str, jkt: str, jti: str) -> str:
    """The replay cache key of one proof: its provider, its key's thumbprint and a digest of
    its ``jti`` (two clients may pick the same ``jti``; the key stays bounded)."""
    digest = hashlib.sha256(jti.encode("utf-8", "replace")).hexdigest()[:32]
    return f"{scope}:{jkt}:{digest}"
