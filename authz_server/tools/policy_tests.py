"""Policy tests: ``authz-server test`` decides each case of a cases file with the configuration's
own engine and compares the decision with what the case expects.

A cases file is YAML: ``groups`` (each a ``name`` and its ``cases``) and/or a flat ``cases``
list. A case is a ``name``, a ``request``, an identity (``claims``, a raw ``token``, or
neither: anonymous), optionally the ``provider`` it is for, and what to ``expect``.

Keys. For a ``claims`` case the runner signs a token with a throwaway key of its own (one per
issuer and algorithm, made in memory, never written), and the providers of that issuer verify
with those keys instead of their configured key source: nothing is fetched for them and no
identity provider is needed. ``token`` and anonymous cases are decided by a second engine
whose providers keep their configured key sources; a provider's keys are loaded (fetched, for
a ``jwksUri``) only when a case's request carries a token naming its issuer. So a raw token
never meets a throwaway key, and a minted one never meets a real key.

Each decision comes from ``explain``: ``AuthorizationService.check`` on an ``Engine`` built
from the configuration as the server builds its own, with the trace of how it was reached.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import yaml
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator
from pydantic import field_validator as _field_validator
from pydantic.alias_generators import to_camel

from authz_server.attributes import RequestAttributes
from authz_server.config.load import Provider, Settings
from authz_server.credentials import binding
from authz_server.credentials.extract import DPOP_LOCATION, TokenLocation
from authz_server.explain import (
    explain,
    place_token,
    provider_for_token,
    render_text,
    request_attributes,
    substitute_introspection,
    substitute_keys,
    token_location,
    unverified_issuer,
)
from authz_server.service import Engine
from authz_server.tools import devkeys

__all__ = [
    "Case",
    "CaseRequest",
    "CasesError",
    "CasesFile",
    "Expectation",
    "Group",
    "Outcome",
    "junit_xml",
    "load_cases",
    "render_outcome",
    "run",
    "summary",
]

# Lifetime of a minted token when the case gives no `exp`.
TOKEN_TTL = 3600
# The algorithm a throwaway key signs with: the first of these the provider accepts.
_ALG_PREFERENCE = ("ES256", "EdDSA", "ES384", "RS256", "PS256", "RS384", "PS384", "RS512", "PS512")
_KEY_KIND = {"ES256": "EC-P256", "ES384": "EC-P384", "EdDSA": "Ed25519"}  # RS*/PS*: RSA
KEYS_DESCRIPTION = "throwaway keys of authz-server test"


class CasesError(Exception):
    """A cases file that cannot be run: each problem names the field at fault."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


# ---------------------------------------------------------------------------- the file model


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        """An unknown field is named with the fields there are (a typo is the usual cause)."""
        if isinstance(data, dict):
            known = {f.alias or name for name, f in cls.model_fields.items()}
            for key in data:
                if key not in known and key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), known, n=1)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise ValueError(
                        f"unknown field {key!r} ({hint}fields: {', '.join(sorted(known))})"
                    )
        return data


class CaseRequest(_Model):
    """The request a case sends, as ``authz-server check`` describes one."""

    method: str = Field(default="GET", min_length=1)
    host: str = ""
    path: str = "/"
    headers: dict[str, str] = {}
    source_ip: str = ""
    context_extensions: dict[str, str] = {}
    # Which workload the request is for, when workloads are recognised by it (an mTLS sidecar).
    destination_principal: str = ""
    # The scheme Envoy saw (a DPoP proof's htu names it; "": http).
    scheme: Literal["", "http", "https"] = ""
    # A PEM file (relative to the cases file): the client certificate of the connection, as
    # Envoy sends it with include_peer_certificate (certificate-bound tokens).
    client_certificate: str = ""

    @_field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/' (a path, with its query if any)")
        return value

    @_field_validator("source_ip")
    @classmethod
    def _an_address(cls, value: str) -> str:
        if value:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address") from None
        return value

    @_field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        lowered = [name.lower() for name in value]
        for name in lowered:
            if not name or any(c in name for c in " :\t\r\n"):
                raise ValueError(f"{name!r} is not a header name")
        if len(set(lowered)) != len(lowered):
            raise ValueError("a header is given twice (names are case-insensitive)")
        return {name.lower(): text for name, text in value.items()}


