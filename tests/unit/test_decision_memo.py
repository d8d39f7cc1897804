"""The decision memo: a repeated request gets the very answer an engine without the memo gives,
whatever the configuration, the requests, the clock, the key sets and the reloads."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from authz_server import errors
from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.config.specs import WHEN_KEYS_EXACT, DecisionMemoSpec, PolicySpec
from authz_server.credentials.introspection import Introspector
from authz_server.doors.http import HTTP_UNKNOWN
from authz_server.ops.metrics import Metrics
from authz_server.policy.compile import attributes_read
from authz_server.responses import Decision
from authz_server.service import AuthorizationService, CheckTrace, Engine, make_cache
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.helpers import Clock
from tests.introspection_idp import IntrospectionServer
from tests.unit import test_apikeys as apikeys_case
from tests.unit import test_introspection as introspection_case
from tests.unit.test_policy_index import ISS, OTHER_ISS, PEER, _configs

_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "suite")
T0 = 1_900_000_000.0  # every example starts its clock here, so tokens can be signed once

# --------------------------------------------------------------------------- keys, tokens

_KEYS: dict[str, SigningKey] = {}


def _key(kid: str) -> SigningKey:
    if kid not in _KEYS:
        _KEYS[kid] = devkeys.generate_key("EC-P256", kid=kid)
    return _KEYS[kid]


# (name, issuer, kid, lifetime from T0 or None for no exp, nbf offset or None, claims)
_TOKEN_SHAPES: dict[str, tuple[str, str, float | None, float | None, dict[str, Any]]] = {
    "alice": (ISS, "k1", 3600, None, {"sub": "alice", "groups": ["admin"], "scope": "read"}),
    "alice-short": (ISS, "k1", 40, None, {"sub": "alice", "groups": ["dev"]}),
    "bob-k2": (ISS, "k2", 7200, None, {"sub": "bob", "org": {"id": 7}, "admin": True}),
    "carol-later": (ISS, "k1", 7200, 600, {"sub": "carol", "scope": "read write"}),
    "dave-other": (OTHER_ISS, "k3", 900, None, {"sub": "dave", "groups": ["ops"]}),
    "eve-expired": (ISS, "k1", -10, None, {"sub": "eve"}),
}
_TOKENS: dict[str, str] = {}


def _token(name: str) -> str:
    if name == "garbage":
        return "not-a.jwt.at-all"
    if name not in _TOKENS:
        issuer, kid, lifetime, nbf, claims = _TOKEN_SHAPES[name]
        body: dict[str, Any] = {"iss": issuer, "iat": int(T0) - 5, "aud": "api", **claims}
        if lifetime is not None:
            body["exp"] = int(T0 + lifetime)
        if nbf is not None:
            body["nbf"] = int(T0 + nbf)
        _TOKENS[name] = _key(kid).sign(body)
    return _TOKENS[name]


# API keys: (sub, claims, seconds from T0 it expires at or None). The keys provider's issuer
# is one the random policies name, so that its keys are allowed and denied as tokens are.
KEYS_ISS = "idp-issuer"
_API_KEYS: dict[str, tuple[str, dict[str, Any], float | None]] = {
    "key-alice-0123456789abcdef": ("alice", {"groups": ["admin"], "scope": "read"}, None),
    "key-bob-0123456789abcdefgh": ("bob", {"org": {"id": 7}}, None),
    "key-carol-0123456789abcdef": ("carol", {"scope": "read write"}, 100),
}
_API_KEY_NAMES = [*_API_KEYS, "key-unknown-0123456789abcd", "short"]


def _keys_file(keys: Iterable[str]) -> str:
    """A keys file holding ``keys`` of the pool."""
    lines = ["keys:"]
    for key in keys:
        sub, claims, expires = _API_KEYS[key]
        lines.append(f"  - sub: {sub}")
        lines.append(f"    sha256: {hashlib.sha256(key.encode()).hexdigest()}")
        lines.append(f"    claims: {json.dumps(claims)}")
        if expires is not None:
            moment = dt.datetime.fromtimestamp(T0 + expires, dt.UTC)
            lines.append(f"    expires: {moment.isoformat()}")
    return "\n".join(lines) + "\n" if len(lines) > 1 else "keys: []\n"


# Opaque tokens and the introspection answer each gets while the IdP holds it active (else
# inactive). One expires before the cache's TTL, one after it.
_OPAQUE: dict[str, dict[str, Any]] = {
    "opaque-alice-0123456789": {"sub": "alice", "scope": "read", "exp": int(T0) + 50},
    "opaque-bob-0123456789ab": {"sub": "bob", "groups": ["admin"], "exp": int(T0) + 7200},
}
_OPAQUE_NAMES = [*_OPAQUE, "opaque-never-0123456789"]


def _idp_answers(mask: int) -> dict[str, dict[str, Any]]:
    """The IdP's answers while it holds active the opaque tokens bit ``mask`` names."""
    return {
        token: {"active": True, "iss": KEYS_ISS, **claims}
        for n, (token, claims) in enumerate(_OPAQUE.items())
        if mask >> n & 1
    }


