"""Configuration: one YAML stream (a file, or a directory of ``*.yaml``) mixing three kinds.

- ``kind: AuthzConfig`` (``apiVersion: authz-server/v1``): ``server``, ``providers``, ``policies``,
  and ``workloads`` with ``scoping`` and ``istio`` (see ``workloads``: which policies apply where).
- ``kind: RequestAuthentication`` (``security.istio.io/v1`` or ``v1beta1``): each ``jwtRules``
  entry becomes a provider.
- ``kind: AuthorizationPolicy`` (``security.istio.io/v1`` or ``v1beta1``): becomes a policy.

``load(path)`` returns ``Settings`` or raises ``ConfigError`` listing every problem with its
document, field path and reason. Nothing here touches the network.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import re
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
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

from authz_server.errors import ConfigError, ConfigProblem
from authz_server.tls import TlsFileError, TlsFiles, read_material
from authz_server.workloads import (
    DEFAULT_ROOT_NAMESPACE,
    IstioScope,
    NativeScope,
    TargetRef,
    Workload,
    istio_selection,
    native_selection,
    workload_problems,
)

Algorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
    "HS256", "HS384", "HS512",
]  # fmt: skip
HMAC_ALGORITHMS: tuple[Algorithm, ...] = ("HS256", "HS384", "HS512")
NATIVE_API_VERSION = "authz-server/v1"
ISTIO_SECURITY_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")

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


class HttpAuthzSpec(_Model):
    """The HTTP door: Envoy's ``http_service`` ext_authz protocol (Istio's
    ``envoyExtAuthzHttp``), beside the gRPC door, on the same decision core."""

    # host:port or unix:/path; absent = the door is closed (the default).
    listen: str | None = None
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
    listen: str | None = None


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


class ServerSpec(_Model):
    listen: str = "0.0.0.0:9001"
    http_listen: str = "0.0.0.0:9090"
    http_authz: HttpAuthzSpec = Field(default_factory=HttpAuthzSpec)
    # Absent: the gRPC listener is plaintext (behind a mesh sidecar, or on a Unix socket).
    tls: TlsSpec | None = None
    grpc: GrpcLimitsSpec = Field(default_factory=GrpcLimitsSpec)
    # Measured (bench/grpc_edge.py): more threads buy nothing under the GIL; 8 leaves room
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
    decision_log: DecisionLogSpec = Field(default_factory=DecisionLogSpec)
    # A configuration with no provider and no policy allows every request. That is what a
    # truncated file or an empty ConfigMap looks like, so it is refused unless this says the
    # emptiness is meant.
    allow_empty: bool = False
    explain: ExplainSpec = Field(default_factory=ExplainSpec)

    @field_validator("unknown_kid_wait")
    @classmethod
    def _bounded_wait(cls, value: float) -> float:
        if value > 10.0:
            raise ValueError("at most 10s: Envoy's own ext_authz timeout is usually shorter")
        return value


# ------------------------------------------------------------------------------ scoping


class WorkloadSpec(_Model):
    """A workload this server guards, and how its requests are recognised."""

    name: str = Field(min_length=1)
    namespace: str = Field(default="default", min_length=1)
    labels: dict[str, str] = {}
    # A request is this workload's when any one of these recognises it: every listed
    # key/value among the request's context extensions, its destination principal, its host.
    context_extensions: dict[str, str] = {}
    destination_principals: list[Annotated[str, Field(min_length=1)]] = []
    hosts: list[Annotated[str, Field(min_length=1)]] = []
    # The Gateway and Service names an Istio policy's targetRefs can point at.
    gateway_refs: list[Annotated[str, Field(min_length=1)]] = []
    service_refs: list[Annotated[str, Field(min_length=1)]] = []

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


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Provider:
    """A provider ready for the verifier: its spec, a unique name and its resolved key source."""

    spec: ProviderSpec
    name: str
    origin: str  # "document: path" of the spec, for error messages and logs
    jwks_file: Path | None = None
    ca_file: Path | None = None
    shared_secret_file: Path | None = None


@dataclass(frozen=True)
class Settings:
    """A fully validated configuration."""

    server: ServerSpec
    providers: tuple[Provider, ...]
    policies: tuple[PolicySpec, ...]
    warnings: tuple[str, ...] = ()
    digest: str = ""
    sources: tuple[str, ...] = field(default_factory=tuple)
    # Scoping (on when workloads are declared): the workloads, and for each policy and
    # provider that does not apply everywhere, the names of the workloads it applies to.
    workloads: tuple[Workload, ...] = ()
    unknown_workload: Literal["deny", "allPolicies"] = "deny"
    policy_scopes: dict[str, frozenset[str]] = field(default_factory=dict)
    provider_scopes: dict[str, frozenset[str]] = field(default_factory=dict)


# ------------------------------------------------------------------------------- loading


@dataclass
class _Doc:
    label: str
    base_dir: Path
    body: dict[str, Any]


def _config_files(path: Path) -> list[Path]:
    if path.is_dir():
        # NOTE: Kubernetes ConfigMap mounts hold `..data`-style hidden entries; skip dotfiles.
        return sorted(
            p
            for p in path.iterdir()
            if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
        )
    return [path]


def _read_documents(path: Path, problems: list[ConfigProblem]) -> Iterator[tuple[_Doc, bytes]]:
    if not path.exists():
        problems.append(ConfigProblem(str(path), "", "no such file or directory"))
        return
    files = _config_files(path)
    if not files:
        problems.append(ConfigProblem(str(path), "", "no *.yaml files in this directory"))
    for file in files:
        raw = file.read_bytes()
        try:
            bodies = list(yaml.safe_load_all(raw))
        except yaml.YAMLError as exc:
            problems.append(ConfigProblem(str(file), "", f"not valid YAML: {exc}"))
            continue
        for index, body in enumerate(bodies):
            if body is None:
                continue
            label = f"{file}#{index}"
            if not isinstance(body, dict):
                problems.append(ConfigProblem(label, "", "a document must be a mapping"))
                continue
            kind = body.get("kind")
            meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
            name = meta.get("name") if isinstance(meta, dict) else None
            label = f"{file}#{index} ({kind}{'/' + str(name) if name else ''})"
            yield _Doc(label, file.parent, body), raw


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


def _problems_from(
    exc: ValidationError, document: str, prefix: str, renames: dict[str, str] | None = None
) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors():
        path = _loc(tuple(err["loc"]))
        for old, new in (renames or {}).items():
            path = path.replace(old, new)
        full = f"{prefix}.{path}" if prefix and path else (prefix or path)
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        problems.append(ConfigProblem(document, full, message))
    return problems


# Mesh YAML often sits next to the policies; these kinds are not about requests.
_MESH_KINDS_IGNORED = frozenset({"PeerAuthentication"})

_ISTIO_JWT_RULE_FIELDS = frozenset(
    {
        "issuer",
        "audiences",
        "jwksUri",
        "jwks_uri",
        "jwks",
        "fromHeaders",
        "fromParams",
        "fromCookies",
        "outputPayloadToHeader",
        "forwardOriginalToken",
        "outputClaimToHeaders",
        "timeout",
        "spaceDelimitedClaims",
        "presence",
    }
)


def _istio_name(body: dict[str, Any]) -> str | None:
    """``namespace/name`` (or ``name``) of an Istio object, None without a usable name."""
    meta = body.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        return None
    namespace = meta.get("namespace")
    return f"{namespace}/{meta['name']}" if namespace else str(meta["name"])


def _istio_meta(doc: _Doc, problems: list[ConfigProblem], warnings: list[str]) -> str | None:
    """Check the envelope of an Istio object; return its ``namespace/name`` or None if unusable."""
    body = doc.body
    meta = body.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        problems.append(ConfigProblem(doc.label, "metadata.name", "required"))
        return None
    if "spec" not in body:
        problems.append(ConfigProblem(doc.label, "spec", "required"))
        return None
    spec = body["spec"]
    if spec is None:
        spec = {}
        body["spec"] = spec
    if not isinstance(spec, dict):
        problems.append(ConfigProblem(doc.label, "spec", "must be a mapping"))
        return None
    extra = set(body) - {"apiVersion", "kind", "metadata", "spec", "status"}
    for key in sorted(extra):
        problems.append(ConfigProblem(doc.label, key, "unknown field"))
    return _istio_name(body)


# A provider found in a document: (spec, document label, field path of the spec, base dir).
_FoundProvider = tuple[ProviderSpec, str, str, Path]
_SCOPE_FIELDS = ("selector", "targetRef", "targetRefs")


def _istio_scope(doc: _Doc, problems: list[ConfigProblem]) -> IstioScope:
    """Where an Istio object applies: its namespace, ``selector.matchLabels``, target refs."""
    meta, spec = doc.body["metadata"], doc.body["spec"]
    namespace = meta.get("namespace")
    match_labels: dict[str, str] | None = None
    selector = spec.get("selector")
    if selector is not None:
        labels = selector.get("matchLabels") if isinstance(selector, dict) else None
        if (
            not isinstance(selector, dict)
            or set(selector) - {"matchLabels"}
            or not isinstance(labels, dict | None)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in (labels or {}).items())
        ):
            problems.append(
                ConfigProblem(doc.label, "spec.selector", "expected {matchLabels: {label: value}}")
            )
        elif labels:
            match_labels = dict(labels)
    raw_refs: list[tuple[str, object]] = []
    if "targetRef" in spec:
        raw_refs.append(("spec.targetRef", spec["targetRef"]))
    if "targetRefs" in spec:
        listed = spec["targetRefs"]
        if isinstance(listed, list):
            raw_refs.extend((f"spec.targetRefs[{i}]", ref) for i, ref in enumerate(listed))
        else:
            problems.append(ConfigProblem(doc.label, "spec.targetRefs", "must be a list"))
    refs: list[TargetRef] = []
    for path, ref in raw_refs:
        if (
            not isinstance(ref, dict)
            or not isinstance(ref.get("kind"), str)
            or not isinstance(ref.get("name"), str)
            or not isinstance(ref.get("namespace", ""), str)
        ):
            problems.append(ConfigProblem(doc.label, path, "expected {kind, name[, namespace]}"))
            continue
        refs.append(TargetRef(ref["kind"], ref["name"], ref.get("namespace") or None))
    return IstioScope(
        namespace if isinstance(namespace, str) and namespace else None, match_labels, tuple(refs)
    )


def _request_authentication(
    doc: _Doc, problems: list[ConfigProblem], warnings: list[str]
) -> list[_FoundProvider]:
    if _istio_meta(doc, problems, warnings) is None:
        return []
    spec = doc.body["spec"]
    for key in sorted(set(spec) - {"jwtRules", "selector", "targetRef", "targetRefs"}):
        problems.append(ConfigProblem(doc.label, f"spec.{key}", "unknown field"))
    rules = spec.get("jwtRules") or []
    if not isinstance(rules, list):
        problems.append(ConfigProblem(doc.label, "spec.jwtRules", "must be a list"))
        return []
    out = []
    for i, rule in enumerate(rules):
        prefix = f"spec.jwtRules[{i}]"
        if not isinstance(rule, dict):
            problems.append(ConfigProblem(doc.label, prefix, "must be a mapping"))
            continue
        unknown = sorted(set(rule) - _ISTIO_JWT_RULE_FIELDS)
        for key in unknown:
            problems.append(ConfigProblem(doc.label, f"{prefix}.{key}", "unknown field"))
        if unknown:
            continue
        fields = dict(rule)
        if "jwks_uri" in fields:
            if "jwksUri" in fields:
                problems.append(
                    ConfigProblem(doc.label, prefix, "only one of jwks_uri or jwksUri can be set")
                )
                continue
            fields["jwksUri"] = fields.pop("jwks_uri")
        if "jwksUri" not in fields and "jwks" not in fields:
            fields["discovery"] = True  # Istio finds the keys through OIDC discovery
        try:
            out.append((ProviderSpec.model_validate(fields), doc.label, prefix, doc.base_dir))
        except ValidationError as exc:
            problems.extend(_problems_from(exc, doc.label, prefix))
    return out


def _authorization_policy(
    doc: _Doc, problems: list[ConfigProblem], warnings: list[str]
) -> PolicySpec | None:
    name = _istio_meta(doc, problems, warnings)
    if name is None:
        return None
    spec = dict(doc.body["spec"])
    if spec.get("action") == "CUSTOM" or "provider" in spec:
        problems.append(ConfigProblem(doc.label, "spec.action", CUSTOM_REFUSED))
        return None
    for scope_field in _SCOPE_FIELDS:
        spec.pop(scope_field, None)
    # NOTE: name and dry run come from metadata, the scope from namespace and selector;
    # PolicySpec would also take them from spec.
    for key in sorted(set(spec) & {"name", "dryRun", "dry_run", "appliesTo", "applies_to"}):
        problems.append(ConfigProblem(doc.label, f"spec.{key}", "unknown field"))
        spec.pop(key)
    meta = doc.body["metadata"]
    annotations = meta.get("annotations")
    if not isinstance(annotations, dict):
        annotations = {}
    dry_run = str(annotations.get("istio.io/dry-run", "false")).lower() == "true"
    namespace = meta.get("namespace")
    if isinstance(namespace, str) and namespace:
        _qualify_service_accounts(spec, namespace)
    try:
        return PolicySpec.model_validate({"name": name, "dryRun": dry_run, **spec})
    except ValidationError as exc:
        problems.extend(_problems_from(exc, doc.label, "spec"))
        return None


def _qualify_service_accounts(spec: dict[str, Any], namespace: str) -> None:
    """Istio reads a bare service account name as one in the policy's own namespace."""
    rules = spec.get("rules")
    if not isinstance(rules, list):
        return
    spec["rules"] = rules = copy.deepcopy(rules)  # leave the document as it was read
    for rule in rules:
        froms = rule.get("from") if isinstance(rule, dict) else None
        for entry in froms if isinstance(froms, list) else []:
            source = entry.get("source") if isinstance(entry, dict) else None
            if not isinstance(source, dict):
                continue
            for key in ("serviceAccounts", "notServiceAccounts"):
                values = source.get(key)
                if isinstance(values, list):
                    source[key] = [
                        f"{namespace}/{v}" if isinstance(v, str) and v and "/" not in v else v
                        for v in values
                    ]


