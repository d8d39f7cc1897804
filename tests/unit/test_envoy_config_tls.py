"""envoy_config: the ext_authz cluster over TLS and mTLS (``authz_tls``). The real Envoy runs
it in tests/e2e/test_tls_e2e.py; here, the shape, checked against Envoy's own protos."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401 (registers)
from google.protobuf import json_format

from authz_server.tools.envoy_config import AuthzTls, render_bootstrap

MTLS = AuthzTls(
    ca_file="/etc/envoy/authz/ca.crt",
    server_name="authz-server.authz-system.svc",
    cert_file="/etc/envoy/authz/tls.crt",
    key_file="/etc/envoy/authz/tls.key",
)


def _authz_cluster(tls: AuthzTls) -> dict[str, Any]:
    bootstrap = yaml.safe_load(
        render_bootstrap(
            listen_port=8080,
            admin_port=8081,
            authz_address="authz-server.authz-system.svc:9001",
            upstream_port=8082,
            authz_tls=tls,
        )
    )
    cluster: dict[str, Any] = bootstrap["static_resources"]["clusters"][0]
    assert cluster["name"] == "authz"
    return cluster


def _tls_context(cluster: dict[str, Any]) -> tls_pb2.UpstreamTlsContext:
    """The cluster parsed as Envoy's Cluster proto (an unknown field name fails), and its TLS
    context."""
    parsed = json_format.ParseDict(cluster, cluster_pb2.Cluster())
    assert parsed.transport_socket.name == "envoy.transport_sockets.tls"
    context = tls_pb2.UpstreamTlsContext()
    assert parsed.transport_socket.typed_config.Unpack(context)
    return context


def test_mtls_presents_envoys_certificate_and_verifies_the_servers_name() -> None:
    context = _tls_context(_authz_cluster(MTLS))

    assert context.sni == "authz-server.authz-system.svc"
    common = context.common_tls_context
    assert list(common.alpn_protocols) == ["h2"]  # gRPC: HTTP/2 negotiated by ALPN
    (certificate,) = common.tls_certificates
    assert certificate.certificate_chain.filename == "/etc/envoy/authz/tls.crt"
    assert certificate.private_key.filename == "/etc/envoy/authz/tls.key"
    validation = common.validation_context
    assert validation.trusted_ca.filename == "/etc/envoy/authz/ca.crt"
    (san,) = validation.match_typed_subject_alt_names
    assert san.san_type == san.DNS
    assert san.matcher.exact == "authz-server.authz-system.svc"


def test_the_cluster_still_speaks_http2() -> None:
    cluster = _authz_cluster(MTLS)
    options = cluster["typed_extension_protocol_options"]
    (protocol,) = options.values()
    assert "http2_protocol_options" in protocol["explicit_http_config"]


def test_tls_without_a_client_certificate_only_verifies_the_server() -> None:
    context = _tls_context(_authz_cluster(AuthzTls(ca_file="/ca.crt", server_name="authz")))
    assert not context.common_tls_context.tls_certificates
    assert context.common_tls_context.validation_context.trusted_ca.filename == "/ca.crt"


def test_an_ip_server_name_is_matched_as_an_ip_san_and_sends_no_sni() -> None:
    context = _tls_context(_authz_cluster(AuthzTls(ca_file="/ca.crt", server_name="10.0.0.7")))
    assert context.sni == ""
    (san,) = context.common_tls_context.validation_context.match_typed_subject_alt_names
    assert (san.san_type, san.matcher.exact) == (san.IP_ADDRESS, "10.0.0.7")


def test_tls_to_the_http_door_is_refused() -> None:
    with pytest.raises(ValueError, match="HTTP door is plaintext"):
        render_bootstrap(
            listen_port=8080,
            admin_port=8081,
            authz_address="127.0.0.1:9002",
            upstream_port=8082,
            door="http",
            authz_tls=MTLS,
        )


def test_a_client_certificate_needs_its_key() -> None:
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        AuthzTls(ca_file="/ca.crt", server_name="authz", cert_file="/tls.crt")


def test_the_reference_shows_what_render_bootstrap_writes() -> None:
    reference = (Path(__file__).resolve().parents[2] / "docs" / "reference.md").read_text()
    section = reference[reference.index("**What Envoy needs.**") :]
    block = section[section.index("```\n") + 4 : section.index("\n```", section.index("```\n"))]
    (shown,) = yaml.safe_load(block)["clusters"]
    tls = AuthzTls(
        ca_file="/etc/envoy/authz-client/ca.crt",
        server_name="authz-server.authz-system.svc",
        cert_file="/etc/envoy/authz-client/tls.crt",
        key_file="/etc/envoy/authz-client/tls.key",
    )
    rendered = _authz_cluster(tls)
    assert shown["transport_socket"] == rendered["transport_socket"]
    assert shown["typed_extension_protocol_options"] == rendered["typed_extension_protocol_options"]