@st.composite
def _opaque_provider(draw: st.DrawFn, taken: str | None) -> dict[str, Any]:
    """An introspection provider (answered offline: ``Introspector.answer_offline``) on a
    location no other non-JWT provider reads, its cache small sometimes (evictions)."""
    # Mostly a header of its own, where the requests mostly carry opaque tokens.
    where = draw(st.sampled_from([w for w in ("x-opaque", "x-opaque", "bearer") if w != taken]))
    provider: dict[str, Any] = {
        "name": "opaque",
        "issuer": KEYS_ISS,
        "introspection": {
            "endpoint": "http://127.0.0.1:9/introspect",
            "clientId": "memo",
            "clientSecretFile": "",
            "cacheTtl": "60s",
            "negativeCacheTtl": "5s",
            "cacheMaxEntries": draw(st.sampled_from([1, 100])),
        },
    }
    if where == "bearer":
        provider.update(_LOCATIONS["bearer"])
    else:
        provider["fromHeaders"] = [{"name": "x-opaque"}]
    return provider


@st.composite
def _keys_provider(draw: st.DrawFn) -> dict[str, Any]:
    """An API keys provider: on its own header, or sharing the bearer one with the JWTs."""
    where = draw(st.sampled_from(["x-api-key", "bearer"]))
    provider: dict[str, Any] = {"name": "keys", "issuer": KEYS_ISS, "apiKeys": {"file": ""}}
    if where == "bearer":
        provider.update(_LOCATIONS["bearer"])
    else:
        provider["fromHeaders"] = [{"name": "x-api-key"}]
    if draw(st.booleans()):
        provider["outputClaimToHeaders"] = [{"header": "x-user", "claim": "sub"}]
    return provider


# ------------------------------------------------------------------------------ configs

_LOCATIONS = {
    "bearer": {"fromHeaders": [{"name": "authorization", "prefix": "Bearer "}]},
    "x-token": {"fromHeaders": [{"name": "x-token"}]},
    "param": {"fromParams": ["access_token"]},
    "cookie": {"fromCookies": ["session"]},
}


@st.composite
def _provider(draw: st.DrawFn, name: str, issuer: str) -> dict[str, Any]:
    # Mostly the Authorization header, where most requests carry their token.
    others = st.lists(st.sampled_from(["x-token", "param", "cookie"]), max_size=2, unique=True)
    where = draw(st.one_of(others.map(lambda more: ["bearer", *more]), others))
    provider: dict[str, Any] = {"name": name, "issuer": issuer}
    for location in where:
        for field, values in _LOCATIONS[location].items():
            provider.setdefault(field, []).extend(values)
    if draw(st.booleans()):
        provider["forwardOriginalToken"] = True
    if draw(st.booleans()):
        provider["outputClaimToHeaders"] = [
            {"header": "x-user", "claim": "sub"},
            {"header": "x-groups", "claim": "groups"},
        ]
    if draw(st.integers(min_value=0, max_value=3)) == 0:
        provider["outputPayloadToHeader"] = "x-payload"
    return provider


_WORKLOADS = [
    {"name": "blue", "namespace": "ns1", "contextExtensions": {"team": "blue"}},
    {"name": "api", "namespace": "ns2", "hosts": ["api.example.com"]},
]


@st.composite
def _documents(draw: st.DrawFn, providers: list[dict[str, Any]]) -> dict[str, Any]:
    """One AuthzConfig: ``providers`` (with their key files filled in later), random
    policies, and sometimes workloads with policies scoped to them."""
    policies = draw(_configs())
    document: dict[str, Any] = {
        "apiVersion": "authz-server/v1",
        "kind": "AuthzConfig",
        "server": {"allowEmpty": True},
        "providers": providers,
        "policies": policies,
    }
    if draw(st.booleans()):
        document["workloads"] = _WORKLOADS
        document["scoping"] = {"unknownWorkload": draw(st.sampled_from(["deny", "allPolicies"]))}
        for policy in policies:
            where = draw(st.sampled_from([None, ["blue"], ["api"], ["blue", "api"]]))
            if where is not None:
                policy["appliesTo"] = {"workloads": where}
    return document


