"""The bugs that would let someone in and that the rest of the suite did not notice (issue 26):
each test here fails on one realistic one-line change to the code (a mutant) and passes on the
code as it is. docs/mutation.md names the mutant each test kills.

- a DENY rule whose ``from`` mixes a token source and an IP source must still be tried for an
  anonymous request (the index must not file it as "needs a token");
- ``presence: REQUIRED`` holds inside a workload scope too;
- a reload that tightens a provider (audiences, requiredClaims) refuses tokens verified and
  cached before it;
- the HTTP door's limits sit exactly where they say: the limit passes, one past it is refused.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from authz_server import errors
from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.config.specs import HttpAuthzSpec, PolicySpec
from authz_server.doors.http import HTTP_UNKNOWN, HttpDoor, _Connection
from authz_server.errors import ConfigError
from authz_server.explain import explain
from authz_server.policy.compile import PolicySet, unknown_attribute_uses
from authz_server.server import AuthzServer
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.helpers import (
    AUDIENCE,
    ISSUER,
    Clock,
    RecordingTransport,
    claims_for,
    identity,
    write_config,
)

# ------------------------------------------------------ a mixed-source DENY, anonymous caller

MIXED_DENY = [
    {
        "name": "no-tokens-or-office",
        "action": "DENY",
        "rules": [
            {
                "from": [
                    {"source": {"requestPrincipals": ["*"]}},
                    {"source": {"ipBlocks": ["10.0.0.0/8"]}},
                ]
            }
        ],
    },
    {"name": "everyone", "rules": [{}]},
]


@pytest.mark.parametrize("indexed", [True, False], ids=["index", "linear"])
def test_a_deny_with_a_token_source_or_an_ip_source_denies_an_anonymous_caller_by_ip(
    indexed: bool,
) -> None:
    policies = PolicySet([PolicySpec.model_validate(s) for s in MIXED_DENY], indexed=indexed)
    office = RequestAttributes(path="/x", source_ip="10.1.2.3")
    outside = RequestAttributes(path="/x", source_ip="192.168.1.1")

    # Either source matches: the caller from 10/8 is denied with no token at all...
    denied = policies.evaluate(office, None)
    assert (denied.allowed, denied.policy) == (False, "no-tokens-or-office")
    # ... and so is any caller with a token, wherever it comes from.
    assert not policies.evaluate(outside, identity()).allowed
    assert policies.evaluate(outside, None).allowed


def test_the_same_mixed_deny_through_the_service_and_its_index(
    tmp_path: Path, clock: Clock
) -> None:
    # Enough other rules that the index files rules under keys and identity, as in production.
    others = [
        {"name": f"api-{n}", "rules": [{"to": [{"operation": {"paths": [f"/api/{n}/*"]}}]}]}
        for n in range(20)
    ]
    text = (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\nproviders: []\n"
        + "policies: "
        + json.dumps([MIXED_DENY[0], *others, MIXED_DENY[1]])
        + "\n"
    )
    service = AuthorizationService(
        Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
    )

    denied = service.check(RequestAttributes(path="/api/3/x", source_ip="10.1.2.3"))
    assert (denied.status, denied.policy) == (401, "no-tokens-or-office")
    assert service.check(RequestAttributes(path="/api/3/x", source_ip="192.168.1.1")).allowed


# ------------------------------------------------- presence: REQUIRED inside a workload scope


def test_presence_required_refuses_anonymous_requests_inside_a_workload_scope(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    jwks = json.dumps(json.dumps(devkeys.jwks(rsa_key)))
    text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
workloads:
  - {{name: orders, contextExtensions: {{workload: orders}}}}
  - {{name: reports, contextExtensions: {{workload: reports}}}}
providers:
  - {{name: main, issuer: {ISSUER}, audiences: [{AUDIENCE}], jwks: {jwks}, presence: REQUIRED}}
policies:
  # reports has no ALLOW policy: without presence, an anonymous request would be allowed.
  - {{name: orders-only-get, appliesTo: {{workloads: [orders]}},
      rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]}}
"""
    engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    service = AuthorizationService(engine)

    for workload in ("orders", "reports"):
        anonymous = RequestAttributes(path="/x", context_extensions={"workload": workload})
        decision = service.check(anonymous)
        assert (decision.status, decision.reason) == (401, errors.MISSING_CREDENTIALS), workload
        signed_in = RequestAttributes(
            path="/x",
            headers={"authorization": f"Bearer {make_token()}"},
            context_extensions={"workload": workload},
        )
        assert service.check(signed_in).allowed, workload


