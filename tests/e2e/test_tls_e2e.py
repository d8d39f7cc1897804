"""mTLS on the gRPC listener, end to end: real Envoy calls the server over mTLS with an
``UpstreamTlsContext``; clients without the right certificate are refused;
the server's certificate rotates the way a Kubernetes Secret volume does (one atomic swap of
the ``..data`` symlink) while Envoy's connection stays up.

One server and one Envoy for the module; Envoy runs one worker thread, so it holds exactly
one connection to the server and the rotation test can tell whether it was kept.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz_server.config import load as config
from authz_server.server import AuthzServer
from authz_server.tools import devkeys
from authz_server.tools.envoy_config import AuthzTls, render_bootstrap
from tests.certs import SERVER_NAME, CertificateAuthority, Leaf
from tests.e2e.harness import (
    EchoUpstream,
    EnvoyProcess,
    free_port,
    http_request,
    wait_until,
)
from tests.helpers import AUDIENCE, ISSUER, claims_for

pytestmark = pytest.mark.e2e

CONFIG = f"""apiVersion: authz-server/v1
kind: AuthzConfig
server:
  tls: {{certFile: tls/tls.crt, keyFile: tls/tls.key, clientCaFile: tls/ca.crt}}
providers:
  - issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksFile: jwks.json
policies:
  - name: no-admin
    action: DENY
    rules: [{{to: [{{operation: {{paths: ["/admin*"]}}}}]}}]
  - name: signed-in
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""


def publish(volume: Path, generation: str, ca: CertificateAuthority, leaf: Leaf) -> None:
    """Write the server's files as the kubelet updates a Secret volume: a new directory, one
    atomic rename of ``..data`` onto it, the visible names linking through ``..data``."""
    target = volume / f"..{generation}"
    target.mkdir()
    (target / "tls.crt").write_bytes(leaf.cert_pem)
    (target / "tls.key").write_bytes(leaf.key_pem)
    (target / "ca.crt").write_bytes(ca.cert_pem)
    (volume / "..data_tmp").symlink_to(target.name)
    os.replace(volume / "..data_tmp", volume / "..data")
    for name in ("tls.crt", "tls.key", "ca.crt"):
        if not (volume / name).is_symlink():
            (volume / name).symlink_to(f"..data/{name}")


@dataclass
class Deployment:
    directory: Path
    ca: CertificateAuthority
    server: AuthzServer
    envoy: EnvoyProcess
    envoy_port: int
    client: tuple[Path, Path]  # a client certificate from the server's CA, and its key
    token: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    directory = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority()
    volume = directory / "tls"
    volume.mkdir()
    publish(volume, "1", ca, ca.issue("authz-server", server=True))
    envoy_cert, envoy_key = ca.issue("envoy", server=False).write(directory, "envoy")
    (directory / "ca.crt").write_bytes(ca.cert_pem)
    key = devkeys.generate_key("EC-P256", kid="tls")
    (directory / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
    (directory / "config.yaml").write_text(CONFIG)

    # In this process (a second interpreter would cost more than the rest of the module);
    # tests/e2e/test_workers.py and the CLI tests cover `serve` itself.
    server = AuthzServer(
        config.load(directory / "config.yaml"), listen="127.0.0.1:0", http_listen=None
    )
    server.start()
    envoy_port, admin_port = free_port(), free_port()
    try:
        with EchoUpstream() as upstream:
            bootstrap = render_bootstrap(
                listen_port=envoy_port,
                admin_port=admin_port,
                authz_address=f"127.0.0.1:{server.grpc_port}",
                upstream_port=upstream.port,
                authz_tls=AuthzTls(
                    ca_file=str(directory / "ca.crt"),
                    server_name=SERVER_NAME,
                    cert_file=str(envoy_cert),
                    key_file=str(envoy_key),
                ),
            )
            with EnvoyProcess(bootstrap, admin_port, extra_args=("--concurrency", "1")) as envoy:
                yield Deployment(
                    directory,
                    ca,
                    server,
                    envoy,
                    envoy_port,
                    ca.issue("test-client", server=False).write(directory, "client"),
                    key.sign(claims_for(time.time())),
                )
    finally:
        server.stop(grace=1)


def status(deployment: Deployment, path: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return http_request(f"{deployment.url}{path}", headers=headers)[0]


def test_envoy_calls_the_server_over_mtls_and_gets_the_usual_answers(
    deployment: Deployment,
) -> None:
    assert status(deployment, "/orders", deployment.token) == 200
    assert status(deployment, "/orders", None) == 401
    assert status(deployment, "/orders", deployment.token[:-4] + "AAAA") == 401
    assert status(deployment, "/admin", deployment.token) == 403
    stats = deployment.envoy.stats("cluster.authz.")
    assert stats["cluster.authz.ssl.handshake"] >= 1
    assert stats["cluster.authz.ssl.connection_error"] == 0


def _health(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = (
        grpc.secure_channel(address, credentials)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_only_a_client_with_a_certificate_from_the_clients_ca_gets_in(
    deployment: Deployment,
) -> None:
    address = deployment.grpc_address
    ca_pem = deployment.ca.cert_pem
    cert, key = deployment.client
    stranger = CertificateAuthority("another CA").issue("intruder", server=False)

    assert _health(address, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert _health(address, grpc.ssl_channel_credentials(ca_pem)) == grpc.StatusCode.UNAVAILABLE
    assert (
        _health(address, grpc.ssl_channel_credentials(ca_pem, stranger.key_pem, stranger.cert_pem))
        == grpc.StatusCode.UNAVAILABLE
    )
    good = grpc.ssl_channel_credentials(ca_pem, key.read_bytes(), cert.read_bytes())
    assert _health(address, good) == grpc.StatusCode.OK


def presented_serial(deployment: Deployment) -> int:
    """The serial of the certificate the server presents in a new TLS handshake."""
    context = ssl.create_default_context(cadata=deployment.ca.cert_pem.decode())
    context.load_cert_chain(*deployment.client)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", deployment.server.grpc_port), 5) as raw,
        context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_a_rotated_certificate_is_served_to_new_connections_while_envoys_stays_up(
    deployment: Deployment,
) -> None:
    assert status(deployment, "/orders", deployment.token) == 200
    before = deployment.envoy.stats("cluster.authz.")
    assert before["cluster.authz.upstream_cx_active"] == 1
    renewed = deployment.ca.issue("authz-server", server=True)

    publish(deployment.directory / "tls", "2", deployment.ca, renewed)

    wait_until(
        lambda: presented_serial(deployment) == renewed.serial,
        timeout=10,
        what="the renewed certificate in a new handshake",
    )
    # The files are checked before every handshake: the old certificate is gone for good.
    assert {presented_serial(deployment) for _ in range(6)} == {renewed.serial}
    assert status(deployment, "/orders", deployment.token) == 200
    assert status(deployment, "/admin", deployment.token) == 403
    after = deployment.envoy.stats("cluster.authz.")
    for kept in ("upstream_cx_total", "ssl.handshake", "upstream_cx_destroy"):
        assert after[f"cluster.authz.{kept}"] == before[f"cluster.authz.{kept}"], kept
    certificates = deployment.server.certificates
    assert certificates is not None
    assert (certificates.reloads, certificates.failures) == (1, 0)
