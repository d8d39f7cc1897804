"""``Identity``: who a verified token says the caller is. Made by ``credentials.jwt`` (and the
other credential kinds), kept by ``credentials.token_cache``, read by the policies, the answer
and the decision log."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SPACE_DELIMITED = frozenset({"scope", "permission"})


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token says the caller is. Lives in the token cache, hence the slots."""

    provider: str
    issuer: str
    subject: str
    claims: Mapping[str, Any]
    audiences: tuple[str, ...]
    presenter: str | None
    # The base64url payload as it came, kept only for a provider with outputPayloadToHeader
    # (a cached token would carry it for nothing otherwise).
    payload_segment: str
    space_delimited: frozenset[str] = DEFAULT_SPACE_DELIMITED
    # Which kind of credential it came from: "jwt", "introspection" (an opaque token the IdP
    # vouched for) or "apiKey". Recorded (trace, explain), never decided on.
    credential: str = "jwt"
    principal: str = field(init=False)  # Istio's request principal: ``iss/sub``
    # What Envoy's dynamic metadata carries: built once per verified token, and its identity
    # keys the rendered answer.
    metadata: Mapping[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        principal = f"{self.issuer}/{self.subject}"
        object.__setattr__(self, "principal", principal)
        metadata = {"principal": principal, "provider": self.provider, "claims": self.claims}
        object.__setattr__(self, "metadata", metadata)