# ------------------------------------------- a reload that tightens a provider, cached tokens


def _provider_config(key: SigningKey, extra: str) -> str:
    jwks = json.dumps(json.dumps(devkeys.jwks(key)))
    return (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
        f"providers:\n  - {{name: main, issuer: {ISSUER}, jwks: {jwks}{extra}}}\n"
        "policies: [{name: signed-in, rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}]\n"
    )


@pytest.mark.parametrize(
    ("tightened", "reason"),
    [
        (", audiences: [another-api]", errors.INVALID_AUDIENCE),
        (", requiredClaims: {tenant: acme}", errors.MISSING_CLAIM),
    ],
    ids=["audiences", "requiredClaims"],
)
def test_a_reload_that_tightens_a_provider_refuses_tokens_verified_before_it(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, tightened: str, reason: str
) -> None:
    path = write_config(tmp_path, _provider_config(rsa_key, ""))
    engine = Engine.build(config.load(path), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    service = AuthorizationService(engine)
    token = rsa_key.sign(claims_for(clock.now))  # aud orders-api, no tenant claim

    def check() -> Any:
        return service.check(
            RequestAttributes(path="/x", headers={"authorization": f"Bearer {token}"})
        )

    assert check().allowed
    assert check().allowed and engine.token_cache.hits == 1  # verified once, then cached

    path.write_text(_provider_config(rsa_key, tightened))
    successor = Engine.build(config.load(path), clock=clock, previous=engine)
    # The same key cache and token cache carry over: only the verification scope differs.
    assert successor.caches["main"] is engine.caches["main"]
    assert successor.token_cache is engine.token_cache
    engine.close(successor=successor)
    service.engine = successor

    refused = check()
    assert (refused.status, refused.reason) == (401, reason)


# ---------------------------------------------------- the HTTP door's limits, at the boundary

LIMITS = {
    "maxRequestLineBytes": 256,
    "maxHeaders": 8,
    "maxHeaderBytes": 1024,
    "maxBodyBytes": 16,
}


@pytest.fixture(scope="module")
def door_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    directory = tmp_path_factory.mktemp("limits")
    key = devkeys.generate_key("EC-P256", kid="limits")
    text = (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
        f"server: {{httpAuthz: {json.dumps(LIMITS)}}}\n"
        f"providers: [{{issuer: {ISSUER}, jwks: {json.dumps(json.dumps(devkeys.jwks(key)))}}}]\n"
        "policies: [{name: everyone, rules: [{}]}]\n"
    )
    server = AuthzServer(
        config.load(write_config(directory, text)),
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        http_authz_listen="127.0.0.1:0",
    )
    server.start()
    try:
        yield server.http_authz_port
    finally:
        server.stop(grace=1)


def _status(port: int, data: bytes) -> int:
    """The status the door answers ``data`` with, on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + 10
        while b"\r\n" not in received and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 "), received[:60]
    return int(received[9:12])


def _head(target: str = "/x", headers: int = 1, pad: int = 0, body: bytes = b"") -> bytes:
    """A request with ``headers`` headers in all (Host first, then ``x-hN: v``; the last one's
    value padded by ``pad`` bytes) and ``body``."""
    lines = [f"GET {target} HTTP/1.1", "Host: api.test"]
    extra = [f"x-h{n}: v" for n in range(headers - 1 - (1 if body else 0))]
    if body:
        extra.append(f"Content-Length: {len(body)}")
    if extra and pad:
        extra[-1] += "v" * pad
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _header_bytes(data: bytes) -> int:
    """What the door counts against maxHeaderBytes: names and values, plus 4 a header."""
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return sum(len(line) - 2 + 4 for line in head)  # ": " is not counted, 4 a header is


@pytest.mark.parametrize(
    ("name", "at_limit", "past_limit", "refusal"),
    [
        (
            "request target",
            _head("/" + "a" * (LIMITS["maxRequestLineBytes"] - 1)),
            _head("/" + "a" * LIMITS["maxRequestLineBytes"]),
            414,
        ),
        (
            "header count",
            _head(headers=LIMITS["maxHeaders"]),
            _head(headers=LIMITS["maxHeaders"] + 1),
            431,
        ),
        ("body", _head(body=b"b" * 16), _head(body=b"b" * 17), 413),
    ],
    ids=["request-target", "header-count", "body"],
)
def test_each_http_door_limit_admits_its_value_and_refuses_one_past_it(
    door_port: int, name: str, at_limit: bytes, past_limit: bytes, refusal: int
) -> None:
    assert _status(door_port, at_limit) == 200, name
    assert _status(door_port, past_limit) == refusal, name


def test_the_header_bytes_limit_admits_its_value_and_refuses_one_past_it(door_port: int) -> None:
    base = _head(headers=2)
    pad = LIMITS["maxHeaderBytes"] - _header_bytes(base)
    at_limit, past_limit = _head(headers=2, pad=pad), _head(headers=2, pad=pad + 1)
    assert _header_bytes(at_limit) == LIMITS["maxHeaderBytes"]

    assert _status(door_port, at_limit) == 200
    assert _status(door_port, past_limit) == 431


# ---------------------------------------- survivors of `make mutate` (docs/mutation.md)


def test_explain_names_each_token_location_as_the_provider_reads_it(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    jwks = json.dumps(json.dumps(devkeys.jwks(rsa_key)))
    text = (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
        f"providers: [{{name: main, issuer: {ISSUER}, jwks: {jwks},"
        " fromHeaders: [{name: X-Token}, {name: authorization, prefix: 'Bearer '}],"
        " fromParams: [tok], fromCookies: [session]}]\n"
        "policies: [{name: everyone, rules: [{}]}]\n"
    )
    engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    token = make_token()

    def location(path: str = "/x", **headers: str) -> str:
        result = explain(engine, RequestAttributes(path=path, headers=headers))
        [found] = result["tokens"]
        return str(found["location"])

    assert location(**{"x-token": token}) == "header x-token"
    assert location(authorization=f"Bearer {token}") == "header authorization (prefix 'Bearer')"
    assert location(f"/x?tok={token}") == "param tok"
    assert location(cookie=f"session={token}") == "cookie session"


def test_a_configuration_in_a_directory_whose_name_is_not_utf8_still_loads_and_decides(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    # A name the file system holds as bytes that are not UTF-8 (Python: lone surrogates).
    directory = tmp_path / os.fsdecode(b"config-\xff")
    directory.mkdir()
    (directory / "jwks.json").write_text(json.dumps(devkeys.jwks(rsa_key)))
    text = (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
        f"providers: [{{name: main, issuer: {ISSUER}, jwksFile: jwks.json}}]\n"
        "policies: [{name: signed-in, rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}]\n"
    )
    engine = Engine.build(config.load(write_config(directory, text)), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    service = AuthorizationService(engine)

    signed_in = RequestAttributes(headers={"authorization": f"Bearer {make_token()}"})
    assert service.check(signed_in).allowed
    assert service.check(RequestAttributes()).status == 401


def test_a_token_header_under_another_scheme_does_not_hide_the_token_in_the_query(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    # Istio's default locations: `Authorization: Bearer`, then `access_token`.
    path = write_config(tmp_path, _provider_config(rsa_key, ""))
    engine = Engine.build(config.load(path), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    request = RequestAttributes(
        path=f"/x?access_token={make_token()}",
        headers={"authorization": "Basic dXNlcjpwYXNz"},
    )

    decision = AuthorizationService(engine).check(request)

    assert decision.allowed and decision.principal == f"{ISSUER}/alice"


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("[::1]", "[::1]", True),
        ("[::1]", "[::1]:8080", True),
        ("[::1]", "[::1]:8", True),
        # Not an IPv6 literal and a port: the whole authority is the host, matching nothing.
        ("[::1]", "[::1]x", False),
        ("[::1]", "[::1]80", False),
        ("[::1]", "[::1]x:80", False),
        ("[::1]:8080", "[::1]:8080", True),
        ("[::1]:8080", "[::1]:80", False),
        ("[::1]:*", "[::1]:8080", True),
        ("[::1]:*", "[::1]", False),
        # A bare IPv6 address has no port: its last group is not one.
        ("2001:db8:", "2001:db8::1", False),
        ("2001:db8::1", "2001:db8::1", True),
    ],
)
def test_hosts_read_a_port_only_after_a_bracketed_address_or_a_name(
    pattern: str, host: str, matches: bool
) -> None:
    spec = {"name": "only", "rules": [{"to": [{"operation": {"hosts": [pattern]}}]}]}
    for indexed in (True, False):
        policies = PolicySet([PolicySpec.model_validate(spec)], indexed=indexed)
        assert policies.evaluate(RequestAttributes(host=host), None).allowed is matches


@pytest.mark.parametrize("path", ["/admin?a=1?b=2", "/admin#x#y", "/admin?a=1#x#y"])
def test_a_deny_on_a_path_holds_whatever_follows_the_first_question_mark_or_hash(
    path: str,
) -> None:
    policies = PolicySet(
        [
            PolicySpec.model_validate(
                {
                    "name": "no-admin",
                    "action": "DENY",
                    "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}],
                }
            ),
            PolicySpec.model_validate({"name": "everyone", "rules": [{}]}),
        ]
    )

    denied = policies.evaluate(RequestAttributes(path=path), None)

    assert (denied.allowed, denied.policy) == (False, "no-admin")


def test_claim_headers_take_numbers_and_booleans_as_json_and_dotted_names_whole(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, make_token: Callable[..., str]
) -> None:
    outputs = ", ".join(
        f"{{header: x-{claim}, claim: {claim}}}" for claim in ("absent", "admin", "level", "ratio")
    )
    outputs += ", {header: x-role, claim: acme.test/role}"
    path = write_config(tmp_path, _provider_config(rsa_key, f", outputClaimToHeaders: [{outputs}]"))
    engine = Engine.build(config.load(path), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    # A claim whose name holds dots is read whole first (then as a path into objects).
    token = make_token(admin=True, level=3, ratio=0.5, **{"acme.test/role": "ops"})

    decision = AuthorizationService(engine).check(
        RequestAttributes(headers={"authorization": f"Bearer {token}"})
    )

    assert decision.allowed
    # An absent claim gives no header, and the headers after it are still set.
    assert dict(decision.headers_to_set) == {
        "x-admin": "true",
        "x-level": "3",
        "x-ratio": "0.5",
        "x-role": "ops",
    }


def test_a_key_removed_after_a_policy_only_reload_still_revokes_the_tokens_cached_before(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(devkeys.jwks(rsa_key)))

    def settings(policy: str) -> config.Settings:
        text = (
            "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
            f"providers: [{{name: main, issuer: {ISSUER}, jwksFile: jwks.json}}]\n"
            f"policies: [{{name: {policy}, rules: [{{from: [{{source: {{requestPrincipals: ['*']}}}}]}}]}}]\n"
        )
        return config.load(write_config(tmp_path, text))

    engine = Engine.build(settings("first"), clock=clock)
    assert engine.caches["main"].refresh()
    service = AuthorizationService(engine)
    token = rsa_key.sign(claims_for(clock.now))
    request = RequestAttributes(headers={"authorization": f"Bearer {token}"})
    assert service.check(request).allowed  # verified, and cached

    successor = Engine.build(settings("second"), clock=clock, previous=engine)
    assert successor.caches["main"] is engine.caches["main"]  # the key cache carries over
    engine.close(successor=successor)
    service.engine = successor
    assert service.check(request).allowed

    jwks.write_text(json.dumps(devkeys.jwks(ec_key)))  # the signing key is withdrawn
    assert successor.caches["main"].refresh()

    refused = service.check(request)
    assert (refused.status, refused.reason) == (401, errors.UNKNOWN_KID)


def _verifying_service(tmp_path: Path, clock: Clock, key: SigningKey) -> AuthorizationService:
    engine = Engine.build(
        config.load(write_config(tmp_path, _provider_config(key, ""))), clock=clock
    )
    for cache in engine.caches.values():
        assert cache.refresh()
    return AuthorizationService(engine)


def test_not_before_admits_a_token_exactly_at_the_skew_and_refuses_it_a_second_before(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey
) -> None:
    clock.now = float(int(clock.now))
    service = _verifying_service(tmp_path, clock, rsa_key)
    skew = 60  # clockSkew's default

    def check(nbf: int) -> Any:
        token = rsa_key.sign(claims_for(clock.now, nbf=nbf))
        return service.check(RequestAttributes(headers={"authorization": f"Bearer {token}"}))

    assert check(int(clock.now) + skew).allowed
    refused = check(int(clock.now) + skew + 1)
    assert (refused.status, refused.reason) == (401, errors.TOKEN_NOT_YET_VALID)


@pytest.mark.parametrize(
    ("claims", "allowed"),
    [
        ({"exp": 2**63 - 1}, True),
        ({"exp": 2**63}, False),
        ({"nbf": -(2**63)}, True),
        ({"nbf": -(2**63) - 1}, False),
    ],
    ids=["exp-int64-max", "exp-past-int64", "nbf-int64-min", "nbf-past-int64"],
)
def test_time_claims_are_numbers_within_int64_both_ends_included(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, claims: dict[str, int], allowed: bool
) -> None:
    service = _verifying_service(tmp_path, clock, rsa_key)
    token = rsa_key.sign(claims_for(clock.now, **claims))

    decision = service.check(RequestAttributes(headers={"authorization": f"Bearer {token}"}))

    assert decision.allowed is allowed
    if not allowed:
        assert (decision.status, decision.reason) == (401, errors.MALFORMED_TOKEN)


def test_the_body_limit_counts_a_body_across_the_chunks_it_arrives_in(
    tmp_path: Path, clock: Clock
) -> None:
    text = (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\nproviders: []\n"
        "policies: [{name: everyone, rules: [{}]}]\n"
    )
    service = AuthorizationService(
        Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
    )
    door = HttpDoor(service, HttpAuthzSpec(maxBodyBytes=16), listen="127.0.0.1:0")
    door.loop_time = lambda: 1.0  # type: ignore[method-assign]
    connection, transport = _Connection(door), RecordingTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]

    connection.data_received(
        b"POST /x HTTP/1.1\r\nHost: api.test\r\nContent-Length: 20\r\n\r\n" + b"b" * 10
    )
    assert transport.out == []  # 10 bytes of 16: still reading
    connection.data_received(b"b" * 10)  # 20 in all

    assert len(transport.out) == 1 and transport.out[0].startswith(b"HTTP/1.1 413 ")


def test_the_http_door_warning_names_each_unseen_clause_its_rule_and_its_effect() -> None:
    specs = [
        PolicySpec.model_validate(spec)
        for spec in (
            {
                "name": "no-8080",
                "action": "DENY",
                "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}],
            },
            {
                "name": "office",
                "rules": [{}, {"when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}]}],
            },
        )
    ]

    assert unknown_attribute_uses(specs, HTTP_UNKNOWN) == [
        "policy 'no-8080' rule 1: to.operation.ports reads destination.port, which the HTTP "
        "door does not receive: through that door the rule always matches (denies)",
        "policy 'office' rule 2: when[source.ip] reads source.ip, which the HTTP door does "
        "not receive: through that door the rule never matches",
    ]


@pytest.mark.parametrize(
    "jwks", ['{"keys": []}', '["not", "a", "key", "set"]'], ids=["no-keys", "not-an-object"]
)
def test_an_inline_key_set_that_can_verify_nothing_is_refused_naming_document_and_field(
    tmp_path: Path, jwks: str
) -> None:
    path = write_config(
        tmp_path,
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
        f"providers: [{{issuer: {ISSUER}, jwks: {json.dumps(jwks)}}}]\n"
        "policies: [{name: everyone, rules: [{}]}]\n",
    )

    with pytest.raises(ConfigError) as refused:
        config.load(path)

    [problem] = refused.value.problems
    assert (problem.document, problem.path) == (f"{path}#0 (AuthzConfig)", "providers[0].jwks")