# ----------------------------------------------------------------------------- requests

# The valid ones more often: their answers are the ones memoised.
_TOKEN_NAMES = [*_TOKEN_SHAPES, "alice", "alice-short", "alice-short", "bob-k2", "garbage"]


@st.composite
def _request(draw: st.DrawFn) -> dict[str, Any]:
    """The keyword arguments of a RequestAttributes: a credential somewhere (or none), and
    the attributes policies read, from small pools so that requests repeat."""
    headers: dict[str, str] = {}
    path = draw(st.sampled_from(["/", "/api/v1/orders", "/admin", "/x.json?y=1", "/api/../admin"]))
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
        token = _token(draw(st.sampled_from(_TOKEN_NAMES)))
        where = draw(
            st.sampled_from(
                [
                    *("bearer", "bearer", "bearer", "x-token", "param", "cookie", "dpop"),
                    *("key", "opaque", "opaque"),
                ]
            )
        )
        if where == "opaque":
            opaque = draw(st.sampled_from(_OPAQUE_NAMES))
            if draw(st.sampled_from([True, True, True, False])):
                headers["x-opaque"] = opaque
            else:
                headers["authorization"] = f"Bearer {opaque}"
        elif where == "key":
            key = draw(st.sampled_from(_API_KEY_NAMES))
            if draw(st.booleans()):
                headers["x-api-key"] = key
            else:
                headers["authorization"] = f"Bearer {key}"
        elif where == "bearer":
            headers["authorization"] = f"Bearer {token}"
        elif where == "x-token":
            headers["x-token"] = token
        elif where == "param":
            path += ("&" if "?" in path else "?") + f"access_token={token}"
        elif where == "cookie":
            headers["cookie"] = draw(
                st.sampled_from([f"session={token}", f"a=1; session={token}", f"session={token},b"])
            )
        else:
            headers["dpop"] = "a-proof"
    for name, pool in (
        ("x-tenant", ["a", "bz"]),
        ("x-forwarded-for", ["192.168.1.1", "10.0.0.1, 192.168.1.1"]),
        ("x-request-id", ["1", "2", "3"]),  # read by nothing: must not change any answer
    ):
        if draw(st.booleans()):
            headers[name] = draw(st.sampled_from(pool))
    return {
        "method": draw(st.sampled_from(["GET", "POST", "DELETE"])),
        "host": draw(st.sampled_from(["api.example.com", "API.example.com:8443", "db.internal"])),
        "path": path,
        "headers": headers,
        "source_ip": draw(st.sampled_from(["10.1.2.3", "192.168.1.1"])),
        "source_port": draw(st.integers(min_value=1024, max_value=65535)),
        "peer_principal": draw(st.sampled_from(["", PEER])),
        "destination_port": draw(st.sampled_from([0, 8080, 443])),
        "sni": draw(st.sampled_from(["", "api.example.com"])),
        "context_extensions": draw(st.sampled_from([{}, {"team": "blue"}, {"team": "red"}])),
        "unknown": draw(st.sampled_from([frozenset(), HTTP_UNKNOWN])),
    }


# An event: mostly a request (by its place in the pool, so that requests repeat), else the
# clock moving, key k2 leaving or coming back, the API keys file changing, the IdP's answers
# changing, or a reload (to the other configuration).
_events = st.one_of(
    st.tuples(st.just("request"), st.integers(min_value=0, max_value=5)),
    st.tuples(st.just("request"), st.integers(min_value=0, max_value=5)),
    st.tuples(st.just("request"), st.integers(min_value=0, max_value=5)),
    st.tuples(st.just("request"), st.integers(min_value=0, max_value=5)),
    st.tuples(st.just("advance"), st.sampled_from([1, 30, 600, 3600])),
    st.tuples(st.just("keys"), st.booleans()),
    # The keys file re-read holding the keys of this bit mask of the pool.
    st.tuples(st.just("apikeys"), st.integers(min_value=0, max_value=2 ** len(_API_KEYS) - 1)),
    # The IdP holding active the opaque tokens of this bit mask (the others inactive).
    st.tuples(st.just("idp"), st.integers(min_value=0, max_value=2 ** len(_OPAQUE) - 1)),
    st.tuples(st.just("reload"), st.just(0)),
)


# ------------------------------------------------------------------------------- engines


def _fields(decision: Decision) -> tuple[Any, ...]:
    """Everything of a Decision, the fields equality leaves out included."""
    return (decision, decision.metadata, decision.audited, decision.dry_run, decision.withheld)


