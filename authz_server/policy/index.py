"""Which rules can match a request, found by lookup instead of by trying every rule.

Built once per configuration from the rules of every policy, each rule numbered by its place in
evaluation order (bit ``i`` of a candidate mask is rule ``i``). A rule is filed under a key only
when every way it can match needs that key:

- ``to``: each operation must list ``hosts``, ``paths`` or ``methods``; the rule is filed under
  the patterns of one such field per operation (the rarest), since a request matching the rule
  matches one of those patterns. Exact values go in a dict, ``prefix*`` and the literal head of a
  path template in tables by prefix length, ``*suffix`` in tables by suffix length, ``*`` under
  "present".
- token presence: a rule whose every ``from`` source lists ``requestPrincipals``, or with a
  ``when`` condition with ``values`` on ``request.auth.*``, matches only with an identity.

Anything else (no ``to``, an operation with only ``not*`` fields or ports, ``rules: [{}]``)
stays on the unplaced list, a candidate for every request. The lookup over-approximates: a
candidate may still fail its full predicate, but a rule that is not a candidate cannot match.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from authz_server.attributes import RequestAttributes
from authz_server.config.specs import Operation, Rule
from authz_server.identity import Identity

PatternKind = Literal["exact", "prefix", "suffix", "present", "template"]
Dimension = Literal["host", "path", "method"]

TEMPLATE_OPERATOR = re.compile(r"(\{\*\*\}|\{\*\})")
_IDENTITY_KEYS = ("request.auth.principal", "request.auth.audiences", "request.auth.presenter")
# When two fields of an operation are equally rare, the host is preferred, then the path.
_DIMENSIONS: tuple[Dimension, ...] = ("host", "path", "method")


def pattern_kind(pattern: str, *, template: bool = False) -> tuple[PatternKind, str]:
    """Istio's reading of a string pattern: ``(kind, text)``, where text is what is compared.

    ``*`` is present (non-empty); a path with ``{*}``/``{**}`` is a template (text: the whole
    pattern); then a trailing ``*`` makes a prefix, a leading one a suffix, else exact.
    """
    if pattern == "*":
        return "present", ""
    if template and "{*" in pattern:
        return "template", pattern
    if pattern.endswith("*"):
        return "prefix", pattern[:-1]
    if pattern.startswith("*"):
        return "suffix", pattern[1:]
    return "exact", pattern


def template_head(pattern: str) -> str:
    """The literal text a path template starts with: every path it matches starts with it."""
    return TEMPLATE_OPERATOR.split(pattern, maxsplit=1)[0]


class StringIndex:
    """Rules by the string patterns of one attribute: ``hits(value)`` is the mask of rules
    with a pattern that can match ``value``."""

    def __init__(self) -> None:
        self._exact: dict[str, int] = {}
        self._prefix: dict[int, dict[str, int]] = {}
        self._suffix: dict[int, dict[str, int]] = {}
        self._present = 0
        self._prefix_tables: tuple[tuple[int, dict[str, int]], ...] = ()
        self._suffix_tables: tuple[tuple[int, dict[str, int]], ...] = ()

    def add(self, kind: PatternKind, text: str, bit: int) -> None:
        if kind == "exact":
            self._exact[text] = self._exact.get(text, 0) | bit
        elif kind == "present":
            self._present |= bit
        elif kind == "suffix" and text:
            table = self._suffix.setdefault(len(text), {})
            table[text] = table.get(text, 0) | bit
        else:  # prefix, or the literal head of a template (an empty one prefixes everything)
            head = template_head(text) if kind == "template" else text
            table = self._prefix.setdefault(len(head), {})
            table[head] = table.get(head, 0) | bit

    def freeze(self) -> None:
        """Sort the length tables, shortest first, so a lookup stops at the value's length."""
        self._prefix_tables = tuple(sorted(self._prefix.items()))
        self._suffix_tables = tuple(sorted(self._suffix.items()))

    def hits(self, value: str) -> int:
        found = self._exact.get(value, 0)
        size = len(value)
        for length, table in self._prefix_tables:
            if length > size:
                break
            found |= table.get(value[:length], 0)
        for length, table in self._suffix_tables:
            if length > size:
                break
            found |= table.get(value[-length:], 0)
        if value:
            found |= self._present
        return found

    def __bool__(self) -> bool:
        return bool(self._exact or self._prefix or self._suffix or self._present)


