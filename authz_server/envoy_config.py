"""Envoy bootstrap for a standalone front proxy that asks this server on every request.

`render_bootstrap` returns the YAML of an Envoy v3 bootstrap: one HTTP listener whose
`ext_authz` filter calls the `authz` cluster (this server, gRPC over HTTP/2, TCP or Unix
socket) and routes everything else to the `upstream` cluster. The demo (`make run`) and the
end-to-end tests run Envoy with it; it also serves as a starting point for real deployments.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["render_bootstrap"]

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
_EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS_NAME = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HTTP_OPTIONS = f"type.googleapis.com/{_HTTP_OPTIONS_NAME}"


def _duration(seconds: float) -> str:
    """Return `seconds` as a protobuf JSON Duration string, millisecond precision."""
    millis = round(seconds * 1000)
    return f"{millis // 1000}.{millis % 1000:03d}s"


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _authz_endpoint_address(authz_address: str) -> dict[str, Any]:
    """Return the Envoy Address of "host:port", "[v6]:port" or "unix:/path"."""
    if authz_address.startswith("unix:"):
        path = authz_address.removeprefix("unix:")
        if not path:
            raise ValueError(f"authz_address {authz_address!r}: empty Unix socket path")
        return {"pipe": {"path": path}}
    host, sep, port = authz_address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"authz_address {authz_address!r}: expected host:port or unix:/path")
    return _socket_address(host.strip("[]"), int(port))


def _cluster(name: str, address: dict[str, Any], *, http2: bool) -> dict[str, Any]:
    protocol: dict[str, Any] = (
        {"http2_protocol_options": {}} if http2 else {"http_protocol_options": {}}
    )
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS_NAME: {"@type": _HTTP_OPTIONS, "explicit_http_config": protocol}
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def render_bootstrap(
    *,
    listen_port: int,
    admin_port: int,
    authz_address: str,
    upstream_port: int,
    authz_timeout_s: float = 1.0,
    listen_host: str = "127.0.0.1",
) -> str:
    """Return an Envoy v3 bootstrap (YAML) fronting 127.0.0.1:`upstream_port` with ext_authz.

    `authz_address` is "host:port" or "unix:/path" of this server's gRPC port. Envoy fails
    closed (`failure_mode_allow: false`): if the server cannot be reached in
    `authz_timeout_s`, the client gets 503 (not a 403 that would blame the caller).
    Raises ValueError on a malformed address or timeout.
    """
    if authz_timeout_s <= 0:
        raise ValueError(f"authz_timeout_s must be positive, got {authz_timeout_s}")
    ext_authz = {
        "@type": _EXT_AUTHZ,
        "transport_api_version": "V3",
        "failure_mode_allow": False,
        "status_on_error": {"code": "ServiceUnavailable"},
        "include_peer_certificate": True,
        "grpc_service": {
            "envoy_grpc": {"cluster_name": "authz"},
            "timeout": _duration(authz_timeout_s),
        },
    }
    connection_manager = {
        "@type": f"{_HCM}.HttpConnectionManager",
        "stat_prefix": "ingress_http",
        "codec_type": "AUTO",
        # The client address comes from the connection, never from a client-sent
        # x-forwarded-for; Envoy appends it so `remoteIpBlocks` sees the real peer.
        "use_remote_address": True,
        # Policies match on the path Envoy routes, so normalise it before ext_authz sees it.
        "normalize_path": True,
        "merge_slashes": True,
        # `/admin%2Fx` would otherwise slip past a rule on `/admin/*` to an upstream that
        # decodes it: redirect the client to the unescaped path instead.
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "generate_request_id": True,
        # So a client can quote the id of a 401/403 that the decision log recorded.
        "always_set_request_id_in_response": True,
        "route_config": {
            "name": "local_route",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ],
        },
        "http_filters": [
            {"name": "envoy.filters.http.ext_authz", "typed_config": ext_authz},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }
    bootstrap = {
        "admin": {"address": _socket_address("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": _socket_address(listen_host, listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": connection_manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                _cluster("authz", _authz_endpoint_address(authz_address), http2=True),
                _cluster("upstream", _socket_address("127.0.0.1", upstream_port), http2=False),
            ],
        },
    }
    return yaml.safe_dump(bootstrap, sort_keys=False)