def _resolve_file(
    value: str | None,
    *,
    field_name: str,
    document: str,
    prefix: str,
    base_dir: Path,
    problems: list[ConfigProblem],
) -> tuple[Path | None, bool]:
    if value is None:
        return None, True
    path = Path(value)
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        problems.append(ConfigProblem(document, f"{prefix}.{field_name}", f"no such file: {path}"))
        return None, False
    return path, True


def _resolve_provider(
    spec: ProviderSpec, document: str, prefix: str, base_dir: Path, problems: list[ConfigProblem]
) -> tuple[dict[str, Path | None], bool]:
    """Check the provider's local files and inline keys; return (resolved paths, ok)."""
    ok = True
    if spec.jwks is not None:
        try:
            parsed = json.loads(spec.jwks)
        except json.JSONDecodeError as exc:
            problems.append(ConfigProblem(document, f"{prefix}.jwks", f"not valid JSON: {exc}"))
            ok = False
        else:
            if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
                problems.append(
                    ConfigProblem(
                        document, f"{prefix}.jwks", 'must be a JSON object {"keys": [...]}'
                    )
                )
                ok = False
            elif not parsed["keys"]:
                problems.append(
                    ConfigProblem(
                        document,
                        f"{prefix}.jwks",
                        "holds no keys: this provider could never verify a token "
                        "(and the server would never be ready)",
                    )
                )
                ok = False
    paths: dict[str, Path | None] = {}
    for attr, field_name in (
        ("jwks_file", "jwksFile"),
        ("ca_file", "caFile"),
        ("shared_secret_file", "sharedSecretFile"),
    ):
        paths[attr], found = _resolve_file(
            getattr(spec, attr),
            field_name=field_name,
            document=document,
            prefix=prefix,
            base_dir=base_dir,
            problems=problems,
        )
        ok = ok and found
    ca_file = paths["ca_file"]
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (ssl.SSLError, OSError) as exc:
            problems.append(
                ConfigProblem(document, f"{prefix}.caFile", f"not a usable CA bundle: {exc}")
            )
            ok = False
    secret = paths["shared_secret_file"]
    if secret is not None and len(secret.read_bytes().strip()) < 32:
        problems.append(
            ConfigProblem(
                document,
                f"{prefix}.sharedSecretFile",
                "the secret must be at least 32 bytes (RFC 7518 3.2)",
            )
        )
        ok = False
    return paths, ok