class Expectation(_Model):
    """What a case expects of the decision; only what is given is compared."""

    status: int | None = Field(default=None, ge=100, le=599)
    decision: Literal["allow", "deny"] | None = None
    policy: str | None = Field(default=None, min_length=1)
    reason: str | None = Field(default=None, min_length=1)
    # Headers set for the upstream, a subset match; null: the header must not be set.
    headers: dict[str, str | None] = {}

    @model_validator(mode="after")
    def _decides_something(self) -> Expectation:
        if self.status is None and self.decision is None:
            raise ValueError("give status or decision (or both)")
        return self

    @_field_validator("headers")
    @classmethod
    def _lower(cls, value: dict[str, str | None]) -> dict[str, str | None]:
        return {name.lower(): text for name, text in value.items()}


class Case(_Model):
    """One request, who sends it, and what should come of it."""

    name: str = Field(min_length=1)
    request: CaseRequest = CaseRequest()
    claims: dict[str, JsonValue] | None = None
    token: str | None = Field(default=None, min_length=1)
    # An API key (its hash must be in the provider's keys file), or the introspection answer
    # for an opaque token the runner makes up (decided offline: the IdP is not called).
    api_key: str | None = Field(default=None, min_length=1)
    introspection: dict[str, JsonValue] | None = None
    provider: str | None = Field(default=None, min_length=1)
    # Sender-constrained minted tokens: bound to a throwaway DPoP key and sent with a fresh
    # proof for the request; bound to the certificate in this PEM file (cnf x5t#S256).
    dpop: bool = False
    bound_to_certificate: str = ""
    expect: Expectation

    @model_validator(mode="after")
    def _one_identity(self) -> Case:
        given = [
            name
            for name, value in (
                ("claims", self.claims),
                ("token", self.token),
                ("apiKey", self.api_key),
                ("introspection", self.introspection),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"give one of claims (a token is minted), token, apiKey, introspection, not "
                f"{' and '.join(given)}"
            )
        if (self.dpop or self.bound_to_certificate) and self.claims is None:
            raise ValueError("dpop and boundToCertificate bind a minted token: give claims")
        if self.dpop and "dpop" in self.request.headers:
            raise ValueError("dpop: true makes the proof: remove request.headers.dpop")
        return self


class Group(_Model):
    name: str = Field(min_length=1)
    cases: list[Case] = Field(min_length=1)


def _unique_names(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"two {what} are named {name!r}: names must be unique")
        seen.add(name)


class CasesFile(_Model):
    """A cases file: groups of named cases, and/or a flat list of cases."""

    groups: list[Group] = []
    cases: list[Case] = []

    @model_validator(mode="after")
    def _some_unique_cases(self) -> CasesFile:
        if not self.cases and not self.groups:
            raise ValueError("no cases: give `groups` (each a name and cases) or `cases`")
        _unique_names([g.name for g in self.groups], "groups")
        _unique_names([c.name for c in self.cases], "cases")
        for group in self.groups:
            _unique_names([c.name for c in group.cases], f"cases of group {group.name!r}")
        return self

    def walk(self) -> Iterator[tuple[str, str | None, Case]]:
        """(field path, group name, case) of every case, in file order: ungrouped first."""
        for index, case in enumerate(self.cases):
            yield f"cases[{index}] ({case.name})", None, case
        for g, group in enumerate(self.groups):
            for index, case in enumerate(group.cases):
                yield f"groups[{g}] ({group.name}).cases[{index}] ({case.name})", group.name, case


def _where(loc: Sequence[int | str], raw: Any) -> str:
    """A pydantic error location as a field path, with the names of the groups and cases on
    the way: ``groups[0] (reads).cases[2] (bob).expect.status``."""
    text = ""
    node = raw
    for item in loc:
        if isinstance(item, int):
            text += f"[{item}]"
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
            name = node.get("name") if isinstance(node, dict) else None
            if isinstance(name, str) and name:
                text += f" ({name})"
        else:
            text += ("." if text else "") + item
            node = node.get(item) if isinstance(node, dict) else None
    return text or "(top level)"


def load_cases(path: Path) -> CasesFile:
    """The cases file at ``path``. Raises CasesError naming each field at fault."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CasesError([f"cannot read it: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise CasesError([f"not YAML: {where}{getattr(exc, 'problem', None) or exc}"]) from None
    if not isinstance(raw, dict):
        raise CasesError(["expected a mapping with `groups` and/or `cases`"])
    try:
        cases = CasesFile.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{_where(error['loc'], raw)}: {message}")
        raise CasesError(problems) from None
    return _files_resolved(cases, path.parent)


def _files_resolved(cases: CasesFile, base: Path) -> CasesFile:
    """``cases`` with its certificate files made absolute, relative to ``base``."""

    def resolved(case: Case) -> Case:
        request = case.request
        if request.client_certificate:
            request = request.model_copy(
                update={"client_certificate": str(base / request.client_certificate)}
            )
        bound = str(base / case.bound_to_certificate) if case.bound_to_certificate else ""
        return case.model_copy(update={"request": request, "bound_to_certificate": bound})

    return cases.model_copy(
        update={
            "cases": [resolved(c) for c in cases.cases],
            "groups": [
                g.model_copy(update={"cases": [resolved(c) for c in g.cases]}) for g in cases.groups
            ],
        }
    )


# ------------------------------------------------------------------------------ preparing


@dataclass(frozen=True)
class _Prepared:
    """A case ready to run: the token it carries (if any) and which engine decides it."""

    group: str | None
    case: Case
    token: str | None = None
    minted: bool = False
    location: TokenLocation | None = None  # where the token goes; None: nowhere
    offline: bool = False  # an opaque token whose introspection answer the case gives
    # DPoP: the origin the proof's htu names instead of the request's (the provider's
    # externalUrl), and whether a proof goes with the token.
    dpop: bool = False
    external_url: str | None = None
    client_certificate: str = ""  # as Envoy sends it: URL-encoded PEM


@dataclass
class _Keys:
    """The throwaway keys, one per (issuer, algorithm), and the providers that trust them."""

    keys: dict[tuple[str, str], tuple[devkeys.SigningKey, dict[str, str]]] = field(
        default_factory=dict
    )
    providers: set[str] = field(default_factory=set)
    # The introspection answers of the `introspection` cases, by the opaque token made up.
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def key_for(self, issuer: str, alg: str) -> devkeys.SigningKey:
        entry = self.keys.get((issuer, alg))
        if entry is None:
            key = devkeys.generate_key(_KEY_KIND.get(alg, "RSA"))
            jwk = {**key.public_jwk(), "alg": alg}
            entry = self.keys[(issuer, alg)] = (key, jwk)
        return entry[0]

    def jwks(self) -> str:
        return json.dumps({"keys": [jwk for _, jwk in self.keys.values()]})

    @functools.cached_property
    def dpop_key(self) -> devkeys.SigningKey:
        """The throwaway client key the DPoP cases' tokens are bound to and proofs signed with."""
        return devkeys.generate_key("EC-P256")


def _mint(
    where: str,
    case: Case,
    *,
    claims: Mapping[str, JsonValue],
    settings: Settings,
    keys: _Keys,
    now: float,
    problems: list[str],
) -> tuple[str, Provider | None] | None:
    """The token a ``claims`` case carries, and the provider it is placed for."""
    by_name = {p.name: p for p in settings.providers}
    target = by_name.get(case.provider) if case.provider else None
    issuer = claims.get("iss", target.spec.issuer if target else None)
    if "iss" not in claims and target is None:
        if len(settings.providers) == 1:
            target = settings.providers[0]
            issuer = target.spec.issuer
        elif not settings.providers:
            problems.append(f"{where}.claims: the configuration has no providers to mint for")
            return None
        else:
            names = ", ".join(p.name for p in settings.providers)
            problems.append(
                f"{where}.claims: {len(settings.providers)} providers ({names}): name one "
                "with `provider`, or give the `iss` claim"
            )
            return None
    if issuer is not None and not isinstance(issuer, str):
        problems.append(f"{where}.claims.iss: must be a string (or null: no iss)")
        return None
    trusting = [p for p in settings.providers if issuer is not None and p.spec.issuer == issuer]
    if target is None and trusting:
        target = trusting[0]
    if target is not None and target not in trusting:
        trusting.append(target)
    for provider in trusting:
        if provider.shared_secret_file is not None:
            problems.append(
                f"{where}.claims: provider {provider.name} verifies HMAC tokens with its "
                "sharedSecretFile, which the runner does not sign with: give a `token`"
            )
            return None
    algorithms = target.spec.algorithms if target is not None else ["ES256"]
    alg = next(a for a in _ALG_PREFERENCE if a in algorithms)
    key = keys.key_for(issuer or "", alg)
    keys.providers.update(p.name for p in trusting)
    payload: dict[str, Any] = {
        "iss": issuer,
        "aud": target.spec.audiences[0] if target is not None and target.spec.audiences else None,
        "iat": int(now),
        "exp": int(now) + TOKEN_TTL,
    }
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not None}
    return key.sign(payload, alg=alg), target


