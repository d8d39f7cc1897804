"""Opaque tokens introspected at a real endpoint (RFC 7662) the test controls, over http and
https: the answers, the failures, the cache, single-flight, and one provider's outage."""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from prometheus_client import CollectorRegistry

from authz_server import errors
from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.credentials.introspection import Introspector
from authz_server.errors import ConfigError
from authz_server.ops.metrics import Metrics
from authz_server.responses import Decision
from authz_server.service import AuthorizationService, Engine
from authz_server.tools.devkeys import SigningKey
from tests.e2e.harness import wait_until
from tests.helpers import Clock, claims_for, write_config
from tests.introspection_idp import CLIENT_ID, CLIENT_SECRET, IntrospectionServer, https_context
from tests.unit.test_service import provider_yaml

IDP_ISSUER = "https://idp.example.com"

CONFIG = """apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: partners-opaque
    issuer: {issuer}
    audiences: [orders-api]
    introspection:
      endpoint: {endpoint}
      clientId: {client_id}
      clientSecretFile: client-secret
      cacheTtl: 60s
      negativeCacheTtl: 5s
      timeout: {timeout}
    {extra}
    fromHeaders: [{{name: authorization, prefix: "Bearer "}}]
    outputClaimToHeaders: [{{header: x-client-id, claim: client_id}}]
{more_providers}
policies:
  - name: orders
    rules:
      - from: [{{source: {{requestPrincipals: ["*"]}}}}]
        when: [{{key: "request.auth.claims[scope]", values: ["orders.read"]}}]
"""


@pytest.fixture(params=["http", "https"])
def idp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IntrospectionServer]:
    if request.param == "https":
        context, ca_file = https_context(tmp_path)
        server = IntrospectionServer(context)
        server.ca_file = ca_file  # type: ignore[attr-defined]
    else:
        server = IntrospectionServer()
    with server:
        yield server


@pytest.fixture
def plain_idp() -> Iterator[IntrospectionServer]:
    with IntrospectionServer() as server:
        yield server


def make_engine(
    tmp_path: Path,
    clock: Clock,
    idp: IntrospectionServer,
    *,
    timeout: str = "1s",
    extra: str = "",
    more_providers: str = "",
    server: str = "",
) -> Engine:
    (tmp_path / "client-secret").write_text(CLIENT_SECRET + "\n")
    ca_file = getattr(idp, "ca_file", None)
    if ca_file is not None:
        extra += f"\n    caFile: {ca_file}"
    text = CONFIG.format(
        issuer=IDP_ISSUER,
        endpoint=idp.endpoint,
        client_id=CLIENT_ID,
        timeout=timeout,
        extra=extra,
        more_providers=more_providers,
    )
    if server:
        text = text.replace("kind: AuthzConfig\n", f"kind: AuthzConfig\nserver: {server}\n", 1)
    engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    return engine


def bearer(token: str) -> RequestAttributes:
    return RequestAttributes(
        method="GET", path="/orders", host="api.test", headers={"authorization": f"Bearer {token}"}
    )


def active_token(idp: IntrospectionServer, clock: Clock, **claims: object) -> str:
    token = secrets.token_urlsafe(32)
    answer: dict[str, object] = {
        "iss": IDP_ISSUER,
        "sub": "svc-billing",
        "aud": "orders-api",
        "client_id": "billing-app",
        "scope": "orders.read orders.write",
        "exp": int(clock()) + 3600,
    }
    answer.update(claims)
    idp.answers[token] = {"active": True, **{k: v for k, v in answer.items() if v is not None}}
    return token


