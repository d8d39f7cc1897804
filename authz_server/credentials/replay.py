"""The replay cache: a DPoP proof's ``jti`` is accepted once within the proof's lifetime.

Two stores, one contract (``ReplayCache.first_use``):
- ``MemoryReplayCache`` (the default): bounded, expiring with the window. It covers ONE
  process: neither ``--workers`` siblings nor other replicas see its entries.
- ``RedisReplayCache`` (``server.replayCache.redis``): one ``SET key NX PX window`` per proof,
  so every process and replica sharing the Redis agrees. Redis slow or down means the proof
  cannot be checked: ``ReplayCacheUnavailable``, which the service turns into a 503
  (fail closed) for DPoP requests only.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from authz_server import errors, request_trace
from authz_server.errors import DependencyError


class ReplayCacheUnavailable(DependencyError):  # noqa: N818 (an error: DependencyError's family)
    """The replay cache could not answer (Redis down, slow, refusing, or memory full)."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            errors.REPLAY_CACHE_UNAVAILABLE, detail, description="replay cache unavailable"
        )


class ReplayCache(Protocol):
    """Where seen proofs are remembered."""

    #: "process" (one process only) or "shared" (every process using the same store).
    covers: str

    def first_use(self, key: str, ttl: float) -> bool:
        """Record ``key`` for ``ttl`` seconds. Returns True the first time within that window,
        False for a replay. Raises ReplayCacheUnavailable when it cannot tell."""
        ...

    def ready(self) -> str | None:
        """None when usable, else why not (for ``/readyz``)."""
        ...

    def close(self) -> None: ...


class MemoryReplayCache:
    """In-process replay cache, bounded in entries. When full of unexpired entries it refuses
    (fail closed) rather than forget a proof that could then be replayed."""

    covers = "process"

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self._max = max_entries
        self._clock = clock
        self._expiry: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def first_use(self, key: str, ttl: float) -> bool:
        now = self._clock()
        with self._lock:
            expiry = self._expiry.get(key)
            if expiry is not None and expiry > now:
                return False
            if expiry is not None:
                del self._expiry[key]
            self._purge(now)
            if len(self._expiry) >= self._max:
                raise ReplayCacheUnavailable(f"replay cache full ({self._max} entries)")
            self._expiry[key] = now + ttl
            return True

    def _purge(self, now: float) -> None:
        # Entries are in insertion order and every ttl is the provider's window, so the oldest
        # expire first; a longer ttl behind a shorter one is purged later, never too early.
        while self._expiry:
            key, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                break
            del self._expiry[key]

    def __len__(self) -> int:
        return len(self._expiry)

    def ready(self) -> str | None:
        return None

    def close(self) -> None:
        with self._lock:
            self._expiry.clear()


@dataclass(frozen=True)
class RedisSettings:
    """How to reach the Redis shared by every replica (``server.replayCache.redis``)."""

    url: str
    password: str | None = None
    username: str | None = None
    key_prefix: str = "authz-server:dpop:"
    timeout: float = 0.25
    ca_file: str | None = None


class RedisReplayCache:
    """Replay cache in Redis: ``SET prefix+key 1 NX PX ttl``; a reply of OK is a first use."""

    covers = "shared"

    def __init__(self, settings: RedisSettings) -> None:
        import redis  # noqa: PLC0415 (NOTE: imported only when configured: most never need it)

        self._settings = settings
        options: dict[str, object] = {
            "socket_timeout": settings.timeout,
            "socket_connect_timeout": settings.timeout,
            "retry_on_timeout": False,
            "health_check_interval": 0,
        }
        if settings.password is not None:
            options["password"] = settings.password
        if settings.username is not None:
            options["username"] = settings.username
        if settings.ca_file is not None and settings.url.startswith("rediss://"):
            options["ssl_ca_certs"] = settings.ca_file
        self._client = redis.Redis.from_url(settings.url, **options)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

    def first_use(self, key: str, ttl: float) -> bool:
        trace = request_trace.current.get()
        started_ns = time.time_ns() if trace is not None else 0
        outcome = "unavailable"
        try:
            reply = self._client.set(
                self._settings.key_prefix + key, b"1", nx=True, px=max(1, int(ttl * 1000))
            )
            outcome = "new" if reply else "replayed"
        except self._errors as exc:
            raise ReplayCacheUnavailable(f"redis: {type(exc).__name__}") from None
        finally:
            if trace is not None:
                # A child span of the traced Check: the Redis round trip it waited for.
                trace.waited("replay_cache.redis", started_ns, time.time_ns(), outcome)
        return bool(reply)

    def ready(self) -> str | None:
        try:
            self._client.ping()
        except self._errors as exc:
            return f"redis replay cache unreachable ({type(exc).__name__})"
        return None

    def close(self) -> None:
        self._client.close()