def _opaque_target(
    where: str, case: Case, kind: str, settings: Settings, problems: list[str]
) -> Provider | None:
    """The provider an ``apiKey`` or ``introspection`` case is for: the one it names, or the
    only provider of that kind."""
    field = "apiKey" if kind == "apiKey" else "introspection"
    of_kind = [p for p in settings.providers if p.spec.kind == kind]
    if case.provider is not None:
        target = next(p for p in settings.providers if p.name == case.provider)
        if target.spec.kind != kind:
            problems.append(f"{where}.{field}: provider {target.name} is no {field} provider")
            return None
        return target
    if len(of_kind) == 1:
        return of_kind[0]
    problems.append(
        f"{where}.{field}: "
        + (
            f"{len(of_kind)} {field} providers ({', '.join(p.name for p in of_kind)}): "
            "name one with `provider`"
            if of_kind
            else f"the configuration has no {field} provider"
        )
    )
    return None


def _placement_problem(where: str, request: CaseRequest, location: TokenLocation) -> str | None:
    if location.kind == "header" and location.name in request.headers:
        return (
            f"{where}.request.headers.{location.name}: the case's token goes in this header: "
            "remove it, or give the token there yourself (no claims/token)"
        )
    return None


def _certificate(where: str, path: str, problems: list[str]) -> str | None:
    """The PEM text of the certificate file at ``path``; None (a problem added) when it cannot
    be read or holds no certificate."""
    try:
        pem = Path(path).read_text()
        binding.certificate_der_from_pem(pem)
    except OSError as exc:
        problems.append(f"{where}: {path}: {exc.strerror}")
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        problems.append(f"{where}: {path}: {exc}")
        return None
    return pem


