"""End to end: policies on the connection (client address, mTLS peer, destination port, SNI)
decided through real Envoy, through both doors, on a TLS listener that asks for (but does not
require) a client certificate.

The gRPC door receives these attributes in the CheckRequest; the HTTP door reads them from the
x-authz-* headers Envoy adds (``server.httpAuthz.attributeHeaders``, ``render_bootstrap(...,
attribute_headers=True)``). Every case gives the same answer through both doors, and a client
that sends its own copy of each x-authz-* header changes nothing: Envoy overwrites it (its value
is quoted, so never empty: with no client certificate and no SNI too).
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_server.tools.envoy_config import render_bootstrap
from tests.certs import CertificateAuthority
from tests.e2e.harness import (
    DOORS,
    AuthzServerProcess,
    EchoUpstream,
    EnvoyProcess,
    free_port,
)

pytestmark = pytest.mark.e2e

CONFIG = """
apiVersion: authz-server/v1
kind: AuthzConfig
server:
  missingTokenStatus: 403
  httpAuthz: {{attributeHeaders: true}}
policies:
  - name: no-mallory
    action: DENY
    rules: [{{from: [{{source: {{principals: ["test/mallory"]}}}}]}}]
  - name: peer
    rules:
      - from: [{{source: {{principals: ["test/alice"]}}}}]
        to: [{{operation: {{paths: ["/peer/*"]}}}}]
  - name: ip
    rules:
      - from: [{{source: {{ipBlocks: ["127.0.0.1/32"]}}}}]
        to: [{{operation: {{paths: ["/ip/*"]}}}}]
      - from: [{{source: {{ipBlocks: ["10.0.0.0/8"]}}}}]
        to: [{{operation: {{paths: ["/far-ip/*"]}}}}]
  - name: port
    rules:
      - to: [{{operation: {{paths: ["/port/*"], ports: ["{grpc_port}", "{http_port}"]}}}}]
      - to: [{{operation: {{paths: ["/far-port/*"], ports: ["1"]}}}}]
  - name: sni
    rules:
      - to: [{{operation: {{paths: ["/sni/*"]}}}}]
        when: [{{key: connection.sni, values: ["localhost"]}}]
"""

_DOWNSTREAM_TLS = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
_TLS_INSPECTOR = (
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
)


@dataclass
class Certs:
    ca: Path
    server: tuple[Path, Path]
    clients: dict[str, tuple[Path, Path]]


@dataclass
class Front:
    door: str
    port: int
    certs: Certs
    upstream: EchoUpstream

    def get(
        self,
        path: str,
        *,
        peer: str | None = None,
        sni: bool = True,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> int:
        """GET ``path`` over TLS, with ``peer``'s client certificate (None: none), SNI
        ``localhost`` or none, and ``headers`` sent exactly as given; the status."""
        context = ssl.create_default_context(cafile=str(self.certs.ca))
        context.check_hostname = False  # the certificate names 127.0.0.1 too; SNI is the test
        if peer is not None:
            cert, key = self.certs.clients[peer]
            context.load_cert_chain(str(cert), str(key))
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        with context.wrap_socket(raw, server_hostname="localhost" if sni else None) as tls:
            lines = [f"GET {path} HTTP/1.1", "Host: api.test", "Connection: close"]
            lines += [f"{name}: {value}" for name, value in headers]
            tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            response = http.client.HTTPResponse(tls)
            response.begin()
            response.read()
            return response.status


def _tls_listener(bootstrap_yaml: str, certs: Certs) -> str:
    """The bootstrap with its listener on TLS: a client certificate asked for, verified
    against the test CA, not required; the tls_inspector reads the SNI."""
    bootstrap: dict[str, Any] = yaml.safe_load(bootstrap_yaml)
    (listener,) = bootstrap["static_resources"]["listeners"]
    listener["listener_filters"] = [
        {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": _TLS_INSPECTOR}}
    ]
    cert, key = certs.server
    listener["filter_chains"][0]["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _DOWNSTREAM_TLS,
            "require_client_certificate": False,
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(cert)},
                        "private_key": {"filename": str(key)},
                    }
                ],
                "validation_context": {"trusted_ca": {"filename": str(certs.ca)}},
            },
        },
    }
    return yaml.safe_dump(bootstrap, sort_keys=False)


@dataclass
class Setup:
    certs: Certs
    grpc_port: int
    door_port: int
    envoy_ports: dict[str, int]
    workdir: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """One server with both doors open, and the listen port each door's Envoy will use."""
    workdir = tmp_path_factory.mktemp("connection-attributes")
    ca = CertificateAuthority()
    (workdir / "ca.crt").write_bytes(ca.cert_pem)
    certs = Certs(
        ca=workdir / "ca.crt",
        server=ca.issue("envoy", server=True).write(workdir, "server"),
        clients={
            name: ca.issue(name, server=False).write(workdir, name) for name in ("alice", "mallory")
        },
    )
    envoy_ports = {door: free_port() for door in DOORS}
    config = workdir / "config.yaml"
    config.write_text(CONFIG.format(grpc_port=envoy_ports["grpc"], http_port=envoy_ports["http"]))
    grpc_port, door_port = free_port(), free_port()
    with AuthzServerProcess(
        config,
        grpc_port,
        free_port(),
        ["--http-authz-listen", f"127.0.0.1:{door_port}"],
        log_path=workdir / "server.log",
    ):
        yield Setup(certs, grpc_port, door_port, envoy_ports, workdir)


