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
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from authz_server import config, devkeys, errors
from authz_server.attributes import RequestAttributes
from authz_server.devkeys import SigningKey
from authz_server.policy import PolicySet
from authz_server.server import AuthzServer
from authz_server.service import AuthorizationService, Engine
from authz_server.specs import PolicySpec
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for, identity, write_config

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
