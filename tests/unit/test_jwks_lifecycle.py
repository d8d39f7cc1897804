"""JWKSCache lifecycle against a real HTTP IdP on 127.0.0.1, with a clock the test moves.

Refresh scheduling (max-age within bounds, jitter), failure backoff, stale-if-error up to
maxStale, recovery, and the unknown-kid refresh: single-flight, rate-limited, time-bounded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from authz_server import errors
from authz_server.config.load import Provider
from authz_server.config.specs import ASYMMETRIC_ALGORITHMS, ProviderSpec
from authz_server.credentials.jwt import ProviderRuntime, TokenVerifier
from authz_server.errors import AuthenticationError, DependencyError
from authz_server.keys.keyset import JWKSCache, KeySet
from authz_server.keys.sources import InlineSource, UrlSource
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.e2e.harness import JWKSServer, wait_until
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for

ALL = frozenset(ASYMMETRIC_ALGORITHMS)


@pytest.fixture(autouse=True)
def _join_refresh_threads() -> Iterator[None]:
    """Unknown-kid refreshes run in their own threads; none may outlive its test."""
    yield
    for thread in threading.enumerate():
        if thread.name.startswith("jwks-kid-"):
            thread.join(5)
            assert not thread.is_alive(), f"{thread.name} still running"


@pytest.fixture
def clock() -> Clock:
    # Whole seconds far from 0: every sum the tests make is exact in floating point.
    return Clock(start=float(int(time.time())))


@pytest.fixture
def idp(rsa_key: SigningKey) -> Iterator[JWKSServer]:
    with JWKSServer(devkeys.jwks(rsa_key)) as server:
        yield server


def make(
    idp: JWKSServer,
    clock: Clock,
    *,
    refresh_interval: float = 300.0,
    min_refresh_interval: float = 30.0,
    max_stale: float = 3600.0,
    timeout: float = 2.0,
) -> JWKSCache:
    return JWKSCache(
        provider="idp",
        allowed_algs=ALL,
        source=UrlSource(idp.jwks_url, timeout=timeout, ssl_context=None),
        refresh_interval=refresh_interval,
        min_refresh_interval=min_refresh_interval,
        max_stale=max_stale,
        clock=clock,
        jitter=lambda: 1.0,
    )


# ------------------------------------------------------------------------- scheduling


@pytest.mark.parametrize(
    ("cache_control", "next_in"),
    [
        (None, 300.0),
        ("max-age=120", 120.0),
        ("public, max-age=5", 30.0),  # below minRefreshInterval
        ("max-age=0", 30.0),
        ("max-age=86400", 300.0),  # above refreshInterval
        ("no-cache", 300.0),
    ],
)
def test_next_refresh_honours_max_age_within_bounds(
    idp: JWKSServer,
    rsa_key: SigningKey,
    clock: Clock,
    cache_control: str | None,
    next_in: float,
) -> None:
    headers = {"Cache-Control": cache_control} if cache_control else {}
    idp.set_jwks(devkeys.jwks(rsa_key), headers=headers)
    cache = make(idp, clock)
    assert cache.refresh()
    assert cache.next_refresh - clock.now == pytest.approx(next_in)


def test_refresh_is_jittered_below_the_interval(idp: JWKSServer, clock: Clock) -> None:
    cache = JWKSCache(
        provider="idp",
        allowed_algs=ALL,
        source=UrlSource(idp.jwks_url, timeout=2, ssl_context=None),
        refresh_interval=100.0,
        clock=clock,
        jitter=lambda: 0.9,
    )
    assert cache.refresh()
    assert cache.next_refresh - clock.now == pytest.approx(90.0)
    default = JWKSCache(
        provider="idp",
        allowed_algs=ALL,
        source=UrlSource(idp.jwks_url, timeout=2, ssl_context=None),
        refresh_interval=100.0,
        clock=clock,
    )
    assert default.refresh()
    assert 85.0 <= default.next_refresh - clock.now <= 100.0


def test_min_refresh_interval_never_exceeds_refresh_interval(idp: JWKSServer) -> None:
    cache = make(idp, Clock(), refresh_interval=10.0, min_refresh_interval=60.0)
    assert cache.min_refresh_interval == 10.0


def test_tick_fetches_only_when_due(idp: JWKSServer, clock: Clock) -> None:
    cache = make(idp, clock, refresh_interval=60.0)
    cache.tick()  # never loaded: due at once
    assert idp.fetch_count() == 1 and cache.keyset is not None
    clock.advance(59.9)
    cache.tick()
    assert idp.fetch_count() == 1
    clock.advance(0.1)
    cache.tick()
    assert idp.fetch_count() == 2


# ---------------------------------------------------------------------------- failures


def test_failures_back_off_exponentially_up_to_the_refresh_interval(
    idp: JWKSServer, clock: Clock
) -> None:
    cache = make(idp, clock, refresh_interval=20.0, min_refresh_interval=5.0)
    assert cache.refresh()
    clock.advance(cache.next_refresh - clock.now)
    idp.set_failure(status=500)
    delays = []
    for _ in range(7):
        fetched = idp.fetch_count()
        cache.tick()
        assert idp.fetch_count() == fetched + 1
        delay = cache.next_refresh - clock.now
        delays.append(delay)
        clock.advance(delay - 0.01)
        cache.tick()  # not due yet: no fetch
        assert idp.fetch_count() == fetched + 1
        clock.advance(0.01)
    assert delays == pytest.approx([1, 2, 4, 8, 16, 20, 20])
    assert cache.fetches == {"success": 1, "failure": 7}

    idp.clear_failure()
    cache.tick()
    assert cache.last_error is None and cache.next_refresh - clock.now == pytest.approx(20)
    clock.advance(20)
    idp.set_failure(status=500)
    cache.tick()
    assert cache.next_refresh - clock.now == pytest.approx(1)  # backoff starts over


def test_stale_keys_serve_until_max_stale_then_are_dropped_and_listeners_told(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    cache = make(idp, clock, refresh_interval=60.0, min_refresh_interval=5.0, max_stale=600.0)
    seen: list[object] = []
    cache.listeners.append(lambda c: seen.append(c.keyset))
    assert cache.refresh()
    good = cache.keyset
    assert seen == [good]
    loaded_at = clock.now

    idp.set_failure(status=503)
    while clock.now - loaded_at < 600.0:
        clock.advance(min(cache.next_refresh, loaded_at + 600.0) - clock.now)
        cache.tick()
        assert cache.keyset is good, f"dropped after {clock.now - loaded_at}s"
    assert cache.stale_for() == pytest.approx(600.0)
    assert cache.fetches["failure"] >= 10 and "HTTP Error 503" in (cache.last_error or "")
    assert seen == [good]  # failures do not notify

    clock.advance(0.5)
    cache.tick()
    assert cache.keyset is None
    assert seen == [good, None]

    idp.clear_failure()
    clock.advance(cache.next_refresh - clock.now)
    cache.tick()
    assert cache.keyset is not None and set(cache.keyset.by_kid) == {rsa_key.kid}
    assert cache.last_error is None and cache.stale_for() == 0.0
    assert seen[-1] is cache.keyset and len(seen) == 3


def test_keys_never_refreshed_yet_are_not_dropped_as_stale(idp: JWKSServer, clock: Clock) -> None:
    cache = make(idp, clock, refresh_interval=300.0, max_stale=60.0)
    assert cache.refresh()
    clock.advance(61)
    cache.tick()
    assert cache.keyset is not None  # nothing failed: the keys are fresh, just not due


def test_an_idp_down_at_start_is_retried_until_it_answers(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    idp.set_failure(close_connection=True)
    cache = make(idp, clock)
    cache.tick()
    cache.tick()
    assert cache.keyset is None and idp.fetch_count() == 1
    clock.advance(1)
    cache.tick()
    assert cache.keyset is None and idp.fetch_count() == 2
    assert cache.stale_for() == 0.0  # nothing to be stale
    idp.clear_failure()
    clock.advance(2)
    cache.tick()
    assert cache.keyset is not None and rsa_key.kid in cache.keyset.by_kid


def test_inline_keys_are_never_refreshed_nor_dropped(rsa_key: SigningKey, clock: Clock) -> None:
    cache = JWKSCache(
        provider="inline",
        allowed_algs=ALL,
        source=InlineSource(json.dumps(devkeys.jwks(rsa_key))),
        max_stale=10.0,
        clock=clock,
    )
    assert cache.refresh()
    keyset = cache.keyset
    clock.advance(10_000)
    cache.tick()
    assert cache.keyset is keyset and cache.fetches["success"] == 1


def test_background_thread_loads_at_once_and_stop_joins_it(idp: JWKSServer) -> None:
    cache = JWKSCache(
        provider="bg",
        allowed_algs=ALL,
        source=UrlSource(idp.jwks_url, timeout=2, ssl_context=None),
    )
    cache.start()
    try:
        wait_until(lambda: cache.keyset is not None, timeout=5, what="the first load")
    finally:
        cache.stop()
    assert not [t for t in threading.enumerate() if t.name == "jwks-bg"]
    assert idp.fetch_count() == 1


# --------------------------------------------------------------------- unknown kid


def test_a_new_kid_published_by_the_idp_is_found_with_one_fetch(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    cache = make(idp, clock)
    assert cache.refresh()
    new = devkeys.generate_key("EC-P256", kid="new-1")
    idp.set_jwks(devkeys.jwks(rsa_key, new))
    assert cache.refresh_for_kid("new-1", wait=5)
    assert idp.fetch_count() == 2
    assert cache.refresh_for_kid("new-1", wait=5)  # known now: no fetch
    assert idp.fetch_count() == 2


def test_concurrent_requests_for_an_unknown_kid_share_one_fetch(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    cache = make(idp, clock)
    assert cache.refresh()
    new = devkeys.generate_key("EC-P256", kid="new-1")
    idp.set_jwks(devkeys.jwks(rsa_key, new))
    idp.set_failure(hang_seconds=10, path="/jwks.json")  # hold the fetch open until released
    barrier = threading.Barrier(20)
    results: list[bool] = []
    lock = threading.Lock()

    def ask() -> None:
        barrier.wait()
        found = cache.refresh_for_kid("new-1", wait=8)
        with lock:
            results.append(found)

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for thread in threads:
        thread.start()
    idp.wait_for_fetches(2, timeout=5)
    idp.clear_failure()  # the one fetch answers with the new set
    for thread in threads:
        thread.join(10)
    assert results == [True] * 20
    assert idp.fetch_count() == 2  # the initial load and exactly one for the 20 requests


def test_concurrent_refreshes_share_one_load(idp: JWKSServer, clock: Clock) -> None:
    cache = make(idp, clock)
    decisions: list[bool] = []  # True for the caller that loads, False for those who wait
    start_or_join = cache._join_or_start

    def recorded() -> Any:
        flight, owner = start_or_join()
        decisions.append(owner)
        return flight, owner

    cache._join_or_start = recorded  # type: ignore[method-assign]
    idp.set_failure(hang_seconds=10)
    outcomes: list[bool] = []
    threads = [threading.Thread(target=lambda: outcomes.append(cache.refresh())) for _ in range(10)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(decisions) == 10, timeout=5, what="10 refresh() callers")
    idp.clear_failure()
    for thread in threads:
        thread.join(10)
    assert sorted(decisions) == [False] * 9 + [True]
    assert outcomes == [True] * 10 and idp.fetch_count() == 1


def test_unknown_kid_refreshes_at_most_once_per_min_refresh_interval(
    idp: JWKSServer, clock: Clock
) -> None:
    cache = make(idp, clock, min_refresh_interval=30.0)
    assert cache.refresh()
    assert not cache.refresh_for_kid("nope-1", wait=5)
    assert idp.fetch_count() == 2
    for n in range(200):  # a flood of random kids within the interval: no fetch at all
        assert not cache.refresh_for_kid(f"random-{n}", wait=5)
    clock.advance(29.9)
    assert not cache.refresh_for_kid("nope-2", wait=5)
    assert idp.fetch_count() == 2
    clock.advance(0.2)
    assert not cache.refresh_for_kid("nope-3", wait=5)
    assert idp.fetch_count() == 3


def test_unknown_kid_wait_is_bounded_when_the_idp_hangs(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    cache = make(idp, clock, timeout=5.0)
    assert cache.refresh()
    idp.set_failure(hang_seconds=10)
    started = time.monotonic()
    assert not cache.refresh_for_kid("new-1", wait=0.3)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 1.5
    assert cache.keyset is not None and rsa_key.kid in cache.keyset.by_kid
    idp.clear_failure()  # let the hanging fetch finish so its thread ends


# ----------------------------------------------------------- through the verifier


def _runtime(cache: JWKSCache) -> ProviderRuntime:
    spec = ProviderSpec.model_validate(
        {"issuer": ISSUER, "audiences": [AUDIENCE], "jwksUri": "http://127.0.0.1:1/jwks"}
    )
    return ProviderRuntime.build(Provider(spec=spec, name="idp", origin="test"), cache)


def test_rotation_first_token_with_the_new_kid_passes_after_one_fetch(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    cache = make(idp, clock)
    assert cache.refresh()
    scope = (_runtime(cache),)
    verifier = TokenVerifier(clock, unknown_kid_wait=5)
    new = devkeys.generate_key("RSA", kid="rsa-2")
    idp.set_jwks(devkeys.jwks(rsa_key, new))
    assert verifier.verify(new.sign(claims_for(clock.now)), scope).subject == "alice"
    assert idp.fetch_count() == 2


def test_a_storm_of_random_kids_is_all_401_with_one_fetch(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    cache = make(idp, clock)
    assert cache.refresh()
    scope = (_runtime(cache),)
    verifier = TokenVerifier(clock, unknown_kid_wait=1)
    reasons = set()
    for n in range(300):
        token = rsa_key.sign(claims_for(clock.now), kid=f"random-{n}")
        with pytest.raises(AuthenticationError) as caught:
            verifier.verify(token, scope)
        reasons.add(caught.value.reason)
    assert reasons == {errors.UNKNOWN_KID}
    assert idp.fetch_count() == 2


def test_hanging_idp_gives_unknown_kid_within_the_configured_wait(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    cache = make(idp, clock, timeout=5.0)
    assert cache.refresh()
    idp.set_failure(hang_seconds=10)
    verifier = TokenVerifier(clock, unknown_kid_wait=0.3)
    token = rsa_key.sign(claims_for(clock.now), kid="rotated")
    started = time.monotonic()
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(token, (_runtime(cache),))
    assert caught.value.reason == errors.UNKNOWN_KID
    assert time.monotonic() - started < 1.5
    idp.clear_failure()


def test_tokens_get_503_while_keyless_and_pass_when_the_idp_returns(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    idp.set_failure(status=500)
    cache = make(idp, clock, min_refresh_interval=30.0)
    assert not cache.refresh()
    scope = (_runtime(cache),)
    verifier = TokenVerifier(clock, unknown_kid_wait=2)
    token = rsa_key.sign(claims_for(clock.now))
    with pytest.raises(DependencyError) as caught:
        verifier.verify(token, scope)
    assert caught.value.reason == errors.JWKS_UNAVAILABLE
    fetched = idp.fetch_count()
    idp.clear_failure()
    with pytest.raises(DependencyError):  # within minRefreshInterval: no new fetch
        verifier.verify(token, scope)
    assert idp.fetch_count() == fetched
    clock.advance(31)
    assert verifier.verify(token, scope).subject == "alice"
    assert idp.fetch_count() == fetched + 1


def test_a_very_long_outage_keeps_backing_off_without_overflowing(clock: Clock) -> None:
    class Down(InlineSource):
        remote = True

        def load(self, allowed_algs: frozenset[str], origin: str) -> tuple[KeySet, float | None]:
            raise OSError("down")

    cache = JWKSCache(
        provider="p",
        allowed_algs=ALL,
        source=Down('{"keys": []}'),
        refresh_interval=60,
        clock=clock,
    )
    for _ in range(1100):
        assert not cache.refresh()
    assert cache.next_refresh - clock.now == 60


def test_a_new_kid_triggers_a_refresh_even_beside_a_key_without_kid(
    idp: JWKSServer, rsa_key: SigningKey, clock: Clock
) -> None:
    anonymous = devkeys.generate_key("EC-P256", kid="x").public_jwk()
    del anonymous["kid"]
    idp.set_jwks({"keys": [anonymous]})
    source = UrlSource(idp.jwks_url, timeout=2, ssl_context=None)
    keys = JWKSCache(provider="p", allowed_algs=ALL, source=source, clock=clock)
    assert keys.refresh()
    idp.set_jwks({"keys": [anonymous, rsa_key.public_jwk()]})
    provider = ProviderRuntime.build(
        Provider(spec=ProviderSpec(issuer=ISSUER, jwks='{"keys": []}'), name="p", origin="t"), keys
    )
    token = rsa_key.sign(claims_for(clock.now))
    assert TokenVerifier(clock).verify(token, [provider]).subject == "alice"
