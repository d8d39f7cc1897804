"""Authorization policies with Istio's semantics, compiled once into predicates.

A rule matches when one of its ``from`` sources, one of its ``to`` operations and every
``when`` condition match (an absent section matches anything). Inside a source or an
operation every set field must match; a list matches when any value does; ``not*`` fields
match when no value does. DENY policies are checked first, then ALLOW: with at least one
enforced ALLOW policy, a request no ALLOW policy matches is denied. AUDIT and dry-run
policies are evaluated and reported, never enforced. An index built at load (``policy.index``)
picks the rules a request can match, so the cost of a Check does not grow with the number of
policies; the result is always that of trying every policy in order (``evaluate_linear``).

String values use Istio's matching: exact, ``prefix*``, ``*suffix``, and ``*`` (present,
non-empty). Paths also take Istio's templates ``{*}`` (one segment) and ``{**}`` (the rest).
Hosts compare case-insensitively. ``requestPrincipals`` (and ``request.auth.principal``) split
the pattern on its last ``/`` and match issuer and subject apart, as Istio does. One deliberate
extension: a number or boolean claim matches its JSON text (``42``, ``true``), so DENY rules on
such claims are not silently inert.

An attribute the door could not tell (``RequestAttributes.unknown``: the HTTP door has no
client address, mTLS identity, destination port, SNI or context extensions) fails closed: a
clause on it makes an ALLOW rule not match and a DENY rule match, whatever the clause says.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic.alias_generators import to_camel

from authz_server import attributes as attr
from authz_server.attributes import IPAddress, RequestAttributes
from authz_server.config.specs import Condition, Operation, PolicySpec, Rule, Source
from authz_server.identity import Identity
from authz_server.policy.index import TEMPLATE_OPERATOR, RuleIndex, pattern_kind

Predicate = Callable[[RequestAttributes, Identity | None], bool]
StringMatcher = Callable[[str], bool]
# The one value a field is matched against, or None when the attribute is absent.
Getter = Callable[[RequestAttributes, Identity | None], str | None]
# The values a field is matched against (any may match), or None when absent.
ListGetter = Callable[[RequestAttributes, Identity | None], Iterable[str] | None]
# What the request had for a field, as the trace shows it (never called to decide).
Observer = Callable[[RequestAttributes, Identity | None], Any]

_CLAIM_PATH = re.compile(r"\[([^\[\]]+)\]")

# NOTE: predicates run on every Check for every candidate rule: they are flat closures over
# precomputed tuples and sets, with loops instead of generator expressions (a generator per
# condition cost ~15% of the server's time under load).


@dataclass(frozen=True)
class Clause:
    """One set field of a rule, compiled: the predicate that decides it and, for the trace,
    the field's name as written, the values it wants and how to read what the request had."""

    field: (
        str  # "to.operation.paths", "from[1].source.ipBlocks", "when[request.auth.claims[groups]]"
    )
    wanted: tuple[str, ...]
    predicate: Predicate
    observe: Observer
    needs: str | None = None  # the door-unknowable attribute it reads, if any
    claim: bool = False  # observe() gives a claim value (shown only when asked for)


# A rule part (its `to`, its `from`, one `when` clause) matches when one of its alternatives
# does; an alternative (one operation, one source) when all of its clauses do.
Alternatives = tuple[tuple[Clause, ...], ...]


def _first_miss(
    clauses: tuple[Clause, ...], request: RequestAttributes, identity: Identity | None
) -> Clause | None:
    for clause in clauses:
        if not clause.predicate(request, identity):
            return clause
    return None


@dataclass(frozen=True)
class CompiledRule:
    """A rule: ``predicate`` (what decides) is the conjunction of ``parts``, built from the
    very clause predicates ``misses`` walks, so the trace cannot disagree with the decision."""

    parts: tuple[Alternatives, ...]
    predicate: Predicate

    def misses(self, request: RequestAttributes, identity: Identity | None) -> tuple[Clause, ...]:
        """Why the rule does not match, for the trace: the first part none of whose
        alternatives matches, as the first failing clause of each alternative. Empty when the
        rule matches."""
        for part in self.parts:
            failed: list[Clause] = []
            for alternative in part:
                miss = _first_miss(alternative, request, identity)
                if miss is None:
                    break
                failed.append(miss)
            else:
                return tuple(failed)
        return ()


