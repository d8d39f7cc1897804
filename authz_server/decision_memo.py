"""The decision memo: a repeated request answered with the Decision made for its first copy.

Per engine (a reload starts empty) and per workload scope, a request is reduced at load to a
key: exactly the request attributes that decide it in that scope. Those are what its
extractor reads (the token headers' values, the Cookie header when a token may be in a
cookie, the query when one may be in a parameter, with the ambiguity checks over both), what
its policies read (``policy.compile.attributes_read``: method, host, path, named headers,
addresses, peer, port, SNI, context extensions, and which attributes the door could not
tell), and what shapes the allow (which token headers are present). An attribute no policy
reads (a source port, a request id) is not in the key, so it does not spoil the hits; a
policy reading something ``attributes_read`` cannot name makes its scope unmemoisable.

An entry holds the Decision itself (the doors cache rendered bytes per Decision object, so
a hit renders nothing either) and one validity per credential it rests on
(``CredentialValidity``), given by the cache that vouched for the credential: a JWT's
verified-token entry (still within ``exp`` and ``nbf`` with the skew, within the cache's
``maxTtl``, verified by a key still in its set), an introspection answer (still the one its
cache holds, before ``min(cacheTtl, exp)``, within ``nbf``), an API key (its table still
the one the keys file gave, before its ``expires``). A hit re-checks each on
``engine.clock()``, so a credential its cache would no longer vouch for is decided afresh.
Only answers that are functions of the key and of such credentials are offered here (see
``AuthorizationService``): never one that rests on a DPoP proof or a client certificate,
a credential nothing cached vouches for, a token that failed, a rewritten Cookie header, a
wait, or a trace.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from operator import attrgetter
from typing import NamedTuple, Protocol

from authz_server import attributes as attr
from authz_server.attributes import RequestAttributes
from authz_server.identity import Identity
from authz_server.responses import Decision

MemoKey = Callable[[RequestAttributes], Hashable]


class CredentialValidity(Protocol):
    """What keeps one credential a decision rested on valid, as its cache would judge it."""

    # NOTE: on every hit, once per credential: a few attribute reads, nothing allocated.
    def live(self, now: float) -> bool:
        """Whether the credential's cache would still vouch for it at ``now``."""
        ...

    def reused(self) -> None:
        """Count the reuse as the cache hit it stands for (called on a hit, after ``live``)."""
        ...


# RequestAttributes fields by what policies read (``policy.compile.attributes_read``).
_FIELDS = {
    "method": ("method",),
    "host": ("host",),
    "path": ("path",),  # raw: the normalized path is a function of it
    attr.SOURCE_IP: ("source_ip",),
    "remote.ip": ("source_ip",),  # and X-Forwarded-For, a header
    attr.SOURCE_PRINCIPAL: ("peer_principal",),
    attr.DESTINATION_IP: ("destination_ip",),
    attr.DESTINATION_PORT: ("destination_port",),
    attr.CONNECTION_SNI: ("sni",),
}


def memo_key(
    number: int,
    reads: frozenset[str] | None,
    *,
    headers: Iterable[str],
    cookies: bool,
    params: bool,
) -> MemoKey | None:
    """The key of a request in scope ``number``: the ``reads`` of its policies, the
    ``headers`` its extractor and the allow read (token headers), the Cookie header when
    ``cookies`` (a token cookie), the raw path when a policy reads it or ``params`` (a token
    parameter). None when ``reads`` is None or names an attribute not known here."""
    if reads is None:
        return None
    fields = {"unknown"}  # clauses on what the door could not tell fail closed
    header_names = set(headers)
    extensions: list[str] = []
    if cookies:
        header_names.add("cookie")
    if params:
        fields.add("path")
    for read in reads:
        if read.startswith("header:"):
            header_names.add(read.removeprefix("header:"))
        elif read.startswith("context_extensions:"):
            extensions.append(read.removeprefix("context_extensions:"))
        elif read in _FIELDS:
            fields.update(_FIELDS[read])
            if read == "remote.ip":
                header_names.add("x-forwarded-for")
        else:
            return None
    return _reader(number, tuple(sorted(fields)), tuple(sorted(header_names)), tuple(extensions))


def _reader(
    number: int, fields: tuple[str, ...], headers: tuple[str, ...], extensions: tuple[str, ...]
) -> MemoKey:
    # NOTE: runs on every Check: C-level getters (attrgetter, map over dict.get), one tuple.
    get_fields = attrgetter(*fields) if len(fields) > 1 else attrgetter(fields[0], fields[0])
    if extensions:

        def key_with_extensions(request: RequestAttributes) -> Hashable:
            return (
                number,
                get_fields(request),
                tuple(map(request.headers.get, headers)),
                tuple(map(request.context_extensions.get, extensions)),
            )

        return key_with_extensions

    def key(request: RequestAttributes) -> Hashable:
        return (number, get_fields(request), tuple(map(request.headers.get, headers)))

    return key


class MemoEntry(NamedTuple):
    # NOTE: a tuple: made on every miss, and a frozen dataclass costs ~1 us to build.
    decision: Decision
    identity: Identity | None
    checks: tuple[CredentialValidity, ...]  # one per credential the decision rests on


class MemoStats:
    """Hits and misses, kept across reloads (the counters a scrape reads)."""

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0


class DecisionMemo:
    """The memoised decisions of one engine, at most ``max_entries`` (then it starts over)."""

    def __init__(self, max_entries: int, stats: MemoStats) -> None:
        self.max_entries = max_entries
        self.stats = stats
        self._entries: dict[Hashable, MemoEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, clock: Callable[[], float]) -> MemoEntry | None:
        """The live entry for ``key`` (its credentials checked on ``clock``), or None."""
        entry = self._entries.get(key)
        # NOTE: counted without a lock, as the Check threads share the GIL: an increment
        # lost to a thread switch would cost a count, never a decision.
        if entry is not None:
            checks = entry.checks
            if checks:
                now = clock()
                for check in checks:
                    if not check.live(now):
                        self._entries.pop(key, None)  # its cache would not vouch for it now
                        self.stats.misses += 1
                        return None
                for check in checks:
                    check.reused()  # as the credential's cache hit would have counted
            self.stats.hits += 1
            return entry
        self.stats.misses += 1
        return None

    def put(
        self,
        key: Hashable,
        decision: Decision,
        identity: Identity | None,
        checks: Sequence[CredentialValidity],
    ) -> None:
        """Remember ``decision`` for ``key``, resting on the credentials ``checks`` vouch for."""
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # the busy callers come back at once
        self._entries[key] = MemoEntry(decision, identity, tuple(checks))
