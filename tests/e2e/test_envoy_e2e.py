"""End to end: real Envoy → our server (subprocess) → real upstream; keys from a real JWKS URL.

Every case runs through both doors (``stack`` is parametrised): Envoy's gRPC ext_authz
(``grpc_service``) and its HTTP ext_authz (``http_service``) must give the client and the
upstream the same answers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from authz_server.tools.envoy_config import render_bootstrap
from tests.e2e.harness import (
    DOORS,
    AuthzServerProcess,
    EchoUpstream,
    EnvoyProcess,
    JWKSServer,
    door_setup,
    free_port,
    http_request,
)
from tests.helpers import AUDIENCE, ISSUER, claims_for

pytestmark = pytest.mark.e2e

CONFIG = """
apiVersion: authz-server/v1
kind: AuthzConfig
server: {{realm: e2e}}
providers:
  - name: main
    issuer: {issuer}
    audiences: [{audience}]
    jwksUri: {jwks_url}
    outputClaimToHeaders:
      - {{header: x-jwt-sub, claim: sub}}
      - {{header: x-jwt-groups, claim: groups}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-internal, namespace: shop}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/api/internal/*"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin-host, namespace: shop}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{hosts: ["admin.example.com"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api, namespace: shop}}
spec:
  rules:
    - from: [{{source: {{requestPrincipals: ["{issuer}/*"]}}}}]
      to: [{{operation: {{methods: ["GET"], paths: ["/api/*"]}}}}]
    - from: [{{source: {{requestPrincipals: ["*"]}}}}]
      to: [{{operation: {{methods: ["POST"], paths: ["/api/*"]}}}}]
      when: [{{key: "request.auth.claims[groups]", values: ["admin"]}}]
    - to: [{{operation: {{paths: ["/public/*"]}}}}]
"""


# The headers the server sets (outputClaimToHeaders above): the HTTP door's Envoy must list them.
OUTPUT_HEADERS = ["x-jwt-sub", "x-jwt-groups"]


@dataclass
class Stack:
    door: str
    envoy_url: str
    grpc_address: str
    upstream: EchoUpstream
    jwks: JWKSServer
    server: AuthzServerProcess
    keys: dict[str, SigningKey]
    envoy: EnvoyProcess

    def get_raw(self, path: str, headers: dict[str, str]) -> Any:
        """GET with ``headers`` sent exactly as named."""
        self.upstream.clear()
        return http_request(self.envoy_url + path, headers=headers)

    def get(self, path: str, token: str | None = None, method: str = "GET", **headers: str) -> Any:
        all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        self.upstream.clear()
        return http_request(
            self.envoy_url + path,
            method=method,
            headers=all_headers,
            body=b"" if method == "POST" else None,
        )


@pytest.fixture(scope="module", params=DOORS)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    door = request.param
    workdir = tmp_path_factory.mktemp(f"e2e-{door}")
    keys = {
        "RS256": devkeys.generate_key("RSA", kid="rsa-1"),
        "ES256": devkeys.generate_key("EC-P256", kid="ec-1"),
        "EdDSA": devkeys.generate_key("Ed25519", kid="ed-1"),
    }
    with JWKSServer(devkeys.jwks(*keys.values())) as jwks, EchoUpstream() as upstream:
        config = workdir / "config.yaml"
        config.write_text(CONFIG.format(issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks.jwks_url))
        grpc_port, http_port = free_port(), free_port()
        server_args, envoy_args = door_setup(
            door, grpc_port if door == "grpc" else free_port(), OUTPUT_HEADERS
        )
        with AuthzServerProcess(
            config,
            grpc_port,
            http_port,
            server_args,
            log_path=workdir / "server.log",
            ready_path="/readyz",
        ) as server:
            listen, admin = free_port(), free_port()
            bootstrap = render_bootstrap(
                listen_port=listen, admin_port=admin, upstream_port=upstream.port, **envoy_args
            )
            with EnvoyProcess(bootstrap, admin, workdir / "envoy.log") as envoy:
                yield Stack(
                    door=door,
                    envoy_url=f"http://127.0.0.1:{listen}",
                    grpc_address=f"127.0.0.1:{grpc_port}",
                    upstream=upstream,
                    jwks=jwks,
                    server=server,
                    keys=keys,
                    envoy=envoy,
                )


def token(stack: Stack, alg: str = "RS256", **claims: Any) -> str:
    return stack.keys[alg].sign(claims_for(time.time(), **claims))


def reason(body: bytes) -> str:
    return str(json.loads(body)["reason"])


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_valid_token_reaches_upstream_with_identity_headers_and_without_the_token(
    stack: Stack, alg: str
) -> None:
    status, _, _ = stack.get("/api/orders", token(stack, alg, groups=["dev", "ops"]))
    assert status == 200
    seen = stack.upstream.last_request().headers
    assert seen["x-jwt-sub"] == "alice"
    assert seen["x-jwt-groups"] == "dev,ops"
    assert "authorization" not in seen
    assert stack.jwks.fetch_count() >= 1


def test_no_token_is_401_with_bearer_challenge(stack: Stack) -> None:
    status, headers, body = stack.get("/api/orders")
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="e2e"'
    assert reason(body) == "missing_credentials"
    assert stack.upstream.requests == []


def _expired(stack: Stack) -> str:
    return token(stack, exp=int(time.time()) - 3600)


def _bad_signature(stack: Stack) -> str:
    head, payload, _ = token(stack).split(".")
    other = devkeys.generate_key("RSA", kid="rsa-1").sign(claims_for(time.time()))
    return f"{head}.{payload}.{other.split('.')[2]}"


def _alg_none(stack: Stack) -> str:
    return devkeys.unsigned_token(claims_for(time.time()), headers={"kid": "rsa-1"})


def _hs256_with_public_key(stack: Stack) -> str:
    return devkeys.hmac_token(
        claims_for(time.time()), stack.keys["RS256"].public_pem(), kid="rsa-1"
    )


@pytest.mark.parametrize(
    ("make", "expected_reason", "description"),
    [
        (_expired, "token_expired", "token expired"),
        (_bad_signature, "invalid_signature", "invalid signature"),
        (lambda s: token(s, aud="someone-else"), "invalid_audience", "audience not accepted"),
        (lambda s: token(s, iss="https://evil.test"), "invalid_issuer", "issuer not accepted"),
        (_alg_none, "unsupported_algorithm", "algorithm not allowed"),
        (_hs256_with_public_key, "unsupported_algorithm", "algorithm not allowed"),
        (lambda s: "garbage.garbage.garbage", "malformed_token", "malformed token"),
    ],
    ids=[
        "expired",
        "bad-signature",
        "wrong-audience",
        "wrong-issuer",
        "alg-none",
        "hs256-pubkey",
        "garbage",
    ],
)
def test_invalid_token_is_401_invalid_token_with_reason(
    stack: Stack, make: Any, expected_reason: str, description: str
) -> None:
    # Even on /public/*, which anonymous callers may use: a bad token is never ignored.
    for path in ("/api/orders", "/public/info"):
        status, headers, body = stack.get(path, make(stack))
        assert status == 401, path
        assert reason(body) == expected_reason
        assert headers["www-authenticate"] == (
            f'Bearer realm="e2e", error="invalid_token", error_description="{description}"'
        )
    assert stack.upstream.requests == []


def test_authenticated_but_not_allowed_is_403_and_admin_may_post(stack: Stack) -> None:
    status, headers, body = stack.get("/api/orders", token(stack, groups=["dev"]), method="POST")
    assert status == 403
    assert reason(body) == "no_allow_policy_matched"
    assert "www-authenticate" not in headers
    status, _, _ = stack.get("/api/orders", token(stack, groups=["admin"]), method="POST")
    assert status == 200


def test_deny_policy_wins_even_through_dot_segments(stack: Stack) -> None:
    good = token(stack, groups=["admin"])
    for path in ("/api/internal/keys", "/api/x/../internal/keys", "/api//internal/keys"):
        status, _, body = stack.get(path, good)
        assert (status, reason(body)) == (403, "policy_denied"), path


def test_spoofed_identity_headers_never_reach_the_upstream(stack: Stack) -> None:
    status, _, _ = stack.get("/public/info", x_jwt_sub="root", x_jwt_groups="admin")
    assert status == 200
    seen = stack.upstream.last_request().headers
    assert "x-jwt-sub" not in seen and "x-jwt-groups" not in seen

    # Underscore twins, which CGI-style upstreams read as the dashed header: removed too.
    # (http_request sends the names as given: `x_jwt_sub` stays `x_jwt_sub`.)
    status, _, _ = stack.get_raw("/public/info", {"x_jwt_sub": "root", "x_jwt_groups": "admin"})
    assert status == 200
    seen = stack.upstream.last_request().headers
    assert "x_jwt_sub" not in seen and "x_jwt_groups" not in seen, seen

    status, _, _ = stack.get("/api/orders", token(stack), x_jwt_sub="root", x_jwt_groups="admin")
    assert status == 200
    seen = stack.upstream.last_request().headers
    assert seen["x-jwt-sub"] == "alice"
    assert "x-jwt-groups" not in seen  # the token has no groups claim: nothing, not the spoof


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "grpcurl"
    return subprocess.run(
        [str(binary), "-plaintext", *args], capture_output=True, text=True, timeout=30, check=False
    )


# gRPC only: grpcurl speaks to the gRPC door's API itself, which the HTTP door does not have.
@pytest.mark.parametrize("stack", ["grpc"], indirect=True)
def test_grpcurl_lists_the_service_and_checks_a_request(stack: Stack) -> None:
    listing = grpcurl(stack.grpc_address, "list")
    assert listing.returncode == 0, listing.stderr
    assert "envoy.service.auth.v3.Authorization" in listing.stdout.split()

    def check(headers: dict[str, str]) -> dict[str, Any]:
        body = {
            "attributes": {
                "request": {"http": {"method": "GET", "path": "/api/orders", "headers": headers}}
            }
        }
        result = grpcurl(
            "-d", json.dumps(body), stack.grpc_address, "envoy.service.auth.v3.Authorization/Check"
        )
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    denied = check({})
    assert denied["status"]["code"] == 16
    # grpcurl prints proto field names (snake_case) and enum names.
    assert denied["denied_response"]["status"]["code"] == "Unauthorized"
    allowed = check({"authorization": f"Bearer {token(stack)}"})
    assert allowed.get("status", {}).get("code", 0) == 0
    assert "ok_response" in allowed


@pytest.mark.parametrize("door", DOORS)
def test_server_drains_and_exits_zero_on_sigterm(tmp_path: Path, door: str) -> None:
    key = devkeys.generate_key("EC-P256", kid="k")
    (tmp_path / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
    (tmp_path / "config.yaml").write_text(
        f"apiVersion: authz-server/v1\nkind: AuthzConfig\nserver: {{shutdownGrace: 1s}}\n"
        f"providers: [{{issuer: {ISSUER}, jwksFile: jwks.json}}]\n"
        "policies: [{name: everyone, rules: [{}]}]\n"
    )
    grpc_port = free_port()
    door_port = grpc_port if door == "grpc" else free_port()
    server_args, _ = door_setup(door, door_port)
    server = AuthzServerProcess(tmp_path / "config.yaml", grpc_port, free_port(), server_args)
    server.start()
    # An idle keep-alive connection (as Envoy keeps them) must not hold the drain up.
    with socket.create_connection(("127.0.0.1", door_port), timeout=5):
        assert server.stop() == 0
    assert "draining" in server.log_text()


def test_escaped_slashes_cannot_sneak_past_a_deny_rule(stack: Stack) -> None:
    status, headers, _ = stack.get("/api%2Finternal%2Fkeys", token(stack))
    assert status in (301, 302, 307, 308)
    assert headers["location"].endswith("/api/internal/keys")
    assert stack.upstream.requests == []


@pytest.mark.parametrize("door", DOORS)
def test_envoy_fails_closed_with_503_when_the_server_is_unreachable(
    tmp_path: Path, door: str
) -> None:
    with EchoUpstream() as upstream:
        listen, admin = free_port(), free_port()
        _, envoy_args = door_setup(door, free_port())  # nothing listens there
        bootstrap = render_bootstrap(
            listen_port=listen, admin_port=admin, upstream_port=upstream.port, **envoy_args
        )
        with EnvoyProcess(bootstrap, admin, tmp_path / "envoy.log"):
            status, _, _ = http_request(f"http://127.0.0.1:{listen}/api/orders")
        assert status == 503
        assert upstream.requests == []


@pytest.mark.parametrize(
    "host", ["admin.example.com", "admin.example.com:80", "Admin.Example.com."]
)
def test_a_deny_on_a_host_holds_with_a_port_or_a_trailing_dot(stack: Stack, host: str) -> None:
    status, _, body = stack.get("/public/info", token(stack), Host=host)
    assert (status, reason(body)) == (403, "policy_denied")
    assert stack.upstream.requests == []
    assert stack.get("/public/info", token(stack), Host="www.example.com:80")[0] == 200


def test_a_header_token_and_a_query_token_for_two_principals_are_refused(stack: Stack) -> None:
    alice, mallory = token(stack), token(stack, sub="mallory")
    status, headers, body = stack.get(f"/public/info?access_token={mallory}", alice)
    assert (status, reason(body)) == (401, "ambiguous_credentials")
    assert headers["www-authenticate"] == (
        'Bearer realm="e2e", error="invalid_token", error_description="more than one token"'
    )
    assert stack.upstream.requests == []


def test_a_token_header_under_another_scheme_never_reaches_the_upstream(stack: Stack) -> None:
    status, _, _ = stack.get_raw("/public/info", {"Authorization": "Token abc"})
    assert status == 200
    assert "authorization" not in stack.upstream.last_request().headers


# gRPC only: Envoy's HTTP ext_authz protocol has no way to remove a query parameter (the
# reference says so); through the gRPC door the CheckResponse removes it.
@pytest.mark.parametrize("stack", ["grpc"], indirect=True)
def test_a_token_in_the_query_never_reaches_the_upstream(stack: Stack) -> None:
    status, _, _ = stack.get(f"/api/orders?page=2&access_token={token(stack)}")
    assert status == 200
    path = stack.upstream.last_request().path
    assert "access_token" not in path and "page=2" in path, path
