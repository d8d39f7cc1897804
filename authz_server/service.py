"""The decision core: credentials → verify → evaluate → respond. No wire format lives here.

``Engine`` is everything compiled from one ``Settings`` (providers with their key caches,
token locations, policies, output header lists). ``AuthorizationService.check`` decides one
request with the current engine; swapping the engine is one reference assignment, so a
reload never mixes two configurations in one decision.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from authz_server import errors, responses
from authz_server.attributes import RequestAttributes, cookie_name, fold_cookie_name
from authz_server.config.load import Provider, Settings
from authz_server.config.specs import PolicySpec
from authz_server.credentials.binding import DpopRules, NonceSource, SenderConstraint
from authz_server.credentials.extract import CredentialExtractor, FoundToken, provider_locations
from authz_server.credentials.jwt import ProviderRuntime, TokenVerifier, WaitMode
from authz_server.credentials.replay import (
    MemoryReplayCache,
    RedisReplayCache,
    RedisSettings,
    ReplayCache,
)
from authz_server.credentials.token_cache import TokenCache
from authz_server.credentials.verification import CredentialVerifier
from authz_server.decision_memo import (
    CredentialValidity,
    DecisionMemo,
    MemoKey,
    MemoStats,
    memo_key,
)
from authz_server.errors import AuthenticationError, AuthorizationError, AuthzError, WouldWait
from authz_server.identity import Identity
from authz_server.keys.keyset import JWKSCache
from authz_server.keys.sources import source_for
from authz_server.ops.log import DecisionLog
from authz_server.ops.metrics import Metrics
from authz_server.policy.compile import CompiledPolicy, PolicySet, attributes_read
from authz_server.policy.workloads import WorkloadIndex
from authz_server.responses import Decision

if TYPE_CHECKING:
    from authz_server.ops.tracing import Tracing

log = logging.getLogger("authz_server.service")

_SEPARATORS = re.compile(r"[-_]")
# Allow decisions kept per engine (one per caller and deciding policy); past this, start over.
_ALLOWS_KEPT = 4096


def _list_element_ok(item: object) -> bool:
    """A list element that survives the upstream splitting the header on commas and trimming
    spaces: a non-empty string with no comma and no space at either end."""
    return isinstance(item, str) and item != "" and "," not in item and item == item.strip()


def _header_value(value: Any) -> str | None:
    """A claim as a header value: strings as-is, scalars as JSON text, string lists joined
    by commas. Objects, lists with an element that would split differently (``"x,admins"``
    in ``["eng", "x,admins"]`` would read as two groups), strings with a space at either end
    (the policies saw ``" root "``, the upstream would read ``root``: HTTP trims header
    values) and anything with control characters give no header."""
    if isinstance(value, str):
        if value != value.strip():
            return None
        text = value
    elif isinstance(value, bool | int | float):
        text = json.dumps(value)
    elif isinstance(value, list) and all(_list_element_ok(v) for v in value):
        text = ",".join(value)
    else:
        return None
    if not text.isprintable():  # no CR/LF or other controls in a header value
        return None
    return text


def _claim(claims: Mapping[str, Any], name: str, parts: tuple[str, ...]) -> Any:
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in parts:  # nested claims, as Istio's `claim: a.b`
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def header_twins(header: str, limit: int = 64) -> list[str]:
    """Every other spelling of ``header`` with ``-`` and ``_`` swapped in its separators
    (``x-user``: ``x_user``; ``x_groups``: ``x-groups``), which CGI-style upstreams read as
    the header itself. At most ``limit``."""
    parts = _SEPARATORS.split(header)
    twins: list[str] = []
    for mask in range(1 << (len(parts) - 1)):
        if len(twins) >= limit:
            break
        name = parts[0]
        for index, part in enumerate(parts[1:]):
            name += ("_" if mask >> index & 1 else "-") + part
        if name != header:
            twins.append(name)
    return twins


def _without_cookies(header: str, names: set[str]) -> str:
    """The Cookie header ``header`` without the cookies named in ``names``, read as
    ``RequestAttributes.cookies`` reads them (``,`` separates too, names trimmed and in any
    case), so that every cookie read as a token is taken out; the others are kept as sent."""
    taken = {fold_cookie_name(name) for name in names}
    kept: list[str] = []
    for part in header.split(";"):
        if "," in part:
            text = ",".join(c for c in part.split(",") if cookie_name(c) not in taken).strip()
        else:
            text = "" if cookie_name(part) in taken else part.strip()
        if text:
            kept.append(text)
    return "; ".join(kept)


class _ProviderOutputs:
    """Per provider: headers to fill from a verified token, precomputed."""

    def __init__(self, runtime: ProviderRuntime) -> None:
        spec = runtime.provider.spec
        self.claim_headers = tuple(
            (h.header.lower(), h.claim, tuple(h.claim.split(".")))
            for h in spec.output_claim_to_headers
        )
        self.payload_header = (spec.output_payload_to_header or "").lower() or None
        self.forward_token = spec.forward_original_token

    def headers(self, identity: Identity) -> tuple[list[tuple[str, str]], list[str]]:
        """(the headers to set, the headers withheld: their claim is there but cannot be a
        header value)."""
        out: list[tuple[str, str]] = []
        withheld: list[str] = []
        for header, claim, parts in self.claim_headers:
            raw = _claim(identity.claims, claim, parts)
            if raw is None:
                continue
            value = _header_value(raw)
            if value is None:
                withheld.append(header)
            else:
                out.append((header, value))
        if self.payload_header:
            out.append((self.payload_header, identity.payload_segment))
        return out, withheld


@dataclass(frozen=True)
class WorkloadScope:
    """What decides the requests of one workload: the policies and providers in its scope.
    ``workload`` None: every policy and provider (no workloads declared, or an unknown
    workload under ``scoping.unknownWorkload: allPolicies``). Its extractor reads only the
    token locations of its providers and hands tokens only to them, so a token is verified
    by a provider in scope (two RequestAuthentications of one issuer in two namespaces are
    two providers: each workload's token goes to its own)."""

    workload: str | None
    policies: PolicySet
    providers: frozenset[str] | None  # None: every provider
    token_required: bool
    extractor: CredentialExtractor
    # A request's key in the engine's decision memo; None: its requests are never memoised.
    memo_key: MemoKey | None = None


class Engine:
    """Everything derived from one Settings, ready for the hot path."""

    def __init__(
        self,
        settings: Settings,
        caches: Mapping[str, JWKSCache],
        clock: Callable[[], float] = time.time,
        token_cache: TokenCache | None = None,
        threads: int | None = None,
        *,
        replay_cache: ReplayCache | None = None,
        memo_stats: MemoStats | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.realm = settings.server.realm
        self.missing_token_status = settings.server.missing_token_status
        self.trusted_proxy_hops = settings.server.trusted_proxy_hops
        self.missing_credentials = responses.deny(
            AuthenticationError(errors.MISSING_CREDENTIALS), realm=self.realm, token_present=False
        )
        self.ambiguous_credentials = responses.deny(
            AuthenticationError(errors.AMBIGUOUS_CREDENTIALS),
            realm=self.realm,
            token_present=True,
        )
        # A token location read two ways (a token cookie beside a comma, a token parameter
        # beside a semicolon): refused by reason.
        self.ambiguous_readings = {
            reason: responses.deny(
                AuthenticationError(reason), realm=self.realm, token_present=True
            )
            for reason in (errors.AMBIGUOUS_COOKIE, errors.AMBIGUOUS_QUERY)
        }
        self.threads = threads or settings.server.threads
        self.providers = tuple(ProviderRuntime.build(p, caches[p.name]) for p in settings.providers)
        self.caches = dict(caches)
        self.extractor = CredentialExtractor(self.providers)
        server = settings.server
        self.token_cache = token_cache or TokenCache(
            server.token_cache.max_entries, server.token_cache.max_ttl, clock=clock
        )
        self.verifier = TokenVerifier(
            clock,
            cache=self.token_cache,
            unknown_kid_wait=server.unknown_kid_wait,
            max_token_bytes=server.max_token_bytes,
            # NOTE: the running pool's size: a reload cannot resize it.
            max_waiting=max(1, (threads or server.threads) // 2),
        )
        # JWTs, API keys and opaque tokens, each to the provider of its kind.
        self.credentials = CredentialVerifier(self.verifier, clock)
        for cache in self.caches.values():
            # A key that left its set stops validating at once; this frees its entries too.
            if self.token_cache.purge not in cache.listeners:
                cache.listeners.append(self.token_cache.purge)
        # Sender-constrained tokens: the rules of each provider that has them, and where seen
        # proofs are remembered (kept across reloads, so a reload never re-admits a replay).
        self.constraints = {
            c.provider: c
            for c in (
                _sender_constraint(p, server.trust_forwarded_client_cert) for p in self.providers
            )
            if c is not None
        }
        # Every header a token is read from, present in a request: removed before the upstream
        # whatever it holds (a token under another scheme, `Token …`, is not ours to pass on),
        # unless it held a token its provider forwards.
        proof_headers = (
            {"dpop"} if any(c.dpop_mode != "disabled" for c in self.constraints.values()) else set()
        )
        self.token_header_names = tuple(sorted(self.extractor.token_headers | proof_headers))
        # Repeated requests answered from here (per engine: a reload starts empty).
        self.memo_stats = memo_stats or MemoStats()
        memo_entries = server.decision_memo.max_entries
        self.memo = DecisionMemo(memo_entries, self.memo_stats) if memo_entries else None
        # Each policy compiled once, whatever the number of workload scopes it is in.
        self._compiled = {s.name: CompiledPolicy.compile(s) for s in settings.policies}
        self.policies = PolicySet(settings.policies, compiled_by_name=self._compiled)
        self.token_required = any(p.provider.spec.presence == "REQUIRED" for p in self.providers)
        self.everywhere = WorkloadScope(
            None,
            self.policies,
            None,
            self.token_required,
            self.extractor,
            self._memo_key(0, settings.policies, self.providers),
        )
        self.workload_index: WorkloadIndex | None = None
        self.scopes: dict[str, WorkloadScope] = {}
        # The scope of a request no workload recognises: None denies it (unknown_workload).
        self.unknown_scope: WorkloadScope | None = self.everywhere
        if settings.workloads:
            self.workload_index = WorkloadIndex(settings.workloads)
            self.scopes = {
                w.name: self._scope(settings, w.name, number)
                for number, w in enumerate(settings.workloads, start=1)
            }
            if settings.unknown_workload == "deny":
                self.unknown_scope = None
        self.unknown_workload = responses.deny(
            AuthorizationError(errors.UNKNOWN_WORKLOAD), realm=self.realm, token_present=False
        )
        self.outputs = {p.name: _ProviderOutputs(p) for p in self.providers}
        self.replay_cache: ReplayCache = replay_cache or make_replay_cache(settings)
        # (id(identity), policy, stripped token headers, query parameters) -> (identity, allow)
        self._allows: dict[
            tuple[int, str | None, tuple[str, ...], tuple[str, ...]],
            tuple[Identity | None, Decision],
        ] = {}
        # Every header any provider may set: a client-sent copy never reaches the upstream.
        self.protected_headers = frozenset(
            h for o in self.outputs.values() for h, _, _ in o.claim_headers
        ) | frozenset(o.payload_header for o in self.outputs.values() if o.payload_header)
        # NOTE: CGI-style upstreams read `x_user` as `x-user` (and `x-groups` as `x_groups`):
        # every other spelling of an identity header or of a header a token is read from is
        # removed on every allow, sent or not, so that no door needs to see it (Envoy's HTTP
        # ext_authz sends only the headers it is told to). A spelling we read or set stays.
        ours = self.protected_headers | self.extractor.token_headers
        self.twin_headers = frozenset(
            twin for header in ours for twin in header_twins(header) if twin not in ours
        )

    def _scope(self, settings: Settings, workload: str, number: int) -> WorkloadScope:
        def applies(scopes: dict[str, frozenset[str]], name: str) -> bool:
            return name not in scopes or workload in scopes[name]

        runtimes = [p for p in self.providers if applies(settings.provider_scopes, p.provider.name)]
        specs = [p for p in settings.policies if applies(settings.policy_scopes, p.name)]
        return WorkloadScope(
            workload,
            PolicySet(specs, compiled_by_name=self._compiled),
            frozenset(p.provider.name for p in runtimes),
            any(p.provider.spec.presence == "REQUIRED" for p in runtimes),
            CredentialExtractor(runtimes),
            self._memo_key(number, specs, runtimes),
        )

    def _memo_key(
        self, number: int, specs: Sequence[PolicySpec], runtimes: Sequence[ProviderRuntime]
    ) -> MemoKey | None:
        """The memo key of scope ``number`` (its policies ``specs``, its providers
        ``runtimes``); None when the memo is off or the scope cannot be memoised."""
        if self.memo is None:
            return None
        locations = [loc for runtime in runtimes for loc in provider_locations(runtime)]
        return memo_key(
            number,
            attributes_read(specs),
            # Every token header of the engine: which are present shapes the allow (`strip`).
            headers=self.token_header_names,
            cookies=any(loc.kind == "cookie" for loc in locations),
            params=any(loc.kind == "param" for loc in locations),
        )

    def scope_for(self, request: RequestAttributes) -> WorkloadScope | None:
        """The scope ``request`` is decided in; None when workloads are declared, none
        recognises the request and unknown workloads are denied."""
        if self.workload_index is None:
            return self.everywhere
        workload = self.workload_index.identify(request)
        return self.scopes[workload.name] if workload is not None else self.unknown_scope

    @classmethod
    def build(
        cls,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        previous: Engine | None = None,
    ) -> Engine:
        """The engine for ``settings``, over new key caches (not loaded yet), except that the
        caches of ``previous`` are kept for providers whose configuration did not change."""
        kept = previous.reusable_caches() if previous is not None else {}
        caches = {p.name: kept.get(_cache_identity(p)) or make_cache(p) for p in settings.providers}
        # The token cache (and its counters) carries over; entries stay valid for providers
        # whose verification scope is unchanged, the others age out of the LRU.
        token_cache = None
        if previous is not None and (
            previous.settings.server.token_cache == settings.server.token_cache
        ):
            token_cache = previous.token_cache
        threads = previous.threads if previous is not None else settings.server.threads
        replay_cache = None
        if previous is not None and (
            previous.settings.server.replay_cache == settings.server.replay_cache
        ):
            replay_cache = previous.replay_cache
        return cls(
            settings,
            caches,
            clock,
            token_cache,
            threads,
            replay_cache=replay_cache,
            memo_stats=previous.memo_stats if previous is not None else None,
        )

    def reusable_caches(self) -> dict[tuple[object, ...], JWKSCache]:
        return {_cache_identity(p.provider): p.keys for p in self.providers}

    def close(self, successor: Engine | None = None) -> None:
        """Detach from the key caches ``successor`` does not keep, and stop them."""
        kept = {id(c) for c in successor.caches.values()} if successor is not None else set()
        shared_cache = successor is not None and successor.token_cache is self.token_cache
        for cache in self.caches.values():
            if (id(cache) not in kept or not shared_cache) and (
                self.token_cache.purge in cache.listeners
            ):
                cache.listeners.remove(self.token_cache.purge)
            if id(cache) not in kept:
                cache.stop()
        if successor is None or successor.replay_cache is not self.replay_cache:
            self.replay_cache.close()

    def allow_for(
        self,
        identity: Identity | None,
        policy: str | None,
        strip: tuple[str, ...],
        query_strip: tuple[str, ...] = (),
    ) -> Decision:
        """The allow for this caller, built once and reused: a caller repeating a token gets
        the same headers, metadata and answer every time."""
        key = (id(identity), policy, strip, query_strip)
        cached = self._allows.get(key)
        # NOTE: the entry holds the identity itself, so an id reused after GC never matches.
        if cached is not None and cached[0] is identity:
            return cached[1]
        decision = self.build_allow(identity, policy, strip, query_strip)
        if len(self._allows) >= _ALLOWS_KEPT:
            self._allows.clear()  # the busy callers come back at once
        self._allows[key] = (identity, decision)
        return decision

    def build_allow(
        self,
        identity: Identity | None,
        policy: str | None,
        strip: tuple[str, ...],
        query_strip: tuple[str, ...] = (),
        *,
        audited: tuple[str, ...] = (),
        dry_run: tuple[tuple[str, str], ...] = (),
        cookie: str | None = None,
    ) -> Decision:
        """An allow: the identity's headers set; their client-sent copies, every other
        spelling of them and of the token headers, the token headers in ``strip`` and the
        query parameters in ``query_strip`` removed. ``cookie``: the Cookie header to send on
        in place of the client's (its token cookies taken out; "" removes it)."""
        to_set: list[tuple[str, str]] = []
        withheld: list[str] = []
        to_remove = set(self.protected_headers) | self.twin_headers
        to_remove.update(strip)
        if identity is not None:
            to_set, withheld = self.outputs[identity.provider].headers(identity)
        if cookie is not None:
            if cookie:
                to_set = [*to_set, ("cookie", cookie)]
            else:
                to_remove.add("cookie")
        to_remove.difference_update(h for h, _ in to_set)
        return responses.allow(
            headers_to_set=tuple(to_set),
            headers_to_remove=tuple(sorted(to_remove)),
            query_params_to_remove=query_strip,
            metadata=identity.metadata if identity is not None else None,
            provider=identity.provider if identity is not None else None,
            principal=identity.principal if identity is not None else None,
            policy=policy,
            audited=audited,
            dry_run=dry_run,
            withheld=tuple(withheld),
        )

    def missing_or_denied(self, identity: Identity | None, error: AuthzError) -> Decision:
        """A policy denial: the prebuilt 401 for an anonymous caller (unless Istio's 403 is
        configured), else the 403 for ``error``."""
        if identity is None and self.missing_token_status == 401:
            return self.missing_credentials
        return responses.deny(error, realm=self.realm, token_present=identity is not None)


_KEY_FIELDS = {
    "issuer",
    "jwks_uri",
    "jwks",
    "jwks_file",
    "discovery",
    "shared_secret_file",
    "ca_file",
    "timeout",
    "algorithms",
    "refresh_interval",
    "min_refresh_interval",
    "max_stale",
}


def _cache_identity(provider: Provider) -> tuple[object, ...]:
    """What a key cache depends on: a reload keeps the cache when none of it changed."""
    # An introspection or API keys provider's cache holds identities made with all of it.
    jwt = provider.spec.kind == "jwt"
    keys = provider.spec.model_dump_json(include=_KEY_FIELDS if jwt else None)
    return (
        provider.name,
        keys,
        provider.jwks_file,
        provider.ca_file,
        provider.shared_secret_file,
        provider.client_secret_file,
        provider.api_keys_file,
    )


def make_cache(provider: Provider) -> JWKSCache:
    """The key cache for ``provider`` (not loaded yet)."""
    spec = provider.spec
    return JWKSCache(
        provider=provider.name,
        allowed_algs=frozenset(spec.algorithms),
        source=source_for(provider),
        refresh_interval=spec.refresh_interval,
        min_refresh_interval=spec.min_refresh_interval,
        # NOTE: a broken keys file keeps the last good keys for good (there is nothing stale
        # about an API key the way there is about a rotated signing key).
        max_stale=spec.max_stale if spec.kind == "jwt" else math.inf,
    )


def _sender_constraint(runtime: ProviderRuntime, trust_xfcc: bool) -> SenderConstraint | None:
    spec = runtime.provider.spec
    if spec.dpop.mode == "disabled" and spec.certificate_bound == "disabled":
        return None
    secret = runtime.provider.nonce_secret_file
    nonces = NonceSource(secret.read_bytes().strip()) if spec.dpop.nonce and secret else None
    return SenderConstraint(
        provider=runtime.name,
        dpop_mode=spec.dpop.mode,
        dpop=DpopRules(
            algorithms=frozenset(spec.dpop.algorithms),
            proof_lifetime=spec.dpop.proof_lifetime,
            clock_skew=spec.clock_skew,
            external_url=spec.dpop.external_url,
        ),
        certificate_mode=spec.certificate_bound,
        trust_forwarded_client_cert=trust_xfcc,
        nonces=nonces,
    )


def _read_secret(path: str | None) -> str | None:
    return Path(path).read_text().strip() if path is not None else None


def make_replay_cache(settings: Settings) -> ReplayCache:
    """The replay cache ``server.replayCache`` describes: Redis when configured, else memory."""
    spec = settings.server.replay_cache
    if spec.redis is None:
        return MemoryReplayCache(spec.max_entries)
    return RedisReplayCache(
        RedisSettings(
            url=spec.redis.url,
            username=spec.redis.username,
            password=_read_secret(spec.redis.password_file),
            key_prefix=spec.redis.key_prefix,
            timeout=spec.redis.timeout,
            ca_file=spec.redis.ca_file,
        )
    )


@dataclass
class CheckTrace:
    """What ``check`` went through, recorded only when a caller asks (``explain``): the
    tokens it found, each it tried with the identity or the error that came of it, and whether
    the decision reached the policies (and with which identity)."""

    found: tuple[FoundToken, ...] = ()
    tokens: list[tuple[FoundToken, Identity | AuthzError]] = field(default_factory=list)
    policies_evaluated: bool = False
    identity: Identity | None = None
    scope: WorkloadScope | None = None  # None: an unknown workload, denied


class AuthorizationService:
    """Decides Checks with the current engine, then records them. Fails closed on any
    unexpected error."""

    def __init__(
        self,
        engine: Engine,
        *,
        metrics: Metrics | None = None,
        decision_log: DecisionLog | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.decision_log = decision_log
        self.tracing = tracing  # None: tracing off, and no cost per Check beyond this check

    def check(
        self,
        request: RequestAttributes,
        *,
        wait: WaitMode = "yes",
        trace: CheckTrace | None = None,
    ) -> Decision:
        """Decide ``request``. With ``wait="defer"`` (an event loop's thread), raises
        WouldWait, before counting or logging anything, when deciding needs to wait for a
        key-set refresh: the caller decides again where it may wait (``"yes"``), or without
        waiting (``"no"``). ``trace``, when given, records the way to the decision."""
        started = time.perf_counter()
        engine = self.engine  # one engine for the whole decision, even across a reload
        identity: Identity | None = None
        span = self.tracing.begin(request) if self.tracing is not None else None
        if span is not None and trace is None:
            trace = CheckTrace()  # what the span reports: workload, credential, cache use
        try:
            decision, identity = self._decide(engine, request, wait, trace)
        except WouldWait:
            if span is not None:
                span.suspend(request)  # the door decides it again: the same span goes on
            raise
        except Exception:
            # NOTE: the exception text may quote request data; log type and place, not values.
            log.exception("internal error while deciding %s %s", request.method, request.host)
            decision = responses.internal_error()
        elapsed = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.record(decision, elapsed, request.door)
        if span is not None:
            span.finish(request, decision, trace, engine.token_cache, identity)
        decision_log = self.decision_log
        if decision_log is not None and decision_log.wants(decision):
            ids = span.ids if span is not None else None
            decision_log.write(request, decision, identity, elapsed, ids)  # queues: no I/O here
        return decision

    def _decide(
        self,
        engine: Engine,
        request: RequestAttributes,
        wait: WaitMode,
        trace: CheckTrace | None = None,
    ) -> tuple[Decision, Identity | None]:
        request.trusted_proxy_hops = engine.trusted_proxy_hops
        scope = engine.scope_for(request)
        if trace is not None:
            trace.scope = scope
        if scope is None:
            return engine.unknown_workload, None
        key_of = scope.memo_key
        memo = engine.memo
        if key_of is None or memo is None or trace is not None:
            return self._decide_in(engine, scope, request, wait, trace, None)
        key = key_of(request)
        entry = memo.get(key, engine.clock)
        if entry is not None:
            return entry.decision, entry.identity
        checks: list[CredentialValidity | None] = []
        decision, identity = self._decide_in(engine, scope, request, wait, None, checks)
        if None not in checks:
            memo.put(key, decision, identity, cast("list[CredentialValidity]", checks))
        return decision, identity

    def _decide_in(  # noqa: PLR0917 (the one caller above)
        self,
        engine: Engine,
        scope: WorkloadScope,
        request: RequestAttributes,
        wait: WaitMode,
        trace: CheckTrace | None,
        verified_for_memo: list[CredentialValidity | None] | None,
    ) -> tuple[Decision, Identity | None]:
        """Decide ``request`` in ``scope``. ``verified_for_memo``, when given, receives the
        validity of each credential the decision rests on, and None when the decision may
        not be memoised."""
        ambiguity = scope.extractor.ambiguity(request)
        if ambiguity is not None:
            return engine.ambiguous_readings[ambiguity], None
        found = scope.extractor.extract(request)
        if trace is not None:
            trace.found = tuple(found)
        if len(found) > 1 and len({token.token for token in found}) > 1:
            # Two principals in one request: whichever the policies saw, the upstream may
            # read the other. Refused rather than guessed.
            return engine.ambiguous_credentials, None
        identity: Identity | None = None
        forwarded: set[str] = set()
        query_strip: list[str] = []
        cookie_strip: set[str] = set()
        verified: dict[tuple[str, bytes], Identity] = {}
        for token in found:
            key = (token.token, token.scope)
            current = verified.get(key)
            if current is None:
                constraint = None
                try:
                    current = engine.credentials.verify(token, wait=wait)
                    constraint = engine.constraints.get(current.provider)
                    if verified_for_memo is not None:
                        # A proof or a certificate is checked on every request: never memoised.
                        verified_for_memo.append(
                            engine.credentials.validity(token, current)
                            if constraint is None
                            else None
                        )
                    if constraint is not None:
                        constraint.check(
                            current.claims,
                            token=token.token,
                            presented_as_dpop=token.location.is_dpop,
                            request=request,
                            now=engine.clock(),
                            replay=engine.replay_cache,
                        )
                except AuthzError as exc:
                    if verified_for_memo is not None:
                        verified_for_memo.append(None)  # a failure may be gone next time
                    if trace is not None:
                        trace.tokens.append((token, exc))
                    denial = responses.with_context(
                        responses.deny(
                            exc,
                            realm=engine.realm,
                            token_present=True,
                            dpop_algs=constraint.algs if constraint is not None else "",
                        ),
                        provider=exc.provider
                        or (constraint.provider if constraint is not None else None)
                        or (token.providers[0].name if len(token.providers) == 1 else None),
                        principal=None,
                        policy=None,
                    )
                    return denial, None
                verified[key] = current
            if trace is not None:
                trace.tokens.append((token, current))
            identity = identity or current
            if engine.outputs[current.provider].forward_token:
                if token.location.kind == "header":
                    forwarded.add(token.location.name)
                    if token.location.is_dpop:
                        forwarded.add("dpop")  # the upstream may verify the proof itself
            elif token.location.kind == "param" and token.location.name not in query_strip:
                query_strip.append(token.location.name)
            elif token.location.kind == "cookie":
                cookie_strip.add(token.location.name)
        if identity is None and scope.token_required:
            return engine.missing_credentials, None

        if trace is not None:
            trace.policies_evaluated, trace.identity = True, identity
        result = scope.policies.evaluate(request, identity)
        provider = identity.provider if identity else None
        principal = identity.principal if identity else None
        if not result.allowed:
            denial = responses.with_context(
                engine.missing_or_denied(identity, AuthorizationError(result.reason)),
                provider=provider,
                principal=principal,
                policy=result.policy,
                audited=result.audited,
                dry_run=result.dry_run,
            )
            return denial, identity

        headers = request.headers
        strip = tuple(
            name
            for name in engine.token_header_names
            if name not in forwarded and headers.get(name) is not None
        )
        if cookie_strip and verified_for_memo is not None:
            verified_for_memo.append(None)  # the Cookie header rewritten: this request's own
        if result.audited or result.dry_run or cookie_strip:
            # Observed verdicts, or a Cookie header rewritten without the token: this
            # request's own answer.
            decision = engine.build_allow(
                identity,
                result.policy,
                strip,
                tuple(query_strip),
                audited=result.audited,
                dry_run=result.dry_run,
                cookie=_without_cookies(headers.get("cookie", ""), cookie_strip)
                if cookie_strip
                else None,
            )
        else:
            decision = engine.allow_for(identity, result.policy, strip, tuple(query_strip))
        return decision, identity