def test_an_active_token_is_an_identity_from_the_answer_asked_as_rfc_7662_says(
    tmp_path: Path, clock: Clock, idp: IntrospectionServer
) -> None:
    service = AuthorizationService(make_engine(tmp_path, clock, idp))
    token = active_token(idp, clock, groups=["partners"])
    decision = service.check(bearer(token))
    assert decision.allowed, decision.reason
    assert decision.principal == f"{IDP_ISSUER}/svc-billing"
    assert dict(decision.headers_to_set) == {"x-client-id": "billing-app"}
    assert "authorization" in decision.headers_to_remove
    [call] = idp.calls
    assert call.form == {"token": [token], "token_type_hint": ["access_token"]}
    assert call.content_type == "application/x-www-form-urlencoded"
    scheme, _, encoded = call.authorization.partition(" ")
    user, _, password = base64.b64decode(encoded).decode().partition(":")
    assert scheme == "Basic" and (unquote(user), unquote(password)) == (CLIENT_ID, CLIENT_SECRET)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": 1}, errors.TOKEN_EXPIRED),
        ({"iss": "https://impostor.example.com"}, errors.INVALID_ISSUER),
        ({"aud": ["another-api"]}, errors.INVALID_AUDIENCE),
        ({"nbf": 4_000_000_000}, errors.TOKEN_NOT_YET_VALID),
        ({"exp": None}, errors.MISSING_CLAIM),
    ],
)
def test_an_active_answer_is_checked_as_a_jwt_payload_is(
    tmp_path: Path,
    clock: Clock,
    plain_idp: IntrospectionServer,
    claims: dict[str, object],
    reason: str,
) -> None:
    service = AuthorizationService(make_engine(tmp_path, clock, plain_idp))
    decision = service.check(bearer(active_token(plain_idp, clock, **claims)))
    assert (decision.status, decision.reason) == (401, reason)


def test_an_inactive_token_is_401_token_inactive_and_the_answer_is_reused_briefly(
    tmp_path: Path, clock: Clock, idp: IntrospectionServer
) -> None:
    service = AuthorizationService(make_engine(tmp_path, clock, idp))
    token = secrets.token_urlsafe(32)
    for _ in range(5):
        decision = service.check(bearer(token))
        assert (decision.status, decision.reason) == (401, errors.TOKEN_INACTIVE)
    assert idp.call_count() == 1
    clock.advance(5)  # negativeCacheTtl
    idp.active(token, iss=IDP_ISSUER, sub="late", aud="orders-api", scope="orders.read")
    assert service.check(bearer(token)).principal == f"{IDP_ISSUER}/late"
    assert idp.call_count() == 2


@pytest.mark.parametrize(
    "failure",
    [
        {"status": 500},
        {"body": b"<html>not json</html>"},
        {"body": b'{"sub": "no active member"}'},
        {"body": b'{"active": "true"}'},
        {"status": 302},
        {"hang_seconds": 5.0},
    ],
    ids=["500", "garbage", "no-active", "active-not-boolean", "redirect", "slow"],
)
def test_an_endpoint_that_cannot_answer_is_503_and_is_never_cached(
    tmp_path: Path, clock: Clock, idp: IntrospectionServer, failure: dict[str, object]
) -> None:
    service = AuthorizationService(make_engine(tmp_path, clock, idp, timeout="300ms"))
    token = active_token(idp, clock)
    idp.fail(**failure)
    decision = service.check(bearer(token))
    assert (decision.status, decision.reason) == (503, errors.INTROSPECTION_UNAVAILABLE)
    assert idp.call_count() == 1
    idp.recover()
    assert service.check(bearer(token)).allowed  # asked again: the error was not kept
    assert idp.call_count() == 2
    if failure.get("status") == 302:
        assert not any("elsewhere" in str(c.form) for c in idp.calls)


def test_100_identical_requests_make_one_call_until_cache_ttl_or_exp(
    tmp_path: Path, clock: Clock, plain_idp: IntrospectionServer
) -> None:
    service = AuthorizationService(make_engine(tmp_path, clock, plain_idp))
    long_lived = active_token(plain_idp, clock)
    short_lived = active_token(plain_idp, clock, exp=int(clock()) + 20)
    for _ in range(100):
        assert service.check(bearer(long_lived)).allowed
        assert service.check(bearer(short_lived)).allowed
    assert plain_idp.call_count() == 2
    clock.advance(21)  # past the short token's exp: its answer is not reused, asked again
    plain_idp.answers[short_lived] = {"active": False}
    assert service.check(bearer(short_lived)).reason == errors.TOKEN_INACTIVE
    assert service.check(bearer(long_lived)).allowed
    assert plain_idp.call_count() == 3
    clock.advance(40)  # cacheTtl: revocation at the IdP takes effect within it
    plain_idp.answers[long_lived] = {"active": False}
    assert service.check(bearer(long_lived)).reason == errors.TOKEN_INACTIVE
    assert plain_idp.call_count() == 4


