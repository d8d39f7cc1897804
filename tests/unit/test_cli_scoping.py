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
