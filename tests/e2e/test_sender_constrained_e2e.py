"""Sender-constrained tokens end to end: a client → real Envoy → our server (subprocess) → a
real upstream, keys from a real JWKS URL.

- DPoP through both doors: the proof travels in a header, so each door sees it. A bound token
  with its proof reaches the upstream (without the token and the proof); the same proof again
  is refused.
- Certificate-bound tokens through the gRPC door, with Envoy terminating the client's mTLS and
  sending its certificate (``include_peer_certificate: true``): the bound token from the client
  holding the certificate reaches the upstream, the same token from another client does not.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey, b64url_encode
from authz_server.tools.envoy_config import render_bootstrap
from tests.certs import CertificateAuthority, Leaf
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
  - name: fapi
    issuer: {issuer}
    audiences: [{audience}]
    jwksUri: {jwks_url}
    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
    {binding}
policies:
  - name: callers
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""
OUTPUT_HEADERS = ["x-jwt-sub"]
# The host the client addresses (sent as Host; Envoy passes it as :authority) and so the
# origin the proofs name.
API_HOST = "api.test"


@dataclass
class Stack:
    door: str
    envoy_port: int
    upstream: EchoUpstream
    signer: SigningKey
    workdir: Path


@contextmanager
def _running_stack(
    workdir: Path, door: str, binding: str, tls: dict[str, Any] | None = None
) -> Iterator[Stack]:
    """JWKS server, upstream, our server through ``door``, and Envoy in front; ``tls``: a
    DownstreamTlsContext for Envoy's listener (Envoy terminating the client's mTLS)."""
    signer = devkeys.generate_key("EC-P256", kid="idp-1")
    with JWKSServer(devkeys.jwks(signer)) as jwks, EchoUpstream() as upstream:
        config = workdir / "config.yaml"
        config.write_text(
            CONFIG.format(issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks.jwks_url, binding=binding)
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
        ):
            listen, admin = free_port(), free_port()
            bootstrap = render_bootstrap(
                listen_port=listen, admin_port=admin, upstream_port=upstream.port, **envoy_args
            )
            if tls is not None:
                document = yaml.safe_load(bootstrap)
                chain = document["static_resources"]["listeners"][0]["filter_chains"][0]
                chain["transport_socket"] = {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": tls,
                }
                bootstrap = yaml.safe_dump(document, sort_keys=False)
            with EnvoyProcess(bootstrap, admin, workdir / "envoy.log"):
                yield Stack(door, listen, upstream, signer, workdir)


# --------------------------------------------------------------------------------- DPoP


@pytest.fixture(scope="module", params=DOORS)
def dpop_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp(f"dpop-{request.param}")
    with _running_stack(workdir, request.param, "dpop: {mode: required}") as stack:
        yield stack


def _dpop_get(stack: Stack, token: str, proof: str) -> tuple[int, dict[str, str], bytes]:
    stack.upstream.clear()
    return http_request(
        f"http://127.0.0.1:{stack.envoy_port}/api/orders",
        headers={"Host": API_HOST, "Authorization": f"DPoP {token}", "DPoP": proof},
    )


def test_a_dpop_request_reaches_the_upstream_once_and_its_replay_is_refused(
    dpop_stack: Stack,
) -> None:
    client_key = devkeys.generate_key("EC-P256")
    token = dpop_stack.signer.sign(claims_for(time.time(), cnf={"jkt": client_key.thumbprint()}))
    proof = devkeys.dpop_proof(
        client_key, method="GET", url=f"http://{API_HOST}/api/orders", access_token=token
    )

    status, _, _ = _dpop_get(dpop_stack, token, proof)
    assert status == 200
    seen = dpop_stack.upstream.last_request().headers
    assert seen["x-jwt-sub"] == "alice"
    assert "authorization" not in seen and "dpop" not in seen

    status, headers, body = _dpop_get(dpop_stack, token, proof)
    assert (status, json.loads(body)["reason"]) == (401, "dpop_proof_replayed")
    assert headers["www-authenticate"].startswith('DPoP realm="e2e"')
    assert 'error="invalid_dpop_proof"' in headers["www-authenticate"]
    assert not dpop_stack.upstream.requests

    status, _, body = http_request(
        f"http://127.0.0.1:{dpop_stack.envoy_port}/api/orders",
        headers={"Host": API_HOST, "Authorization": f"Bearer {token}"},
    )
    assert (status, json.loads(body)["reason"]) == (401, "bound_token_without_proof")


# ------------------------------------------------------------------------- certificates


def _x5t(leaf: Leaf) -> str:
    der = x509.load_pem_x509_certificate(leaf.cert_pem).public_bytes(serialization.Encoding.DER)
    return b64url_encode(hashlib.sha256(der).digest())


def _mtls_get(
    port: int, ca: CertificateAuthority, client: tuple[Path, Path], token: str
) -> tuple[int, bytes]:
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    context.load_cert_chain(*client)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", "/api/orders", headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_a_certificate_bound_token_passes_only_from_the_client_holding_the_certificate(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority()
    server_cert, server_key = ca.issue("localhost", server=True).write(tmp_path, "envoy")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    partner_leaf = ca.issue("partner", server=False)
    partner = partner_leaf.write(tmp_path, "partner")
    stranger = ca.issue("stranger", server=False).write(tmp_path, "stranger")
    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
        "DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(server_cert)},
                    "private_key": {"filename": str(server_key)},
                }
            ],
            "validation_context": {"trusted_ca": {"filename": str(tmp_path / "ca.crt")}},
        },
    }

    with _running_stack(tmp_path, "grpc", "certificateBound: required", tls) as stack:
        token = stack.signer.sign(claims_for(time.time(), cnf={"x5t#S256": _x5t(partner_leaf)}))

        status, _ = _mtls_get(stack.envoy_port, ca, partner, token)
        assert status == 200
        assert stack.upstream.last_request().headers["x-jwt-sub"] == "alice"

        stack.upstream.clear()
        status, body = _mtls_get(stack.envoy_port, ca, stranger, token)
        assert (status, json.loads(body)["reason"]) == (401, "certificate_mismatch")
        assert not stack.upstream.requests