def _prepare(
    cases: CasesFile, settings: Settings, *, clock: Callable[[], float] = time.time
) -> tuple[list[_Prepared], _Keys]:
    """Every case checked against the configuration (the providers and policies it names
    exist; a provider to mint for can be told) and given its token. Raises CasesError with
    every problem found."""
    problems: list[str] = []
    by_name = {p.name: p for p in settings.providers}
    policies = {p.name for p in settings.policies}
    keys = _Keys()
    prepared: list[_Prepared] = []
    now = clock()
    for where, group, case in cases.walk():
        if case.provider is not None and case.provider not in by_name:
            names = ", ".join(by_name) or "none"
            problems.append(
                f"{where}.provider: no provider named {case.provider!r} (providers: {names})"
            )
            continue
        expected = case.expect.policy
        if expected is not None and expected not in policies:
            close = difflib.get_close_matches(expected, policies, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                f"{where}.expect.policy: no policy named {expected!r} in the configuration "
                f"({hint}policies: {', '.join(sorted(policies)) or 'none'})"
            )
        client_certificate = ""
        if case.request.client_certificate:
            pem = _certificate(
                f"{where}.request.clientCertificate", case.request.client_certificate, problems
            )
            client_certificate = quote(pem, safe="") if pem else ""
        if case.claims is not None:
            claims = dict(case.claims)
            cnf: dict[str, JsonValue] = {}
            if case.dpop:
                cnf["jkt"] = keys.dpop_key.thumbprint()
            if case.bound_to_certificate:
                pem = _certificate(
                    f"{where}.boundToCertificate", case.bound_to_certificate, problems
                )
                if pem:
                    der = binding.certificate_der_from_pem(pem)
                    cnf["x5t#S256"] = binding.certificate_thumbprint(der)
            if cnf:
                given = claims.get("cnf")
                claims["cnf"] = {**(given if isinstance(given, dict) else {}), **cnf}
            minted = _mint(
                where,
                case,
                claims=claims,
                settings=settings,
                keys=keys,
                now=now,
                problems=problems,
            )
            if minted is None:
                continue
            token, target = minted
            location = DPOP_LOCATION if case.dpop else token_location(target)
            problem = _placement_problem(where, case.request, location)
            if problem:
                problems.append(problem)
            external_url = target.spec.dpop.external_url if target is not None else None
            prepared.append(
                _Prepared(
                    group,
                    case,
                    token,
                    True,
                    location,
                    dpop=case.dpop,
                    external_url=external_url,
                    client_certificate=client_certificate,
                )
            )
        elif case.api_key is not None or case.introspection is not None:
            kind = "apiKey" if case.api_key is not None else "introspection"
            target = _opaque_target(where, case, kind, settings, problems)
            if target is None:
                continue
            location = token_location(target)
            problem = _placement_problem(where, case.request, location)
            if problem:
                problems.append(problem)
            if case.api_key is not None:
                prepared.append(
                    _Prepared(
                        group,
                        case,
                        case.api_key,
                        False,
                        location,
                        client_certificate=client_certificate,
                    )
                )
                continue
            token = f"opaque-case-{len(keys.answers)}-{secrets.token_urlsafe(16)}"
            answer: dict[str, Any] = {
                "active": True,
                "iss": target.spec.issuer,
                "aud": target.spec.audiences[0] if target.spec.audiences else None,
                "exp": int(now) + TOKEN_TTL,
            }
            answer.update(case.introspection or {})
            keys.answers[token] = {k: v for k, v in answer.items() if v is not None}
            prepared.append(
                _Prepared(
                    group,
                    case,
                    token,
                    False,
                    location,
                    offline=True,
                    client_certificate=client_certificate,
                )
            )
        elif case.token is not None:
            target = by_name.get(case.provider) if case.provider else None
            location = token_location(target or provider_for_token(settings, case.token))
            problem = _placement_problem(where, case.request, location)
            if problem:
                problems.append(problem)
            prepared.append(
                _Prepared(
                    group, case, case.token, False, location, client_certificate=client_certificate
                )
            )
        else:
            prepared.append(_Prepared(group, case, client_certificate=client_certificate))
    if problems:
        raise CasesError(problems)
    return prepared, keys