def _template_regex(pattern: str) -> str:
    return "".join(
        "[^/]+" if part == "{*}" else ".*" if part == "{**}" else re.escape(part)
        for part in TEMPLATE_OPERATOR.split(pattern)
    )


def _either(matchers: Sequence[StringMatcher]) -> StringMatcher:
    if len(matchers) == 1:
        return matchers[0]
    if len(matchers) == 2:
        first, second = matchers
        return lambda value: first(value) or second(value)
    every = tuple(matchers)

    def either(value: str) -> bool:
        for matcher in every:  # noqa: SIM110 (see the NOTE at the top)
            if matcher(value):
                return True
        return False

    return either


def _any_string(
    patterns: Sequence[str], *, ignore_case: bool = False, template: bool = False
) -> StringMatcher:
    """One predicate for a list of Istio patterns, true when any matches: exact values are one
    set lookup, prefixes and suffixes one ``startswith``/``endswith`` on a tuple, templates one
    regular expression."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    templates: list[str] = []
    present = False
    for pattern in patterns:
        kind, text = pattern_kind(pattern.lower() if ignore_case else pattern, template=template)
        if kind == "exact":
            exact.add(text)
        elif kind == "prefix":
            prefixes.append(text)
        elif kind == "suffix":
            suffixes.append(text)
        elif kind == "template":
            templates.append(_template_regex(text))
        else:
            present = True
    matchers: list[StringMatcher] = []
    if exact:
        matchers.append(frozenset(exact).__contains__)
    if prefixes:
        prefix_tuple = tuple(prefixes)
        matchers.append(lambda value: value.startswith(prefix_tuple))
    if suffixes:
        suffix_tuple = tuple(suffixes)
        matchers.append(lambda value: value.endswith(suffix_tuple))
    if present:
        matchers.append(bool)  # present means not empty
    if templates:
        compiled = re.compile("|".join(f"(?:{t})" for t in templates), re.DOTALL)
        matchers.append(lambda value: compiled.fullmatch(value) is not None)
    return _either(matchers)


def string_matcher(
    pattern: str, *, ignore_case: bool = False, template: bool = False
) -> StringMatcher:
    """Compile one Istio string pattern into a predicate on a string."""
    return _any_string([pattern], ignore_case=ignore_case, template=template)


def _negate(positive: Predicate, negate: bool) -> Predicate:
    if not negate:
        return positive
    return lambda request, identity: not positive(request, identity)


UnknownTest = Callable[[RequestAttributes], bool]


def _unknown(attribute: str) -> UnknownTest:
    return lambda request: attribute in request.unknown


def _remote_unknown(request: RequestAttributes) -> bool:
    # X-Forwarded-For may still name the client when the direct peer is unknown.
    return attr.SOURCE_IP in request.unknown and request.remote_address is None


# Which door-unknowable attribute each field reads (fields not listed are always known).
_SOURCE_NEEDS = {
    "principals": attr.SOURCE_PRINCIPAL,
    "not_principals": attr.SOURCE_PRINCIPAL,
    "namespaces": attr.SOURCE_PRINCIPAL,
    "not_namespaces": attr.SOURCE_PRINCIPAL,
    "service_accounts": attr.SOURCE_PRINCIPAL,
    "not_service_accounts": attr.SOURCE_PRINCIPAL,
    "trust_domains": attr.SOURCE_PRINCIPAL,
    "not_trust_domains": attr.SOURCE_PRINCIPAL,
    "ip_blocks": attr.SOURCE_IP,
    "not_ip_blocks": attr.SOURCE_IP,
    "remote_ip_blocks": attr.SOURCE_IP,  # unless X-Forwarded-For reaches the door
    "not_remote_ip_blocks": attr.SOURCE_IP,
}
_OPERATION_NEEDS = {"ports": attr.DESTINATION_PORT, "not_ports": attr.DESTINATION_PORT}
_CONDITION_NEEDS = {
    "source.ip": attr.SOURCE_IP,
    "remote.ip": attr.SOURCE_IP,
    "destination.ip": attr.DESTINATION_IP,
    "source.principal": attr.SOURCE_PRINCIPAL,
    "source.namespace": attr.SOURCE_PRINCIPAL,
    "destination.port": attr.DESTINATION_PORT,
    "connection.sni": attr.CONNECTION_SNI,
}


def condition_needs(key: str) -> str | None:
    """The door-unknowable attribute a ``when`` key reads, or None."""
    if key.startswith("request.context_extensions["):
        return attr.CONTEXT_EXTENSIONS
    return _CONDITION_NEEDS.get(key)


def _guard(is_unknown: UnknownTest, predicate: Predicate, when_unknown: bool) -> Predicate:
    """``predicate``, except that it answers ``when_unknown`` when the door could not tell
    the attribute it reads."""

    def guarded(request: RequestAttributes, identity: Identity | None) -> bool:
        if request.unknown and is_unknown(request):
            return when_unknown
        return predicate(request, identity)

    return guarded


def unknown_attribute_uses(specs: Sequence[PolicySpec], unknown: frozenset[str]) -> list[str]:
    """One line per clause of ``specs`` that reads an attribute in ``unknown``: how such a
    rule will behave (for the warning at load when the HTTP door is open)."""
    lines: list[str] = []
    for spec in specs:
        effect = "always matches (denies)" if spec.action == "DENY" else "never matches"
        for number, rule in enumerate(spec.rules or (), start=1):
            fields: list[tuple[str, str]] = []
            for source in rule.from_ or ():
                for name, needs in _SOURCE_NEEDS.items():
                    if getattr(source.source, name):
                        fields.append((f"from.source.{to_camel(name)}", needs))
            for operation in rule.to or ():
                for name, needs in _OPERATION_NEEDS.items():
                    if getattr(operation.operation, name):
                        fields.append((f"to.operation.{to_camel(name)}", needs))
            for condition in rule.when or ():
                condition_need = condition_needs(condition.key)
                if condition_need is not None:
                    fields.append((f"when[{condition.key}]", condition_need))
            for field, needs in dict(fields).items():
                if needs in unknown:
                    lines.append(
                        f"policy {spec.name!r} rule {number}: {field} reads {needs}, which the "
                        f"HTTP door does not receive: through that door the rule {effect}"
                    )
    return lines


def _field(getter: Getter, matcher: StringMatcher, *, negate: bool) -> Predicate:
    """Positive: the value matches (absent never matches). Negated: it does not."""

    def positive(request: RequestAttributes, identity: Identity | None) -> bool:
        value = getter(request, identity)
        return value is not None and matcher(value)

    return _negate(positive, negate)


def _list_field(getter: ListGetter, matcher: StringMatcher, *, negate: bool) -> Predicate:
    """Positive: some value matches (absent never matches). Negated: no value matches."""

    def positive(request: RequestAttributes, identity: Identity | None) -> bool:
        values = getter(request, identity)
        if values is None:
            return False
        for value in values:  # noqa: SIM110 (see the NOTE at the top)
            if matcher(value):
                return True
        return False

    return _negate(positive, negate)


def _ip_field(
    getter: Callable[[RequestAttributes], IPAddress | None], blocks: Sequence[str], *, negate: bool
) -> Predicate:
    networks = [ipaddress.ip_network(b, strict=False) for b in blocks]
    by_version: dict[int, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]] = {
        4: tuple(n for n in networks if n.version == 4),
        6: tuple(n for n in networks if n.version == 6),
    }

    def positive(request: RequestAttributes, identity: Identity | None) -> bool:
        address = getter(request)
        if address is None:
            return False
        for network in by_version[address.version]:  # noqa: SIM110 (see the NOTE at the top)
            if address in network:
                return True
        return False

    return _negate(positive, negate)


# ----------------------------------------------------------------------- attribute getters


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
    matchers = tuple(request_principal_matcher(p) for p in patterns)

    def positive(_: RequestAttributes, identity: Identity | None) -> bool:
        if identity is None:
            return False
        issuer, subject = identity.issuer, identity.subject
        for matcher in matchers:  # noqa: SIM110 (see the NOTE at the top)
            if matcher(issuer, subject):
                return True
        return False

    return _negate(positive, negate)


def _peer(index: int) -> Getter:
    def get(request: RequestAttributes, _: Identity | None) -> str | None:
        peer = request.peer_identity
        if peer is None or not peer[index]:
            return None
        return peer[index]

    return get


def _service_account(request: RequestAttributes, _: Identity | None) -> str | None:
    peer = request.peer_identity
    if peer is None or not peer[3]:
        return None
    return f"{peer[2]}/{peer[3]}"


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


def _claim(path: Sequence[str]) -> ListGetter:
    keys = tuple(path)
    leaf = keys[-1]

    def get(_: RequestAttributes, identity: Identity | None) -> list[str] | None:
        if identity is None:
            return None
        value: Any = identity.claims
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return claim_strings(value, leaf, identity.space_delimited)

    return get


def _header(name: str) -> Getter:
    return lambda request, _: request.headers.get(name)


def _context_extension(name: str) -> Getter:
    return lambda request, _: request.context_extensions.get(name)


def _destination_port(request: RequestAttributes, _: Identity | None) -> str | None:
    port = request.destination_port
    return str(port) if port else None


_SIMPLE_GETTERS: dict[str, Getter] = {
    "request.auth.presenter": lambda _, i: None if i is None else i.presenter,
    "source.principal": _peer(0),
    "source.namespace": _peer(2),
    "destination.port": _destination_port,
    "connection.sni": lambda r, _: r.sni or None,
}
_IP_GETTERS: dict[str, Callable[[RequestAttributes], IPAddress | None]] = {
    "source.ip": lambda r: r.source_address,
    "remote.ip": lambda r: r.remote_address,
    "destination.ip": lambda r: r.destination_address,
}


def _audiences(_: RequestAttributes, identity: Identity | None) -> Iterable[str] | None:
    return None if identity is None else identity.audiences


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _ip_text(getter: Callable[[RequestAttributes], IPAddress | None]) -> Observer:
    return lambda request, _: _text(getter(request))


def _principal(_: RequestAttributes, identity: Identity | None) -> str | None:
    return None if identity is None else identity.principal


def _claim_value(path: Sequence[str]) -> Observer:
    keys = tuple(path)

    def observe(_: RequestAttributes, identity: Identity | None) -> Any:
        value: Any = None if identity is None else identity.claims
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    return observe


def _single_getter(key: str) -> Getter:
    if key in _SIMPLE_GETTERS:
        return _SIMPLE_GETTERS[key]
    if key.startswith("request.headers["):
        return _header(_CLAIM_PATH.findall(key)[0].lower())
    # request.context_extensions[...] (specs.Condition validated the key)
    return _context_extension(_CLAIM_PATH.findall(key)[0])


# For a `when` key: the predicate on its values (negated or not), and what the trace shows.
FieldPredicate = Callable[[Sequence[str], bool], Predicate]


def _condition_reader(key: str) -> tuple[FieldPredicate, Observer]:
    """How a ``when`` key is matched and observed, decided once per key."""
    if key in _IP_GETTERS:
        ip = _IP_GETTERS[key]
        return (lambda values, negate: _ip_field(ip, values, negate=negate)), _ip_text(ip)
    if key == "request.auth.principal":
        return (lambda values, negate: _request_principals(values, negate=negate)), _principal
    if key == "request.auth.audiences":
        return (
            lambda values, negate: _list_field(_audiences, _any_string(values), negate=negate)
        ), (lambda _, identity: None if identity is None else list(identity.audiences))
    if key.startswith("request.auth.claims["):
        path = _CLAIM_PATH.findall(key)
        claim = _claim(path)
        return (
            lambda values, negate: _list_field(claim, _any_string(values), negate=negate)
        ), _claim_value(path)
    single = _single_getter(key)
    return (lambda values, negate: _field(single, _any_string(values), negate=negate)), single


def _condition(condition: Condition, when_unknown: bool) -> list[Clause]:
    key = condition.key
    needs = condition_needs(key)
    is_unknown: UnknownTest | None = None
    if needs is not None:
        is_unknown = _remote_unknown if key == "remote.ip" else _unknown(needs)
    predicate_for, observe = _condition_reader(key)
    claim = key.startswith("request.auth.claims[")
    clauses: list[Clause] = []
    for values, negate, field in (
        (condition.values, False, f"when[{key}]"),
        (condition.not_values, True, f"when[{key}].notValues"),
    ):
        if not values:
            continue
        predicate = predicate_for(values, negate)
        if is_unknown is not None:
            predicate = _guard(is_unknown, predicate, when_unknown)
        clauses.append(Clause(field, tuple(values), predicate, observe, needs, claim))
    return clauses


# --------------------------------------------------------------------- sources/operations


def _source(source: Source, when_unknown: bool, place: str) -> list[Clause]:
    clauses: list[Clause] = []
    peer_unknown = _unknown(attr.SOURCE_PRINCIPAL)
    string_fields: list[tuple[str, Getter, bool]] = [
        ("principals", _peer(0), False),
        ("not_principals", _peer(0), True),
        ("namespaces", _peer(2), False),
        ("not_namespaces", _peer(2), True),
        ("service_accounts", _service_account, False),
        ("not_service_accounts", _service_account, True),
        ("trust_domains", _peer(1), False),
        ("not_trust_domains", _peer(1), True),
    ]
    for name, getter, negate in string_fields:
        values: list[str] | None = getattr(source, name)
        if values:
            field = _field(getter, _any_string(values), negate=negate)
            predicate = _guard(peer_unknown, field, when_unknown)
            clauses.append(
                Clause(
                    f"{place}.{to_camel(name)}",
                    tuple(values),
                    predicate,
                    getter,
                    attr.SOURCE_PRINCIPAL,
                )
            )
    for name, negate in (("request_principals", False), ("not_request_principals", True)):
        values = getattr(source, name)
        if values:
            predicate = _request_principals(values, negate=negate)
            clauses.append(
                Clause(f"{place}.{to_camel(name)}", tuple(values), predicate, _principal)
            )
    ip_fields = [
        ("ip_blocks", "source.ip", _unknown(attr.SOURCE_IP), False),
        ("not_ip_blocks", "source.ip", _unknown(attr.SOURCE_IP), True),
        ("remote_ip_blocks", "remote.ip", _remote_unknown, False),
        ("not_remote_ip_blocks", "remote.ip", _remote_unknown, True),
    ]
    for name, key, is_unknown, negate in ip_fields:
        blocks: list[str] | None = getattr(source, name)
        if blocks:
            field = _ip_field(_IP_GETTERS[key], blocks, negate=negate)
            predicate = _guard(is_unknown, field, when_unknown)
            observe = _ip_text(_IP_GETTERS[key])
            clauses.append(
                Clause(
                    f"{place}.{to_camel(name)}",
                    tuple(blocks),
                    predicate,
                    observe,
                    attr.SOURCE_IP,
                )
            )
    return clauses


def _host(match: StringMatcher) -> Predicate:
    def positive(request: RequestAttributes, _: Identity | None) -> bool:
        for form in request.host_forms:  # noqa: SIM110 (see the NOTE at the top)
            if match(form):
                return True
        return False

    return positive


def _method(match: StringMatcher) -> Predicate:
    return lambda request, _: match(request.method)


def _path(match: StringMatcher) -> Predicate:
    return lambda request, _: match(request.normalized_path)


def _port(match: StringMatcher) -> Predicate:
    # An unknown destination port (0) is absent: a positive field cannot match it.
    return lambda request, _: request.destination_port != 0 and match(str(request.destination_port))


def _observe_port(request: RequestAttributes, _: Identity | None) -> str | None:
    return str(request.destination_port) if request.destination_port else None


# Each operation field: the attribute predicate, the matching options, negated or not, and
# what the trace shows the request had.
_OPERATION_FIELDS: tuple[
    tuple[str, Callable[[StringMatcher], Predicate], dict[str, bool], bool, Observer], ...
] = (
    ("hosts", _host, {"ignore_case": True}, False, lambda r, _: r.host),
    ("not_hosts", _host, {"ignore_case": True}, True, lambda r, _: r.host),
    ("methods", _method, {}, False, lambda r, _: r.method),
    ("not_methods", _method, {}, True, lambda r, _: r.method),
    ("paths", _path, {"template": True}, False, lambda r, _: r.normalized_path),
    ("not_paths", _path, {"template": True}, True, lambda r, _: r.normalized_path),
    ("ports", _port, {}, False, _observe_port),
    ("not_ports", _port, {}, True, _observe_port),
)


def _operation(operation: Operation, when_unknown: bool, place: str) -> list[Clause]:
    clauses: list[Clause] = []
    for name, on_attribute, options, negate, observe in _OPERATION_FIELDS:
        values: list[str] | None = getattr(operation, name)
        if values:
            match = _any_string(values, **options)
            predicate = _negate(on_attribute(match), negate)
            needs = None
            if on_attribute is _port:
                needs = attr.DESTINATION_PORT
                predicate = _guard(_unknown(needs), predicate, when_unknown)
            clauses.append(
                Clause(f"{place}.{to_camel(name)}", tuple(values), predicate, observe, needs)
            )
    return clauses


def _always(request: RequestAttributes, identity: Identity | None) -> bool:
    return True


def _all(predicates: Sequence[Predicate]) -> Predicate:
    if not predicates:
        return _always
    if len(predicates) == 1:
        return predicates[0]
    if len(predicates) == 2:
        first, second = predicates
        return lambda request, identity: first(request, identity) and second(request, identity)
    every = tuple(predicates)

    def all_of(request: RequestAttributes, identity: Identity | None) -> bool:
        for predicate in every:  # noqa: SIM110 (see the NOTE at the top)
            if not predicate(request, identity):
                return False
        return True

    return all_of


def _any(predicates: Sequence[Predicate]) -> Predicate:
    if len(predicates) == 1:
        return predicates[0]
    if len(predicates) == 2:
        first, second = predicates
        return lambda request, identity: first(request, identity) or second(request, identity)
    every = tuple(predicates)

    def any_of(request: RequestAttributes, identity: Identity | None) -> bool:
        for predicate in every:  # noqa: SIM110 (see the NOTE at the top)
            if predicate(request, identity):
                return True
        return False

    return any_of


def _place(section: str, number: int, count: int) -> str:
    return section if count == 1 else f"{section}[{number}]"


def compile_rule(rule: Rule, *, when_unknown: bool = False) -> CompiledRule:
    """Compile ``rule``; its predicate is true when the rule matches the request. A clause on
    an attribute the door could not tell counts as ``when_unknown`` (True for DENY rules, False
    for the others: either way, fail closed)."""
    # `to` first: host, method and path are the cheapest fields and the most selective.
    parts: list[Alternatives] = []
    if rule.to:
        count = len(rule.to)
        parts.append(
            tuple(
                tuple(_operation(t.operation, when_unknown, f"{_place('to', n, count)}.operation"))
                for n, t in enumerate(rule.to)
            )
        )
    if rule.from_:
        count = len(rule.from_)
        parts.append(
            tuple(
                tuple(_source(f.source, when_unknown, f"{_place('from', n, count)}.source"))
                for n, f in enumerate(rule.from_)
            )
        )
    for condition in rule.when or []:
        parts.extend(((clause,),) for clause in _condition(condition, when_unknown))
    predicate = _all([_any([_all([c.predicate for c in alt]) for alt in part]) for part in parts])
    return CompiledRule(tuple(parts), predicate)


# ------------------------------------------------------------------------------ policies


@dataclass(frozen=True)
class CompiledPolicy:
    name: str
    action: str
    dry_run: bool
    rules: tuple[CompiledRule, ...]

    @classmethod
    def compile(cls, spec: PolicySpec) -> CompiledPolicy:
        return cls(
            name=spec.name,
            action=spec.action,
            dry_run=spec.dry_run,
            rules=tuple(
                compile_rule(r, when_unknown=spec.action == "DENY") for r in spec.rules or ()
            ),
        )

    def matches(self, request: RequestAttributes, identity: Identity | None) -> bool:
        for rule in self.rules:  # noqa: SIM110 (see the NOTE at the top)
            if rule.predicate(request, identity):
                return True
        return False


@dataclass(frozen=True)
class PolicyResult:
    """The outcome of evaluation: allowed or not, the policy that decided, and what was only
    observed (AUDIT matches, dry-run verdicts as ``(policy, "allow" | "deny")``)."""

    allowed: bool
    policy: str | None
    reason: str
    audited: tuple[str, ...] = ()
    dry_run: tuple[tuple[str, str], ...] = ()


# The groups, in the order the indexed evaluation walks them: what is only observed first,
# since a DENY or ALLOW match ends the walk.
_AUDIT, _DRY_RUN, _DENY, _ALLOW = range(4)


@dataclass(frozen=True)
class _Entry:
    """One rule of one policy, as the indexed evaluation sees it."""

    rule: Predicate
    group: int
    policy: str
    slot: int  # the policy's place in its group
    others: int  # the candidate mask with every rule of this policy cleared
    verdict: str  # dry run: what the policy would decide when it matches


class PolicySet:
    """Every policy of a configuration, compiled and grouped by action.

    ``evaluate`` tries only the rules an index built here picks for the request (see
    ``policy.index``), in the linear order, so its result always equals ``evaluate_linear``.
    ``indexed=False`` makes ``evaluate`` linear.
    """

    def __init__(
        self,
        specs: Sequence[PolicySpec],
        *,
        indexed: bool = True,
        compiled_by_name: Mapping[str, CompiledPolicy] | None = None,
    ) -> None:
        # `compiled_by_name`: policies compiled already (one set per workload shares them).
        known = compiled_by_name or {}
        compiled = [(s, known.get(s.name) or CompiledPolicy.compile(s)) for s in specs]
        groups = (
            [c for c in compiled if c[1].action == "AUDIT"],
            [c for c in compiled if c[1].dry_run and c[1].action != "AUDIT"],
            [c for c in compiled if c[1].action == "DENY" and not c[1].dry_run],
            [c for c in compiled if c[1].action == "ALLOW" and not c[1].dry_run],
        )
        self.audit = tuple(p for _, p in groups[_AUDIT])
        self.dry_run = tuple(p for _, p in groups[_DRY_RUN])
        self.deny = tuple(p for _, p in groups[_DENY])
        self.allow = tuple(p for _, p in groups[_ALLOW])
        # A dry-run policy the request does not match: a DENY would allow, an ALLOW would deny.
        self._dry_run_unmatched = tuple(
            (p.name, "allow" if p.action == "DENY" else "deny") for p in self.dry_run
        )
        self._index: RuleIndex | None = None
        self._entries: tuple[_Entry, ...] = ()
        if indexed:
            rules: list[Rule] = []
            entries: list[_Entry] = []
            for group, members in enumerate(groups):
                for slot, (spec, policy) in enumerate(members):
                    first = len(rules)
                    rules.extend(spec.rules or ())
                    others = ~(((1 << len(rules)) - 1) ^ ((1 << first) - 1))
                    verdict = "deny" if policy.action == "DENY" else "allow"
                    entries.extend(
                        _Entry(rule.predicate, group, policy.name, slot, others, verdict)
                        for rule in policy.rules
                    )
            self._index = RuleIndex(rules)
            self._entries = tuple(entries)

    def candidates(self, request: RequestAttributes, identity: Identity | None) -> list[str]:
        """Names of the policies ``evaluate`` tries for ``request``, in order, each once
        (every policy with a rule when not indexed)."""
        if self._index is None:
            groups = (self.audit, self.dry_run, self.deny, self.allow)
            return [p.name for group in groups for p in group if p.rules]
        mask = self._index.candidates(request, identity)
        names: list[str] = []
        while mask:
            entry = self._entries[(mask & -mask).bit_length() - 1]
            names.append(entry.policy)
            mask &= entry.others
        return names

    def evaluate(self, request: RequestAttributes, identity: Identity | None) -> PolicyResult:
        if self._index is None:
            return self.evaluate_linear(request, identity)
        mask = self._index.candidates(request, identity)
        entries = self._entries
        audited: list[str] = []
        dry_run = self._dry_run_unmatched
        while mask:
            lowest = mask & -mask
            entry = entries[lowest.bit_length() - 1]
            if not entry.rule(request, identity):
                mask ^= lowest
                continue
            group = entry.group
            if group == _DENY:
                return PolicyResult(False, entry.policy, "policy_denied", tuple(audited), dry_run)
            if group == _ALLOW:
                return PolicyResult(True, entry.policy, "allowed", tuple(audited), dry_run)
            mask &= entry.others
            if group == _AUDIT:
                audited.append(entry.policy)
            else:
                verdicts = list(dry_run)
                verdicts[entry.slot] = (entry.policy, entry.verdict)
                dry_run = tuple(verdicts)
        if self.allow:
            return PolicyResult(False, None, "no_allow_policy_matched", tuple(audited), dry_run)
        return PolicyResult(True, None, "allowed", tuple(audited), dry_run)

    def evaluate_linear(
        self, request: RequestAttributes, identity: Identity | None
    ) -> PolicyResult:
        """The reference evaluation: every policy of every group, in order."""
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


# ------------------------------------------------------------------- what policies read

# The request attributes a field reads (``attributes_read``), by field: `attr.*` names, plus
# "method", "host", "path". Identity fields (requestPrincipals, request.auth.*) read none: the
# identity comes from the credential, which a decision memo keys on anyway.
_OPERATION_READS = {
    **_OPERATION_NEEDS,
    "hosts": "host",
    "not_hosts": "host",
    "methods": "method",
    "not_methods": "method",
    "paths": "path",
    "not_paths": "path",
}
_SOURCE_READS: dict[str, str | None] = {
    **{name: needs for name, needs in _SOURCE_NEEDS.items() if "remote" not in name},
    "remote_ip_blocks": "remote.ip",
    "not_remote_ip_blocks": "remote.ip",
    "request_principals": None,
    "not_request_principals": None,
}
_CONDITION_READS: dict[str, str | None] = {
    **_CONDITION_NEEDS,
    "remote.ip": "remote.ip",  # X-Forwarded-For first, then the source address
    "request.auth.principal": None,
    "request.auth.audiences": None,
    "request.auth.presenter": None,
}


def attributes_read(specs: Iterable[PolicySpec]) -> frozenset[str] | None:
    """The request attributes evaluating ``specs`` can read, beside the identity and
    ``RequestAttributes.unknown``: ``method``, ``host``, ``path`` (normalized from the raw
    path), ``source.ip``, ``remote.ip`` (X-Forwarded-For, then the source address),
    ``source.principal`` (the mTLS peer), ``destination.ip``, ``destination.port``,
    ``connection.sni``, ``header:<name>`` (lower case) and ``context_extensions:<key>``.

    Returns None when a set field or a ``when`` key is not known here (a field added later
    and not listed): its reads cannot be told, so nothing may be keyed on them."""
    reads: set[str] = set()
    for spec in specs:
        for rule in spec.rules or ():
            for to in rule.to or ():
                for name in type(to.operation).model_fields:
                    if getattr(to.operation, name) is None:
                        continue
                    if name not in _OPERATION_READS:
                        return None
                    reads.add(_OPERATION_READS[name])
            for from_ in rule.from_ or ():
                for name in type(from_.source).model_fields:
                    if getattr(from_.source, name) is None:
                        continue
                    if name not in _SOURCE_READS:
                        return None
                    source_read = _SOURCE_READS[name]
                    if source_read is not None:
                        reads.add(source_read)
            for condition in rule.when or ():
                key = condition.key
                if key in _CONDITION_READS:
                    condition_read = _CONDITION_READS[key]
                    if condition_read is not None:
                        reads.add(condition_read)
                elif key.startswith("request.auth.claims["):
                    continue
                elif key.startswith("request.headers["):
                    reads.add(f"header:{_CLAIM_PATH.findall(key)[0].lower()}")
                elif key.startswith("request.context_extensions["):
                    reads.add(f"context_extensions:{_CLAIM_PATH.findall(key)[0]}")
                else:
                    return None
    return frozenset(reads)
