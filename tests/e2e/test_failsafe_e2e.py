"""A lost policy file never turns into allow-all (issue 19), through both doors.

The README's layout is a directory with `provider.yaml` beside `orders.yaml`. Losing the
policies (the file emptied, deleted, or cut before `policies:`) leaves providers and no policy:
every request would pass, with or without a token. Such a configuration is refused at start
(exit 1, one log line naming the problem) and on reload (counted, logged, the old one kept:
an anonymous DELETE stays 401 through Envoy).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from authz_server.tools.envoy_config import render_bootstrap
from tests.e2e.harness import (
    DOORS,
    REPO_ROOT,
    AuthzServerProcess,
    EchoUpstream,
    EnvoyProcess,
    door_setup,
    free_port,
    http_request,
    wait_until,
)
from tests.helpers import AUDIENCE, ISSUER, claims_for

pytestmark = pytest.mark.e2e

PROVIDER_YAML = f"""\
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: main
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksFile: jwks.json
"""

ORDERS_YAML = """\
apiVersion: authz-server/v1
kind: AuthzConfig
policies:
  - name: orders-read
    rules:
      - from: [{source: {requestPrincipals: ["*"]}}]
        to: [{operation: {methods: [GET], paths: ["/api/orders*"]}}]
"""


def cut_before_policies(text: str) -> str:
    """``text`` up to the line ``policies:``, as `head -n N` cuts a file just before it."""
    lines = text.splitlines(keepends=True)
    return "".join(lines[: next(i for i, line in enumerate(lines) if line == "policies:\n")])


def test_the_cut_of_the_shipped_config_is_the_one_the_issue_shows() -> None:
    shipped = (REPO_ROOT / "k8s" / "base" / "config.yaml").read_text()
    cut = cut_before_policies(shipped)
    assert "providers:" in cut and "policies" not in cut
    assert cut == "".join(shipped.splitlines(keepends=True)[:22])  # head -n 22


def k8s_cut(directory: Path) -> Path:
    path = directory / "trunc.yaml"
    path.write_text(cut_before_policies((REPO_ROOT / "k8s" / "base" / "config.yaml").read_text()))
    return path


def emptied_policy_file(directory: Path) -> Path:
    (directory / "provider.yaml").write_text(PROVIDER_YAML)
    (directory / "orders.yaml").write_text("")
    return directory


def deleted_policy_file(directory: Path) -> Path:
    (directory / "provider.yaml").write_text(PROVIDER_YAML)
    return directory


LOST = {"k8s-cut": k8s_cut, "emptied": emptied_policy_file, "deleted": deleted_policy_file}


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("lost", list(LOST))
def test_a_config_whose_policies_were_lost_does_not_start(
    tmp_path: Path, lost: str, door: str
) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(devkeys.jwks(devkeys.generate_key("EC-P256"))))
    path = LOST[lost](tmp_path)
    server_args, _ = door_setup(door, free_port())
    serve = subprocess.run(
        [sys.executable, "-m", "authz_server", "serve", "--config", str(path),
         "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}",
         *server_args],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert serve.returncode == 1, serve.stderr
    records = [json.loads(line) for line in serve.stderr.splitlines() if line.strip()]
    (problem,) = [r for r in records if r["message"].startswith("invalid configuration")]
    assert problem["field"] == "policies"
    assert "but no policy" in problem["problem"]
    assert "with or without credentials" in problem["problem"]
    assert records[-1]["message"].startswith("not starting: 1 problem(s)")
    validate = subprocess.run(
        [sys.executable, "-m", "authz_server", "validate", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert (validate.returncode, validate.stdout) == (1, "")
    assert "but no policy" in validate.stderr


@dataclass
class Stack:
    directory: Path
    server: AuthzServerProcess
    envoy_url: str

    def reloads(self, result: str) -> float:
        _, _, body = http_request(f"{self.server.http_url}/metrics")
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if (sample.name, sample.labels.get("result")) == (
                    "authz_config_reloads_total",
                    result,
                ):
                    return sample.value
        return 0.0

    def status(self, method: str, token: str | None = None) -> int:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        status, _, _ = http_request(f"{self.envoy_url}/api/orders/1", method, headers)
        return status


@pytest.fixture(params=DOORS)
def stack(request: pytest.FixtureRequest, tmp_path: Path, rsa_key: SigningKey) -> Iterator[Stack]:
    (tmp_path / "jwks.json").write_text(json.dumps(devkeys.jwks(rsa_key)))
    (tmp_path / "provider.yaml").write_text(PROVIDER_YAML)
    (tmp_path / "orders.yaml").write_text(ORDERS_YAML)
    with ExitStack() as stack:
        upstream = stack.enter_context(EchoUpstream())
        grpc_port = free_port()
        door = str(request.param)
        server_args, envoy_args = door_setup(door, grpc_port if door == "grpc" else free_port())
        server = stack.enter_context(
            AuthzServerProcess(
                tmp_path, grpc_port, free_port(), server_args, log_path=tmp_path / "server.log"
            )
        )
        listen, admin = free_port(), free_port()
        bootstrap = render_bootstrap(
            listen_port=listen, admin_port=admin, upstream_port=upstream.port, **envoy_args
        )
        stack.enter_context(EnvoyProcess(bootstrap, admin, tmp_path / "envoy.log"))
        yield Stack(tmp_path, server, f"http://127.0.0.1:{listen}")


def test_losing_the_policy_file_on_reload_is_refused_and_the_door_stays_shut(
    stack: Stack, rsa_key: SigningKey
) -> None:
    token = rsa_key.sign(claims_for(time.time()))
    orders = stack.directory / "orders.yaml"
    assert (stack.status("GET", token), stack.status("DELETE"), stack.status("POST")) == (
        200,
        401,
        401,
    )
    losses = [
        ("emptied", lambda: orders.write_text("")),
        ("deleted", orders.unlink),
        ("cut before policies:", lambda: orders.write_text(cut_before_policies(ORDERS_YAML))),
    ]
    for refused, (what, lose) in enumerate(losses, start=1):
        lose()
        wait_until(
            lambda n=refused: stack.reloads("failure") == n, timeout=15, what=f"{what}: refused"
        )
        assert (stack.status("DELETE"), stack.status("POST")) == (401, 401), what
        assert stack.status("GET", token) == 200, what
        # Changed bytes (a comment), so that the restored file is a new configuration.
        orders.write_text(f"# restored after it was {what}\n{ORDERS_YAML}")
        wait_until(
            lambda n=refused: stack.reloads("success") == n, timeout=15, what=f"{what}: restored"
        )
    log = stack.server.log_text()
    assert log.count("but no policy") == len(losses)
    assert "0 polic(ies)" not in log