# -------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Outcome:
    """How one case went: what differed from its expectation (nothing: passed), the trace."""

    group: str | None
    name: str
    mismatches: tuple[str, ...]
    trace: str
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.mismatches

    @property
    def title(self) -> str:
        return f"{self.group} / {self.name}" if self.group else self.name


class _Engines:
    """The two engines, each built on first use: ``minted`` verifies with the throwaway keys,
    ``configured`` with the providers' own key sources, loaded for an issuer when a request
    first carries a token naming it."""

    def __init__(self, settings: Settings, keys: _Keys, warn: Callable[[str], None]) -> None:
        self._settings = settings
        self._keys = keys
        self._warn = warn
        self._minted: Engine | None = None
        self._configured: Engine | None = None
        self._offline: Engine | None = None
        self._loaded: set[str] = set()

    def offline(self) -> Engine:
        """The engine whose introspection providers answer from the cases' answers."""
        if self._offline is None:
            engine = self._offline = Engine.build(self._settings)
            substitute_introspection(engine, self._keys.answers)
            for runtime in engine.providers:
                if runtime.provider.spec.kind == "introspection":
                    engine.caches[runtime.name].refresh()  # nothing to fetch: ready at once
        return self._offline

    def minted(self) -> Engine:
        if self._minted is None:
            engine = self._minted = Engine.build(self._settings)
            substitute_keys(engine, self._keys.jwks(), KEYS_DESCRIPTION, self._keys.providers)
            for name in self._keys.providers:
                engine.caches[name].refresh()  # an inline document: nothing is fetched
        return self._minted

    def configured(self, request: RequestAttributes) -> Engine:
        if self._configured is None:
            self._configured = Engine.build(self._settings)
            for runtime in self._configured.providers:
                if runtime.provider.spec.kind == "apiKey":
                    cache = self._configured.caches[runtime.name]
                    if not cache.refresh():  # a local file: read at once
                        self._warn(f"provider {runtime.name}: {cache.last_error}")
        engine = self._configured
        # The keys of the issuers the request's tokens name (unverified), once each.
        issuers = {unverified_issuer(found.token) for found in engine.extractor.extract(request)}
        for runtime in engine.providers:
            if runtime.issuer in issuers and runtime.name not in self._loaded:
                self._loaded.add(runtime.name)
                cache = engine.caches[runtime.name]
                if not cache.refresh():
                    self._warn(f"provider {runtime.name}: {cache.last_error}")
        return engine

    def close(self) -> None:
        for engine in (self._minted, self._configured, self._offline):
            if engine is not None:
                engine.close()


