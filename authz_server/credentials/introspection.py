"""Opaque tokens: OAuth2 Token Introspection (RFC 7662), cached.

``Introspector`` is one provider's client and cache. A token it has not seen is sent to the
IdP (``POST`` form ``token=…&token_type_hint=access_token``, HTTP Basic client
authentication, https verified against the provider's ``caFile``), one call per token at a
time (single-flight) and at most ``maxConcurrentCalls`` calls at once. The answer is kept,
keyed by the token's SHA-256 (never the token), in a bounded LRU: an active answer until
``min(cacheTtl, exp)``, an inactive or refused one for ``negativeCacheTtl``. An IdP that does
not answer, answers slowly, with a non-200 status, a redirect, or anything but a JSON object
with a boolean ``active`` is a ``DependencyError`` (503, fail closed) and is never cached.

The introspector is also its provider's ``jwks.KeySource`` (``load`` gives an empty key set
that counts as loaded), so the engine keeps it across a reload exactly when the provider's
configuration is unchanged: a changed endpoint, client or secret file starts an empty cache.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, urlencode, urlsplit

from authz_server import errors, request_trace
from authz_server.config.specs import IntrospectionSpec
from authz_server.credentials.jwt import ProviderRuntime, TokenVerifier, WaitMode, check_times
from authz_server.errors import AuthenticationError, DependencyError, WouldWait
from authz_server.identity import Identity
from authz_server.keys.keyset import KeySet

log = logging.getLogger("authz_server.introspection")

MAX_RESPONSE_BYTES = 1 << 20
# Latency buckets of the calls to the IdP (seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The `result` label of the calls: bounded, never request data.
CALL_RESULTS = (
    "active", "inactive", "timeout", "unreachable", "http_error", "redirect", "bad_response",
    "busy",
)  # fmt: skip


class _Failure(Exception):  # noqa: N818 (internal: becomes a DependencyError)
    def __init__(self, result: str, detail: str) -> None:
        super().__init__(detail)
        self.result = result


@dataclass(frozen=True)
class IntrospectionReady(KeySet):
    """The key set of an introspection provider: none, and ready from the start."""

    may_be_empty: ClassVar[bool] = True

    def reusing(self, previous: KeySet | None) -> KeySet:
        return self

    @property
    def summary(self) -> str:
        return "nothing (tokens are introspected when they come)"


@dataclass(frozen=True, slots=True)
class _Entry:
    outcome: Identity | AuthenticationError
    exp: float | None
    nbf: float | None
    until: float  # on the clock: reused until then


def _digest(token: str) -> bytes:
    """The answer cache's key for ``token`` (its SHA-256: the token itself is never kept)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class AnswerValidity:
    """What keeps a decision resting on a cached introspection answer valid
    (``decision_memo.CredentialValidity``): the answer is still the one the cache holds for
    its token (not past ``min(cacheTtl, exp)``, not evicted, not dropped with a changed client
    secret) and within its ``nbf`` with the skew, as ``Introspector.verify`` checks on a hit."""

    __slots__ = ("digest", "entry", "introspector", "skew")

    def __init__(
        self,
        introspector: Introspector,
        digest: bytes,
        entry: _Entry,
        skew: float,
    ) -> None:
        self.introspector = introspector
        self.digest = digest
        self.entry = entry
        self.skew = skew

    def live(self, now: float) -> bool:
        """Whether a ``verify`` at ``now`` would give the answer's identity from the cache."""
        entry = self.entry
        # The introspector's cache, read without its lock: one get.
        if now >= entry.until or self.introspector.cached(self.digest) is not entry:
            return False
        # `until` is at most `exp`; `nbf` matters when the clock goes back.
        nbf = entry.nbf
        return nbf is None or now + self.skew >= nbf

    def reused(self) -> None:
        """Count the reuse as the cache hit it stands for (and keep the answer recent)."""
        self.introspector.reused(self.digest)


@dataclass
class _Flight:
    done: threading.Event = field(default_factory=threading.Event)
    entry: _Entry | None = None
    error: DependencyError | None = None


