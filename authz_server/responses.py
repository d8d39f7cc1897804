"""Decisions: the one place where errors become HTTP statuses, headers and bodies.

A ``Decision`` is door-neutral: the gRPC door renders it into a ``CheckResponse``, a later
HTTP door into an HTTP response. Deny decisions for a given error are built once and reused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from authz_server import errors
from authz_server.errors import AuthenticationError, AuthzError, DependencyError

# gRPC status codes carried in CheckResponse.status (google.rpc.Code).
GRPC_OK = 0
GRPC_PERMISSION_DENIED = 7
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16

# Short, fixed descriptions (never request data) for WWW-Authenticate error_description.
_DESCRIPTIONS = {
    errors.MALFORMED_TOKEN: "malformed token",
    errors.AMBIGUOUS_CREDENTIALS: "more than one token",
    errors.AMBIGUOUS_COOKIE: "token cookie next to a comma",
    errors.AMBIGUOUS_QUERY: "token parameter next to a semicolon",
    errors.UNSUPPORTED_ALGORITHM: "algorithm not allowed",
    errors.UNKNOWN_KID: "signing key not found",
    errors.INVALID_SIGNATURE: "invalid signature",
    errors.TOKEN_EXPIRED: "token expired",
    errors.TOKEN_NOT_YET_VALID: "token not yet valid",
    errors.INVALID_ISSUER: "issuer not accepted",
    errors.INVALID_AUDIENCE: "audience not accepted",
    errors.MISSING_CLAIM: "required claim missing",
    errors.MALFORMED_API_KEY: "malformed API key",
    errors.UNKNOWN_API_KEY: "unknown API key",
    errors.API_KEY_EXPIRED: "API key expired",
    errors.TOKEN_INACTIVE: "token inactive",
}
# Refusals of a DPoP proof answer with a DPoP challenge (RFC 9449 7.1), naming the algorithms.
_DPOP_ERRORS = {
    errors.INVALID_DPOP_PROOF: "invalid_dpop_proof",
    errors.DPOP_PROOF_REPLAYED: "invalid_dpop_proof",
    errors.USE_DPOP_NONCE: "use_dpop_nonce",
}
_ERROR_NAMES = {401: "unauthorized", 403: "forbidden", 500: "internal_error", 503: "unavailable"}
_GRPC_CODES = {
    401: GRPC_UNAUTHENTICATED,
    403: GRPC_PERMISSION_DENIED,
    500: GRPC_INTERNAL,
    503: GRPC_UNAVAILABLE,
}


@dataclass(frozen=True)
class Decision:
    """What to answer Envoy. ``status`` is the HTTP status of a denial (200 when allowed)."""

    allowed: bool
    status: int
    reason: str
    grpc_code: int = GRPC_OK
    headers_to_set: tuple[tuple[str, str], ...] = ()
    headers_to_remove: tuple[str, ...] = ()
    # Query parameters that held a token: removed before the upstream (the gRPC door only;
    # Envoy's HTTP ext_authz protocol has no way to say it).
    query_params_to_remove: tuple[str, ...] = ()
    response_headers: tuple[tuple[str, str], ...] = ()  # on the denial sent to the client
    body: str = ""
    metadata: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)
    provider: str | None = None
    principal: str | None = None
    policy: str | None = None
    # Observed, never enforced: AUDIT policies that matched, dry-run verdicts (policy, would).
    audited: tuple[str, ...] = field(default=(), compare=False)
    dry_run: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    # Identity headers left out: the claim is there, its value cannot be a header (counted).
    withheld: tuple[str, ...] = field(default=(), compare=False)


def allow(
    *,
    headers_to_set: tuple[tuple[str, str], ...],
    headers_to_remove: tuple[str, ...],
    query_params_to_remove: tuple[str, ...] = (),
    metadata: Mapping[str, Any] | None,
    provider: str | None,
    principal: str | None,
    policy: str | None,
    audited: tuple[str, ...] = (),
    dry_run: tuple[tuple[str, str], ...] = (),
    withheld: tuple[str, ...] = (),
) -> Decision:
    return Decision(
        allowed=True,
        status=200,
        reason="allowed",
        headers_to_set=headers_to_set,
        headers_to_remove=headers_to_remove,
        query_params_to_remove=query_params_to_remove,
        metadata=metadata,
        provider=provider,
        principal=principal,
        policy=policy,
        audited=audited,
        dry_run=dry_run,
        withheld=withheld,
    )


def _quoted_string_safe(text: str) -> str:
    """``text`` fit for an RFC 7230 quoted-string: no quotes, backslashes or controls."""
    return "".join(c for c in text if c.isprintable() and c not in '"\\')


def _www_authenticate(
    realm: str, reason: str, token_present: bool, description: str, dpop_algs: str = ""
) -> str:
    dpop_error = _DPOP_ERRORS.get(reason) if dpop_algs else None
    if dpop_error is not None:
        description = _quoted_string_safe(description or "invalid DPoP proof")
        return (
            f'DPoP realm="{realm}", algs="{dpop_algs}", error="{dpop_error}", '
            f'error_description="{description}"'
        )
    value = f'Bearer realm="{realm}"'
    if token_present:
        description = _quoted_string_safe(description or _DESCRIPTIONS.get(reason, "invalid token"))
        value += f', error="invalid_token", error_description="{description}"'
    return value


@lru_cache(maxsize=256)
def _denial(
    status: int,
    reason: str,
    realm: str,
    token_present: bool,
    description: str = "",
    *,
    dpop_algs: str = "",
) -> Decision:
    headers: list[tuple[str, str]] = [("content-type", "application/json")]
    if status == 401:
        challenge = _www_authenticate(realm, reason, token_present, description, dpop_algs)
        headers.append(("www-authenticate", challenge))
    body = json.dumps({"error": _ERROR_NAMES.get(status, "denied"), "reason": reason})
    return Decision(
        allowed=False,
        status=status,
        reason=reason,
        grpc_code=_GRPC_CODES.get(status, GRPC_PERMISSION_DENIED),
        response_headers=tuple(headers),
        body=body,
    )


def deny(error: AuthzError, *, realm: str, token_present: bool, dpop_algs: str = "") -> Decision:
    """The denial for ``error``: 401 with WWW-Authenticate, 403, or 503 (shared, prebuilt).
    ``dpop_algs``: the provider's DPoP algorithms, for a DPoP challenge on a proof refused."""
    if isinstance(error, AuthenticationError):
        status = 401
    elif isinstance(error, DependencyError):
        status = 503
    else:
        status = error.status
    decision = _denial(
        status, error.reason, realm, token_present, error.description or "", dpop_algs=dpop_algs
    )
    if error.headers:
        # This denial's own headers (a fresh DPoP-Nonce): never in the shared one.
        decision = replace(decision, response_headers=decision.response_headers + error.headers)
    return decision


def internal_error() -> Decision:
    """Fail closed: the answer to any unexpected exception."""
    return _denial(500, errors.INTERNAL_ERROR, "", False)


def with_context(
    decision: Decision,
    *,
    provider: str | None,
    principal: str | None,
    policy: str | None,
    audited: tuple[str, ...] = (),
    dry_run: tuple[tuple[str, str], ...] = (),
) -> Decision:
    """A shared denial annotated with who asked and what the policies said (for logs and
    metrics; the rendered answer stays the same)."""
    if provider is None and principal is None and policy is None and not audited and not dry_run:
        return decision
    return replace(
        decision,
        provider=provider,
        principal=principal,
        policy=policy,
        audited=audited,
        dry_run=dry_run,
    )
