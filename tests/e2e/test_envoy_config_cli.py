"""`authz-server envoy-config` puts a real Envoy in front of an API: the bootstrap the command
prints (nothing edited) runs Envoy, which asks the real server (`authz-server serve`) through
each door, and over mTLS, and the client gets 200 (the upstream hearing who the token says),
401 and 403."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from authz_server.tools import devkeys
from tests.certs import CertificateAuthority
from tests.e2e.harness import (
    REPO_ROOT,
    AuthzServerProcess,
    EchoUpstream,
    EnvoyProcess,
    free_port,
    http_request,
)
from tests.helpers import AUDIENCE, ISSUER, claims_for

pytestmark = pytest.mark.e2e

CONFIG = f"""apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksFile: jwks.json
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
policies:
  - name: no-admin
    action: DENY
    rules: [{{to: [{{operation: {{paths: ["/admin*"]}}}}]}}]
  - name: signed-in
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""

# How Envoy reaches the server: the gRPC door, the HTTP door, the gRPC door over mTLS.
SETUPS = ["grpc", "http", "grpc-mtls"]


@dataclass
class Front:
    url: str
    upstream: EchoUpstream
    token: str


def _envoy_config(argv: list[str]) -> str:
    """Run the command as a user would; return what it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "authz_server", "envoy-config", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module", params=SETUPS)
def front(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Front]:
    setup: str = request.param
    directory = tmp_path_factory.mktemp(setup)
    key = devkeys.generate_key("EC-P256", kid="cli")
    (directory / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
    (directory / "config.yaml").write_text(CONFIG)
    grpc_port, http_port, door_port = free_port(), free_port(), free_port()
    envoy_port, admin_port = free_port(), free_port()
    serve_args: list[str] = []
    flags = ["--config", str(directory / "config.yaml")]
    if setup == "http":
        serve_args = ["--http-authz-listen", f"127.0.0.1:{door_port}"]
        flags += ["--door", "http", "--authz-address", f"127.0.0.1:{door_port}"]
    else:
        flags += ["--authz-address", f"127.0.0.1:{grpc_port}"]
    if setup == "grpc-mtls":
        ca = CertificateAuthority()
        server_cert, server_key = ca.issue("authz-server", server=True).write(directory, "server")
        envoy_cert, envoy_key = ca.issue("envoy", server=False).write(directory, "envoy")
        (directory / "ca.crt").write_bytes(ca.cert_pem)
        serve_args = [
            "--tls-cert-file", str(server_cert),
            "--tls-key-file", str(server_key),
            "--tls-client-ca-file", str(directory / "ca.crt"),
        ]  # fmt: skip
        # No --authz-tls-server-name: the certificate must name the host Envoy dials.
        flags += [
            "--authz-tls-ca-file", str(directory / "ca.crt"),
            "--authz-tls-cert-file", str(envoy_cert),
            "--authz-tls-key-file", str(envoy_key),
        ]  # fmt: skip
    with (
        AuthzServerProcess(directory / "config.yaml", grpc_port, http_port, serve_args),
        EchoUpstream() as upstream,
    ):
        flags += ["--listen", f"127.0.0.1:{envoy_port}", "--upstream", f"127.0.0.1:{upstream.port}"]
        bootstrap = _envoy_config([*flags, "--admin-port", str(admin_port)])
        with EnvoyProcess(bootstrap, admin_port):
            yield Front(
                f"http://127.0.0.1:{envoy_port}", upstream, key.sign(claims_for(time.time()))
            )


def _status(front: Front, path: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return http_request(f"{front.url}{path}", headers=headers)[0]


def test_a_valid_token_reaches_the_upstream_with_who_it_is(front: Front) -> None:
    front.upstream.clear()
    assert _status(front, "/orders", front.token) == 200
    seen = front.upstream.last_request().headers
    assert seen["x-user"] == "alice"
    assert "authorization" not in seen


def test_no_token_and_a_forged_token_are_401(front: Front) -> None:
    front.upstream.clear()
    assert _status(front, "/orders", None) == 401
    assert _status(front, "/orders", front.token[:-4] + "AAAA") == 401
    assert not front.upstream.requests


def test_a_denied_path_is_403(front: Front) -> None:
    assert _status(front, "/admin/users", front.token) == 403