def _operation_keys(operation: Operation) -> dict[Dimension, list[tuple[PatternKind, str]]]:
    """The keys each positive field of ``operation`` offers, by dimension."""
    keys: dict[Dimension, list[tuple[PatternKind, str]]] = {}
    if operation.hosts:
        keys["host"] = [pattern_kind(p.lower()) for p in operation.hosts]
    if operation.paths:
        keys["path"] = [pattern_kind(p, template=True) for p in operation.paths]
    if operation.methods:
        keys["method"] = [pattern_kind(p) for p in operation.methods]
    return keys


def requires_identity(rule: Rule) -> bool:
    """True when ``rule`` cannot match a request without a verified token."""
    if rule.from_ and all(f.source.request_principals for f in rule.from_):
        return True
    return any(
        condition.values
        and (condition.key in _IDENTITY_KEYS or condition.key.startswith("request.auth.claims["))
        for condition in rule.when or ()
    )


Key = tuple[Dimension, PatternKind, str]
# Where one rule is filed: under keys (it needs one of them), under token presence, or nowhere.
Placement = list[Key] | Literal["identity", "unplaced"]


def place(rules: Sequence[Rule]) -> list[Placement]:
    """Where to file each rule. Each operation of ``to`` offers the patterns of its positive
    host, path and method fields; the rule takes, per operation, the field whose patterns the
    fewest other operations share (presence and one-character prefixes count as shared by all),
    or token presence when that is rarer, or when ``to`` cannot place it."""
    offers = [[_operation_keys(to.operation) for to in rule.to or ()] for rule in rules]
    shared: Counter[Key] = Counter(
        (dim, kind, text)
        for operations in offers
        for keys in operations
        for dim, patterns in keys.items()
        for kind, text in patterns
    )
    everyone = len(rules) + 1

    def cost(dim: Dimension, patterns: list[tuple[PatternKind, str]]) -> int:
        return sum(
            everyone
            if kind == "present" or (kind == "prefix" and len(text) < 2)
            else shared[dim, kind, text]
            for kind, text in patterns
        )

    needs_identity = [requires_identity(rule) for rule in rules]
    identity_cost = sum(needs_identity)
    placements: list[Placement] = []
    for operations, identity_only in zip(offers, needs_identity, strict=True):
        keys: list[Key] = []
        to_cost = everyone * everyone
        if operations and all(operations):
            to_cost = 0
            for offer in operations:
                dim = min(offer, key=lambda d: (cost(d, offer[d]), _DIMENSIONS.index(d)))
                to_cost += cost(dim, offer[dim])
                keys.extend((dim, kind, text) for kind, text in offer[dim])
        if identity_only and (not keys or identity_cost < to_cost):
            placements.append("identity")
        else:
            placements.append(keys or "unplaced")
    return placements


class RuleIndex:
    """Candidate rules for a request, as a bit mask over the rules given, in their order."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        tables: dict[Dimension, StringIndex] = {dim: StringIndex() for dim in _DIMENSIONS}
        self.identity = 0  # rules that need a token
        self.unplaced = 0  # rules every request must try
        for position, placement in enumerate(place(rules)):
            bit = 1 << position
            if placement == "identity":
                self.identity |= bit
            elif placement == "unplaced":
                self.unplaced |= bit
            else:
                for dim, kind, text in placement:
                    tables[dim].add(kind, text, bit)
        for table in tables.values():
            table.freeze()
        # An empty table is skipped at lookup.
        self._host = tables["host"] or None
        self._path = tables["path"] or None
        self._method = tables["method"] or None

    def candidates(self, request: RequestAttributes, identity: Identity | None) -> int:
        """The mask of rules that may match ``request``; every other rule cannot."""
        found = self.unplaced
        if self._host is not None:
            for form in request.host_forms:
                found |= self._host.hits(form)
        if self._path is not None:
            found |= self._path.hits(request.normalized_path)
        if self._method is not None:
            found |= self._method.hits(request.method)
        if identity is not None:
            found |= self.identity
        return found