# TlsFiles attribute -> the field's name in the configuration.
_TLS_FIELDS = {"cert_file": "certFile", "key_file": "keyFile", "client_ca_file": "clientCaFile"}


def _resolve_server_tls(server: ServerSpec, doc: _Doc, problems: list[ConfigProblem]) -> ServerSpec:
    """``server`` with its TLS file paths made absolute (relative ones are read from the
    document's directory), after checking that the files hold a usable certificate, key and CA
    bundle; each problem names its field."""
    if server.tls is None:
        return server
    absolute = {
        attr: str((doc.base_dir / value).absolute())
        for attr in _TLS_FIELDS
        if (value := getattr(server.tls, attr)) is not None
    }
    tls = server.tls.model_copy(update=absolute)
    try:
        read_material(tls.files())
    except TlsFileError as exc:
        problems.extend(
            ConfigProblem(doc.label, f"server.tls.{_TLS_FIELDS[attr]}", message)
            for attr, message in exc.problems
        )
    return server.model_copy(update={"tls": tls})


_Item = TypeVar("_Item", bound=BaseModel)


def _valid_items(raw: object, model: type[_Item]) -> Iterator[tuple[int, _Item]]:
    """(index, item) for each entry of the list ``raw`` that ``model`` accepts."""
    for index, entry in enumerate(raw if isinstance(raw, list) else []):
        try:
            yield index, model.model_validate(entry)
        except ValidationError:
            continue