@dataclass
class IntrospectionStats:
    """Counters a scrape reads (``metrics``): calls by result, their latency, cache use."""

    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CALL_RESULTS, 0))
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_count: int = 0
    latency_sum: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    shared: int = 0  # requests that waited for another request's call (single-flight)

    def observe(self, seconds: float) -> None:
        """One call's latency, whatever its result."""
        self.latency_count += 1
        self.latency_sum += seconds
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.bucket_counts[index] += 1
                break


def _basic_auth(client_id: str, secret: str) -> str:
    # RFC 6749 2.3.1: id and secret are form-urlencoded before the Basic encoding.
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class Introspector:
    """One introspection provider's client, answer cache and call bounds."""

    remote = False  # nothing to refresh in the background (jwks.KeySource)
    watched = False

    def __init__(
        self,
        provider: str,
        spec: IntrospectionSpec,
        secret_file: Path,
        ca_file: Path | None = None,
    ) -> None:
        self.provider = provider
        self.spec = spec
        self.description = spec.endpoint
        self._secret_file = secret_file
        self._secret: tuple[tuple[int, int, int] | None, str] | None = None
        parts = urlsplit(spec.endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            # NOTE: built once: loading a CA bundle costs ~40 ms per context.
            self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._flights: dict[bytes, _Flight] = {}
        self._lock = threading.Lock()
        self._calls = threading.BoundedSemaphore(spec.max_concurrent_calls)
        self.stats = IntrospectionStats()
        # Set by `check` and `test` to decide without the IdP: the answer for each token.
        self._offline: dict[str, dict[str, Any]] | None = None

    def answer_offline(self, answers: Mapping[str, Mapping[str, Any]]) -> None:
        """Decide without the IdP from now on: ``answers`` holds the introspection answer
        for each token (any other token is inactive). For ``check`` and ``test``."""
        self._offline = {token: dict(answer) for token, answer in answers.items()}

    # ------------------------------------------------------------- jwks.KeySource

    def load(self, allowed_algs: frozenset[str], origin: str) -> tuple[KeySet, float | None]:
        return IntrospectionReady(keys=()), None

    def changed(self) -> bool:
        return False

    # ------------------------------------------------------------------- verify

    def __len__(self) -> int:
        return len(self._entries)

    def validity(self, token: str, identity: Identity, skew: float) -> AnswerValidity | None:
        """The validity of the cached answer for ``token`` if it gave ``identity`` (the
        ``verify`` that just returned it), else None (an answer that was not cached)."""
        digest = _digest(token)
        entry = self._entries.get(digest)
        if entry is None or entry.outcome is not identity:
            return None
        return AnswerValidity(self, digest, entry, skew)

    def cached(self, digest: bytes) -> _Entry | None:
        """The cache's entry for ``digest`` as it is (unlocked, uncounted)."""
        return self._entries.get(digest)

    def reused(self, digest: bytes) -> None:
        """A decision resting on the answer for ``digest`` was reused: a cache hit."""
        with self._lock:
            self.stats.cache_hits += 1
            if digest in self._entries:
                self._entries.move_to_end(digest)

    def verify(
        self,
        token: str,
        provider: ProviderRuntime,
        verifier: TokenVerifier,
        *,
        clock: Callable[[], float] = time.time,
        wait: WaitMode = "yes",
    ) -> Identity:
        """The identity the IdP vouches for behind ``token``, from the cache when it can.

        Raises AuthenticationError (token_inactive, or the claim checks' reasons),
        DependencyError (introspection_unavailable: the IdP could not answer), or WouldWait
        with ``wait="defer"`` when a call is needed (decide again on a thread that may wait).
        """
        digest = _digest(token)
        now = clock()
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None and now >= entry.until:
                del self._entries[digest]
                entry = None
            if entry is not None:
                self._entries.move_to_end(digest)
                self.stats.cache_hits += 1
                flight, owner = None, False
            else:
                if wait == "defer":
                    raise WouldWait
                self.stats.cache_misses += 1
                flight = self._flights.get(digest)
                owner = flight is None
                if flight is None:
                    flight = self._flights[digest] = _Flight()
                else:
                    self.stats.shared += 1
        if flight is not None:
            if owner:
                # NOTE: a call holds a Check thread up to `timeout`: past the verifier's
                # waiting slots a new token is not sent (503), so that many tokens at a hanging
                # IdP never hold every thread and the other providers keep answering. Requests
                # joining a call in flight wait for it without a slot (one call serves them).
                slot = verifier.waiting.acquire(blocking=False)
                try:
                    entry = self._fly(
                        flight, digest, token, provider, verifier, clock, wait if slot else "no"
                    )
                finally:
                    if slot:
                        verifier.waiting.release()
            elif not flight.done.wait(2 * self.spec.timeout + 1.0):
                # The owner's call ends within its timeout and the wait for a call slot.
                raise self._unavailable("the introspection call did not finish")
            else:
                entry = flight.entry
            if entry is None:
                raise flight.error or self._unavailable("no answer")
        assert entry is not None
        outcome = entry.outcome
        if isinstance(outcome, AuthenticationError):
            # NOTE: the cached error is raised again and again: without its last traceback,
            # or each raise would chain onto the previous ones (memory that only grows).
            raise outcome.with_traceback(None)
        check_times(entry.exp, entry.nbf, provider.clock_skew, clock())
        return outcome

    def _fly(  # noqa: PLR0917 (one call site, all needed)
        self,
        flight: _Flight,
        digest: bytes,
        token: str,
        provider: ProviderRuntime,
        verifier: TokenVerifier,
        clock: Callable[[], float],
        wait: WaitMode,
    ) -> _Entry | None:
        try:
            if wait == "no":
                # No thread may wait here (the HTTP door's waiting threads are all busy).
                raise self._failed("busy", "no thread free to wait for the IdP")
            response = self._introspect(token)
            now = clock()
            flight.entry = self._entry(response, provider, verifier, now)
            self._store(digest, flight.entry, now)
        except DependencyError as exc:
            flight.error = exc
        finally:
            with self._lock:
                self._flights.pop(digest, None)
            flight.done.set()
        return flight.entry

    def _store(self, digest: bytes, entry: _Entry, now: float) -> None:
        limit = self.spec.cache_max_entries
        if not limit or entry.until <= now:
            return
        with self._lock:
            self._entries[digest] = entry
            self._entries.move_to_end(digest)
            while len(self._entries) > limit:
                self._entries.popitem(last=False)

    def _entry(
        self,
        response: dict[str, Any],
        provider: ProviderRuntime,
        verifier: TokenVerifier,
        now: float,
    ) -> _Entry:
        """The cache entry for an answer received at ``now``: the identity, or the 401 it
        means."""
        negative = now + self.spec.negative_cache_ttl
        if response["active"] is not True:
            self._count("inactive")
            inactive = AuthenticationError(
                errors.TOKEN_INACTIVE, "the IdP says the token is inactive"
            )
            return _Entry(inactive, None, None, negative)
        self._count("active")
        iss = response.get("iss")
        try:
            if iss is not None and iss != provider.issuer:
                raise AuthenticationError(
                    errors.INVALID_ISSUER, "the introspection answer names another issuer"
                )
            identity, exp, nbf = verifier.identity_from_claims(provider, response)
        except AuthenticationError as exc:
            return _Entry(exc, None, None, negative)
        identity = Identity(
            provider=identity.provider,
            issuer=identity.issuer,
            subject=identity.subject,
            claims=identity.claims,
            audiences=identity.audiences,
            presenter=identity.presenter
            if identity.presenter is not None
            else (response["client_id"] if isinstance(response.get("client_id"), str) else None),
            payload_segment="",
            space_delimited=identity.space_delimited,
            credential="introspection",
        )
        until = now + self.spec.cache_ttl
        if exp is not None:
            until = min(until, exp)
        return _Entry(identity, exp, nbf, until)

    # --------------------------------------------------------------------- call

    def _count(self, result: str) -> None:
        with self._lock:  # calls of several tokens end at once
            self.stats.calls[result] = self.stats.calls.get(result, 0) + 1

    def _observe(self, seconds: float) -> None:
        with self._lock:
            self.stats.observe(seconds)

    def _unavailable(self, detail: str) -> DependencyError:
        return DependencyError(errors.INTROSPECTION_UNAVAILABLE, f"{self.provider}: {detail}"[:200])

    def _failed(self, result: str, detail: str) -> DependencyError:
        self._count(result)
        log.warning(
            "provider %s: introspection at %s failed (%s): %s; its tokens get 503",
            self.provider,
            self.spec.endpoint,
            result,
            detail,
        )
        return self._unavailable(detail)

    def _secret_value(self) -> str:
        """The client secret, read again when its file changes (then the cache is dropped:
        another client may be told other things)."""
        signature = _file_signature(self._secret_file)
        current = self._secret
        if current is None or current[0] != signature:
            try:
                value = self._secret_file.read_text("utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise _Failure("unreachable", f"cannot read the client secret: {exc}") from None
            with self._lock:
                if current is not None:
                    self._entries.clear()
                self._secret = (signature, value)
            return value
        return current[1]

    def _introspect(self, token: str) -> dict[str, Any]:
        """POST the token to the endpoint; the answer, a JSON object with a boolean ``active``.

        Raises DependencyError (counted and logged) for anything else."""
        if self._offline is not None:
            try:
                return _answer(self._offline.get(token, {"active": False}))
            except _Failure as failure:
                raise self._failed(failure.result, str(failure)) from None
        timeout = self.spec.timeout
        if not self._calls.acquire(timeout=timeout):
            raise self._failed("busy", "too many introspection calls in flight")
        started = time.perf_counter()
        trace = request_trace.current.get()
        started_ns = time.time_ns() if trace is not None else 0
        outcome = "error"
        try:
            response = self._post(token, timeout)
            outcome = "active" if response.get("active") is True else "inactive"
        except _Failure as failure:
            self._observe(time.perf_counter() - started)
            raise self._failed(failure.result, str(failure)) from None
        finally:
            self._calls.release()
            if trace is not None:
                # A child span of the traced Check: the call it waited for, and what came of it.
                trace.waited("introspection.call", started_ns, time.time_ns(), outcome)
        self._observe(time.perf_counter() - started)
        return response

    def _post(self, token: str, timeout: float) -> dict[str, Any]:
        body = urlencode({"token": token, "token_type_hint": "access_token"}).encode("ascii")
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            "Authorization": _basic_auth(self.spec.client_id, self._secret_value()),
            # The traced Check this call is made for (traceparent, tracestate), if any.
            **request_trace.outgoing_headers(),
        }
        deadline = time.monotonic() + timeout
        connection: http.client.HTTPConnection
        if self._ssl is not None:
            connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._ssl
            )
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        try:
            connection.request("POST", self._path, body=body, headers=headers)
            reply = connection.getresponse()
            raw = reply.read(MAX_RESPONSE_BYTES + 1)
            if time.monotonic() > deadline:
                raise _Failure("timeout", f"no whole answer within {timeout:g}s")
        except TimeoutError:
            raise _Failure("timeout", f"no answer within {timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Failure("unreachable", f"{type(exc).__name__}: {exc}") from None
        finally:
            connection.close()
        if 300 <= reply.status < 400:
            # Never followed: the token and the client secret go to the configured endpoint only.
            raise _Failure("redirect", f"answered {reply.status} (redirects are not followed)")
        if reply.status != 200:
            raise _Failure("http_error", f"answered HTTP {reply.status}")
        if len(raw) > MAX_RESPONSE_BYTES:
            raise _Failure("bad_response", "answer larger than 1 MiB")
        try:
            answer = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _Failure("bad_response", "the answer is not JSON") from None
        return _answer(answer)


def _answer(answer: object) -> dict[str, Any]:
    """``answer`` if it is an introspection answer: a JSON object with a boolean ``active``.
    Raises _Failure."""
    if not isinstance(answer, dict) or not isinstance(answer.get("active"), bool):
        raise _Failure("bad_response", "the answer has no boolean 'active'")
    return answer