def _with_token(request: CaseRequest, location: TokenLocation, token: str) -> CaseRequest:
    headers, path = place_token(request.headers, request.path, location, token)
    return request.model_copy(update={"headers": headers, "path": path})


def _with_proof(
    request: CaseRequest, item: _Prepared, key: devkeys.SigningKey, token: str
) -> CaseRequest:
    """``request`` with a fresh DPoP proof for it (made now: a proof is short-lived and
    accepted once), for the URL the server compares the proof's htu with."""
    try:
        url = binding.request_htu(request.scheme, request.host, request.path, item.external_url)
    except ValueError:
        url = "http://invalid/"  # no URL can be formed: the server refuses the proof too
    proof = devkeys.dpop_proof(key, method=request.method.upper(), url=url, access_token=token)
    return request.model_copy(update={"headers": {**request.headers, "dpop": proof}})


def _shown(value: object) -> str:
    return "none" if value is None else json.dumps(value)


def mismatches(expect: Expectation, result: Mapping[str, Any]) -> list[str]:
    """What the decision ``result`` (an ``explain`` result) has that ``expect`` did not say,
    one line per field."""
    found: list[str] = []
    if expect.decision is not None and result["decision"] != expect.decision:
        found.append(f"decision: expected {expect.decision}, got {result['decision']}")
    if expect.status is not None and result["status"] != expect.status:
        found.append(f"status: expected {expect.status}, got {result['status']}")
    if expect.reason is not None and result["reason"] != expect.reason:
        found.append(f"reason: expected {expect.reason}, got {result['reason']}")
    if expect.policy is not None and result["policy"] != expect.policy:
        found.append(f"policy: expected {expect.policy}, got {_shown(result['policy'])}")
    headers = result["headers_to_set"]
    for name, wanted in expect.headers.items():
        had = headers.get(name)
        if wanted is None and had is not None:
            found.append(f"header {name}: expected not set, got {_shown(had)}")
        elif wanted is not None and had != wanted:
            found.append(
                f"header {name}: expected {_shown(wanted)}, "
                f"got {'not set' if had is None else _shown(had)}"
            )
    return found


