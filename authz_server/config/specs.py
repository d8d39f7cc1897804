"""The configuration's schema: what each field of a document may hold, checked by pydantic.

- ``AuthzConfigDoc``, a ``kind: AuthzConfig`` document, and its parts: ``ServerSpec`` (and
  ``TlsSpec``, ``GrpcLimitsSpec``, ``HttpAuthzSpec``, ``TokenCacheSpec``, ``DecisionLogSpec``,
  ``ExplainSpec``), ``ProviderSpec``, ``PolicySpec`` with Istio's rule models (``Rule``,
  ``Source``, ``Operation``, ``Condition``), ``WorkloadSpec``, ``ScopingSpec``, ``IstioSpec``.
- The constants those fields are checked against (``NATIVE_API_VERSION``, the algorithm lists,
  ``MAX_CLOCK_SKEW``) and ``parse_duration``/``Duration``.
- ``Document``, one document of the configuration stream, and ``problems_from``, which turns a
  pydantic ValidationError into ``ConfigProblem``s naming document and field path.

Reading the stream is ``load``'s; translating Istio objects into these specs is ``istio``'s.
Nothing here reads a file or touches the network.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from authz_server.errors import ConfigProblem
from authz_server.ops.tls import TlsFiles
from authz_server.policy.workloads import DEFAULT_ROOT_NAMESPACE, Workload

Algorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
    "HS256", "HS384", "HS512",
]  # fmt: skip
HMAC_ALGORITHMS: tuple[Algorithm, ...] = ("HS256", "HS384", "HS512")
NATIVE_API_VERSION = "authz-server/v1"

ASYMMETRIC_ALGORITHMS: tuple[Algorithm, ...] = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "EdDSA",
)

# Clocks that disagree by more than this are broken, and a larger skew accepts expired tokens.
MAX_CLOCK_SKEW = 300.0

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|s|m|h)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: object) -> float:
    """Return seconds for ``"1h30m"``, ``"5s"``, ``"250ms"``, ``"1.5s"`` or a bare number.

    Raises ValueError naming the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration like '5s', '250ms' or '1h30m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value and _DURATION_PART.sub("", value) == "":
        seconds = sum(
            float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(value.strip())
        )
    else:
        raise ValueError(f"expected a duration like '5s', '250ms' or '1h30m', got {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _secure_or_loopback(url: str) -> bool:
    """https, or http to a loopback host (tests, sidecars)."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


# ----------------------------------------------------------------------------- providers


class HeaderLocation(_Model):
    name: str = Field(min_length=1)
    prefix: str = ""


class ClaimToHeader(_Model):
    header: str = Field(pattern=r"^[-_A-Za-z0-9]+$")
    claim: str = Field(min_length=1)


BindingMode = Literal["disabled", "optional", "required"]
# RFC 9449 4.2: a proof is signed with an asymmetric key; HMAC would need a shared secret.
DPOP_DEFAULT_ALGORITHMS: tuple[Algorithm, ...] = ("ES256", "EdDSA", "RS256", "PS256")


class DpopSpec(_Model):
    """DPoP (RFC 9449) for one provider: ``optional`` checks the proof of a token bound to a
    key (``cnf.jkt``) and lets unbound tokens pass as bearer tokens; ``required`` accepts
    bound, proven tokens only."""

    mode: BindingMode = "disabled"
    proof_lifetime: Duration = 60.0
    algorithms: list[Algorithm] = Field(default_factory=lambda: list(DPOP_DEFAULT_ALGORITHMS))
    # The origin clients address (https://api.example.com) when Envoy's view of scheme and
    # host differs from it (behind a load balancer): a proof's htu names the client's URL.
    external_url: str | None = None
    # Server nonces (RFC 9449 8): a proof must carry a nonce this server handed out, derived
    # from the secret in nonceSecretFile and the time, so every replica sharing the secret
    # accepts every other's nonce without shared memory.
    nonce: bool = False
    nonce_secret_file: str | None = Field(default=None, min_length=1)

    @field_validator("proof_lifetime")
    @classmethod
    def _bounded_lifetime(cls, value: float) -> float:
        if not 1.0 <= value <= 300.0:
            raise ValueError(
                "must be between 1s and 5m (the replay cache holds every proof so long)"
            )
        return value

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one algorithm is required")
        symmetric = [a for a in value if a in HMAC_ALGORITHMS]
        if symmetric:
            raise ValueError(f"{symmetric[0]}: a DPoP proof is signed with an asymmetric key")
        return value

    @model_validator(mode="after")
    def _nonce_needs_a_secret(self) -> DpopSpec:
        if self.nonce and self.nonce_secret_file is None:
            raise ValueError(
                "nonce: true needs nonceSecretFile (a secret every replica shares, at least "
                "32 bytes), so that any replica accepts another's nonce"
            )
        return self

    @field_validator("external_url")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s?#]+(/[^?#\s]*)?$", value):
            raise ValueError(
                "an absolute http(s) URL without query or fragment, like https://api.example.com"
            )
        return value


class IntrospectionSpec(_Model):
    """Opaque tokens, asked about at the IdP by OAuth2 Token Introspection (RFC 7662)."""

    endpoint: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    # client_secret_basic: the secret is read from this file (a mounted Secret), never inline.
    client_secret_file: str = Field(min_length=1)
    # An active answer is reused this long, never past the token's `exp`; an inactive one,
    # `negativeCacheTtl`. Revocation at the IdP takes effect here within `cacheTtl`.
    cache_ttl: Duration = 60.0
    negative_cache_ttl: Duration = 5.0
    timeout: Duration = 1.0
    cache_max_entries: int = Field(default=10_000, ge=0, le=10_000_000)  # 0: no cache
    # Introspection calls in flight at once for this provider; more wait up to `timeout`.
    max_concurrent_calls: int = Field(default=16, ge=1, le=1024)

    @field_validator("endpoint")
    @classmethod
    def _secure_endpoint(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("url must have scheme http:// or https:// and a host")
        if not _secure_or_loopback(value):
            raise ValueError(
                "tokens and the client secret must travel over https (http is accepted on "
                "loopback only)"
            )
        return value

    @field_validator("timeout")
    @classmethod
    def _sane_timeout(cls, value: float) -> float:
        if not 0.001 <= value <= 10.0:
            raise ValueError("between 1ms and 10s: a Check waits for it, and Envoy waits less")
        return value

    @field_validator("cache_ttl", "negative_cache_ttl")
    @classmethod
    def _bounded_ttl(cls, value: float) -> float:
        if value > 3600.0:
            raise ValueError(
                "at most 1h: a revoked token stays accepted for as long as its answer is cached"
            )
        return value


class ApiKeysSpec(_Model):
    """API keys: a file (a mounted Secret) of SHA-256 hashes, each with a `sub` and claims."""

    file: str = Field(min_length=1)


class ProviderSpec(_Model):
    """One JWT issuer: every field of Istio's ``JWTRule`` plus the native extras."""

    name: str | None = Field(default=None, min_length=1)
    issuer: str = Field(min_length=1)
    audiences: list[Annotated[str, Field(min_length=1)]] = []
    jwks_uri: str | None = None
    jwks: str | None = None
    jwks_file: str | None = None
    from_headers: list[HeaderLocation] = []
    from_params: list[Annotated[str, Field(min_length=1)]] = []
    from_cookies: list[Annotated[str, Field(min_length=1)]] = []
    output_payload_to_header: str | None = Field(default=None, pattern=r"^[-_A-Za-z0-9]+$")
    forward_original_token: bool = False
    output_claim_to_headers: list[ClaimToHeader] = []
    timeout: Duration = 5.0
    space_delimited_claims: list[str] = []
    presence: Literal["OPTIONAL", "REQUIRED"] = "OPTIONAL"
    # Key set lifecycle (native extras). NOTE: sharedSecretFile precedes algorithms, whose
    # validator reads it.
    discovery: bool = False
    shared_secret_file: str | None = None
    algorithms: list[Algorithm] = Field(default_factory=lambda: list(ASYMMETRIC_ALGORITHMS))
    clock_skew: Duration = 60.0
    ca_file: str | None = None
    refresh_interval: Duration = 300.0
    min_refresh_interval: Duration = 30.0
    max_stale: Duration = 86400.0
    # Claims checks: `exp` is required unless this is false; requiredClaims maps a claim to the
    # value it must equal (a list claim must contain it), or to null for "must be present".
    require_expiration: bool = True
    required_claims: dict[str, str | int | bool | None] = {}
    # Sender-constrained tokens (RFC 9449, RFC 8705): see docs/sender-constrained.md.
    dpop: DpopSpec = Field(default_factory=DpopSpec)
    certificate_bound: BindingMode = "disabled"
    # Credentials other than JWTs (native only): one of these instead of a key source.
    introspection: IntrospectionSpec | None = None
    api_keys: ApiKeysSpec | None = None

    @property
    def kind(self) -> Literal["jwt", "introspection", "apiKey"]:
        """Which kind of credential this provider verifies."""
        if self.introspection is not None:
            return "introspection"
        if self.api_keys is not None:
            return "apiKey"
        return "jwt"

    @field_validator("refresh_interval", "min_refresh_interval")
    @classmethod
    def _sane_refresh(cls, value: float) -> float:
        if value < 1.0:
            raise ValueError("must be at least 1s (a shorter interval hammers the IdP)")
        return value

    @field_validator("clock_skew")
    @classmethod
    def _bounded_skew(cls, value: float) -> float:
        if value > MAX_CLOCK_SKEW:
            raise ValueError(
                f"at most {MAX_CLOCK_SKEW:g}s (5m): a larger skew keeps expired tokens valid; "
                "fix the clocks instead (NTP)"
            )
        return value

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, value: float) -> float:
        if value < 0.001:
            raise ValueError("must be a valid duration greater than 1ms")
        return value

    @field_validator("algorithms", mode="before")
    @classmethod
    def _no_none(cls, value: object) -> object:
        if isinstance(value, list) and any(
            isinstance(alg, str) and alg.lower() == "none" for alg in value
        ):
            raise ValueError("'none' is never accepted")
        return value

    @field_validator("algorithms")
    @classmethod
    def _fit_the_key_source(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value:
            raise ValueError("at least one algorithm is required")
        hmac = [a for a in value if a in HMAC_ALGORITHMS]
        if info.data.get("shared_secret_file") is not None:
            if len(hmac) != len(value):
                raise ValueError("a sharedSecretFile provider verifies HS256/HS384/HS512 only")
        elif hmac:
            raise ValueError(
                f"{hmac[0]} needs a shared secret (sharedSecretFile); a public key is never "
                "used as an HMAC secret"
            )
        return value

    @field_validator("jwks_uri")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("url must have scheme http:// or https:// and a host")
        if value is not None and not _secure_or_loopback(value):
            raise ValueError(
                "keys must come over https: anyone on the path could hand out signing keys "
                "over plain http (http is accepted on loopback only)"
            )
        return value

    @model_validator(mode="after")
    def _key_source_and_algorithms(self) -> ProviderSpec:
        sources = [
            to_camel(s)
            for s in ("jwks_uri", "jwks", "jwks_file", "shared_secret_file")
            if getattr(self, s) is not None
        ] + (["discovery"] if self.discovery else [])
        if self.introspection is not None or self.api_keys is not None:
            return self._opaque_provider(sources)
        if len(sources) != 1:
            raise ValueError(
                "exactly one of jwksUri, jwks, jwksFile, discovery: true, sharedSecretFile "
                "must be set" + (f" (got {', '.join(sources)})" if sources else "")
            )
        if self.discovery and not re.match(r"^https?://[^/\s]+", self.issuer):
            raise ValueError("discovery needs an issuer that is an http(s) URL")
        if self.discovery and not _secure_or_loopback(self.issuer):
            raise ValueError(
                "OIDC discovery over plain http would let anyone on the path choose the keys: "
                "use an https issuer, or give jwksUri (https) or jwks/jwksFile"
            )
        if self.shared_secret_file is not None and "algorithms" not in self.model_fields_set:
            object.__setattr__(self, "algorithms", list(HMAC_ALGORITHMS))
        return self

    def _opaque_provider(self, sources: list[str]) -> ProviderSpec:
        """An introspection or API keys provider: no JWT key source, nothing JWT-only."""
        kind = "introspection" if self.introspection is not None else "apiKeys"
        if self.introspection is not None and self.api_keys is not None:
            raise ValueError("introspection and apiKeys are two providers: give each its own")
        jwt_only = sources + [
            to_camel(f)
            for f in ("output_payload_to_header", "algorithms")
            if f in self.model_fields_set
        ]
        if jwt_only:
            raise ValueError(f"{kind} providers read no JWT: remove {', '.join(jwt_only)}")
        if self.api_keys is not None:
            jwt_checks = [
                to_camel(f) for f in ("audiences", "required_claims", "ca_file") if getattr(self, f)
            ]
            if jwt_checks:
                raise ValueError(
                    f"an apiKeys provider checks no {', '.join(jwt_checks)}: a key's claims "
                    "come from the keys file"
                )
        return self

    def locations(self) -> tuple[tuple[str, str, str], ...]:
        """Where this provider reads its credential: (kind, name, prefix), header names in
        lower case; Istio's defaults when none is given."""
        if not (self.from_headers or self.from_params or self.from_cookies):
            return (("header", "authorization", "Bearer "), ("param", "access_token", ""))
        return (
            *(("header", h.name.lower(), h.prefix) for h in self.from_headers),
            *(("param", p, "") for p in self.from_params),
            *(("cookie", c, "") for c in self.from_cookies),
        )


# ------------------------------------------------------------------------------ policies

WHEN_KEYS_EXACT = frozenset(
    {
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "source.ip",
        "remote.ip",
        "source.principal",
        "source.namespace",
        "destination.ip",
        "destination.port",
        "connection.sni",
    }
)
_WHEN_KEY_INDEXED = re.compile(
    r"^(?:request\.auth\.claims(?:\[[^\[\]]+\])+|request\.headers\[[^\[\]]+\]"
    r"|request\.context_extensions\[[^\[\]]+\])$"
)


def _every_value(
    values: list[str] | None, problem: Callable[[str], str | None]
) -> list[str] | None:
    """Check each value with ``problem`` (None when fine); raise one error naming every bad
    value, so a list with several mistakes is reported whole, not one fix at a time."""
    found = [p for p in map(problem, values or []) if p is not None]
    if found:
        raise ValueError("; ".join(found))
    return values


def _cidr_problem(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"{value!r} is not an IP address or CIDR block"
    return None


def _service_account_problem(value: str) -> str | None:
    namespace, slash, name = value.partition("/")
    if "*" in value:
        return f"{value!r}: wildcards are not allowed in service accounts"
    if not (slash and namespace and name) or "/" in name:
        return (
            f"{value!r} is not namespace/serviceAccount (a bare name takes the namespace "
            "of an AuthorizationPolicy's metadata.namespace)"
        )
    return None


def _path_template_problem(value: str) -> str | None:
    """Istio's rules: ``{*}`` and ``{**}`` are whole segments; ``{**}`` is the last operator."""
    if "{" not in value and "}" not in value:
        return None
    seen_rest = False
    for segment in value.strip("/").split("/"):
        if segment in ("{*}", "{**}"):
            if seen_rest:
                return f"{value!r}: {{**}} must be the last operator of a path template"
            seen_rest = segment == "{**}"
        elif "{" in segment or "}" in segment:
            return f"{value!r}: a path template operator must be a whole segment, {{*}} or {{**}}"
    return None


def _port_problem(value: str) -> str | None:
    if not (value.isdigit() and 0 < int(value) < 65536):
        return f"{value!r} is not a port number (1-65535)"
    return None


def _check_cidrs(values: list[str] | None) -> list[str] | None:
    return _every_value(values, _cidr_problem)


def _check_service_accounts(values: list[str] | None) -> list[str] | None:
    return _every_value(values, _service_account_problem)


def _check_path_templates(values: list[str] | None) -> list[str] | None:
    return _every_value(values, _path_template_problem)


def _check_ports(values: list[str] | None) -> list[str] | None:
    return _every_value(values, _port_problem)


StrList = list[Annotated[str, Field(min_length=1)]] | None


class Source(_Model):
    principals: StrList = None
    not_principals: StrList = None
    request_principals: StrList = None
    not_request_principals: StrList = None
    namespaces: StrList = None
    not_namespaces: StrList = None
    service_accounts: StrList = None
    not_service_accounts: StrList = None
    trust_domains: StrList = None
    not_trust_domains: StrList = None
    ip_blocks: StrList = None
    not_ip_blocks: StrList = None
    remote_ip_blocks: StrList = None
    not_remote_ip_blocks: StrList = None

    _cidrs = field_validator(
        "ip_blocks", "not_ip_blocks", "remote_ip_blocks", "not_remote_ip_blocks"
    )(_check_cidrs)
    _service_accounts = field_validator("service_accounts", "not_service_accounts")(
        _check_service_accounts
    )

    @model_validator(mode="after")
    def _shape(self) -> Source:
        if not any(getattr(self, f) for f in type(self).model_fields):
            raise ValueError("`source` must not be empty")
        if (self.service_accounts or self.not_service_accounts) and (
            self.principals or self.not_principals or self.namespaces or self.not_namespaces
        ):
            raise ValueError("cannot set serviceAccounts with namespaces or principals")
        return self


class Operation(_Model):
    hosts: StrList = None
    not_hosts: StrList = None
    ports: StrList = None
    not_ports: StrList = None
    methods: StrList = None
    not_methods: StrList = None
    paths: StrList = None
    not_paths: StrList = None

    _ports = field_validator("ports", "not_ports")(_check_ports)
    _paths = field_validator("paths", "not_paths")(_check_path_templates)

    @model_validator(mode="after")
    def _not_empty(self) -> Operation:
        if not any(getattr(self, f) for f in type(self).model_fields):
            raise ValueError("`operation` must not be empty")
        return self


class Condition(_Model):
    key: str
    values: StrList = None
    not_values: StrList = None

    @field_validator("key")
    @classmethod
    def _known_key(cls, key: str) -> str:
        if key in WHEN_KEYS_EXACT or _WHEN_KEY_INDEXED.match(key):
            return key
        raise ValueError(
            f"unknown key {key!r}; supported: {', '.join(sorted(WHEN_KEYS_EXACT))}, "
            "request.auth.claims[name][...], request.headers[name], "
            "request.context_extensions[name]"
        )

    @field_validator("values", "not_values")
    @classmethod
    def _typed_values(cls, values: list[str] | None, info: ValidationInfo) -> list[str] | None:
        key = info.data.get("key")
        if key in ("source.ip", "remote.ip", "destination.ip"):
            return _check_cidrs(values)
        if key == "destination.port":
            return _check_ports(values)
        return values

    @model_validator(mode="after")
    def _has_values(self) -> Condition:
        if not self.values and not self.not_values:
            raise ValueError("at least one of values or notValues must be set")
        return self


class RuleFrom(_Model):
    source: Source


class RuleTo(_Model):
    operation: Operation


class Rule(_Model):
    from_: list[RuleFrom] | None = Field(default=None, alias="from")
    to: list[RuleTo] | None = None
    when: list[Condition] | None = None


CUSTOM_REFUSED = (
    "CUSTOM delegates to an external authorizer, which is authz-server itself; "
    "give authz-server the ALLOW/DENY/AUDIT policies to enforce instead"
)


class AppliesToSpec(_Model):
    """Where a native policy applies once workloads are declared: the workloads named, those
    of the namespaces listed, those recognised by one of the hosts, those whose context
    extensions include these."""

    workloads: list[Annotated[str, Field(min_length=1)]] = []
    namespaces: list[Annotated[str, Field(min_length=1)]] = []
    hosts: list[Annotated[str, Field(min_length=1)]] = []
    context_extensions: dict[str, str] = {}

    @model_validator(mode="after")
    def _selects_something(self) -> AppliesToSpec:
        if not (self.workloads or self.namespaces or self.hosts or self.context_extensions):
            raise ValueError(
                "selects nothing: list workloads, namespaces, hosts or contextExtensions "
                "(leave appliesTo out to apply everywhere)"
            )
        return self


class PolicySpec(_Model):
    """One policy; ``rules`` is exactly Istio's ``AuthorizationPolicy.spec.rules``."""

    name: str = Field(min_length=1)
    action: Literal["ALLOW", "DENY", "AUDIT"] = "ALLOW"
    dry_run: bool = False
    rules: list[Rule] | None = None
    applies_to: AppliesToSpec | None = None

    @field_validator("action", mode="before")
    @classmethod
    def _not_custom(cls, value: object) -> object:
        if value == "CUSTOM":
            raise ValueError(CUSTOM_REFUSED)
        return value


# -------------------------------------------------------------------------------- server


class DecisionLogSpec(_Model):
    """One JSON line per decision (logger ``authz_server.decision``)."""

    enabled: bool = True
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    deny_only: bool = False
    # Claims to copy into each line; none by default (claims can be personal data).
    claims: list[Annotated[str, Field(min_length=1)]] = []
    level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"


class TokenCacheSpec(_Model):
    """The verified-token cache: entries live until the token's `exp`, at most `maxTtl`."""

    max_entries: int = Field(default=10_000, ge=0, le=10_000_000)  # 0 turns the cache off
    max_ttl: Duration = 3600.0


class DecisionMemoSpec(_Model):
    """Repeated requests answered from a memo of decisions (see ``decision_memo``)."""

    max_entries: int = Field(default=4096, ge=0, le=10_000_000)  # 0 turns the memo off


def listen_address_problem(address: str) -> str | None:
    """What is wrong with ``address`` as a place to listen (``host:port``, ``[v6]:port`` or
    ``unix:/path``), or None when it is fine. Checked here so that a mistake gets a sentence
    that says what to write, not gRPC's C-core line ("Failed to bind to address")."""
    if address.startswith("unix:"):
        return None if address.removeprefix("unix:") else "unix: needs a path (unix:/run/x.sock)"
    host, sep, port = address.rpartition(":")
    if not sep:
        return f"{address!r}: expected host:port or unix:/path (e.g. 0.0.0.0:{address or 9001})"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"{address!r}: the port must be a number from 0 to 65535"
    if not host:
        return (
            f"{address!r}: no host: write 0.0.0.0:{port} (every interface) or "
            f"127.0.0.1:{port} (this machine only)"
        )
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{address!r}: {host} is not an IPv6 address"
        return None
    if ":" in host:
        return f"{address!r}: an IPv6 host goes in brackets: [{host}]:{port}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", host):
        return f"{address!r}: {host!r} is not a host name or an IP address"
    return None


def _listen_address(value: str) -> str:
    if (problem := listen_address_problem(value)) is not None:
        raise ValueError(problem)
    return value


ListenAddress = Annotated[str, AfterValidator(_listen_address)]


class HttpAuthzSpec(_Model):
    """The HTTP door: Envoy's ``http_service`` ext_authz protocol (Istio's
    ``envoyExtAuthzHttp``), beside the gRPC door, on the same decision core."""

    # host:port or unix:/path; absent = the door is closed (the default).
    listen: ListenAddress | None = None
    # Envoy's `http_service.path_prefix`: removed from the path before deciding.
    path_prefix: str = Field(default="", pattern=r"^(/[^?#\s]*)?$")
    # Oversized requests: 414 (request target), 431 (headers), 413 (body).
    max_request_line_bytes: int = Field(default=8192, ge=256, le=1 << 20)
    max_header_bytes: int = Field(default=65536, ge=1024, le=1 << 24)
    max_headers: int = Field(default=100, ge=8, le=10_000)
    max_body_bytes: int = Field(default=65536, ge=0, le=1 << 26)
    # A request must arrive whole within this (a slow client gets 408 and is closed).
    request_timeout: Duration = 10.0
    # An idle keep-alive connection is closed after this; keep Envoy's cluster idle_timeout
    # below it so Envoy, not us, closes idle connections.
    idle_timeout: Duration = 300.0
    max_connections: int = Field(default=10_000, ge=1, le=1_000_000)
    # Read the client's address, its mTLS identity (URI SAN), the SNI and the destination
    # address and port from the x-authz-* headers Envoy adds (doors/envoy_headers.py); off,
    # policies on them fail closed through this door. Turn it on only with an Envoy that adds
    # them (`authz-server envoy-config`, Istio's includeAdditionalHeadersInCheck).
    attribute_headers: bool = False

    @field_validator("path_prefix")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        if value.endswith("/"):
            raise ValueError("no trailing '/': Envoy appends the original path, which has one")
        return value


class ExplainSpec(_Model):
    """The Explain API (``authz_server.v1.Explain``): why a request would be allowed or denied,
    rule by rule. Off by default: its answers reveal the structure of the policies."""

    enabled: bool = False
    # host:port or unix:/path: its own gRPC server there; absent = on the gRPC port (`listen`).
    listen: ListenAddress | None = None


class TracingSpec(_Model):
    """OpenTelemetry tracing: one span per Check. Off by default; everything else (exporter
    endpoint, protocol, sampler, service name) comes from the standard OTEL_* environment
    variables. Read at start: a reload does not turn it on or off."""

    enabled: bool = False


class TlsSpec(_Model):
    """TLS on the gRPC listener. Paths are relative to the configuration file; the files are
    read again when they change (certificate rotation), so no restart is needed."""

    # PEM: the server's certificate (then any intermediates), and its private key.
    cert_file: str = Field(min_length=1)
    key_file: str = Field(min_length=1)
    # PEM bundle of CAs; set = mTLS: a client certificate signed by one of them is required.
    client_ca_file: str | None = Field(default=None, min_length=1)

    def files(self) -> TlsFiles:
        """The paths as given (``load`` makes them absolute)."""
        return TlsFiles(
            Path(self.cert_file),
            Path(self.key_file),
            Path(self.client_ca_file) if self.client_ca_file is not None else None,
        )


class GrpcLimitsSpec(_Model):
    """Limits of the gRPC listener; a request past one gets a gRPC error, never a crash."""

    # A CheckRequest larger than this is refused with RESOURCE_EXHAUSTED (grpcio's own default,
    # 4 MiB). At least 64 KiB: a request carrying Envoy's largest header block (60 KiB by
    # default) must fit, and more where Envoy forwards request bodies.
    max_receive_message_bytes: int = Field(default=4 << 20, ge=64 << 10, le=1 << 30)
    # HTTP/2 streams (Checks in flight) one connection may open; a client that opens more has
    # them refused (REFUSED_STREAM), Envoy waits or opens another connection. None: no limit.
    max_concurrent_streams: int | None = Field(default=None, ge=1, le=(1 << 31) - 1)
    # Request metadata (the gRPC call's own HTTP/2 headers, not the HTTP headers inside the
    # CheckRequest) larger than this is refused with RESOURCE_EXHAUSTED, always. grpcio's
    # default refuses at random between 8 and 16 KiB; Envoy sends a few hundred bytes.
    max_metadata_bytes: int = Field(default=8 << 10, ge=1 << 10, le=1 << 24)


class RedisSpec(_Model):
    """The Redis a replay cache shares between processes and replicas."""

    url: str = Field(pattern=r"^(rediss?|unix)://")
    username: str | None = Field(default=None, min_length=1)
    password_file: str | None = Field(default=None, min_length=1)
    key_prefix: str = Field(default="authz-server:dpop:", max_length=128)
    timeout: Duration = 0.25
    ca_file: str | None = Field(default=None, min_length=1)

    @field_validator("timeout")
    @classmethod
    def _bounded_timeout(cls, value: float) -> float:
        if not 0.001 <= value <= 5.0:
            raise ValueError("must be between 1ms and 5s: every DPoP request waits for it")
        return value


class ReplayCacheSpec(_Model):
    """Where DPoP proofs' ``jti`` are remembered: in process (default; one process only) or
    in a Redis every process and replica shares."""

    max_entries: int = Field(default=100_000, ge=100, le=10_000_000)
    redis: RedisSpec | None = None


class ServerSpec(_Model):
    listen: ListenAddress = "0.0.0.0:9001"
    # The side port: /metrics, /healthz, /readyz (not the HTTP door, `httpAuthz.listen`).
    metrics_listen: ListenAddress = "0.0.0.0:9090"
    # Deprecated alias of `metricsListen` (its name was mistaken for the HTTP door's):
    # accepted with a warning, moved into `metrics_listen` by the validator below.
    http_listen: ListenAddress | None = None
    http_authz: HttpAuthzSpec = Field(default_factory=HttpAuthzSpec)
    # Absent: the gRPC listener is plaintext (behind a mesh sidecar, or on a Unix socket).
    tls: TlsSpec | None = None
    grpc: GrpcLimitsSpec = Field(default_factory=GrpcLimitsSpec)
    # Measured (bench/results/grpc_edge.md): more threads buy nothing under the GIL; 8 leaves room
    # for Checks that wait on I/O (a JWKS refresh) without queueing the rest.
    threads: int = Field(default=8, ge=1, le=1024)
    realm: str = Field(default="authz-server", pattern=r'^[^"\\\r\n]*$')
    # Istio answers 403 to an anonymous request no policy allows; 401 tells the client to log in.
    missing_token_status: Literal[401, 403] = 401
    # How many proxies in front of Envoy append to X-Forwarded-For (Envoy's xff_num_trusted_hops).
    trusted_proxy_hops: int = Field(default=0, ge=0, le=16)
    # On SIGTERM: report NOT_SERVING (health, /readyz) and keep answering for `drainDelay`
    # while load balancers take us out, then refuse new Checks and give in-flight ones
    # `shutdownGrace` to finish.
    drain_delay: Duration = 0.0
    shutdown_grace: Duration = 5.0
    # Tokens longer than this are refused before any decoding.
    max_token_bytes: int = Field(default=8192, ge=256, le=1 << 20)
    # How long a Check with an unknown `kid` waits for the key set refresh it triggers. Keep it
    # below Envoy's ext_authz timeout (1s in our bootstrap), or Envoy answers first.
    unknown_kid_wait: Duration = 0.5
    token_cache: TokenCacheSpec = Field(default_factory=TokenCacheSpec)
    decision_memo: DecisionMemoSpec = Field(default_factory=DecisionMemoSpec)
    decision_log: DecisionLogSpec = Field(default_factory=DecisionLogSpec)
    # A configuration with no provider and no policy allows every request. That is what a
    # truncated file or an empty ConfigMap looks like, so it is refused unless this says the
    # emptiness is meant.
    allow_empty: bool = False
    explain: ExplainSpec = Field(default_factory=ExplainSpec)
    tracing: TracingSpec = Field(default_factory=TracingSpec)
    replay_cache: ReplayCacheSpec = Field(default_factory=ReplayCacheSpec)
    # Read the client certificate of a certificate-bound token from X-Forwarded-Client-Cert
    # (Hash= or Cert=) when Envoy's CheckRequest has none: only when every hop in front of
    # Envoy sets (or strips) that header, since a client could send it otherwise.
    trust_forwarded_client_cert: bool = False

    @model_validator(mode="before")
    @classmethod
    def _deprecated_http_listen(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        old = next((data[k] for k in ("httpListen", "http_listen") if k in data), None)
        if old is None:
            return data
        if "metricsListen" in data or "metrics_listen" in data:
            raise ValueError(
                "httpListen is the deprecated name of metricsListen: set only metricsListen"
            )
        return {**data, "metricsListen": old}

    @field_validator("unknown_kid_wait")
    @classmethod
    def _bounded_wait(cls, value: float) -> float:
        if value > 10.0:
            raise ValueError("at most 10s: Envoy's own ext_authz timeout is usually shorter")
        return value


# ------------------------------------------------------------------------------ scoping


# A workload's host: a name (or `*.` and a suffix), then optionally `:port` or `:*`. Anything
# else (`api.*`, `*`, `foo*`) could never be matched as written: refused rather than inert.
WORKLOAD_HOST = r"(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?(:([0-9]{1,5}|\*))?"


class WorkloadSpec(_Model):
    """A workload this server guards, and how its requests are recognised."""

    name: str = Field(min_length=1)
    namespace: str = Field(default="default", min_length=1)
    labels: dict[str, str] = {}
    # A request is this workload's when any one of these recognises it: every listed
    # key/value among the request's context extensions, its destination principal, its host.
    context_extensions: dict[str, str] = {}
    destination_principals: list[Annotated[str, Field(min_length=1)]] = []
    # `host`, `host:port`, `host:*` (any port), or `*.suffix` (with or without a port).
    hosts: list[Annotated[str, Field(min_length=1)]] = []
    # The Gateway and Service names an Istio policy's targetRefs can point at.
    gateway_refs: list[Annotated[str, Field(min_length=1)]] = []
    service_refs: list[Annotated[str, Field(min_length=1)]] = []

    @field_validator("hosts")
    @classmethod
    def _hosts_that_can_match(cls, hosts: list[str]) -> list[str]:
        wrong = [h for h in hosts if not re.fullmatch(WORKLOAD_HOST, h)]
        if wrong:
            raise ValueError(
                f"{', '.join(repr(h) for h in wrong)}: a host is a name, `*.` and a suffix, "
                "or either with `:port` or `:*` (any port)"
            )
        return hosts

    def workload(self) -> Workload:
        return Workload(
            name=self.name,
            namespace=self.namespace,
            labels=dict(self.labels),
            context_extensions=dict(self.context_extensions),
            destination_principals=tuple(self.destination_principals),
            hosts=tuple(self.hosts),
            gateway_refs=tuple(self.gateway_refs),
            service_refs=tuple(self.service_refs),
        )


class ScopingSpec(_Model):
    # A request no declared workload recognises: 403 `unknown_workload` (fail closed), or
    # decided with every policy and provider, as without workloads.
    unknown_workload: Literal["deny", "allPolicies"] = "deny"


class IstioSpec(_Model):
    # Istio's root namespace: a policy there applies to every namespace.
    root_namespace: str = Field(default=DEFAULT_ROOT_NAMESPACE, min_length=1)


class AuthzConfigDoc(_Model):
    api_version: Literal["authz-server/v1"]
    kind: Literal["AuthzConfig"]
    metadata: dict[str, Any] | None = None
    server: ServerSpec | None = None
    providers: list[ProviderSpec] = []
    policies: list[PolicySpec] = []
    workloads: list[WorkloadSpec] = []
    scoping: ScopingSpec | None = None
    istio: IstioSpec | None = None


# ---------------------------------------------------------------------------- documents


@dataclass
class Document:
    """One document of the configuration stream: where it came from, as parsed YAML."""

    label: str  # "file#index (kind/name)", naming the document in every problem
    base_dir: Path  # relative file paths in the document are read from here
    body: dict[str, Any]


# A provider found in a document: (spec, document label, field path of the spec, base dir).
FoundProvider = tuple[ProviderSpec, str, str, Path]


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or part.startswith(
            ("function-", "list[", "nullable", "literal[")
        ):
            continue
        else:
            out += f".{part}" if out else part
    return out


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The models an annotation holds: itself, or inside Optional, list, dict, Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def _field_names(model: type[BaseModel]) -> dict[str, str]:
    """Every spelling a field of ``model`` accepts (alias and Python name) -> its alias."""
    names: dict[str, str] = {}
    for name, info in model.model_fields.items():
        alias = info.alias or name
        names[name] = names[alias] = alias
    return names


def known_fields(model: type[BaseModel], loc: Sequence[int | str]) -> list[str] | None:
    """The field names of the model at ``loc`` under ``model`` (list indexes and dict keys
    skipped), or None when the path leaves the models."""
    candidates = [model]
    for part in loc:
        if isinstance(part, int) or not candidates:
            continue
        following = [
            found
            for current in candidates
            if (alias := _field_names(current).get(part)) is not None
            for name, info in current.model_fields.items()
            if (info.alias or name) == alias
            for found in _models_in(info.annotation)
        ]
        if following:
            candidates = following
    return sorted(set(_field_names(candidates[0]).values())) if candidates else None


def _models_by_title() -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    pending: list[type[BaseModel]] = [_Model]
    while pending:
        model = pending.pop()
        found.setdefault(model.__name__, model)
        pending.extend(model.__subclasses__())
    return found


def _unknown_field(err: Any, model: type[BaseModel] | None) -> str:
    """ "unknown field", with the closest known field when one is close (as `test` says it)."""
    loc = tuple(err["loc"])
    known = known_fields(model, loc[:-1]) if model is not None and loc else None
    if not known or not isinstance(loc[-1], str):
        return "unknown field"
    close = difflib.get_close_matches(loc[-1], known, n=1)
    return f"unknown field (did you mean {close[0]!r}?)" if close else "unknown field"


def problems_from(exc: ValidationError, document: str, prefix: str) -> list[ConfigProblem]:
    """One ConfigProblem per error of ``exc``, its field path under ``prefix`` in ``document``;
    an unknown field says which known one it is closest to."""
    problems = []
    model = _models_by_title().get(exc.title)
    for err in exc.errors():
        path = _loc(tuple(err["loc"]))
        full = f"{prefix}.{path}" if prefix and path else (prefix or path)
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = _unknown_field(err, model)
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        problems.append(ConfigProblem(document, full, message))
    return problems
