"""End to end: one authz-server guarding three workloads behind one real Envoy, scoped as
Istio scopes its policies.

Envoy routes ``/orders`` and ``/reports`` of any host to two upstreams, each route with its own
``context_extensions`` (``workload``) merged with the virtual host's (``namespace``), and serves
``catalog.example.com`` from a third upstream with no context extensions at all: the server
recognises that one by its host. The server reads Istio YAML for all three (a mesh-wide
RequestAuthentication and DENY, one provider and policies selected by labels, one namespace-wide
policy), so each route is decided with only its workload's policies and providers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from authz_server.tools.envoy_config import render_bootstrap
from tests.e2e.harness import (
    AuthzServerProcess,
    EchoUpstream,
    EnvoyProcess,
    JWKSServer,
    free_port,
    http_request,
)
from tests.helpers import AUDIENCE, ISSUER, claims_for

pytestmark = pytest.mark.e2e

PARTNERS = "https://partners.test"
CATALOG_HOST = "catalog.example.com"

CONFIG = """
apiVersion: authz-server/v1
kind: AuthzConfig
server: {{realm: scoping}}
workloads:
  - name: orders
    namespace: shop
    labels: {{app: orders}}
    contextExtensions: {{namespace: shop, workload: orders}}
  - name: reports
    namespace: shop
    labels: {{app: reports}}
    contextExtensions: {{namespace: shop, workload: reports}}
  - name: catalog
    namespace: web
    labels: {{app: catalog}}
    # Also catalog.internal, for which this Envoy has no virtual host of its own.
    hosts: ["{catalog_host}", "catalog.internal"]
---
# Every workload accepts the main issuer's tokens.
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: idp, namespace: istio-system}}
spec:
  jwtRules:
    - issuer: {issuer}
      audiences: [{audience}]
      jwksUri: {jwks_url}
      outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
---
# Only reports accepts the partners' tokens.
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: partners, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: reports}}}}
  jwtRules:
    - issuer: {partners}
      jwksUri: {jwks_url}