def load(path: str | Path) -> Settings:
    """Read, validate and resolve the configuration at ``path`` (file or directory).

    Returns Settings. Raises ConfigError listing every problem found.
    """
    root = Path(path)
    problems: list[ConfigProblem] = []
    warnings: list[str] = []
    server: ServerSpec | None = None
    providers: list[_FoundProvider] = []
    policies: list[PolicySpec] = []
    # (name, document label, field path of the name) of every policy, valid or not, so that a
    # duplicate name is reported together with the other problems.
    policy_names: list[tuple[str, str, str]] = []
    # Scoping: the declared workloads (spec, document, field path), where each Istio policy
    # and provider says it applies, each native policy's appliesTo.
    workload_specs: list[tuple[WorkloadSpec, str, str]] = []
    scoping_spec: ScopingSpec | None = None
    istio_spec: IstioSpec | None = None
    istio_policy_scopes: dict[str, tuple[IstioScope, str]] = {}
    istio_provider_scopes: dict[int, tuple[IstioScope, str]] = {}
    native_scopes: dict[str, tuple[NativeScope, str, str]] = {}
    scoped_documents: list[tuple[str, str]] = []  # (document, the scope field it sets)
    digest = hashlib.sha256()
    # NOTE: keyed by id() but holding the bytes, so a freed file's id is never reused.
    seen_raw: dict[int, bytes] = {}

    documents = 0
    for doc, raw in _read_documents(root, problems):
        documents += 1
        if id(raw) not in seen_raw:
            seen_raw[id(raw)] = raw
            digest.update(raw)
        api_version, kind = doc.body.get("apiVersion"), doc.body.get("kind")
        if kind == "AuthzConfig" or api_version == NATIVE_API_VERSION:
            try:
                native = AuthzConfigDoc.model_validate(doc.body)
            except ValidationError as exc:
                problems.extend(_problems_from(exc, doc.label, ""))
                # The valid providers and policies of a broken document still take part in the
                # checks across documents (key files, duplicate names), so that every problem
                # is reported at once.
                providers.extend(
                    (spec, doc.label, f"providers[{i}]", doc.base_dir)
                    for i, spec in _valid_items(doc.body.get("providers"), ProviderSpec)
                )
                raw_policies = doc.body.get("policies")
                policy_names.extend(
                    (entry["name"], doc.label, f"policies[{i}].name")
                    for i, entry in enumerate(
                        raw_policies if isinstance(raw_policies, list) else []
                    )
                    if isinstance(entry, dict) and isinstance(entry.get("name"), str)
                )
                continue
            if native.server is not None:
                if server is not None:
                    problems.append(
                        ConfigProblem(doc.label, "server", "set in more than one document")
                    )
                server = _resolve_server_tls(native.server, doc, problems)
            for key, value in (("scoping", native.scoping), ("istio", native.istio)):
                if value is None:
                    continue
                if (scoping_spec if key == "scoping" else istio_spec) is not None:
                    problems.append(ConfigProblem(doc.label, key, "set in more than one document"))
                if isinstance(value, ScopingSpec):
                    scoping_spec = value
                elif isinstance(value, IstioSpec):
                    istio_spec = value
            workload_specs.extend(
                (w, doc.label, f"workloads[{i}]") for i, w in enumerate(native.workloads)
            )
            for i, scoped in enumerate(native.policies):
                if scoped.applies_to is not None:
                    to = scoped.applies_to
                    native_scopes[scoped.name] = (
                        NativeScope(
                            tuple(to.workloads),
                            tuple(to.namespaces),
                            tuple(to.hosts),
                            dict(to.context_extensions),
                        ),
                        doc.label,
                        f"policies[{i}]",
                    )
            providers.extend(
                (p, doc.label, f"providers[{i}]", doc.base_dir)
                for i, p in enumerate(native.providers)
            )
            policies.extend(native.policies)
            policy_names.extend(
                (p.name, doc.label, f"policies[{i}].name") for i, p in enumerate(native.policies)
            )
        elif kind in ("RequestAuthentication", "AuthorizationPolicy"):
            if api_version not in ISTIO_SECURITY_VERSIONS:
                problems.append(
                    ConfigProblem(
                        doc.label,
                        "apiVersion",
                        f"expected one of {', '.join(ISTIO_SECURITY_VERSIONS)}, "
                        f"got {api_version!r}",
                    )
                )
            elif kind == "RequestAuthentication":
                first = len(providers)
                providers.extend(_request_authentication(doc, problems, warnings))
                if len(providers) > first:
                    scope = _istio_scope(doc, problems)
                    for index in range(first, len(providers)):
                        istio_provider_scopes[index] = (scope, doc.label)
            else:
                policy = _authorization_policy(doc, problems, warnings)
                if policy is not None:
                    policies.append(policy)
                    istio_policy_scopes[policy.name] = (_istio_scope(doc, problems), doc.label)
                name = _istio_name(doc.body)
                if name is not None:
                    policy_names.append((name, doc.label, "metadata.name"))
            spec_body = doc.body.get("spec")
            if isinstance(spec_body, dict):
                scoped_documents.extend(
                    (doc.label, key) for key in _SCOPE_FIELDS if key in spec_body
                )
        elif not isinstance(api_version, str) or not isinstance(kind, str):
            problems.append(
                ConfigProblem(
                    doc.label,
                    "apiVersion" if not isinstance(api_version, str) else "kind",
                    "required: every document needs apiVersion and kind",
                )
            )
        elif kind in _MESH_KINDS_IGNORED and api_version.startswith("security.istio.io/"):
            warnings.append(
                f"{doc.label}: {kind} configures the mesh's mTLS, not requests; ignored"
            )
        elif api_version.startswith(("security.istio.io/", "authz-server/")):
            problems.append(
                ConfigProblem(
                    doc.label,
                    "kind",
                    f"unsupported kind {kind!r}; expected AuthzConfig, RequestAuthentication "
                    "or AuthorizationPolicy",
                )
            )
        else:
            warnings.append(f"{doc.label}: kind {kind!r} ({api_version}) is not ours; ignored")

    resolved: list[Provider] = []
    names: dict[str, int] = {}
    provider_names: dict[int, str] = {}
    for index, (spec, document, prefix, base_dir) in enumerate(providers):
        paths, ok = _resolve_provider(spec, document, prefix, base_dir, problems)
        name = spec.name or spec.issuer
        if name in names:
            if spec.name:
                problems.append(
                    ConfigProblem(document, f"{prefix}.name", f"duplicate provider name {name!r}")
                )
                continue
            names[name] += 1
            name = f"{name}#{names[name]}"
        else:
            names[name] = 1
        provider_names[index] = name
        if ok:
            origin = f"{document}: {prefix}"
            resolved.append(Provider(spec=spec, name=name, origin=origin, **paths))

    seen_names: set[str] = set()
    for name, document, name_path in policy_names:
        if name in seen_names:
            problems.append(ConfigProblem(document, name_path, f"duplicate policy name {name!r}"))
        seen_names.add(name)

    if documents == 0 and not problems:
        problems.append(
            ConfigProblem(
                str(root),
                "",
                "no configuration documents (the file is empty or holds only comments): "
                "refused, since an empty configuration would allow every request",
            )
        )
    elif not providers and not policies and not problems:
        if server is None or not server.allow_empty:
            problems.append(
                ConfigProblem(
                    str(root),
                    "",
                    "no providers and no policies: this configuration would allow every "
                    "request, which is what a truncated file or an empty ConfigMap looks like. "
                    "Set server.allowEmpty: true if allowing everything is meant",
                )
            )
        else:
            warnings.append(
                f"{root}: server.allowEmpty is set and there are no providers and no "
                "policies: every request is allowed"
            )
    workloads = tuple(spec.workload() for spec, _, _ in workload_specs)
    policy_scopes: dict[str, frozenset[str]] = {}
    provider_scopes: dict[str, frozenset[str]] = {}
    if workloads:
        for index, field_name, message in workload_problems(workloads):
            _, document, path = workload_specs[index]
            where = f"{path}.{field_name}" if field_name else path
            problems.append(ConfigProblem(document, where, message))
        root_namespace = (istio_spec or IstioSpec()).root_namespace
        istio_scopes: list[tuple[str, IstioScope, str, dict[str, frozenset[str]]]] = [
            (name, scope, document, policy_scopes)
            for name, (scope, document) in istio_policy_scopes.items()
        ]
        istio_scopes += [
            (provider_names[index], scope, document, provider_scopes)
            for index, (scope, document) in istio_provider_scopes.items()
            if index in provider_names
        ]
        for name, scope, document, into in istio_scopes:
            selected, found = istio_selection(scope, workloads, root_namespace)
            problems.extend(ConfigProblem(document, where, message) for where, message in found)
            if not found and not selected:
                warnings.append(
                    f"{document}: applies to no declared workload (namespace "
                    f"{scope.namespace!r}, selector {dict(scope.match_labels or {})}): inert"
                )
            into[name] = selected
        for name, (native_scope, document, path) in native_scopes.items():
            selected, found = native_selection(native_scope, workloads)
            problems.extend(
                ConfigProblem(document, f"{path}.{where}", message) for where, message in found
            )
            if not found and not selected:
                warnings.append(
                    f"{document}: {path}.appliesTo selects no declared workload: the policy "
                    "applies nowhere"
                )
            policy_scopes[name] = selected
    else:
        for document, key in scoped_documents:
            warnings.append(
                f"{document}: spec.{key} is ignored: no workloads are declared, so every "
                "policy applies to every request (declare workloads to scope policies)"
            )
        for _, document, path in native_scopes.values():
            problems.append(
                ConfigProblem(
                    document,
                    f"{path}.appliesTo",
                    "needs workloads: declare the workloads it selects among (without them "
                    "every policy applies everywhere)",
                )
            )

    if problems:
        raise ConfigError(problems)
    return Settings(
        server=server or ServerSpec(),
        providers=tuple(resolved),
        policies=tuple(policies),
        warnings=tuple(warnings),
        digest=digest.hexdigest()[:16],
        sources=tuple(str(p) for p in _config_files(root)),
        workloads=workloads,
        unknown_workload=(scoping_spec or ScopingSpec()).unknown_workload,
        policy_scopes=policy_scopes,
        provider_scopes=provider_scopes,
    )
