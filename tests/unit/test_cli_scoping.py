"""`authz-server check` says which workload a request is scoped to, from what Envoy would send:
context extensions, the destination principal of an mTLS sidecar, the host."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from authz_server import cli
from tests.helpers import write_config

# No providers: decided without any network. orders admits only GETs; reports has no ALLOW
# policy of its own, so it allows.
MESH = """\
apiVersion: authz-server/v1
kind: AuthzConfig
workloads:
  - name: orders
    namespace: shop
    labels: {app: orders}
    destinationPrincipals: ["spiffe://cluster.local/ns/shop/sa/orders"]
  - name: reports
    namespace: shop
    labels: {app: reports}
    contextExtensions: {workload: reports}
    hosts: [reports.example.com]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-reads, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""


def _check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[int, dict[str, Any]]:
    path = write_config(tmp_path, MESH)
    code = cli.main(["check", "--json", "--config", str(path), "--method", "POST", *flags])
    return code, json.loads(capsys.readouterr().out)


def test_check_scopes_a_request_by_its_destination_principal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = _check(
        tmp_path,
        capsys,
        "--destination-principal",
        "spiffe://cluster.local/ns/shop/sa/orders",
    )

    # Denied by orders' policy (a request with no token: 401, asking to authenticate).
    assert (code, result["status"], result["policies_evaluated"]) == (1, 401, True)
    assert result["workload"]["name"] == "orders"
    assert result["workload"]["policies_in_scope"] == ["shop/orders-reads"]


@pytest.mark.parametrize(
    "flags",
    [("--context-extension", "workload=reports"), ("--host", "reports.example.com:443")],
)
def test_check_scopes_a_request_by_its_context_extensions_or_its_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: tuple[str, str]
) -> None:
    code, result = _check(tmp_path, capsys, *flags)

    assert (code, result["decision"]) == (0, "allow")
    assert result["workload"] == {
        "name": "reports",
        "unknown": None,
        "policies_in_scope": [],
        "providers_in_scope": [],
    }


def test_check_without_anything_that_recognises_a_workload_is_unknown_workload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, MESH)
    principal = "spiffe://cluster.local/ns/shop/sa/billing"

    code = cli.main(["check", "--config", str(path), "--destination-principal", principal])
    out = capsys.readouterr().out

    assert code == 1
    assert "403 unknown_workload" in out
    assert "workload: not recognised" in out


@pytest.mark.parametrize(
    "flags",
    [
        ("--context-extension", "workload=billing"),
        ("--destination-principal", "spiffe://cluster.local/ns/shop/sa/billing"),
    ],
)
def test_check_never_lets_the_host_pick_the_scope_of_what_a_route_or_sidecar_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: tuple[str, str]
) -> None:
    # reports lists this host; the route (or the sidecar) named a workload nobody declared.
    code, result = _check(tmp_path, capsys, *flags, "--host", "reports.example.com")

    assert (code, result["status"], result["reason"]) == (1, 403, "unknown_workload")
    assert result["workload"]["name"] is None


ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
NO_POLICY_WARNING = (
    "workload 'reports' (namespace 'shop') has no policy in its scope: every request for it "
    "is allowed, with or without credentials"
)


def test_a_workload_without_any_policy_is_named_in_a_warning_by_validate_and_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, MESH)
    assert cli.main(["validate", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == "ok\n"
    assert f"warning: {NO_POLICY_WARNING}" in err.splitlines()
    assert "workload 'orders' (namespace 'shop') has no policy" not in err  # it has one

    code = cli.main(["check", "--config", str(path), "--host", "reports.example.com"])
    out, err = capsys.readouterr()
    assert code == 0
    assert f"warning: {NO_POLICY_WARNING}" in err.splitlines()
    # The trace tells the truth about an empty scope: no token is asked for.
    assert "no policy: every request is allowed, with or without credentials" in out
    assert "valid credentials" not in out
    cli.main(["check", "--json", "--config", str(path), "--host", "reports.example.com"])
    result = json.loads(capsys.readouterr().out)
    assert result["note"] == "no policy: every request is allowed, with or without credentials"
    cli.main(["check", "--json", "--config", str(path), "--destination-principal", ORDERS])
    assert json.loads(capsys.readouterr().out)["note"] == ""  # orders has a policy


def test_serve_logs_the_warning_for_a_workload_without_any_policy(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write_config(tmp_path, MESH)
    # A listen address that cannot work ends the run right after the configuration loaded.
    result = subprocess.run(
        [sys.executable, "-m", "authz_server", "serve", "--config", str(path), "--listen", ":1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    warnings = [
        json.loads(line)["message"]
        for line in result.stderr.splitlines()
        if json.loads(line)["level"] == "WARNING"
    ]
    assert NO_POLICY_WARNING in warnings


def test_no_warning_when_every_workload_has_a_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    everywhere = MESH + (
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: mesh-audit, namespace: istio-system}\n"
        "spec: {action: AUDIT, rules: [{}]}\n"
    )
    path = write_config(tmp_path, everywhere)
    assert cli.main(["validate", "--config", str(path)]) == 0
    assert "has no policy" not in capsys.readouterr().err
