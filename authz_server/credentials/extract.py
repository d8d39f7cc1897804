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
from functools import cached_property
from typing import Literal
from urllib.parse import unquote_plus

from authz_server import errors
from authz_server.attributes import RequestAttributes, fold_cookie_name
from authz_server.credentials.jwt import ProviderRuntime
from authz_server.credentials.token_cache import TokenCache

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

    @cached_property
    def cache_key(self) -> bytes:
        """Its key in the verified-token cache: computed once, for the verification and then
        for the decision memo's look at the entry it left."""
        return TokenCache.digest(self.token, self.scope)


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
    cookie_name: str = ""  # as RequestAttributes.cookies keys it (attributes.cookie_name)


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
            _CompiledLocation(
                loc,
                tuple(ps),
                loc.prefix.lower(),
                verification_scope(tuple(ps)),
                fold_cookie_name(loc.name) if loc.kind == "cookie" else "",
            )
            for loc, ps in readers.items()
        )
        self.token_headers = frozenset(loc.name for loc in readers if loc.kind == "header")
        self._cookie_names = frozenset(c.cookie_name for c in self._locations if c.cookie_name)
        self._param_names = frozenset(loc.name for loc in readers if loc.kind == "param")
        self._param_names_lower = frozenset(name.lower() for name in self._param_names)
        # A query in lower case can respell a name only if a name has capitals.
        self._param_names_folded = self._param_names == self._param_names_lower

    def ambiguity(self, request: RequestAttributes) -> str | None:
        """The reason to refuse ``request`` because upstreams read one of its token locations
        differently: ``ambiguous_cookie`` when a token cookie shares a ``;``-separated part of
        the Cookie header with a ``,`` (as Envoy joins two Cookie headers), ``ambiguous_query``
        when a token parameter shares an ``&``-separated part of the query with a ``;``, or is
        named other than exactly (escaped, another case); else None. (Every reading is
        searched for tokens; this is where the readings disagree on which cookie or
        parameter, or which value, is there, or where Envoy could not remove it.)"""
        # NOTE: on every Check: look at the raw texts first, and derive views only when a
        # separator or an escape is there.
        if self._cookie_names:
            cookie = request.headers.get("cookie")
            if (
                cookie is not None
                and "," in cookie
                and not self._cookie_names.isdisjoint(request.cookies_beside_comma)
            ):
                return errors.AMBIGUOUS_COOKIE
        if self._param_names and "?" in request.path:
            query = request.query_string
            if ";" in query and not self._param_names.isdisjoint(
                request.query_names_beside_semicolon
            ):
                return errors.AMBIGUOUS_QUERY
            if self._respelled_param(query):
                return errors.AMBIGUOUS_QUERY
        return None

    def _respelled_param(self, query: str) -> bool:
        """Whether ``query`` names a token parameter other than exactly: escaped
        (``access%5Ftoken``, which upstreams decode) or in another case (``ACCESS_TOKEN``,
        which ASP.NET reads as ``access_token``). Envoy removes parameters by their exact
        name, so it would pass such a token on to the upstream."""
        if "%" not in query and "+" not in query:
            lowered = query.lower()
            if (lowered == query and self._param_names_folded) or not any(
                name in lowered for name in self._param_names_lower
            ):
                return False  # no escape, and no name in another case: nothing to split
        for part in query.replace(";", "&").split("&"):
            raw = part.partition("=")[0]
            if raw not in self._param_names and (
                unquote_plus(raw).lower() in self._param_names_lower
            ):
                return True
        return False

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
                values = request.cookies.get(compiled.cookie_name, ())
            for value in values:
                token = value.strip()
                if token:
                    found.append(FoundToken(location, token, compiled.providers, compiled.scope))
        return found
