"""The replay cache: a proof's jti is accepted once per window, in one process (memory) and
across processes sharing a real Redis; an unreachable Redis fails closed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from authz_server import errors
from authz_server.credentials.binding import replay_key
from authz_server.credentials.replay import (
    MemoryReplayCache,
    RedisReplayCache,
    RedisSettings,
    ReplayCacheUnavailable,
)
from tests.redis_server import PASSWORD, RedisServer, running_redis


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_accepts_a_jti_once_per_window_then_again_after_it() -> None:
    clock = Clock()
    cache = MemoryReplayCache(clock=clock)
    key = replay_key("p", "jkt", "jti-1")
    assert cache.first_use(key, 60)
    assert not cache.first_use(key, 60)
    clock.now += 59.9
    assert not cache.first_use(key, 60)
    clock.now += 0.2
    assert cache.first_use(key, 60)


def test_the_same_jti_from_two_keys_is_two_proofs() -> None:
    cache = MemoryReplayCache()
    assert cache.first_use(replay_key("p", "key-a", "same"), 60)
    assert cache.first_use(replay_key("p", "key-b", "same"), 60)


def test_a_full_memory_cache_refuses_rather_than_forgets() -> None:
    clock = Clock()
    cache = MemoryReplayCache(max_entries=2, clock=clock)
    assert cache.first_use("a", 60) and cache.first_use("b", 60)
    with pytest.raises(ReplayCacheUnavailable) as caught:
        cache.first_use("c", 60)
    assert caught.value.reason == errors.REPLAY_CACHE_UNAVAILABLE
    assert caught.value.status == 503
    assert not cache.first_use("a", 60)  # still remembered
    clock.now += 61
    assert cache.first_use("c", 60)  # expired entries make room
    assert len(cache) == 1


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> RedisServer:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server  # type: ignore[misc]


def test_redis_accepts_a_jti_once_and_expires_it(redis: RedisServer) -> None:
    cache = RedisReplayCache(RedisSettings(url=redis.url, password=PASSWORD, key_prefix="t1:"))
    assert cache.ready() is None
    assert cache.first_use("k", 0.2)
    assert not cache.first_use("k", 0.2)
    # Redis expires the key by itself: poll for it, bounded.
    import time

    deadline = time.monotonic() + 5
    while not cache.first_use("k", 30):
        assert time.monotonic() < deadline, "the key never expired"
        time.sleep(0.05)
    cache.close()


def test_a_replay_to_another_process_sharing_the_redis_is_refused(redis: RedisServer) -> None:
    settings = RedisSettings(url=redis.url, password=PASSWORD, key_prefix="t2:")
    cache = RedisReplayCache(settings)
    assert cache.first_use(replay_key("fapi", "jkt", "jti-x"), 60)
    script = (
        "import sys\n"
        "from authz_server.credentials.binding import replay_key\n"
        "from authz_server.credentials.replay import RedisReplayCache, RedisSettings\n"
        "settings = RedisSettings(url=sys.argv[1], password=sys.argv[2], key_prefix='t2:')\n"
        "cache = RedisReplayCache(settings)\n"
        "print(cache.first_use(replay_key('fapi', 'jkt', 'jti-x'), 60),\n"
        "      cache.first_use(replay_key('fapi', 'jkt', 'jti-y'), 60))\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", script, redis.url, PASSWORD],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert other.stdout.split() == ["False", "True"]


def test_a_wrong_password_or_a_dead_redis_fails_closed_without_leaking_it(
    redis: RedisServer, tmp_path: Path
) -> None:
    wrong = RedisReplayCache(RedisSettings(url=redis.url, password="not-" + PASSWORD))
    dead = RedisReplayCache(RedisSettings(url=f"unix://{tmp_path}/none.sock", password=PASSWORD))
    for cache in (wrong, dead):
        with pytest.raises(ReplayCacheUnavailable) as caught:
            cache.first_use("k", 60)
        assert caught.value.status == 503
        assert PASSWORD not in str(caught.value)
        assert cache.ready() is not None
