"""Token extraction: where each provider looks for a JWT, and what a request carries there.

Locations are compiled once per configuration: the distinct (header, prefix), query
parameter and cookie locations of all providers, each with the providers that read it.
With neither ``fromHeaders`` nor ``fromParams`` (nor ``fromCookies``) a provider reads
Istio's defaults: ``Authorization: Bearer <token>`` and the ``access_token`` query parameter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from authz_server.attributes import RequestAttributes
from authz_server.tokens import ProviderRuntime

LocationKind = Literal["header", "param", "cookie"]


@dataclass(frozen=True)
class TokenLocation:
    kind: LocationKind
    name: str  # header names are lower case
    prefix: str = ""

    @property
    def is_dpop(self) -> bool:
        """The token came as ``Authorization: DPoP <token>`` (RFC 9449 7.1)."""
        return self.kind == "header" and self.prefix.strip().lower() == "dpop"

    def describe(self) -> str:
        if self.kind == "header":
            return f"header {self.name}" + (
                f" (prefix {self.prefix.strip()!r})" if self.prefix else ""
            )
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class FoundToken:
    location: TokenLocation
    token: str
    providers: tuple[ProviderRuntime, ...]
    scope: bytes  # what verifying here depends on: equal across reloads that keep it


def verification_scope(providers: tuple[ProviderRuntime, ...]) -> bytes:
    """A digest of everything that decides whether a token verifies for ``providers``.

    Cached verifications are shared only within one scope, and survive a reload that leaves
    it unchanged (a policy edit, say)."""
    digest = hashlib.sha256()
    for runtime in providers:
        provider = runtime.provider
        for part in (
            provider.name,
            provider.spec.model_dump_json(),
            str(provider.jwks_file),
            str(provider.ca_file),
            str(provider.shared_secret_file),
            str(id(runtime.keys)),  # the key cache object itself: a new one is a new scope
        ):
            digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return digest.digest()[:16]


@dataclass(frozen=True)
class _CompiledLocation:
    location: TokenLocation
    providers: tuple[ProviderRuntime, ...]
    prefix_lower: str = field(default="")
    scope: bytes = b""


DEFAULT_LOCATIONS = (
    TokenLocation("header", "authorization", "Bearer "),
    TokenLocation("param", "access_token"),
)
DPOP_LOCATION = TokenLocation("header", "authorization", "DPoP ")


def provider_locations(provider: ProviderRuntime) -> tuple[TokenLocation, ...]:
    spec = provider.provider.spec
    # A provider with DPoP also reads `Authorization: DPoP <token>` (RFC 9449 7.1).
    dpop = (DPOP_LOCATION,) if spec.dpop.mode != "disabled" else ()
    if not (spec.from_headers or spec.from_params or spec.from_cookies):
        return DEFAULT_LOCATIONS + dpop
    return (
        *(TokenLocation("header", h.name.lower(), h.prefix) for h in spec.from_headers),
        *(TokenLocation("param", p) for p in spec.from_params),
        *(TokenLocation("cookie", c) for c in spec.from_cookies),
        *(
            loc
            for loc in dpop
            if loc
            not in {TokenLocation("header", h.name.lower(), h.prefix) for h in spec.from_headers}
        ),
    )


class CredentialExtractor:
    """Finds the tokens a request carries in the locations the providers read."""

    def __init__(self, providers: Sequence[ProviderRuntime]) -> None:
        readers: dict[TokenLocation, list[ProviderRuntime]] = {}
        for provider in providers:
            for location in provider_locations(provider):
                readers.setdefault(location, []).append(provider)
        self._locations = tuple(
            _CompiledLocation(loc, tuple(ps), loc.prefix.lower(), verification_scope(tuple(ps)))
            for loc, ps in readers.items()
        )
        self.token_headers = frozenset(loc.name for loc in readers if loc.kind == "header")

    def extract(self, request: RequestAttributes) -> list[FoundToken]:
        """Return the tokens found, in configuration order, one per location and value (the
        same token in two headers is found twice: both must be stripped; a parameter or a
        cookie repeated with two values gives two)."""
        found: list[FoundToken] = []
        headers = request.headers
        for compiled in self._locations:
            location = compiled.location
            values: Iterable[str]
            if location.kind == "header":
                raw = headers.get(location.name)
                if raw is None:
                    continue
                if compiled.prefix_lower:
                    # NOTE: auth schemes are case-insensitive (RFC 9110 11.1): "bearer x" counts.
                    if raw[: len(compiled.prefix_lower)].lower() != compiled.prefix_lower:
                        continue
                    raw = raw[len(compiled.prefix_lower) :]
                values = (raw,)
            elif location.kind == "param":
                query = request.query_string
                # NOTE: parsing a query costs ~9 us; skip it when the name cannot be there
                # (an escaped name, like access%5Ftoken, contains "%").
                if location.name not in query and "%" not in query:
                    continue
                values = request.query_params.get(location.name, ())
            else:
                values = request.cookies.get(location.name, ())
            for value in values:
                token = value.strip()
                if token:
                    found.append(FoundToken(location, token, compiled.providers, compiled.scope))
        return found
