"""The error tree of authz-server, mapped to responses in exactly one place (``responses``).

::

    AuthzError                      every decision-time failure; carries a stable ``reason``
    ├── AuthenticationError         401 + WWW-Authenticate (missing or invalid credentials)
    ├── AuthorizationError          403 (authenticated, or anonymous, but not permitted)
    └── DependencyError             503 (a provider's keys never loaded: fail closed)

    ConfigError                     raised at load; never reaches a request

Each ``reason`` is snake_case and bounded (it is also a metric label and a log field).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class AuthzError(Exception):
    """Base of every error a Check can end in. ``reason`` is a fixed snake_case code."""

    status: int = 403
    # Set when one provider's check of one kind of credential raised it (an API key, an
    # introspected token): what the trace says decided.
    provider: str | None = None
    credential: str | None = None

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        description: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        # Headers the denial carries to the client besides the fixed ones (a DPoP-Nonce).
        self.headers = headers
        # Shown to the client (WWW-Authenticate error_description) instead of the reason's
        # fixed text: built from configuration only, never from request data.
        self.description = description


class AuthenticationError(AuthzError):
    """Credentials are missing or invalid: 401."""

    status = 401


class AuthorizationError(AuthzError):
    """The caller is not permitted: 403."""

    status = 403


class DependencyError(AuthzError):
    """Something the decision needs (a provider's keys) is unavailable: 503, fail closed."""

    status = 503


# Reasons, in one place so that tests, metrics and docs agree on the spelling.
class WouldWait(Exception):  # noqa: N818 (a signal, not an error)
    """Deciding needs to wait for a key-set refresh already under way, and the caller said it
    cannot wait on its thread (an event loop): decide again where waiting is allowed."""


MISSING_CREDENTIALS = "missing_credentials"
MALFORMED_TOKEN = "malformed_token"
AMBIGUOUS_CREDENTIALS = "ambiguous_credentials"
AMBIGUOUS_COOKIE = "ambiguous_cookie"
AMBIGUOUS_QUERY = "ambiguous_query"
UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
UNKNOWN_KID = "unknown_kid"
INVALID_SIGNATURE = "invalid_signature"
TOKEN_EXPIRED = "token_expired"
TOKEN_NOT_YET_VALID = "token_not_yet_valid"
INVALID_ISSUER = "invalid_issuer"
INVALID_AUDIENCE = "invalid_audience"
MISSING_CLAIM = "missing_claim"
POLICY_DENIED = "policy_denied"
NO_ALLOW_POLICY_MATCHED = "no_allow_policy_matched"
UNKNOWN_WORKLOAD = "unknown_workload"
JWKS_UNAVAILABLE = "jwks_unavailable"
# Sender-constrained tokens (binding, replay).
INVALID_DPOP_PROOF = "invalid_dpop_proof"
DPOP_PROOF_REPLAYED = "dpop_proof_replayed"
USE_DPOP_NONCE = "use_dpop_nonce"
BOUND_TOKEN_WITHOUT_PROOF = "bound_token_without_proof"
CERTIFICATE_MISMATCH = "certificate_mismatch"
REPLAY_CACHE_UNAVAILABLE = "replay_cache_unavailable"
# API keys and introspected (opaque) tokens.
MALFORMED_API_KEY = "malformed_api_key"
UNKNOWN_API_KEY = "unknown_api_key"
API_KEY_EXPIRED = "api_key_expired"
TOKEN_INACTIVE = "token_inactive"
INTROSPECTION_UNAVAILABLE = "introspection_unavailable"
INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a configuration: where (document, field path) and what."""

    document: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.document}: {self.path}" if self.path else self.document
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A configuration was refused. ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