class _Pair:
    """The same configuration decided twice: with the memo and without, over the same key
    caches (so a key leaving its set is one event for both) and the same clock."""

    def __init__(self, directory: Path, documents: list[dict[str, Any]], clock: Clock) -> None:
        self.directory = directory
        self.documents = documents
        self.clock = clock
        self.current = 0
        self.jwks = directory / "jwks.json"
        self.other_jwks = directory / "other.json"
        self.api_keys = directory / "keys.yaml"
        self.api_keys_version = 0
        self.secret = directory / "client-secret"
        self.secret.write_text("memo-secret\n")
        self.idp_mask = 2 ** len(_OPAQUE) - 1
        self.set_keys(with_k2=True)
        self.set_api_keys(2 ** len(_API_KEYS) - 1)
        self.other_jwks.write_text(json.dumps(devkeys.jwks(_key("k3"))))
        self.caches: dict[str, Any] = {}
        self.loaded: dict[int, tuple[config.Settings, config.Settings]] = {}
        self.memo: AuthorizationService | None = None
        self.plain: AuthorizationService | None = None
        self.reload()

    def set_keys(self, *, with_k2: bool) -> None:
        keys = [_key("k1"), _key("k2")] if with_k2 else [_key("k1")]
        self.jwks.write_text(json.dumps(devkeys.jwks(*keys)))

    def set_api_keys(self, mask: int) -> None:
        """The keys file holding the keys of the pool that bit ``mask`` names."""
        self.api_keys.write_text(_keys_file(k for n, k in enumerate(_API_KEYS) if mask >> n & 1))
        self.api_keys_version += 1  # a new signature even within one mtime tick
        os.utime(self.api_keys, ns=(self.api_keys_version, self.api_keys_version))

    def set_idp(self, mask: int) -> None:
        """The IdP holds active the opaque tokens bit ``mask`` names (read on the next call)."""
        self.idp_mask = mask
        for cache in self.caches.values():
            if isinstance(cache.source, Introspector):
                cache.source.answer_offline(_idp_answers(mask))

    def refresh(self) -> None:
        for cache in self.caches.values():
            assert cache.refresh()

    def _settings(self) -> tuple[config.Settings, config.Settings]:
        """The current document's settings with a small memo (so that it also starts over
        when full), and with the memo off."""
        if self.current not in self.loaded:
            document = json.loads(json.dumps(self.documents[self.current]))
            for provider in document["providers"]:
                if "apiKeys" in provider:
                    provider["apiKeys"]["file"] = str(self.api_keys)
                elif "introspection" in provider:
                    provider["introspection"]["clientSecretFile"] = str(self.secret)
                else:
                    provider["jwksFile"] = str(
                        self.other_jwks if provider["name"] == "other" else self.jwks
                    )
            document["server"]["decisionMemo"] = {"maxEntries": 5}
            path = self.directory / f"config-{self.current}.json"
            path.write_text(json.dumps(document))  # YAML reads JSON, and faster
            with_memo = config.load(path)
            off = with_memo.server.model_copy(
                update={"decision_memo": DecisionMemoSpec(max_entries=0)}
            )
            self.loaded[self.current] = (with_memo, dataclasses.replace(with_memo, server=off))
        return self.loaded[self.current]

    def reload(self) -> None:
        with_memo, without = self._settings()
        if not self.caches:
            self.caches = {p.name: make_cache(p) for p in with_memo.providers}
            self.refresh()
            self.set_idp(self.idp_mask)
        engines = []
        for settings_, previous in ((with_memo, self.memo), (without, self.plain)):
            engines.append(
                Engine(
                    settings_,
                    self.caches,
                    self.clock,
                    # A reload keeps the token cache (as Engine.build does).
                    previous.engine.token_cache if previous is not None else None,
                )
            )
        assert engines[0].memo is not None and engines[1].memo is None
        self.memo, self.plain = AuthorizationService(engines[0]), AuthorizationService(engines[1])

    def close(self) -> None:
        for cache in self.caches.values():
            cache.stop()


@contextmanager
def _pair(documents: list[dict[str, Any]]) -> Iterator[_Pair]:
    with tempfile.TemporaryDirectory() as directory:
        pair = _Pair(Path(directory), documents, Clock(T0))
        try:
            yield pair
        finally:
            pair.close()


