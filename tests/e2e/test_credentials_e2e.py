"""End to end, both doors: credentials that are not JWTs, through a real Envoy to a real
upstream. API keys from a keys file; opaque tokens introspected at a real endpoint (RFC 7662)."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from authz_server.tools.envoy_config import render_bootstrap
from tests.e2e.harness import (
    DOORS,
    TOKEN_LEDGER,
    AuthzServerProcess,
    EchoUpstream,
    EnvoyProcess,
    door_setup,
    free_port,
    http_request,
    wait_until,
)
from tests.introspection_idp import CLIENT_ID, CLIENT_SECRET, IntrospectionServer

pytestmark = pytest.mark.e2e

IDP_ISSUER = "https://idp.example.com"
KEYS_ISSUER = "apikeys.example.com"

CONFIG = """
apiVersion: authz-server/v1
kind: AuthzConfig
server: {{realm: creds}}
providers:
  - name: partners-opaque
    issuer: {idp_issuer}
    introspection:
      endpoint: {endpoint}
      clientId: {client_id}
      clientSecretFile: client-secret
      cacheTtl: 60s
      negativeCacheTtl: 5s
      timeout: 1s
    fromHeaders: [{{name: authorization, prefix: "Bearer "}}]
    outputClaimToHeaders: [{{header: x-client-id, claim: client_id}}]
  - name: partner-keys
    issuer: {keys_issuer}
    apiKeys: {{file: keys.yaml}}
    fromHeaders: [{{name: x-api-key}}]
    outputClaimToHeaders:
      - {{header: x-partner, claim: sub}}
      - {{header: x-groups, claim: groups}}
policies:
  - name: api
    rules:
      - from: [{{source: {{requestPrincipals: ["*"]}}}}]
        to: [{{operation: {{paths: ["/api/*"]}}}}]
"""
OUTPUT_HEADERS = ["x-client-id", "x-partner", "x-groups"]


@dataclass
class Stack:
    door: str
    envoy_url: str
    upstream: EchoUpstream
    idp: IntrospectionServer
    server: AuthzServerProcess
    api_key: str

    def get(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        self.upstream.clear()
        return http_request(self.envoy_url + path, headers=headers)


def new_secret() -> str:
    """An opaque token or key, remembered so that the session checks no server output
    holds it."""
    value = secrets.token_urlsafe(32)
    TOKEN_LEDGER.saw_token(value)
    return value


@pytest.fixture(scope="module", params=DOORS)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    door = request.param
    workdir = tmp_path_factory.mktemp(f"creds-{door}")
    api_key = new_secret()
    (workdir / "keys.yaml").write_text(
        "keys:\n"
        f"  - sub: partner-acme\n    sha256: {hashlib.sha256(api_key.encode()).hexdigest()}\n"
        "    claims: {groups: [partners, beta]}\n"
    )
    (workdir / "client-secret").write_text(CLIENT_SECRET + "\n")
    with IntrospectionServer() as idp, EchoUpstream() as upstream:
        config = workdir / "config.yaml"
        config.write_text(
            CONFIG.format(
                idp_issuer=IDP_ISSUER,
                endpoint=idp.endpoint,
                client_id=CLIENT_ID,
                keys_issuer=KEYS_ISSUER,
            )
        )
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
            with EnvoyProcess(bootstrap, admin, workdir / "envoy.log"):
                yield Stack(door, f"http://127.0.0.1:{listen}", upstream, idp, server, api_key)


def reason(body: bytes) -> Any:
    return json.loads(body)["reason"]


def test_an_api_key_is_200_with_its_claims_as_headers_and_the_key_removed(stack: Stack) -> None:
    status, _, _ = stack.get("/api/orders", {"X-Api-Key": stack.api_key, "X-Partner": "evil"})
    assert status == 200
    seen = stack.upstream.last_request().headers
    assert seen["x-partner"] == "partner-acme"
    assert seen["x-groups"] == "partners,beta"
    assert "x-api-key" not in seen


def test_an_unknown_api_key_is_401_with_its_reason(stack: Stack) -> None:
    status, headers, body = stack.get("/api/orders", {"X-Api-Key": new_secret()})
    assert status == 401 and reason(body) == "unknown_api_key"
    assert 'error="invalid_token"' in headers["www-authenticate"]
    assert stack.upstream.requests == []


def test_an_api_key_in_a_header_its_provider_does_not_read_is_ignored(stack: Stack) -> None:
    # No provider reads X-Partner-Key: the request is anonymous, and the policy wants a caller.
    status, _, body = stack.get("/api/orders", {"X-Partner-Key": stack.api_key})
    assert status == 401 and reason(body) == "missing_credentials"


def test_an_opaque_token_is_200_with_x_client_id_and_an_inactive_one_401(stack: Stack) -> None:
    token = new_secret()
    stack.idp.active(token, iss=IDP_ISSUER, sub="svc-billing", client_id="billing-app")
    status, _, _ = stack.get("/api/orders", {"Authorization": f"Bearer {token}"})
    assert status == 200
    seen = stack.upstream.last_request().headers
    assert seen["x-client-id"] == "billing-app" and "authorization" not in seen
    call = stack.idp.calls[-1]
    assert call.form == {"token": [token], "token_type_hint": ["access_token"]}
    assert call.authorization.startswith("Basic ")
    inactive = new_secret()
    status, headers, body = stack.get("/api/orders", {"Authorization": f"Bearer {inactive}"})
    assert status == 401 and reason(body) == "token_inactive"
    assert 'error_description="token inactive"' in headers["www-authenticate"]


def test_a_keys_file_update_applies_and_a_broken_one_keeps_the_last_good_keys(
    stack: Stack,
) -> None:
    keys_file = stack.server.config_path.parent / "keys.yaml"
    original = keys_file.read_text()
    added = new_secret()
    digest = hashlib.sha256(added.encode()).hexdigest()
    try:
        # A Secret update: the file replaced whole, with one key more.
        replacement = keys_file.with_name(".keys.yaml.new")
        replacement.write_text(original + f"  - sub: partner-new\n    sha256: {digest}\n")
        replacement.replace(keys_file)
        wait_until(
            lambda: stack.get("/api/orders", {"X-Api-Key": added})[0] == 200,
            timeout=10,
            what="the new key to work",
        )
        assert stack.upstream.last_request().headers["x-partner"] == "partner-new"
        replacement.write_text(original + f"  - sub: mallory\n    sha256: {digest}\n" * 2)
        replacement.replace(keys_file)
        wait_until(
            lambda: "duplicate" in stack.server.log_text(),
            timeout=10,
            what="the broken keys file to be refused",
        )
        assert stack.get("/api/orders", {"X-Api-Key": added})[0] == 200
        assert stack.upstream.last_request().headers["x-partner"] == "partner-new"
    finally:
        keys_file.write_text(original)