def test_50_concurrent_identical_tokens_make_one_call(
    tmp_path: Path, clock: Clock, plain_idp: IntrospectionServer
) -> None:
    service = AuthorizationService(make_engine(tmp_path, clock, plain_idp))
    token = active_token(plain_idp, clock)
    plain_idp.fail(hang_seconds=0.3)  # slow enough that all 50 ask while the call is out
    plain_idp.behaviour.status = None
    plain_idp.behaviour.body = None
    results: list[Decision] = []
    start = threading.Barrier(50)

    def ask() -> None:
        start.wait(5)
        results.append(service.check(bearer(token)))

    threads = [threading.Thread(target=ask) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 50 and all(r.allowed for r in results)
    assert plain_idp.call_count() == 1


def test_an_outage_of_one_idp_is_503_for_its_tokens_only(
    tmp_path: Path,
    clock: Clock,
    plain_idp: IntrospectionServer,
    rsa_key: SigningKey,
    make_token: Callable[..., str],
) -> None:
    engine = make_engine(
        tmp_path, clock, plain_idp, timeout="200ms", more_providers=provider_yaml(rsa_key)
    )
    service = AuthorizationService(engine)
    cached = active_token(plain_idp, clock)
    assert service.check(bearer(cached)).allowed
    plain_idp.stop()  # connection refused from now on
    fresh = active_token(plain_idp, clock)
    outage = service.check(bearer(fresh))
    assert (outage.status, outage.reason) == (503, errors.INTROSPECTION_UNAVAILABLE)
    jwt = make_token(scope="orders.read")
    assert service.check(bearer(jwt)).allowed  # the JWT provider keeps working
    assert service.check(bearer(cached)).allowed  # an answer cached before the outage


def test_a_100_kb_token_is_refused_before_any_call(
    tmp_path: Path, clock: Clock, plain_idp: IntrospectionServer
) -> None:
    service = AuthorizationService(make_engine(tmp_path, clock, plain_idp))
    decision = service.check(bearer("A" * 100_000))
    assert (decision.status, decision.reason) == (401, errors.MALFORMED_TOKEN)
    assert plain_idp.call_count() == 0


def test_a_jwt_looking_token_that_is_no_jwt_of_ours_is_introspected(
    tmp_path: Path, clock: Clock, plain_idp: IntrospectionServer, rsa_key: SigningKey
) -> None:
    engine = make_engine(tmp_path, clock, plain_idp, more_providers=provider_yaml(rsa_key))
    service = AuthorizationService(engine)
    fake = "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln"
    assert service.check(bearer(fake)).reason == errors.TOKEN_INACTIVE
    assert plain_idp.calls[-1].form["token"] == [fake]


def test_a_new_secret_or_endpoint_drops_the_cached_answers(
    tmp_path: Path, clock: Clock, plain_idp: IntrospectionServer
) -> None:
    engine = make_engine(tmp_path, clock, plain_idp)
    service = AuthorizationService(engine)
    token = active_token(plain_idp, clock)
    assert service.check(bearer(token)).allowed
    (tmp_path / "client-secret").write_text("rotated-secret-value-0123\n")
    os.utime(tmp_path / "client-secret", ns=(5, 5))
    # The cached answer stands until a call is made with the new secret (the next miss)...
    other = active_token(plain_idp, clock)
    assert service.check(bearer(other)).allowed
    # ...which dropped every answer given to the old client.
    assert service.check(bearer(token)).allowed
    assert plain_idp.call_count() == 3
    assert plain_idp.calls[-1].authorization != plain_idp.calls[0].authorization
    # A reload with the same provider keeps the cache; another endpoint starts afresh.
    same = Engine.build(engine.settings, clock=clock, previous=engine)
    assert same.caches["partners-opaque"] is engine.caches["partners-opaque"]
    with IntrospectionServer() as moved:
        moved.answers = dict(plain_idp.answers)
        text = (tmp_path / "config.yaml").read_text().replace(plain_idp.endpoint, moved.endpoint)
        settings = config.load(write_config(tmp_path, text))
        fresh = Engine.build(settings, clock=clock, previous=engine)
        assert fresh.caches["partners-opaque"] is not engine.caches["partners-opaque"]
        assert fresh.caches["partners-opaque"].refresh()
        assert AuthorizationService(fresh).check(bearer(token)).allowed
        assert moved.call_count() == 1


def test_metrics_count_calls_by_result_their_latency_and_cache_hits(
    tmp_path: Path, clock: Clock, plain_idp: IntrospectionServer
) -> None:
    engine = make_engine(tmp_path, clock, plain_idp, timeout="300ms")
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.watch_engine(lambda: engine)
    service = AuthorizationService(engine, metrics=metrics)
    token = active_token(plain_idp, clock)
    for _ in range(3):
        service.check(bearer(token))
    service.check(bearer(secrets.token_urlsafe(32)))
    plain_idp.fail(status=500)
    service.check(bearer(secrets.token_urlsafe(32)))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"provider": "partners-opaque", **labels})

    assert value("authz_introspection_calls_total", result="active") == 1
    assert value("authz_introspection_calls_total", result="inactive") == 1
    assert value("authz_introspection_calls_total", result="http_error") == 1
    assert value("authz_introspection_cache_hits_total") == 2
    assert value("authz_introspection_duration_seconds_count") == 3
    assert value("authz_introspection_duration_seconds_bucket", le="+Inf") == 3