@pytest.fixture(scope="module", params=DOORS)
def front(request: pytest.FixtureRequest, setup: Setup) -> Iterator[Front]:
    """Envoy on a TLS listener asking the server through one door."""
    door: str = request.param
    admin = free_port()
    with EchoUpstream() as upstream:
        door_args: dict[str, Any] = (
            {"authz_address": f"127.0.0.1:{setup.grpc_port}"}
            if door == "grpc"
            else {
                "authz_address": f"127.0.0.1:{setup.door_port}",
                "door": "http",
                "attribute_headers": True,
            }
        )
        bootstrap = render_bootstrap(
            listen_port=setup.envoy_ports[door],
            admin_port=admin,
            upstream_port=upstream.port,
            **door_args,
        )
        with EnvoyProcess(
            _tls_listener(bootstrap, setup.certs), admin, setup.workdir / f"envoy-{door}.log"
        ):
            yield Front(door, setup.envoy_ports[door], setup.certs, upstream)


# Each reserved header, forged by the client with the value that would allow (or escape the
# DENY) if the server believed it; repeated, or in another case: Envoy must replace them all.
FORGED_ALICE = (
    ("x-authz-peer-principal", '"spiffe://test/alice"'),
    ("X-Authz-Peer-Principal", '"spiffe://test/alice"'),
)
FORGED_IP = (("x-authz-source-ip", '"10.1.2.3"'), ("x-authz-source-ip", "10.1.2.3"))
FORGED_PORT = (("x-authz-destination-port", '"1"'),)
FORGED_SNI = (("x-authz-sni", '"localhost"'),)


@dataclass(frozen=True)
class Case:
    path: str
    peer: str | None  # the client certificate's name, or none
    sni: bool
    headers: tuple[tuple[str, str], ...]  # what the client adds
    status: int  # through either door


CASES = {
    "peer-alice": Case("/peer/x", "alice", True, (), 200),
    "peer-none": Case("/peer/x", None, True, (), 403),
    # No certificate: Envoy sends "" as the peer, over the client's copies.
    "peer-forged-without-certificate": Case("/peer/x", None, True, FORGED_ALICE, 403),
    "peer-forged-by-denied-mallory": Case("/peer/x", "mallory", True, FORGED_ALICE, 403),
    "ip-local": Case("/ip/x", None, True, (), 200),
    "ip-elsewhere": Case("/far-ip/x", None, True, (), 403),
    "ip-forged": Case("/far-ip/x", None, True, FORGED_IP, 403),
    "port-listener": Case("/port/x", None, True, (), 200),
    "port-other": Case("/far-port/x", None, True, (), 403),
    "port-forged": Case("/far-port/x", None, True, FORGED_PORT, 403),
    "sni-localhost": Case("/sni/x", None, True, (), 200),
    "sni-none": Case("/sni/x", None, False, (), 403),
    # No SNI: Envoy sends "" as the SNI, over the client's copy.
    "sni-forged-without-sni": Case("/sni/x", None, False, FORGED_SNI, 403),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_connection_policies_decide_alike_through_both_doors_and_forged_headers_change_nothing(
    front: Front, case: Case
) -> None:
    front.upstream.clear()
    assert front.get(case.path, peer=case.peer, sni=case.sni, headers=case.headers) == case.status
    assert len(front.upstream.requests) == (1 if case.status == 200 else 0)