def run(
    settings: Settings,
    cases: CasesFile,
    *,
    warn: Callable[[str], None] = lambda _: None,
    clock: Callable[[], float] = time.time,
) -> list[Outcome]:
    """Decide every case of ``cases`` under ``settings`` and compare. Raises CasesError when
    the file does not fit the configuration (before any case runs)."""
    prepared, keys = _prepare(cases, settings, clock=clock)
    engines = _Engines(settings, keys, warn)
    outcomes: list[Outcome] = []
    try:
        for item in prepared:
            started = time.perf_counter()
            request = item.case.request
            if item.token is not None and item.location is not None:
                request = _with_token(request, item.location, item.token)
            if item.dpop and item.token is not None:
                request = _with_proof(request, item, keys.dpop_key, item.token)
            attributes = request_attributes(
                method=request.method,
                host=request.host,
                path=request.path,
                headers=request.headers,
                source_ip=request.source_ip,
                context_extensions=request.context_extensions,
                destination_principal=request.destination_principal,
                scheme=request.scheme,
                client_certificate=item.client_certificate,
            )
            if item.minted:
                engine = engines.minted()
            elif item.offline:
                engine = engines.offline()
            else:
                engine = engines.configured(attributes)
            result = explain(
                engine,
                attributes,
                # NOTE: the claims are the cases file's own (or its token's): nothing to hide.
                show_claims=True,
            )
            outcomes.append(
                Outcome(
                    group=item.group,
                    name=item.case.name,
                    mismatches=tuple(mismatches(item.case.expect, result)),
                    trace=render_text(result),
                    seconds=time.perf_counter() - started,
                )
            )
    finally:
        engines.close()
    return outcomes


# ------------------------------------------------------------------------------ reporting


def render_outcome(outcome: Outcome) -> list[str]:
    """The PASS/FAIL line of a case; for a failure, what differed and the trace beneath."""
    if outcome.passed:
        return [f"PASS  {outcome.title}"]
    lines = [f"FAIL  {outcome.title}"]
    lines.extend(f"      {line}" for line in outcome.mismatches)
    lines.append("      trace:")
    lines.extend(f"        {line}" for line in outcome.trace.splitlines())
    return lines


def summary(outcomes: Sequence[Outcome]) -> str:
    failed = sum(1 for o in outcomes if not o.passed)
    return f"{len(outcomes) - failed} passed, {failed} failed"


def junit_xml(outcomes: Sequence[Outcome], suite: str) -> bytes:
    """The outcomes as JUnit XML: a ``testsuite`` per group (ungrouped cases in one named
    ``suite``), a ``testcase`` per case, a ``failure`` with what differed and the trace."""
    root = ET.Element("testsuites", name="authz-server test")
    suites: dict[str, ET.Element] = {}
    for outcome in outcomes:
        name = outcome.group or suite
        element = suites.get(name)
        if element is None:
            element = suites[name] = ET.SubElement(root, "testsuite", name=name)
        case = ET.SubElement(
            element, "testcase", classname=name, name=outcome.name, time=f"{outcome.seconds:.6f}"
        )
        if not outcome.passed:
            failure = ET.SubElement(
                case, "failure", message="; ".join(outcome.mismatches), type="PolicyTestFailure"
            )
            failure.text = "\n".join(outcome.mismatches) + "\n\n" + outcome.trace + "\n"
    for element in (*suites.values(), root):
        cases = element.iter("testcase")
        counted = [(c, c.find("failure") is not None, float(c.get("time", "0"))) for c in cases]
        element.set("tests", str(len(counted)))
        element.set("failures", str(sum(1 for _, failed, _ in counted if failed)))
        element.set("errors", "0")
        element.set("time", f"{sum(t for _, _, t in counted):.6f}")
        if element is not root:
            element.set("skipped", "0")
    ET.indent(root)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))