def test_two_introspection_providers_on_one_location_are_refused(
    tmp_path: Path, plain_idp: IntrospectionServer
) -> None:
    (tmp_path / "client-secret").write_text("x\n")
    second = f"""  - name: other-idp
    issuer: https://other.example.com
    introspection: {{endpoint: {plain_idp.endpoint}, clientId: c, clientSecretFile: client-secret}}
"""
    text = CONFIG.format(
        issuer=IDP_ISSUER,
        endpoint=plain_idp.endpoint,
        client_id=CLIENT_ID,
        timeout="1s",
        extra="",
        more_providers=second,
    )
    with pytest.raises(ConfigError) as caught:
        config.load(write_config(tmp_path, text))
    [problem] = caught.value.problems
    assert problem.path == "providers[1]"
    assert "header 'authorization'" in problem.message and "partners-opaque" in problem.message


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("endpoint", "http://idp.example.com/introspect", "over https"),
        ("timeout", "30s", "between 1ms and 10s"),
        ("cacheTtl", "2h", "at most 1h"),
    ],
)
def test_a_bad_introspection_field_is_refused_with_its_path(
    tmp_path: Path, field: str, value: str, says: str
) -> None:
    (tmp_path / "client-secret").write_text("x\n")
    body = {
        "endpoint": "https://idp.example.com/introspect",
        "clientId": "c",
        "clientSecretFile": "client-secret",
        field: value,
    }
    text = (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\nproviders:\n"
        f"  - {{issuer: {IDP_ISSUER}, introspection: {json.dumps(body)}}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        config.load(write_config(tmp_path, text))
    [problem] = caught.value.problems
    assert problem.path == f"providers[0].introspection.{field}" and says in problem.message


def test_the_introspector_is_its_providers_key_source(
    tmp_path: Path, clock: Clock, plain_idp: IntrospectionServer
) -> None:
    engine = make_engine(tmp_path, clock, plain_idp)
    cache = engine.caches["partners-opaque"]
    assert isinstance(cache.source, Introspector) and cache.keyset is not None


def test_calls_in_flight_to_one_idp_stay_within_max_concurrent_calls(
    tmp_path: Path, clock: Clock, plain_idp: IntrospectionServer
) -> None:
    engine = make_engine(tmp_path, clock, plain_idp, extra="  maxConcurrentCalls: 2")
    service = AuthorizationService(engine)
    tokens = [active_token(plain_idp, clock) for _ in range(4)]
    plain_idp.fail(hang_seconds=0.2)
    results: list[Decision] = []
    threads = [
        threading.Thread(target=lambda t=t: results.append(service.check(bearer(t))))
        for t in tokens
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 4 and all(r.allowed for r in results)
    assert plain_idp.call_count() == 4 and plain_idp.max_in_flight == 2


def test_a_hanging_idp_holds_at_most_half_the_threads_and_jwts_keep_being_decided(
    tmp_path: Path,
    clock: Clock,
    plain_idp: IntrospectionServer,
    rsa_key: SigningKey,
    make_token: Callable[..., str],
) -> None:
    engine = make_engine(
        tmp_path,
        clock,
        plain_idp,
        timeout="5s",
        more_providers=provider_yaml(rsa_key),
        server="{threads: 2}",  # one thread may wait on an IdP
    )
    service = AuthorizationService(engine)
    plain_idp.fail(hang_seconds=5.0)
    first: list[Decision] = []
    waiting = threading.Thread(
        target=lambda: first.append(service.check(bearer(active_token(plain_idp, clock))))
    )
    waiting.start()
    try:
        wait_until(lambda: plain_idp.call_count() == 1, timeout=5, what="the first call")
        # The one waiting slot is taken: another token is not sent, answered 503 at once.
        second = service.check(bearer(active_token(plain_idp, clock)))
        assert (second.status, second.reason) == (503, errors.INTROSPECTION_UNAVAILABLE)
        assert plain_idp.call_count() == 1
        assert service.check(bearer(make_token(scope="orders.read"))).allowed
    finally:
        plain_idp.recover()  # releases the hanging call
        waiting.join(10)
    assert first and first[0].allowed


def test_a_denial_by_an_introspection_provider_names_it_even_on_a_shared_header(
    tmp_path: Path, clock: Clock, plain_idp: IntrospectionServer, rsa_key: SigningKey
) -> None:
    engine = make_engine(tmp_path, clock, plain_idp, more_providers=provider_yaml(rsa_key))
    decision = AuthorizationService(engine).check(bearer(secrets.token_urlsafe(32)))
    assert (decision.reason, decision.provider) == (errors.TOKEN_INACTIVE, "partners-opaque")


def test_a_cached_inactive_answer_does_not_grow_with_each_request(
    tmp_path: Path, clock: Clock, plain_idp: IntrospectionServer
) -> None:
    engine = make_engine(tmp_path, clock, plain_idp)
    runtime = engine.providers[0]
    introspector = engine.caches["partners-opaque"].source
    assert isinstance(introspector, Introspector)
    depths = []
    for _ in range(3):
        with pytest.raises(errors.AuthenticationError) as caught:
            introspector.verify("never-active-token", runtime, engine.verifier, clock=clock)
        depth, tb = 0, caught.value.__traceback__
        while tb is not None:
            depth, tb = depth + 1, tb.tb_next
        depths.append(depth)
    assert plain_idp.call_count() == 1 and depths[1] == depths[2]


def test_a_malformed_jwt_naming_one_of_our_issuers_is_refused_and_never_sent_to_the_idp(
    tmp_path: Path, clock: Clock, plain_idp: IntrospectionServer, rsa_key: SigningKey
) -> None:
    engine = make_engine(tmp_path, clock, plain_idp, more_providers=provider_yaml(rsa_key))
    service = AuthorizationService(engine)
    # Signed by our JWT provider's key, naming its issuer, with an `exp` that is no number.
    ours = rsa_key.sign(claims_for(clock(), exp="soon"))
    assert service.check(bearer(ours)).reason == errors.MALFORMED_TOKEN
    assert plain_idp.calls == []