@settings(
    # 200 in the suite (~5,000 requests decided both ways; ~18 s of CPU, most of it drawing
    # and loading configurations); `make fuzz` runs it with 3,000.
    max_examples={"fuzz": 3000, "mutate": 30}.get(_PROFILE, 200),
    deadline=None,
    derandomize=bool(os.environ.get("CI")) or _PROFILE == "mutate",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_the_memoised_engine_decides_every_request_as_an_engine_without_the_memo(
    data: st.DataObject,
) -> None:
    providers = [data.draw(_provider("main", ISS))]
    if data.draw(st.booleans()):
        providers.append(data.draw(_provider("other", OTHER_ISS)))
    taken = None
    if data.draw(st.booleans()):
        providers.append(data.draw(_keys_provider()))
        taken = "bearer" if "prefix" in providers[-1]["fromHeaders"][0] else "x-api-key"
    if data.draw(st.sampled_from([True, True, False])):
        providers.append(data.draw(_opaque_provider(taken)))
    documents = [data.draw(_documents(providers)), data.draw(_documents(providers))]
    pool = data.draw(st.lists(_request(), min_size=3, max_size=6, unique_by=repr))
    events = data.draw(st.lists(_events, min_size=12, max_size=40))
    with _pair(documents) as pair:
        for kind, value in events:
            if kind == "advance":
                pair.clock.advance(value)
            elif kind == "keys":
                pair.set_keys(with_k2=bool(value))
                pair.refresh()
            elif kind == "apikeys":
                pair.set_api_keys(value)
                pair.refresh()
            elif kind == "idp":
                pair.set_idp(value)
            elif kind == "reload":
                pair.current = 1 - pair.current
                pair.reload()
            else:
                attributes = pool[value % len(pool)]
                assert pair.memo is not None and pair.plain is not None
                memoised = pair.memo.check(RequestAttributes(**attributes))
                plain = pair.plain.check(RequestAttributes(**attributes))
                assert _fields(memoised) == _fields(plain), (kind, value, attributes)


# ------------------------------------------------------------------ what a user notices

ALLOW_GET_API = """
policies:
  - name: read
    rules:
      - from: [{source: {requestPrincipals: ["*"]}}]
        to: [{operation: {methods: ["GET"], paths: ["/api/*"]}}]
  - name: tenant-a
    rules:
      - from: [{source: {requestPrincipals: ["*"]}}]
        when: [{key: "request.headers[x-tenant]", values: ["a"]}]
"""


def _service(
    directory: Path,
    clock: Clock,
    keys: list[SigningKey],
    *,
    policies: str = ALLOW_GET_API,
    server: str = "",
    provider: str = "",
) -> AuthorizationService:
    jwks = directory / "jwks.json"
    jwks.write_text(json.dumps(devkeys.jwks(*keys)))
    path = directory / "config.yaml"
    path.write_text(
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
        + (f"server:\n{server}\n" if server else "")
        + f"providers:\n  - name: main\n    issuer: {ISS}\n    jwksFile: {jwks}\n{provider}\n"
        + policies
    )
    engine = Engine.build(config.load(path), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    return AuthorizationService(engine)


def _signed(key: SigningKey, clock: Clock, lifetime: float = 3600, **claims: Any) -> str:
    body = {"iss": ISS, "sub": "alice", "iat": int(clock.now), "exp": int(clock.now + lifetime)}
    return key.sign({**body, **claims})


def _get(
    token: str, path: str = "/api/orders", method: str = "GET", **headers: str
) -> RequestAttributes:
    return RequestAttributes(
        method=method,
        host="api.example.com",
        path=path,
        headers={
            "authorization": f"Bearer {token}",
            **{name.replace("_", "-"): value for name, value in headers.items()},
        },
        source_port=len(headers) + 40000,
    )


@pytest.fixture
def key() -> SigningKey:
    return _key("k1")


def test_a_repeated_request_gets_the_very_decision_object_and_counts_a_hit(
    tmp_path: Path, clock: Clock, key: SigningKey
) -> None:
    service = _service(tmp_path, clock, [key])
    token = _signed(key, clock)
    first = service.check(_get(token))
    again = service.check(_get(token))
    assert first.allowed and again is first  # the doors' render caches hit too
    stats = service.engine.memo_stats
    assert (stats.hits, stats.misses) == (1, 1)


def test_a_token_that_expires_is_refused_on_the_next_request_though_the_memo_held_its_allow(
    tmp_path: Path, clock: Clock, key: SigningKey
) -> None:
    service = _service(tmp_path, clock, [key])
    token = _signed(key, clock, lifetime=60)
    assert service.check(_get(token)).allowed
    assert service.check(_get(token)).allowed
    assert service.engine.memo_stats.hits == 1  # the memo held the allow
    clock.advance(60 + 60)  # its lifetime and the default clock skew
    decision = service.check(_get(token))
    assert (decision.status, decision.reason) == (401, errors.TOKEN_EXPIRED)


def test_a_key_removed_from_the_key_set_makes_the_next_request_401(
    tmp_path: Path, clock: Clock, key: SigningKey
) -> None:
    other = _key("k2")
    service = _service(tmp_path, clock, [key, other])
    token = _signed(other, clock)
    assert service.check(_get(token)).allowed
    assert service.check(_get(token)).allowed
    assert service.engine.memo_stats.hits == 1  # the memo held the allow
    (tmp_path / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
    for cache in service.engine.caches.values():
        assert cache.refresh()
    decision = service.check(_get(token))
    assert (decision.status, decision.reason) == (401, errors.UNKNOWN_KID)


def test_a_reload_that_changes_a_policy_changes_the_next_answer(
    tmp_path: Path, clock: Clock, key: SigningKey
) -> None:
    service = _service(tmp_path, clock, [key])
    token = _signed(key, clock)
    assert service.check(_get(token)).allowed
    assert service.check(_get(token)).allowed
    denying = (
        ALLOW_GET_API
        + """  - name: no-orders
    action: DENY
    rules: [{to: [{operation: {paths: ["/api/orders"]}}]}]
"""
    )
    (tmp_path / "config.yaml").write_text(
        (tmp_path / "config.yaml").read_text().replace(ALLOW_GET_API, denying)
    )
    engine = Engine.build(
        config.load(tmp_path / "config.yaml"), clock=clock, previous=service.engine
    )
    service.engine = engine
    decision = service.check(_get(token))
    assert (decision.status, decision.policy) == (403, "no-orders")


def test_paths_methods_and_headers_a_policy_reads_get_their_own_answers(
    tmp_path: Path, clock: Clock, key: SigningKey
) -> None:
    service = _service(tmp_path, clock, [key])
    token = _signed(key, clock)
    for _ in range(2):
        assert service.check(_get(token)).allowed
        assert not service.check(_get(token, path="/admin")).allowed
        assert not service.check(_get(token, method="POST", path="/admin")).allowed
        assert service.check(_get(token, method="POST", path="/admin", x_tenant="a")).allowed
        assert not service.check(_get(token, method="POST", path="/admin", x_tenant="b")).allowed
        # The same token in another header the policies do not read: the same answer.
        assert service.check(_get(token, x_request_id="7")).allowed
    # The second round all hits, and so did the header nobody reads in the first.
    assert service.engine.memo_stats.hits == 6 + 1


def test_headers_no_policy_reads_share_an_entry_and_the_source_port_never_counts(
    tmp_path: Path, clock: Clock, key: SigningKey
) -> None:
    service = _service(tmp_path, clock, [key])
    token = _signed(key, clock)
    first = service.check(_get(token, x_request_id="1"))
    # _get gives each number of extra headers its own source port.
    assert service.check(_get(token, x_request_id="2")) is first
    assert service.check(_get(token, x_request_id="3", x_trace="t")) is first


def test_with_the_memo_off_nothing_is_memoised(
    tmp_path: Path, clock: Clock, key: SigningKey
) -> None:
    service = _service(tmp_path, clock, [key], server="  decisionMemo: {maxEntries: 0}")
    token = _signed(key, clock)
    assert service.engine.memo is None
    assert service.check(_get(token)).allowed and service.check(_get(token)).allowed
    assert service.engine.memo_stats.hits == service.engine.memo_stats.misses == 0


def test_the_memo_starts_over_when_full_and_keeps_answering(
    tmp_path: Path, clock: Clock, key: SigningKey
) -> None:
    service = _service(tmp_path, clock, [key], server="  decisionMemo: {maxEntries: 3}")
    tokens = [_signed(key, clock, sub=f"user-{n}") for n in range(5)]
    for token in tokens * 2:
        assert service.check(_get(token)).allowed
    assert service.engine.memo is not None and len(service.engine.memo) <= 3


def test_an_explained_check_is_decided_afresh_and_records_its_way(
    tmp_path: Path, clock: Clock, key: SigningKey
) -> None:
    service = _service(tmp_path, clock, [key])
    token = _signed(key, clock)
    first = service.check(_get(token))
    trace = CheckTrace()
    assert service.check(_get(token), trace=trace) == first
    assert trace.policies_evaluated and trace.identity is not None
    assert service.engine.memo_stats.hits == 0


@pytest.mark.parametrize(
    ("policy", "readable"),
    [
        (
            {"rules": [{"to": [{"operation": {"methods": ["GET"], "notPaths": ["/a"]}}]}]},
            {"method", "path"},
        ),
        (
            {"rules": [{"to": [{"operation": {"hosts": ["a"], "ports": ["80"]}}]}]},
            {"host", "destination.port"},
        ),
        (
            {
                "rules": [
                    {"from": [{"source": {"remoteIpBlocks": ["10.0.0.0/8"], "namespaces": ["x"]}}]}
                ]
            },
            {"remote.ip", "source.principal"},
        ),
        (
            {
                "rules": [
                    {
                        "when": [
                            {"key": "request.headers[X-Tenant]", "values": ["a"]},
                            {"key": "request.context_extensions[team]", "values": ["b"]},
                            {"key": "request.auth.claims[groups]", "values": ["c"]},
                            {"key": "connection.sni", "values": ["d"]},
                            {"key": "destination.ip", "values": ["10.0.0.1"]},
                        ]
                    }
                ]
            },
            {"header:x-tenant", "context_extensions:team", "connection.sni", "destination.ip"},
        ),
        ({"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}, set()),
    ],
)
def test_what_a_policy_reads_is_told_from_its_rules(
    policy: dict[str, Any], readable: set[str]
) -> None:
    assert attributes_read([PolicySpec.model_validate({"name": "p", **policy})]) == readable


def test_a_dpop_request_is_verified_every_time_and_a_replayed_proof_is_refused(
    tmp_path: Path, clock: Clock, key: SigningKey
) -> None:
    holder = devkeys.generate_key("EC-P256", kid="holder")
    service = _service(
        tmp_path,
        clock,
        [key],
        policies="policies: [{name: all, rules: [{}]}]",
        provider="    dpop: {mode: optional}",
    )
    token = _signed(key, clock, cnf={"jkt": holder.thumbprint()})
    proof = devkeys.dpop_proof(
        holder,
        method="GET",
        url="https://api.example.com/api/orders",
        access_token=token,
        iat=clock.now,
    )

    def send() -> Decision:
        return service.check(
            RequestAttributes(
                method="GET",
                host="api.example.com",
                path="/api/orders",
                scheme="https",
                headers={"authorization": f"DPoP {token}", "dpop": proof},
            )
        )

    assert send().allowed
    decision = send()
    assert (decision.status, decision.reason) == (401, errors.DPOP_PROOF_REPLAYED)
    assert service.engine.memo_stats.hits == 0


def test_every_when_key_the_configuration_accepts_is_one_a_memo_can_key_on() -> None:
    # A key attributes_read cannot name makes its scope unmemoisable (safe, but no memo).
    for key_name in sorted(WHEN_KEYS_EXACT):
        value = "10.0.0.1" if key_name.endswith(".ip") else "80"
        spec = PolicySpec.model_validate(
            {"name": "p", "rules": [{"when": [{"key": key_name, "values": [value]}]}]}
        )
        assert attributes_read([spec]) is not None, key_name


def test_hits_and_misses_are_scraped_and_a_hit_counts_as_a_token_cache_hit(
    tmp_path: Path, clock: Clock, key: SigningKey
) -> None:
    service = _service(tmp_path, clock, [key])
    metrics = Metrics(CollectorRegistry())
    metrics.watch_engine(lambda: service.engine)
    token = _signed(key, clock)
    for _ in range(3):
        assert service.check(_get(token)).allowed
    assert not service.check(_get(token, path="/admin")).allowed
    sample = metrics.registry.get_sample_value
    assert sample("authz_decision_memo_hits_total") == 2
    assert sample("authz_decision_memo_misses_total") == 2
    # Each hit reused the token's verification, as the token cache would have.
    assert sample("authz_token_cache_hits_total") == 2 + 1


# ------------------------------------------------------- opaque tokens and API keys


def _scraped(service: AuthorizationService) -> Any:
    metrics = Metrics(CollectorRegistry())
    metrics.watch_engine(lambda: service.engine)
    return metrics.registry.get_sample_value


def test_an_opaque_token_is_memoised_until_its_answer_leaves_the_cache_then_asked_again(
    tmp_path: Path, clock: Clock
) -> None:
    with IntrospectionServer() as idp:
        service = AuthorizationService(introspection_case.make_engine(tmp_path, clock, idp))
        sample = _scraped(service)
        bearer = introspection_case.bearer
        short = introspection_case.active_token(idp, clock, exp=int(clock()) + 30)
        long = introspection_case.active_token(idp, clock)  # until cacheTtl (60s)
        for _ in range(3):
            assert service.check(bearer(short)).allowed
            assert service.check(bearer(long)).allowed
        assert idp.call_count() == 2
        assert sample("authz_decision_memo_hits_total") == 4
        # The IdP revokes both: the answers stand while the cache would keep them...
        idp.answers[short] = idp.answers[long] = {"active": False}
        clock.advance(28)
        assert service.check(bearer(short)).allowed and service.check(bearer(long)).allowed
        assert idp.call_count() == 2
        # ...and past the short one's exp it is introspected again, and now inactive.
        clock.advance(3)
        decision = service.check(bearer(short))
        assert (decision.status, decision.reason) == (401, errors.TOKEN_INACTIVE)
        assert service.check(bearer(long)).allowed
        assert idp.call_count() == 3
        clock.advance(30)  # past cacheTtl for the long one
        decision = service.check(bearer(long))
        assert (decision.status, decision.reason) == (401, errors.TOKEN_INACTIVE)
        assert idp.call_count() == 4


def test_an_opaque_token_whose_answer_was_evicted_from_its_cache_is_asked_again(
    tmp_path: Path, clock: Clock
) -> None:
    with IntrospectionServer() as idp:
        engine = introspection_case.make_engine(tmp_path, clock, idp, extra="  cacheMaxEntries: 1")
        service = AuthorizationService(engine)
        bearer = introspection_case.bearer
        first = introspection_case.active_token(idp, clock)
        second = introspection_case.active_token(idp, clock)
        assert service.check(bearer(first)).allowed
        assert service.check(bearer(first)).allowed  # a memo hit
        assert service.check(bearer(second)).allowed  # its answer pushes out the first's
        idp.answers[first] = {"active": False}
        decision = service.check(bearer(first))
        assert (decision.status, decision.reason) == (401, errors.TOKEN_INACTIVE)
        assert idp.call_count() == 3


def test_an_api_key_removed_from_the_keys_file_is_refused_though_the_memo_held_its_allow(
    tmp_path: Path, clock: Clock
) -> None:
    engine = apikeys_case.make(tmp_path, clock)
    service = AuthorizationService(engine)
    sample = _scraped(service)
    key = apikeys_case.ACME_KEY
    for _ in range(3):
        assert service.check(apikeys_case.get(x_api_key=key)).allowed
    assert sample("authz_decision_memo_hits_total") == 2
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("keys: []\n")
    os.utime(keys_file, ns=(1, 1))  # a new signature even within one mtime tick
    engine.caches["partner-keys"].tick()
    decision = service.check(apikeys_case.get(x_api_key=key))
    assert (decision.status, decision.reason) == (401, errors.UNKNOWN_API_KEY)


def test_an_api_key_is_memoised_until_it_expires_and_across_a_reread_that_keeps_it(
    tmp_path: Path, clock: Clock
) -> None:
    key = apikeys_case.ACME_KEY
    expires = dt.datetime.fromtimestamp(int(clock()) + 60, dt.UTC)
    keys = f"keys:\n  - sub: soon\n    sha256: {apikeys_case.sha(key)}\n"
    keys += f"    claims: {{scope: orders.read}}\n    expires: {expires.isoformat()}\n"
    engine = apikeys_case.make(tmp_path, clock, keys=keys)
    service = AuthorizationService(engine)
    sample = _scraped(service)
    assert service.check(apikeys_case.get(x_api_key=key)).allowed
    assert service.check(apikeys_case.get(x_api_key=key)).allowed
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(keys + f"  - sub: new\n    sha256: {apikeys_case.sha('x' * 32)}\n")
    os.utime(keys_file, ns=(1, 1))
    cache = engine.caches["partner-keys"]
    failures = cache.fetches["failure"]
    cache.tick()  # a new table, the key still in it: decided afresh, then memoised again
    assert cache.fetches["failure"] == failures
    clock.advance(55)
    for _ in range(2):
        assert service.check(apikeys_case.get(x_api_key=key)).allowed
    assert sample("authz_decision_memo_hits_total") == 2
    clock.advance(5)
    decision = service.check(apikeys_case.get(x_api_key=key))
    assert (decision.status, decision.reason) == (401, errors.API_KEY_EXPIRED)


def test_an_opaque_token_is_asked_every_time_when_its_answers_are_not_cached(
    tmp_path: Path, clock: Clock
) -> None:
    with IntrospectionServer() as idp:
        engine = introspection_case.make_engine(tmp_path, clock, idp, extra="  cacheMaxEntries: 0")
        service = AuthorizationService(engine)
        token = introspection_case.active_token(idp, clock)
        for _ in range(3):
            assert service.check(introspection_case.bearer(token)).allowed
        assert idp.call_count() == 3  # nothing cached vouches for it: never memoised
        assert service.engine.memo_stats.hits == 0
