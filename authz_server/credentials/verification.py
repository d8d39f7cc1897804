"""Which provider verifies a credential found in a request, by the kind of credential.

- A location read only by JWT providers: the token is a JWT (``jwt``), as always.
- A location also read by an introspection or API keys provider (at most one such provider
  per location, checked at load): a JWT whose ``iss`` names one of the location's JWT
  providers is verified as a JWT; anything else goes to that provider, an API key to its
  keys table (``apikeys``), an opaque token to its IdP (``introspection``).

Every kind ends in the same ``Identity``, so nothing downstream asks which kind it was
(``Identity.credential`` records it for the trace).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from authz_server import errors
from authz_server.credentials.apikeys import ApiKeyTable
from authz_server.credentials.extract import FoundToken
from authz_server.credentials.introspection import Introspector
from authz_server.credentials.jwt import ProviderRuntime, TokenVerifier, WaitMode, decode_segments
from authz_server.decision_memo import CredentialValidity
from authz_server.errors import AuthenticationError, AuthzError, DependencyError
from authz_server.identity import Identity

_NOT_OURS = frozenset({errors.MALFORMED_TOKEN, errors.INVALID_ISSUER})


def _jwt_issuer(token: str) -> Any:
    """The ``iss`` of ``token`` if it decodes as a JWT (unverified), else None."""
    try:
        _, payload, _ = decode_segments(token)
    except AuthenticationError:
        return None
    return payload.get("iss")


class CredentialVerifier:
    """Verifies each found credential with the provider of its kind (see the module)."""

    def __init__(self, jwt: TokenVerifier, clock: Callable[[], float]) -> None:
        self.jwt = jwt
        self._clock = clock
        # id(providers of a location) -> (that tuple, its JWT providers, its other provider)
        self._split: dict[
            int,
            tuple[tuple[ProviderRuntime, ...], tuple[ProviderRuntime, ...], ProviderRuntime | None],
        ] = {}

    def _kinds(
        self, providers: tuple[ProviderRuntime, ...]
    ) -> tuple[tuple[ProviderRuntime, ...], ProviderRuntime | None]:
        split = self._split.get(id(providers))
        if split is None or split[0] is not providers:
            jwt = tuple(p for p in providers if p.provider.spec.kind == "jwt")
            other = next((p for p in providers if p.provider.spec.kind != "jwt"), None)
            split = (providers, jwt, other)
            self._split[id(providers)] = split
        return split[1], split[2]

    def verify(self, found: FoundToken, *, wait: WaitMode = "yes") -> Identity:
        """The identity behind ``found``. Raises AuthenticationError (401 reasons),
        DependencyError (503) or WouldWait (see ``TokenVerifier.verify``)."""
        jwt, other = self._kinds(found.providers)
        token = found.token
        if other is None:
            return self.jwt.verify(
                token, found.providers, found.scope, wait=wait, cache_key=found.cache_key
            )
        if jwt and token.count(".") == 2:
            try:
                return self.jwt.verify(
                    token, jwt, found.scope, wait=wait, cache_key=found.cache_key
                )
            except AuthenticationError as exc:
                issuers = {p.issuer for p in jwt}
                if exc.reason not in _NOT_OURS or _jwt_issuer(token) in issuers:
                    raise
        return self.verify_other(token, other, wait=wait)

    def validity(self, found: FoundToken, identity: Identity) -> CredentialValidity | None:
        """What keeps ``identity``, just given by ``verify(found)``, valid for the decision
        memo: the cache entry it came from (a JWT's verified-token entry, an introspection
        answer) or the API key table that holds it. None when nothing cached vouches for it
        (no token cache, an answer not cached): a decision resting on it is not memoised."""
        token = found.token
        kind = identity.credential
        if kind == "jwt":
            cache = self.jwt.cache
            if cache is None:
                return None
            return cache.validity(found.cache_key, identity)
        _, other = self._kinds(found.providers)
        if other is None or other.name != identity.provider:
            return None
        source = other.keys.source
        if kind == "introspection" and isinstance(source, Introspector):
            return source.validity(token, identity, other.clock_skew)
        table = other.keys.keyset
        if kind == "apiKey" and isinstance(table, ApiKeyTable):
            return table.validity(token, identity, other.keys)
        return None

    def verify_other(
        self, token: str, provider: ProviderRuntime, *, wait: WaitMode = "yes"
    ) -> Identity:
        """``token`` as the credential of an introspection or API keys ``provider``.
        An error raised names the provider and the kind (``AuthzError.provider``,
        ``.credential``) for the trace."""
        kind = provider.provider.spec.kind
        try:
            source = provider.keys.source
            if isinstance(source, Introspector):
                if len(token) > self.jwt.max_token_bytes:
                    # Never sent on: the IdP is not there to absorb what we refuse anyway.
                    raise AuthenticationError(
                        errors.MALFORMED_TOKEN,
                        f"token longer than {self.jwt.max_token_bytes} bytes",
                    )
                return source.verify(token, provider, self.jwt, clock=self._clock, wait=wait)
            table = provider.keys.keyset
            if not isinstance(table, ApiKeyTable):
                # The keys file was never read (missing or broken since the start): fail closed.
                raise DependencyError(errors.JWKS_UNAVAILABLE, f"no API keys for {provider.name}")
            return table.lookup(token, self._clock())
        except AuthzError as exc:
            exc.provider, exc.credential = provider.name, kind
            raise