---
# The root namespace, no selector: every workload.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-blocked-callers, namespace: istio-system}}
spec:
  action: DENY
  rules: [{{when: [{{key: "request.auth.claims[blocked]", values: ["true"]}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: orders-admins, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  rules: [{{when: [{{key: "request.auth.claims[groups]", values: ["admin"]}}]}}]
---
# reports has no ALLOW policy of its own: it allows what no DENY refuses.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reports-read-only, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: reports}}}}
  action: DENY
  rules: [{{to: [{{operation: {{methods: ["DELETE"]}}}}]}}]
---
# The namespace, no selector: every workload of web.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: signed-in-readers, namespace: web}}
spec:
  rules:
    - from: [{{source: {{requestPrincipals: ["*"]}}}}]
      to: [{{operation: {{methods: ["GET"]}}}}]
"""

_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"


def _context_extensions(**extensions: str) -> dict[str, Any]:
    """A ``typed_per_filter_config`` that sets ext_authz context extensions."""
    return {
        "envoy.filters.http.ext_authz": {
            "@type": _PER_ROUTE,
            "check_settings": {"context_extensions": extensions},
        }
    }


def _route(prefix: str, cluster: str, **extensions: str) -> dict[str, Any]:
    route: dict[str, Any] = {"match": {"prefix": prefix}, "route": {"cluster": cluster}}
    if extensions:
        route["typed_per_filter_config"] = _context_extensions(**extensions)
    return route


def scoped_bootstrap(
    *, listen_port: int, admin_port: int, authz_port: int, upstreams: dict[str, int]
) -> str:
    """``render_bootstrap``'s Envoy, with a cluster per upstream and routes that say which
    workload each request is for. ``upstreams`` maps cluster names to ports."""
    bootstrap = yaml.safe_load(
        render_bootstrap(
            listen_port=listen_port,
            admin_port=admin_port,
            authz_address=f"127.0.0.1:{authz_port}",
            upstream_port=upstreams["orders"],
        )
    )
    resources = bootstrap["static_resources"]
    template = next(c for c in resources["clusters"] if c["name"] == "upstream")
    for name, port in upstreams.items():
        cluster = json.loads(json.dumps(template))
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = name
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = port
        resources["clusters"].append(cluster)
    manager = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["route_config"]["virtual_hosts"] = [
        {
            "name": "catalog",
            "domains": [CATALOG_HOST],
            "routes": [_route("/", "catalog")],
        },
        {
            "name": "shop",
            "domains": ["*"],
            # Merged with each route's: the route adds `workload`.
            "typed_per_filter_config": _context_extensions(namespace="shop"),
            "routes": [
                _route("/orders", "orders", workload="orders"),
                _route("/reports", "reports", workload="reports"),
                _route("/billing", "orders", workload="billing"),  # no such workload declared
                _route("/", "orders"),  # only the virtual host's namespace
            ],
        },
    ]
    return yaml.safe_dump(bootstrap, sort_keys=False)


@dataclass
class Mesh:
    url: str
    upstreams: dict[str, EchoUpstream]
    key: SigningKey

    def token(self, **claims: Any) -> str:
        return self.key.sign(claims_for(time.time(), **claims))

    def call(
        self, path: str, token: str | None = None, method: str = "GET", host: str | None = None
    ) -> tuple[int, str | None, str | None]:
        """(status, the denial's reason or None, the upstream that got the request or None)."""
        headers = {"Host": host} if host else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        for upstream in self.upstreams.values():
            upstream.clear()
        status, _, body = http_request(self.url + path, method=method, headers=headers)
        reached = [name for name, upstream in self.upstreams.items() if upstream.requests]
        assert len(reached) <= 1, reached
        reason = json.loads(body)["reason"] if status in (401, 403) else None
        return status, reason, reached[0] if reached else None


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("scoping")
    key = devkeys.generate_key("RSA", kid="scoping-1")
    names = ("orders", "reports", "catalog")
    with JWKSServer(devkeys.jwks(key)) as jwks:
        upstreams = {name: EchoUpstream().start() for name in names}
        try:
            config = workdir / "config.yaml"
            config.write_text(
                CONFIG.format(
                    issuer=ISSUER,
                    audience=AUDIENCE,
                    partners=PARTNERS,
                    jwks_url=jwks.jwks_url,
                    catalog_host=CATALOG_HOST,
                )
            )
            grpc_port, listen, admin = free_port(), free_port(), free_port()
            with AuthzServerProcess(
                config,
                grpc_port,
                free_port(),
                log_path=workdir / "server.log",
                ready_path="/readyz",
            ):
                bootstrap = scoped_bootstrap(
                    listen_port=listen,
                    admin_port=admin,
                    authz_port=grpc_port,
                    upstreams={name: upstream.port for name, upstream in upstreams.items()},
                )
                with EnvoyProcess(bootstrap, admin, workdir / "envoy.log"):
                    yield Mesh(f"http://127.0.0.1:{listen}", upstreams, key)
        finally:
            for upstream in upstreams.values():
                upstream.stop()


def test_a_token_allowed_on_one_route_is_refused_on_the_other(mesh: Mesh) -> None:
    developer = mesh.token(groups=["dev"])
    admin = mesh.token(sub="root", groups=["admin"])

    # orders' ALLOW policy asks for admins; it does not make reports an allow-list.
    assert mesh.call("/orders/1", developer) == (403, "no_allow_policy_matched", None)
    assert mesh.call("/reports/daily", developer) == (200, None, "reports")
    assert mesh.call("/orders/1", admin) == (200, None, "orders")
    assert mesh.upstreams["orders"].last_request().headers["x-jwt-sub"] == "root"


def test_a_workload_with_no_allow_policy_allows_even_without_a_token(mesh: Mesh) -> None:
    assert mesh.call("/reports/daily") == (200, None, "reports")
    # orders has an ALLOW policy: an anonymous caller is asked to authenticate.
    assert mesh.call("/orders/1") == (401, "missing_credentials", None)


def test_a_deny_scoped_to_one_workload_does_not_touch_the_other(mesh: Mesh) -> None:
    admin = mesh.token(groups=["admin"])

    assert mesh.call("/reports/daily", admin, method="DELETE") == (403, "policy_denied", None)
    assert mesh.call("/orders/1", admin, method="DELETE") == (200, None, "orders")


def test_a_deny_in_the_root_namespace_applies_to_every_workload(mesh: Mesh) -> None:
    blocked = mesh.token(groups=["admin"], blocked=True)

    assert mesh.call("/orders/1", blocked) == (403, "policy_denied", None)
    assert mesh.call("/reports/daily", blocked) == (403, "policy_denied", None)
    assert mesh.call("/", blocked, host=CATALOG_HOST) == (403, "policy_denied", None)


def test_a_provider_selected_for_one_workload_is_an_unknown_issuer_elsewhere(mesh: Mesh) -> None:
    partner = mesh.token(iss=PARTNERS, aud=None)

    assert mesh.call("/reports/daily", partner) == (200, None, "reports")
    assert mesh.call("/orders/1", partner) == (401, "invalid_issuer", None)
    assert mesh.call("/", partner, host=CATALOG_HOST) == (401, "invalid_issuer", None)


def test_a_route_no_workload_is_declared_for_fails_closed(mesh: Mesh) -> None:
    admin = mesh.token(groups=["admin"])

    # A route whose context extensions name no declared workload, and one with only the
    # virtual host's: both reach no upstream, whatever the token.
    assert mesh.call("/billing/invoices", admin) == (403, "unknown_workload", None)
    assert mesh.call("/", admin) == (403, "unknown_workload", None)
    assert mesh.call("/", admin, host="unknown.example.com") == (403, "unknown_workload", None)


def test_a_virtual_host_without_context_extensions_is_recognised_by_its_host(
    mesh: Mesh,
) -> None:
    developer = mesh.token(groups=["dev"])

    # catalog's own namespace-wide policy decides: signed-in GETs, nothing else; orders'
    # admins-only policy plays no part.
    assert mesh.call("/items", developer, host=CATALOG_HOST) == (200, None, "catalog")
    assert mesh.call("/items", developer, "POST", host=CATALOG_HOST) == (
        403,
        "no_allow_policy_matched",
        None,
    )
    assert mesh.call("/items", host="Catalog.Example.com") == (401, "missing_credentials", None)


def test_the_host_never_picks_the_scope_of_a_route_that_sent_context_extensions(
    mesh: Mesh,
) -> None:
    developer = mesh.token(groups=["dev"])
    # Envoy takes this host to its catch-all virtual host (the shop routes, each with context
    # extensions), while the catalog workload lists it: the client would pick catalog's
    # lenient policies for a request that goes to the orders upstream.
    catalog_by_name = "catalog.internal"

    assert mesh.call("/billing/invoices", developer, host=catalog_by_name) == (
        403,
        "unknown_workload",
        None,
    )
    assert mesh.call("/", developer, host=catalog_by_name) == (403, "unknown_workload", None)
    # Where Envoy sent no context extensions (catalog's own virtual host), the host decides.
    assert mesh.call("/items", developer, host=CATALOG_HOST) == (200, None, "catalog")
