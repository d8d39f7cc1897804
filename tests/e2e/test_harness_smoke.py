"""The e2e harness itself: real HTTP servers, and real Envoy with the rendered bootstrap.

Envoy talks to a stub Authorization servicer started in-process, so these tests prove the
bootstrap and the harness independently of the real server.
"""

from __future__ import annotations

import json
import time
import urllib.error
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from authz_server.tools.envoy_config import render_bootstrap
from tests.e2e.harness import (
    EchoUpstream,
    EnvoyProcess,
    JWKSServer,
    free_port,
    http_request,
    wait_until,
)

pytestmark = pytest.mark.e2e


class _StubAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    """Allows /ok (adding `x-stub: yes` for the upstream), denies everything else with 403."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
        path = request.attributes.request.http.path
        self.paths.append(path)
        if path == "/ok":
            header = base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="x-stub", value="yes")
            )
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(headers=[header]),
            )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
                body='{"error": "stub_denied"}',
            ),
        )


@pytest.fixture
def stub_authz(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """Start the stub servicer on TCP or a Unix socket; yield (authz_address, servicer)."""
    servicer = _StubAuthorization()
    executor = futures.ThreadPoolExecutor(max_workers=4)
    server = grpc.server(executor)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    if request.param == "unix":
        address = f"unix:{tmp_path / 'authz.sock'}"
        assert server.add_insecure_port(address) > 0
    else:
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        yield address, servicer
    finally:
        server.stop(grace=None).wait()
        executor.shutdown(wait=True)


@pytest.mark.parametrize("stub_authz", ["tcp", "unix"], indirect=True)
def test_envoy_asks_the_authz_cluster_and_forwards_its_headers(
    stub_authz: tuple[str, Any], tmp_path: Path
) -> None:
    authz_address, servicer = stub_authz
    listen_port, admin_port = free_port(), free_port()
    with EchoUpstream() as upstream:
        bootstrap = render_bootstrap(
            listen_port=listen_port,
            admin_port=admin_port,
            authz_address=authz_address,
            upstream_port=upstream.port,
        )
        with EnvoyProcess(bootstrap, admin_port, tmp_path / "envoy.log"):
            base = f"http://127.0.0.1:{listen_port}"

            status, _, body = http_request(f"{base}/ok", headers={"x-stub": "spoofed"})
            assert status == 200, body
            seen = upstream.last_request()
            assert seen.path == "/ok"
            assert seen.headers["x-stub"] == "yes"  # set, not appended to the client's copy
            assert "x-request-id" in seen.headers
            assert json.loads(body)["headers"]["x-stub"] == "yes"

            status, _, body = http_request(f"{base}/other", method="POST", body=b"{}")
            assert status == 403
            assert json.loads(body) == {"error": "stub_denied"}
            assert upstream.last_request().path == "/ok"  # the denied request never got there

            # normalize_path + merge_slashes: the authz server sees the path Envoy routes.
            status, _, _ = http_request(f"{base}//ok/../ok")
            assert status == 200
            assert servicer.paths == ["/ok", "/other", "/ok"]


def test_jwks_server_serves_replaceable_keys_and_discovery() -> None:
    with JWKSServer({"keys": [{"kid": "a"}]}) as server:
        status, headers, body = http_request(server.jwks_url)
        assert (status, json.loads(body)) == (200, {"keys": [{"kid": "a"}]})
        assert headers["content-type"] == "application/json"

        server.set_jwks({"keys": [{"kid": "b"}]}, headers={"Cache-Control": "max-age=60"})
        status, headers, body = http_request(server.jwks_url)
        assert json.loads(body) == {"keys": [{"kid": "b"}]}
        assert headers["cache-control"] == "max-age=60"

        _, _, body = http_request(server.discovery_url)
        assert json.loads(body) == {"issuer": server.url, "jwks_uri": server.jwks_url}
        server.set_issuer("https://issuer.test")
        _, _, body = http_request(server.discovery_url)
        assert json.loads(body)["issuer"] == "https://issuer.test"

        assert http_request(f"{server.url}/nope")[0] == 404
        assert server.fetch_count() == 2
        assert server.fetch_count("/.well-known/openid-configuration") == 2


def test_jwks_server_fails_lies_and_drops_on_request() -> None:
    with JWKSServer({"keys": []}) as server:
        server.set_failure(status=503, body=b"down")
        assert http_request(server.jwks_url)[::2] == (503, b"down")

        server.set_failure(body=b"not json")
        assert http_request(server.jwks_url)[::2] == (200, b"not json")

        server.set_failure(close_connection=True)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            http_request(server.jwks_url)

        server.set_failure(status=500, path="/.well-known/openid-configuration")
        assert http_request(server.jwks_url)[0] == 200
        assert http_request(server.discovery_url)[0] == 500

        server.clear_failure()
        assert http_request(server.jwks_url)[::2] == (200, b'{"keys": []}')
        assert server.fetch_count() == 5


def test_jwks_server_hang_is_bounded_and_released_by_stop() -> None:
    server = JWKSServer().start()
    try:
        server.set_failure(hang_seconds=0.2, status=500)
        assert http_request(server.jwks_url, timeout=5)[0] == 500  # answered after the hang

        server.set_failure(hang_seconds=60)
        with pytest.raises((urllib.error.URLError, TimeoutError)):
            http_request(server.jwks_url, timeout=0.3)
        server.wait_for_fetches(2)
    finally:
        started = time.monotonic()
        server.stop()
    assert time.monotonic() - started < 5  # the 60 s hang was released, not waited out


def test_echo_upstream_echoes_any_method_and_records_requests() -> None:
    with EchoUpstream(keep=2) as upstream:
        for method in ("GET", "DELETE", "PATCH"):
            status, _, body = http_request(
                f"{upstream.url}/p?q=1", method=method, headers={"X-Mixed-Case": "v"}, body=b"x"
            )
            echoed = json.loads(body)
            assert (status, echoed["method"], echoed["path"]) == (200, method, "/p?q=1")
            assert echoed["headers"]["x-mixed-case"] == "v"
        assert [r.method for r in upstream.requests] == ["DELETE", "PATCH"]
        assert upstream.last_request().body == b"x"


def test_wait_until_names_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match="the impossible"):
        wait_until(lambda: False, timeout=0.05, what="the impossible")
    assert wait_until(lambda: 42) == 42
