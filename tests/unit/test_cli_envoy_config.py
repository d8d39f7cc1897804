"""``authz-server envoy-config``: the bootstrap it prints is Envoy's own Bootstrap message (read
with Envoy's protos, so a misspelt field or a wrong type URL fails), the real Envoy accepts it,
it says what the flags asked, and a bad flag is named. The end-to-end proof, through a real
Envoy: tests/e2e/test_envoy_config_cli.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (registers the type)
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from authz_server import cli
from tests.test_docs_commands import commands_in
from tests.unit.test_envoy_config import _envoy_validate

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """apiVersion: authz-server/v1
kind: AuthzConfig
server:
  httpAuthz: {listen: 127.0.0.1:9002, pathPrefix: /authz}
providers:
  - issuer: https://idp.example.com
    jwksUri: https://idp.example.com/jwks.json
    outputClaimToHeaders: [{header: X-User, claim: sub}]
    outputPayloadToHeader: x-jwt-payload
policies:
  - name: signed-in
    rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
"""

GRPC = ["--listen", "0.0.0.0:8080", "--upstream", "backend.default.svc:8000"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["envoy-config", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _bootstrap(text: str) -> bootstrap_pb2.Bootstrap:
    """The output as Envoy's Bootstrap message: YAML -> dict -> ParseDict (unknown fields and
    unregistered type URLs are errors)."""
    return json_format.ParseDict(yaml.safe_load(text), bootstrap_pb2.Bootstrap())


def _filters(bootstrap: bootstrap_pb2.Bootstrap) -> tuple[Any, ext_authz_pb2.ExtAuthz]:
    (listener,) = bootstrap.static_resources.listeners
    (chain,) = listener.filter_chains
    (network_filter,) = chain.filters
    manager = http_connection_manager_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(manager)
    assert [f.name for f in manager.http_filters] == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    ext_authz = ext_authz_pb2.ExtAuthz()
    assert manager.http_filters[0].typed_config.Unpack(ext_authz)
    return listener, ext_authz


def _endpoint(bootstrap: bootstrap_pb2.Bootstrap, cluster: str) -> Any:
    (found,) = [c for c in bootstrap.static_resources.clusters if c.name == cluster]
    return found, found.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address


def test_grpc_bootstrap_is_envoys_bootstrap_for_the_given_addresses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _run(
        capsys, *GRPC, "--authz-address", "authz-server.authz-system.svc:9001", "--timeout", "250ms"
    )
    assert code == 0, err
    bootstrap = _bootstrap(out)
    listener, ext_authz = _filters(bootstrap)
    assert listener.address.socket_address.address == "0.0.0.0"
    assert listener.address.socket_address.port_value == 8080
    assert ext_authz.grpc_service.envoy_grpc.cluster_name == "authz"
    assert ext_authz.grpc_service.timeout.ToMilliseconds() == 250
    assert ext_authz.failure_mode_allow is False
    authz, address = _endpoint(bootstrap, "authz")
    assert (address.socket_address.address, address.socket_address.port_value) == (
        "authz-server.authz-system.svc",
        9001,
    )
    assert not authz.HasField("transport_socket")
    _, upstream = _endpoint(bootstrap, "upstream")
    assert (upstream.socket_address.address, upstream.socket_address.port_value) == (
        "backend.default.svc",
        8000,
    )
    # Admin never on the listen address: 127.0.0.1 only.
    assert bootstrap.admin.address.socket_address.address == "127.0.0.1"
    assert bootstrap.admin.address.socket_address.port_value == 9901


def test_http_door_bootstrap_passes_on_the_configs_identity_headers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG)
    code, out, err = _run(
        capsys,
        *GRPC,
        "--door",
        "http",
        "--authz-address",
        "127.0.0.1:9002",
        "--config",
        str(tmp_path),
    )
    assert code == 0, err
    _, ext_authz = _filters(_bootstrap(out))
    service = ext_authz.http_service
    assert service.server_uri.cluster == "authz"
    assert service.path_prefix == "/authz"
    allowed = service.authorization_response.allowed_upstream_headers.patterns
    assert sorted(p.exact for p in allowed) == ["x-jwt-payload", "x-user"]


def test_tls_to_the_server_verifies_its_name_and_presents_envoys_certificate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _run(
        capsys,
        *GRPC,
        "--authz-address",
        "authz-server.authz-system.svc:9001",
        "--authz-tls-ca-file",
        "/etc/envoy/ca.crt",
        "--authz-tls-cert-file",
        "/etc/envoy/tls.crt",
        "--authz-tls-key-file",
        "/etc/envoy/tls.key",
    )
    assert code == 0, err
    authz, _ = _endpoint(_bootstrap(out), "authz")
    context = tls_pb2.UpstreamTlsContext()
    assert authz.transport_socket.typed_config.Unpack(context)
    # The server name defaults to the host Envoy dials.
    assert context.sni == "authz-server.authz-system.svc"
    common = context.common_tls_context
    assert common.validation_context.trusted_ca.filename == "/etc/envoy/ca.crt"
    (san,) = common.validation_context.match_typed_subject_alt_names
    assert san.matcher.exact == "authz-server.authz-system.svc"
    (certificate,) = common.tls_certificates
    assert certificate.certificate_chain.filename == "/etc/envoy/tls.crt"


@pytest.mark.parametrize("door", ["grpc", "http"])
def test_the_real_envoy_accepts_the_bootstrap(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, door: str
) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG)
    code, out, err = _run(
        capsys,
        "--listen",
        "[::1]:18080",
        "--upstream",
        "127.0.0.1:18082",
        "--door",
        door,
        "--authz-address",
        "unix:/tmp/authz.sock",
        "--config",
        str(tmp_path / "config.yaml"),
    )
    assert code == 0, err
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(out)
    _envoy_validate(bootstrap)


@pytest.mark.parametrize(
    "flags",
    [
        ["--authz-address", "10.0.0.5:9001", "--admin-port", "19901", "--timeout", "2s"],
        [
            "--authz-address", "authz.example:9001",
            "--authz-tls-ca-file", "/ca.crt", "--authz-tls-server-name", "authz.internal",
            "--authz-tls-cert-file", "/tls.crt", "--authz-tls-key-file", "/tls.key",
        ],
        ["--door", "http", "--authz-address", "unix:/run/authz.sock", "--config", "CONFIG"],
    ],
)  # fmt: skip
def test_the_header_comment_is_the_command_that_makes_it_again(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str]
) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG)
    flags = [str(tmp_path) if flag == "CONFIG" else flag for flag in flags]
    code, out, err = _run(capsys, *GRPC, *flags)
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("# Envoy bootstrap made by: authz-server envoy-config ")
    argv = shlex.split(first.removeprefix("# Envoy bootstrap made by: "))
    assert argv[:2] == ["authz-server", "envoy-config"]
    assert set(flags) <= set(argv)
    assert _run(capsys, *argv[2:]) == (0, out, "")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--listen", "8080"], "--listen '8080': expected HOST:PORT"),
        (["--listen", "localhost:8080"], "Envoy listens on an IP address"),
        (["--timeout", "0s"], "--timeout '0s': must be more than 0"),
        (["--listen", "::1:8080"], "in brackets"),
        (["--listen", "[nope]:8080"], "not an IPv6 address"),
        (["--upstream", "api:0"], "--upstream 'api:0': the port must be 1-65535"),
        (["--authz-address", "authz"], "--authz-address 'authz'"),
        (["--timeout", "soon"], "--timeout 'soon'"),
        (["--admin-port", "70000"], "--admin-port 70000"),
        (["--door", "http"], "--door http needs --config"),
        (["--authz-tls-cert-file", "c.pem"], "need --authz-tls-ca-file"),
        (["--authz-tls-ca-file", "ca.pem", "--door", "http"], "only the gRPC door"),
        (["--authz-tls-ca-file", "ca.pem", "--authz-tls-key-file", "k"], "go together"),
    ],
)
def test_a_bad_flag_is_named_and_nothing_is_printed(
    capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    defaults = {"--listen": "127.0.0.1:8080", "--upstream": "127.0.0.1:8000"}
    defaults["--authz-address"] = "127.0.0.1:9001"
    argv = [word for flag, value in defaults.items() if flag not in flags for word in (flag, value)]
    code, out, err = _run(capsys, *argv, *flags)
    assert code == 2
    assert out == ""
    assert named in err


@pytest.mark.parametrize("door", ["grpc", "http"])
def test_a_bad_config_is_refused_with_its_problems(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, door: str
) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG.replace("issuer:", "issuerr:"))
    code, out, err = _run(
        capsys,
        *GRPC,
        "--door",
        door,
        "--authz-address",
        "127.0.0.1:9002",
        "--config",
        str(tmp_path),
    )
    assert (code, out) == (2, "")
    assert "invalid configuration" in err
    assert "issuerr" in err


def _documented_commands() -> list[list[str]]:
    """Each `envoy-config` command the README and the reference show, as its arguments."""
    commands = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "reference.md"):
        text = re.sub(r"\\\n\s*", " ", doc.read_text())  # join continued lines
        for _, line in commands_in(text):
            words = shlex.split(line.split(" > ")[0])
            if "envoy-config" in words and "HOST:PORT" not in line:  # an example, not a synopsis
                commands.append(words[words.index("envoy-config") + 1 :])
    return commands


def test_the_documented_commands_print_envoys_bootstrap(capsys: pytest.CaptureFixture[str]) -> None:
    commands = _documented_commands()
    assert len(commands) >= 2
    for argv in commands:
        code, out, err = _run(capsys, *argv)
        assert code == 0, f"{argv}: {err}"
        _bootstrap(out)
