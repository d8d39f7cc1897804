"""Envoy bootstraps for the benchmark, derived from the one the project ships.

Every variant starts from `authz_server.envoy_config.render_bootstrap` (the bootstrap users run,
with its ext_authz settings: fail closed, 1 s timeout, path normalisation) and replaces the
route to the upstream with a direct response, so no upstream server is measured:

  no_auth      the HTTP filters are the router alone (Envoy's own cost)
  jwt_rbac     Envoy's jwt_authn + rbac filters in place of ext_authz (the in-proxy baseline)
  ext_authz    ext_authz over gRPC to the given address (authz-server, or the floor)
"""

from __future__ import annotations

from typing import Any

import yaml

from authz_server.envoy_config import render_bootstrap

_UNUSED_PORT = 9  # render_bootstrap wants an upstream; the direct response never reaches it
DIRECT_RESPONSE = {
    "match": {"prefix": "/"},
    "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
}


def _connection_manager(bootstrap: dict[str, Any]) -> dict[str, Any]:
    listener = bootstrap["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def bootstrap(
    variant: str,
    *,
    listen_port: int,
    admin_port: int,
    authz_address: str = "127.0.0.1:9",
    jwt_rbac_filters: list[dict[str, Any]] | None = None,
) -> str:
    """Return the YAML of `variant` (no_auth, jwt_rbac or ext_authz) listening on 127.0.0.1.

    Raises ValueError for an unknown variant or jwt_rbac without its filters.
    """
    shipped = yaml.safe_load(
        render_bootstrap(
            listen_port=listen_port,
            admin_port=admin_port,
            authz_address=authz_address,
            upstream_port=_UNUSED_PORT,
        )
    )
    hcm = _connection_manager(shipped)
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [DIRECT_RESPONSE]
    filters = hcm["http_filters"]
    ext_authz, router = filters[0], filters[-1]
    if ext_authz["name"] != "envoy.filters.http.ext_authz":
        raise ValueError(f"unexpected first filter in the shipped bootstrap: {ext_authz['name']}")
    keep_clusters: set[str] = set()
    if variant == "no_auth":
        hcm["http_filters"] = [router]
    elif variant == "jwt_rbac":
        if not jwt_rbac_filters:
            raise ValueError("jwt_rbac needs jwt_rbac_filters")
        hcm["http_filters"] = [*jwt_rbac_filters, router]
    elif variant == "ext_authz":
        keep_clusters.add("authz")
    else:
        raise ValueError(f"unknown bootstrap variant {variant!r}")
    resources = shipped["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] in keep_clusters]
    return yaml.safe_dump(shipped, sort_keys=False)
