"""Envoy bootstraps for the benchmark, derived from the one the project ships.

Every variant starts from `authz_server.tools.envoy_config.render_bootstrap` (the bootstrap
users run, with its ext_authz settings: fail closed, 1 s timeout, path normalisation) and
replaces the route to the upstream with a direct response, so no upstream server is measured:

  no_auth      the HTTP filters are the router alone (Envoy's own cost)
  jwt_rbac     Envoy's jwt_authn + rbac filters in place of ext_authz (the in-proxy baseline)
  ext_authz    ext_authz over gRPC to the given address (authz-server, or the floor)
  ext_authz_http  ext_authz over HTTP (``http_service``) to the given address: authz-server's
               HTTP door (passing `upstream_headers` on), or the HTTP floor

`http_ext_authz` keeps the route to the upstream and puts one listener per HTTP ext_authz
server in one Envoy: the same connection manager, with ext_authz over HTTP (``http_service``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import yaml

from authz_server.tools.envoy_config import render_bootstrap

_UNUSED_PORT = 9  # render_bootstrap wants an upstream; the direct response never reaches it
DIRECT_RESPONSE = {
    "match": {"prefix": "/"},
    "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
}


def _connection_manager(listener: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def bootstrap(
    variant: str,
    *,
    listen_port: int,
    admin_port: int,
    authz_address: str = "127.0.0.1:9",
    jwt_rbac_filters: list[dict[str, Any]] | None = None,
    upstream_headers: Sequence[str] = (),
) -> str:
    """Return the YAML of `variant` (no_auth, jwt_rbac, ext_authz or ext_authz_http) listening
    on 127.0.0.1.

    Raises ValueError for an unknown variant or jwt_rbac without its filters.
    """
    shipped = yaml.safe_load(
        render_bootstrap(
            listen_port=listen_port,
            admin_port=admin_port,
            authz_address=authz_address,
            upstream_port=_UNUSED_PORT,
            door="http" if variant == "ext_authz_http" else "grpc",
            upstream_headers=upstream_headers,
        )
    )
    hcm = _connection_manager(shipped["static_resources"]["listeners"][0])
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
    elif variant in ("ext_authz", "ext_authz_http"):
        keep_clusters.add("authz")
    else:
        raise ValueError(f"unknown bootstrap variant {variant!r}")
    resources = shipped["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] in keep_clusters]
    return yaml.safe_dump(shipped, sort_keys=False)


def http_ext_authz(
    servers: dict[str, tuple[int, int]], *, admin_port: int, upstream_port: int
) -> str:
    """Return the YAML of one Envoy with a listener per entry of `servers` on 127.0.0.1.

    `servers` maps a name (``[a-z0-9_]``: the listener's stat prefix is ``ingress_<name>``) to
    (listen port, port of the HTTP ext_authz server on 127.0.0.1). Each listener asks its
    server as the shipped HTTP-door bootstrap does (``render_bootstrap(door="http")``:
    ``http_service`` over HTTP/1.1, the shipped timeout, fail closed) and routes allowed
    requests to the upstream on `upstream_port`.
    """
    shipped = yaml.safe_load(
        render_bootstrap(
            listen_port=0,  # each listener gets its own below
            admin_port=admin_port,
            authz_address="127.0.0.1:9",  # replaced by one cluster per server
            upstream_port=upstream_port,
            door="http",
        )
    )
    resources = shipped["static_resources"]
    template = resources["listeners"][0]
    authz_cluster = next(c for c in resources["clusters"] if c["name"] == "authz")
    listeners, clusters = [], [c for c in resources["clusters"] if c is not authz_cluster]
    for name, (listen_port, authz_port) in servers.items():
        cluster = copy.deepcopy(authz_cluster)
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = f"authz_{name}"
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = authz_port
        clusters.append(cluster)

        listener = copy.deepcopy(template)
        listener["name"] = f"ingress_{name}"
        listener["address"]["socket_address"]["port_value"] = listen_port
        hcm = _connection_manager(listener)
        hcm["stat_prefix"] = f"ingress_{name}"
        http_service = hcm["http_filters"][0]["typed_config"]["http_service"]
        http_service["server_uri"]["cluster"] = cluster["name"]
        listeners.append(listener)
    resources["listeners"], resources["clusters"] = listeners, clusters
    return yaml.safe_dump(shipped, sort_keys=False)
