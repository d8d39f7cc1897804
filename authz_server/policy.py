"""Authorization policies with Istio's semantics, compiled once into predicates.

A rule matches when one of its ``from`` sources, one of its ``to`` operations and every
``when`` condition match (an absent section matches anything). Inside a source or an
operation every set field must match; a list matches when any value does; ``not*`` fields
match when no value does. DENY policies are checked first, then ALLOW: with at least one
enforced ALLOW policy, a request no ALLOW policy matches is denied. AUDIT and dry-run
policies are evaluated and reported, never enforced.

String values use Istio's matching: exact, ``prefix*``, ``*suffix``, and ``*`` (present,
non-empty). Paths also take Istio's templates ``{*}`` (one segment) and ``{**}`` (the rest).
Hosts compare case-insensitively. ``requestPrincipals`` (and ``request.auth.principal``) split
the pattern on its last ``/`` and match issuer and subject apart, as Istio does. One deliberate
extension: a number or boolean claim matches its JSON text (``42``, ``true``), so DENY rules on
such claims are not silently inert.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from authz_server.attributes import IPAddress, RequestAttributes
from authz_server.config import Condition, Operation, PolicySpec, Rule, Source
from authz_server.tokens import Identity

Predicate = Callable[[RequestAttributes, Identity | None], bool]
StringMatcher = Callable[[str], bool]
# Extracts the values a field is matched against: None when the attribute is absent.
Getter = Callable[[RequestAttributes, Identity | None], Iterable[str] | None]

_CLAIM_PATH = re.compile(r"\[([^\[\]]+)\]")


def string_matcher(
    pattern: str, *, ignore_case: bool = False, template: bool = False
) -> StringMatcher:
    """Compile one Istio string pattern into a predicate on a string."""
    if ignore_case:
        pattern = pattern.lower()
    if pattern == "*":
        return lambda value: value != ""
    if template and "{*" in pattern:
        parts = re.split(r"(\{\*\*\}|\{\*\})", pattern)
        regex = "".join(
            "[^/]+" if p == "{*}" else ".*" if p == "{**}" else re.escape(p) for p in parts
        )
        compiled = re.compile(regex, re.DOTALL)
        return lambda value: compiled.fullmatch(value) is not None
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return lambda value: value.startswith(prefix)
    if pattern.startswith("*"):
        suffix = pattern[1:]
        return lambda value: value.endswith(suffix)
    return lambda value: value == pattern


def _any_string(patterns: Sequence[str], **kwargs: bool) -> StringMatcher:
    matchers = [string_matcher(p, **kwargs) for p in patterns]
    if len(matchers) == 1:
        return matchers[0]
    return lambda value: any(m(value) for m in matchers)


def _field(getter: Getter, matcher: StringMatcher, *, negate: bool) -> Predicate:
    """Positive: some value matches (absent never matches). Negated: no value matches."""

    def positive(request: RequestAttributes, identity: Identity | None) -> bool:
        values = getter(request, identity)
        return values is not None and any(matcher(v) for v in values)

    if not negate:
        return positive
    return lambda request, identity: not positive(request, identity)


def _ip_field(
    getter: Callable[[RequestAttributes], IPAddress | None], blocks: Sequence[str], *, negate: bool
) -> Predicate:
    networks = tuple(ipaddress.ip_network(b, strict=False) for b in blocks)

    def positive(request: RequestAttributes, identity: Identity | None) -> bool:
        address = getter(request)
        return address is not None and any(
            address.version == net.version and address in net for net in networks
        )

    if not negate:
        return positive
    return lambda request, identity: not positive(request, identity)


# ----------------------------------------------------------------------- attribute getters


def _one(value: str | None) -> list[str] | None:
    return None if value is None else [value]


def _present(value: str) -> bool:
    return value != ""


def _never(_: str) -> bool:
    return False


def _exact(expected: str) -> StringMatcher:
    return lambda value: value == expected


def _prefix(prefix: str) -> StringMatcher:
    return lambda value: value.startswith(prefix)


def _suffix(suffix: str) -> StringMatcher:
    return lambda value: value.endswith(suffix)


def request_principal_matcher(pattern: str) -> Callable[[str, str], bool]:
    """Compile one ``requestPrincipals`` pattern into a predicate on (issuer, subject).

    As Istio does, the pattern is split on its last ``/`` (issuers are URLs) and each half is
    matched on its own: ``*`` (both present), ``iss/*``, ``iss/sub-prefix*``, ``*/sub``,
    ``*iss-suffix/sub``; without a ``/``, ``*sub-suffix`` or ``iss-prefix*``. Matching the joined
    ``iss/sub`` string instead would let ``https://idp/*`` accept the issuer ``https://idp/other``.
    """
    issuer: StringMatcher
    subject: StringMatcher
    head, slash, tail = pattern.rpartition("/")
    if pattern == "*":
        issuer, subject = _present, _present
    elif not slash:
        if pattern.startswith("*"):
            issuer, subject = _present, _suffix(pattern[1:])
        elif pattern.endswith("*"):
            issuer, subject = _prefix(pattern[:-1]), _present
        else:  # an issuer with no subject part: no token has an empty `sub` to match
            issuer, subject = _exact(pattern), _never
    elif pattern.startswith("*"):
        issuer = _present if head == "*" else _suffix(head[1:])
        subject = _exact(tail)
    elif pattern.endswith("*"):
        issuer = _exact(head)
        subject = _present if tail == "*" else _prefix(tail[:-1])
    else:
        issuer, subject = _exact(head), _exact(tail)
    return lambda iss, sub: issuer(iss) and subject(sub)


def _request_principals(patterns: Sequence[str], *, negate: bool) -> Predicate:
    matchers = [request_principal_matcher(p) for p in patterns]

    def positive(_: RequestAttributes, identity: Identity | None) -> bool:
        return identity is not None and any(m(identity.issuer, identity.subject) for m in matchers)

    if not negate:
        return positive
    return lambda request, identity: not positive(request, identity)


def _peer(index: int) -> Getter:
    def get(request: RequestAttributes, _: Identity | None) -> list[str] | None:
        peer = request.peer_identity
        if peer is None or not peer[index]:
            return None
        return [peer[index]]

    return get


def _service_account(request: RequestAttributes, _: Identity | None) -> list[str] | None:
    peer = request.peer_identity
    if peer is None or not peer[3]:
        return None
    return [f"{peer[2]}/{peer[3]}"]


def claim_strings(value: Any, leaf: str, space_delimited: frozenset[str]) -> list[str] | None:
    """The strings a claim value matches as: list elements, split scopes, JSON text of scalars."""
    if isinstance(value, str):
        return value.split() if leaf in space_delimited else [value]
    if isinstance(value, bool | int | float):
        return [json.dumps(value)]
    if isinstance(value, list):
        out: list[str] = []
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, bool | int | float):
                out.append(json.dumps(item))
        return out
    return None


def _claim(path: Sequence[str]) -> Getter:
    def get(_: RequestAttributes, identity: Identity | None) -> list[str] | None:
        if identity is None:
            return None
        value: Any = identity.claims
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return claim_strings(value, path[-1], identity.space_delimited)

    return get


def _header(name: str) -> Getter:
    return lambda request, _: _one(request.headers.get(name))


def _context_extension(name: str) -> Getter:
    return lambda request, _: _one(request.context_extensions.get(name))


_SIMPLE_GETTERS: dict[str, Getter] = {
    "request.auth.audiences": lambda _, i: None if i is None else list(i.audiences),
    "request.auth.presenter": lambda _, i: None if i is None else _one(i.presenter),
    "source.principal": _peer(0),
    "source.namespace": _peer(2),
    "destination.port": lambda r, _: [str(r.destination_port)] if r.destination_port else None,
    "connection.sni": lambda r, _: [r.sni] if r.sni else None,
}
_IP_GETTERS: dict[str, Callable[[RequestAttributes], IPAddress | None]] = {
    "source.ip": lambda r: r.source_address,
    "remote.ip": lambda r: r.remote_address,
    "destination.ip": lambda r: r.destination_address,
}


def _condition(condition: Condition) -> list[Predicate]:
    key = condition.key
    predicates: list[Predicate] = []
    for values, negate in ((condition.values, False), (condition.not_values, True)):
        if not values:
            continue
        if key in _IP_GETTERS:
            predicates.append(_ip_field(_IP_GETTERS[key], values, negate=negate))
            continue
        if key == "request.auth.principal":
            predicates.append(_request_principals(values, negate=negate))
            continue
        if key in _SIMPLE_GETTERS:
            getter = _SIMPLE_GETTERS[key]
        elif key.startswith("request.auth.claims["):
            getter = _claim(_CLAIM_PATH.findall(key))
        elif key.startswith("request.headers["):
            getter = _header(_CLAIM_PATH.findall(key)[0].lower())
        else:  # request.context_extensions[...] (config validated the key)
            getter = _context_extension(_CLAIM_PATH.findall(key)[0])
        predicates.append(_field(getter, _any_string(values), negate=negate))
    return predicates


# --------------------------------------------------------------------- sources/operations


def _source(source: Source) -> list[Predicate]:
    predicates: list[Predicate] = []
    string_fields: list[tuple[list[str] | None, Getter, bool]] = [
        (source.principals, _peer(0), False),
        (source.not_principals, _peer(0), True),
        (source.namespaces, _peer(2), False),
        (source.not_namespaces, _peer(2), True),
        (source.service_accounts, _service_account, False),
        (source.not_service_accounts, _service_account, True),
        (source.trust_domains, _peer(1), False),
        (source.not_trust_domains, _peer(1), True),
    ]
    for values, getter, negate in string_fields:
        if values:
            predicates.append(_field(getter, _any_string(values), negate=negate))
    for values, negate in (
        (source.request_principals, False),
        (source.not_request_principals, True),
    ):
        if values:
            predicates.append(_request_principals(values, negate=negate))
    ip_fields = [
        (source.ip_blocks, _IP_GETTERS["source.ip"], False),
        (source.not_ip_blocks, _IP_GETTERS["source.ip"], True),
        (source.remote_ip_blocks, _IP_GETTERS["remote.ip"], False),
        (source.not_remote_ip_blocks, _IP_GETTERS["remote.ip"], True),
    ]
    for blocks, ip_getter, negate in ip_fields:
        if blocks:
            predicates.append(_ip_field(ip_getter, blocks, negate=negate))
    return predicates


def _host(request: RequestAttributes, _: Identity | None) -> list[str]:
    return [request.host_lower]


def _method(request: RequestAttributes, _: Identity | None) -> list[str]:
    return [request.method]


def _path(request: RequestAttributes, _: Identity | None) -> list[str]:
    return [request.normalized_path]


def _port(request: RequestAttributes, _: Identity | None) -> list[str] | None:
    return [str(request.destination_port)] if request.destination_port else None


def _operation(operation: Operation) -> list[Predicate]:
    predicates: list[Predicate] = []
    fields: list[tuple[list[str] | None, Getter, dict[str, bool], bool]] = [
        (operation.hosts, _host, {"ignore_case": True}, False),
        (operation.not_hosts, _host, {"ignore_case": True}, True),
        (operation.methods, _method, {}, False),
        (operation.not_methods, _method, {}, True),
        (operation.paths, _path, {"template": True}, False),
        (operation.not_paths, _path, {"template": True}, True),
        (operation.ports, _port, {}, False),
        (operation.not_ports, _port, {}, True),
    ]
    for values, getter, options, negate in fields:
        if values:
            predicates.append(_field(getter, _any_string(values, **options), negate=negate))
    return predicates


def _all(predicates: Sequence[Predicate]) -> Predicate:
    if len(predicates) == 1:
        return predicates[0]
    return lambda request, identity: all(p(request, identity) for p in predicates)


def _any(predicates: Sequence[Predicate]) -> Predicate:
    if len(predicates) == 1:
        return predicates[0]
    return lambda request, identity: any(p(request, identity) for p in predicates)


def compile_rule(rule: Rule) -> Predicate:
    """Return a predicate that is true when ``rule`` matches the request."""
    parts: list[Predicate] = []
    if rule.from_:
        parts.append(_any([_all(_source(f.source)) for f in rule.from_]))
    if rule.to:
        parts.append(_any([_all(_operation(t.operation)) for t in rule.to]))
    for condition in rule.when or []:
        parts.extend(_condition(condition))
    if not parts:
        return lambda request, identity: True
    return _all(parts)


# ------------------------------------------------------------------------------ policies


@dataclass(frozen=True)
class CompiledPolicy:
    name: str
    action: str
    dry_run: bool
    rules: tuple[Predicate, ...]

    @classmethod
    def compile(cls, spec: PolicySpec) -> CompiledPolicy:
        return cls(
            name=spec.name,
            action=spec.action,
            dry_run=spec.dry_run,
            rules=tuple(compile_rule(r) for r in spec.rules or ()),
        )

    def matches(self, request: RequestAttributes, identity: Identity | None) -> bool:
        return any(rule(request, identity) for rule in self.rules)


@dataclass(frozen=True)
class PolicyResult:
    """The outcome of evaluation: allowed or not, the policy that decided, and what was only
    observed (AUDIT matches, dry-run verdicts as ``(policy, "allow" | "deny")``)."""

    allowed: bool
    policy: str | None
    reason: str
    audited: tuple[str, ...] = ()
    dry_run: tuple[tuple[str, str], ...] = ()


class PolicySet:
    """Every policy of a configuration, compiled and grouped by action."""

    def __init__(self, specs: Sequence[PolicySpec]) -> None:
        compiled = [CompiledPolicy.compile(s) for s in specs]
        self.deny = tuple(p for p in compiled if p.action == "DENY" and not p.dry_run)
        self.allow = tuple(p for p in compiled if p.action == "ALLOW" and not p.dry_run)
        self.audit = tuple(p for p in compiled if p.action == "AUDIT")
        self.dry_run = tuple(p for p in compiled if p.dry_run and p.action != "AUDIT")

    def evaluate(self, request: RequestAttributes, identity: Identity | None) -> PolicyResult:
        audited = tuple(p.name for p in self.audit if p.matches(request, identity))
        # Every dry-run policy gives a verdict on every request: a DENY policy would deny what
        # it matches, an ALLOW policy would deny what it does not match.
        dry_run = tuple(
            (p.name, "deny" if p.matches(request, identity) == (p.action == "DENY") else "allow")
            for p in self.dry_run
        )
        for policy in self.deny:
            if policy.matches(request, identity):
                return PolicyResult(False, policy.name, "policy_denied", audited, dry_run)
        if self.allow:
            for policy in self.allow:
                if policy.matches(request, identity):
                    return PolicyResult(True, policy.name, "allowed", audited, dry_run)
            return PolicyResult(False, None, "no_allow_policy_matched", audited, dry_run)
        return PolicyResult(True, None, "allowed", audited, dry_run)
