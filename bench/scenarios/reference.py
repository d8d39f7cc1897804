"""The configurations and requests that bench/scenarios/envoy.py measures.

The reference configuration is the one a mesh user would write: Istio ``RequestAuthentication``
with two issuers (the first copies three claims to headers) and two ``AuthorizationPolicy``
objects, a DENY (blocked users, internal paths) and an ALLOW with four rules. The measured
request (``GET /api/orders?page=2`` with an issuer-A token) is allowed by the last ALLOW rule,
so every rule is evaluated.

`credentials_config` adds an introspection provider (issuer A's opaque tokens, read where its
JWTs are) and an API keys provider beside it, with the same output headers, so that a Check
with each kind of credential does the same work once the credential is verified.

`envoy_jwt_rbac_filters` renders the same rules as Envoy's own ``jwt_authn`` + ``rbac`` HTTP
filters: the in-proxy baseline. `scale_config` generates N ALLOW policies (distinct hosts, path
prefixes and methods, plus three DENY) whose last one matches `scale_request`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf import timestamp_pb2

from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey

ISSUER_A = "https://issuer-a.bench"
ISSUER_B = "https://issuer-b.bench"
AUDIENCE = "bench"
PATH = "/api/orders?page=2"
HOST = "api.bench"
# Where Envoy's jwt_authn puts each issuer's payload (dynamic metadata of the jwt_authn filter).
_JWT_FILTER = "envoy.filters.http.jwt_authn"
_META_KEY = {ISSUER_A: "issuer_a", ISSUER_B: "issuer_b"}
_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
_JWT_AUTHN = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
SCALE_METHODS = ("GET", "POST", "PUT", "DELETE")


def claims(jti: int, *, lifetime_s: int = 3600) -> dict[str, Any]:
    """Claims of an issuer-A token that the reference configuration allows on `PATH`."""
    return {
        "iss": ISSUER_A,
        "sub": "alice",
        "aud": AUDIENCE,
        "exp": int(time.time()) + lifetime_s,
        "jti": f"bench-{jti}",
        "tenant": "acme",
        "email": "alice@acme.example",
        "groups": ["dev"],
        "scope": "orders:read profile",
    }


def jwks_text(key: SigningKey) -> str:
    """The public JWKS of `key` as one line of JSON."""
    return json.dumps(devkeys.jwks(key), separators=(",", ":"))


# ----------------------------------------------------------------------- authz-server configs


def istio_config(jwks_a: str, jwks_b: str) -> str:
    """The reference configuration as Istio YAML (three documents)."""
    return f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: istio-system}}
spec:
  jwtRules:
  - issuer: {ISSUER_A}
    audiences: [{AUDIENCE}]
    jwks: '{jwks_a}'
    outputClaimToHeaders:
    - {{header: x-user, claim: sub}}
    - {{header: x-tenant, claim: tenant}}
    - {{header: x-email, claim: email}}
  - issuer: {ISSUER_B}
    audiences: [{AUDIENCE}]
    jwks: '{jwks_b}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-blocked, namespace: istio-system}}
spec:
  action: DENY
  rules:
  - when:
    - {{key: "request.auth.claims[blocked]", values: ["true"]}}
  - to:
    - operation: {{paths: ["/internal/*"]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-api, namespace: istio-system}}
spec:
  action: ALLOW
  rules:
  - to:
    - operation: {{methods: [GET], paths: [/healthz, "/public/*"]}}
  - from:
    - source: {{requestPrincipals: ["{ISSUER_B}/*"]}}
    to:
    - operation: {{methods: [GET], paths: ["/partner/*"]}}
  - from:
    - source: {{requestPrincipals: ["{ISSUER_A}/*"]}}
    to:
    - operation: {{paths: ["/admin/*"]}}
    when:
    - {{key: "request.auth.claims[groups]", values: [admin]}}
  - from:
    - source: {{requestPrincipals: ["{ISSUER_A}/*"]}}
    to:
    - operation: {{methods: [GET, POST], paths: ["/api/*"]}}
    when:
    - {{key: "request.auth.claims[scope]", values: ["orders:read"]}}
"""


def credentials_config(endpoint: str, keys_file: str, secret_file: str) -> str:
    """A native document to append to `istio_config`: issuer A's opaque tokens, introspected at
    `endpoint` (HTTP Basic with the secret in `secret_file`), and API keys from `keys_file`
    in `x-api-key`, each with issuer A's output headers."""
    outputs = (
        "[{header: x-user, claim: sub}, {header: x-tenant, claim: tenant}, "
        "{header: x-email, claim: email}]"
    )
    return f"""\
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: opaque-a
    issuer: {ISSUER_A}
    audiences: [{AUDIENCE}]
    introspection: {{endpoint: {endpoint}, clientId: bench, clientSecretFile: {secret_file}}}
    outputClaimToHeaders: {outputs}
  - name: keys-a
    issuer: {ISSUER_A}
    apiKeys: {{file: {keys_file}}}
    fromHeaders: [{{name: x-api-key}}]
    outputClaimToHeaders: {outputs}
"""


def introspection_answer() -> dict[str, Any]:
    """What the bench's introspection endpoint answers: issuer A's claims, active."""
    return {"active": True, **claims(0)}


def api_keys_file(key: str) -> str:
    """A keys file holding `key`, whose identity has issuer A's claims (`claims`)."""
    claims_of = {k: v for k, v in claims(0).items() if k not in ("iss", "sub", "exp", "aud")}
    entry = {"sub": "alice", "sha256": hashlib.sha256(key.encode()).hexdigest()}
    return "keys:\n  - " + json.dumps({**entry, "claims": claims_of}) + "\n"


def scale_host(n: int) -> str:
    return f"svc{n - 1}.bench"


def scale_path(n: int) -> str:
    return f"/svc{n - 1}/orders?page=2"


def scale_config(n: int, jwks_a: str, jwks_b: str) -> str:
    """A native configuration with `n` ALLOW policies and three DENY policies.

    ALLOW policy i requires an issuer-A principal, host ``svc{i}.bench``, path ``/svc{i}/*``,
    one method (the last policy's is GET) and the ``orders:read`` scope; `scale_request`
    matches only the last one.
    """
    lines = [
        "apiVersion: authz-server/v1",
        "kind: AuthzConfig",
        "providers:",
        f"  - {{name: a, issuer: '{ISSUER_A}', audiences: [{AUDIENCE}], jwks: '{jwks_a}',",
        "     outputClaimToHeaders: [{header: x-user, claim: sub}, {header: x-tenant, claim: "
        "tenant}, {header: x-email, claim: email}]}",
        f"  - {{name: b, issuer: '{ISSUER_B}', audiences: [{AUDIENCE}], jwks: '{jwks_b}'}}",
        "policies:",
        "  - {name: deny-blocked, action: DENY, rules: [{when: [{key: "
        "'request.auth.claims[blocked]', values: ['true']}]}]}",
        "  - {name: deny-internal, action: DENY, rules: [{to: [{operation: "
        "{paths: ['/internal/*']}}]}]}",
        "  - {name: deny-debug, action: DENY, rules: [{to: [{operation: "
        "{methods: [TRACE, CONNECT]}}]}]}",
    ]
    for i in range(n):
        method = SCALE_METHODS[(n - 1 - i) % len(SCALE_METHODS)]
        lines.append(
            f"  - {{name: allow-svc{i}, rules: [{{from: [{{source: {{requestPrincipals: "
            f"['{ISSUER_A}/*']}}}}], to: [{{operation: {{hosts: ['svc{i}.bench'], methods: "
            f"[{method}], paths: ['/svc{i}/*']}}}}], when: [{{key: "
            f"'request.auth.claims[scope]', values: ['orders:read']}}]}}]}}"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- Envoy's own equivalent


def _payload_value(issuer: str, claim: str, value: dict[str, Any]) -> dict[str, Any]:
    matcher = {"filter": _JWT_FILTER, "path": [{"key": _META_KEY[issuer]}, {"key": claim}]}
    # The request's dynamic metadata (metadata_source defaults to DYNAMIC).
    return {"sourced_metadata": {"metadata_matcher": {**matcher, "value": value}}}


def _principal(issuer: str) -> dict[str, Any]:
    """``requestPrincipals: [issuer/*]``: a verified token from `issuer` that has a ``sub``."""
    return _payload_value(issuer, "sub", {"present_match": True})


def _claim_has(issuer: str, claim: str, value: str) -> dict[str, Any]:
    """``request.auth.claims[claim]`` matches `value`: the claim or one list element equals it."""
    return {
        "or_ids": {
            "ids": [
                _payload_value(issuer, claim, {"string_match": {"exact": value}}),
                _payload_value(
                    issuer, claim, {"list_match": {"one_of": {"string_match": {"exact": value}}}}
                ),
            ]
        }
    }


def _method_in(*methods: str) -> dict[str, Any]:
    headers = [{"header": {"name": ":method", "string_match": {"exact": m}}} for m in methods]
    return headers[0] if len(headers) == 1 else {"or_rules": {"rules": headers}}


def _path_prefix(prefix: str) -> dict[str, Any]:
    return {"url_path": {"path": {"prefix": prefix}}}


def _rbac(action: str, policies: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {"@type": _RBAC, "rules": {"action": action, "policies": policies}},
    }


def envoy_jwt_rbac_filters(jwks_a: str, jwks_b: str) -> list[dict[str, Any]]:
    """The reference configuration as Envoy ``jwt_authn`` + two ``rbac`` filters (DENY, ALLOW).

    As Istio: a missing token passes authentication, a bad one is 401; the token header is not
    forwarded; issuer A's sub/tenant/email are copied to headers; ``scope`` is split on spaces.
    """

    def provider(issuer: str, jwks: str, headers: list[tuple[str, str]]) -> dict[str, Any]:
        return {
            "issuer": issuer,
            "audiences": [AUDIENCE],
            "local_jwks": {"inline_string": jwks},
            "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
            "forward": False,
            "payload_in_metadata": _META_KEY[issuer],
            "normalize_payload_in_metadata": {"space_delimited_claims": ["scope"]},
            "claim_to_headers": [{"header_name": h, "claim_name": c} for h, c in headers],
        }

    jwt_authn = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": _JWT_AUTHN,
            "providers": {
                "issuer_a": provider(
                    ISSUER_A,
                    jwks_a,
                    [("x-user", "sub"), ("x-tenant", "tenant"), ("x-email", "email")],
                ),
                "issuer_b": provider(ISSUER_B, jwks_b, []),
            },
            "rules": [
                {
                    "match": {"prefix": "/"},
                    "requires": {
                        "requires_any": {
                            "requirements": [
                                {"provider_name": "issuer_a"},
                                {"provider_name": "issuer_b"},
                                {"allow_missing": {}},
                            ]
                        }
                    },
                }
            ],
        },
    }
    blocked = [
        _payload_value(issuer, "blocked", value)
        for issuer in (ISSUER_A, ISSUER_B)
        for value in ({"bool_match": True}, {"string_match": {"exact": "true"}})
    ]
    deny = _rbac(
        "DENY",
        {
            "deny-blocked-rule0": {
                "permissions": [{"any": True}],
                "principals": [{"or_ids": {"ids": blocked}}],
            },
            "deny-blocked-rule1": {
                "permissions": [_path_prefix("/internal/")],
                "principals": [{"any": True}],
            },
        },
    )
    allow = _rbac(
        "ALLOW",
        {
            "allow-api-rule0": {
                "permissions": [
                    {
                        "and_rules": {
                            "rules": [
                                _method_in("GET"),
                                {
                                    "or_rules": {
                                        "rules": [
                                            {"url_path": {"path": {"exact": "/healthz"}}},
                                            _path_prefix("/public/"),
                                        ]
                                    }
                                },
                            ]
                        }
                    }
                ],
                "principals": [{"any": True}],
            },
            "allow-api-rule1": {
                "permissions": [
                    {"and_rules": {"rules": [_method_in("GET"), _path_prefix("/partner/")]}}
                ],
                "principals": [_principal(ISSUER_B)],
            },
            "allow-api-rule2": {
                "permissions": [_path_prefix("/admin/")],
                "principals": [
                    {
                        "and_ids": {
                            "ids": [_principal(ISSUER_A), _claim_has(ISSUER_A, "groups", "admin")]
                        }
                    }
                ],
            },
            "allow-api-rule3": {
                "permissions": [
                    {"and_rules": {"rules": [_method_in("GET", "POST"), _path_prefix("/api/")]}}
                ],
                "principals": [
                    {
                        "and_ids": {
                            "ids": [
                                _principal(ISSUER_A),
                                _claim_has(ISSUER_A, "scope", "orders:read"),
                            ]
                        }
                    }
                ],
            },
        },
    )
    return [jwt_authn, deny, allow]


# ----------------------------------------------------------------------- direct gRPC requests


def check_request(
    token: str | None,
    *,
    host: str = HOST,
    path: str = PATH,
    method: str = "GET",
    credential_headers: Mapping[str, str] | None = None,
) -> bytes:
    """A serialized CheckRequest with the fields Envoy's ext_authz sends for an HTTP/1.1 GET:
    `token` as a bearer token (None: no Authorization), `credential_headers` besides."""
    ctx = attribute_context_pb2.AttributeContext

    def peer(port: int) -> Any:
        return ctx.Peer(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
            )
        )

    request_id = "5a1c7f0e-3b2d-4c8e-9f10-0123456789ab"
    headers = {
        ":authority": host,
        ":path": path,
        ":method": method,
        ":scheme": "http",
        "user-agent": "bench",
        "accept": "*/*",
        "authorization": f"Bearer {token}",
        "x-forwarded-proto": "http",
        "x-request-id": request_id,
        **(credential_headers or {}),
    }
    if token is None:
        del headers["authorization"]
    http = ctx.HttpRequest(
        id="1234567890123456789",
        method=method,
        headers=headers,
        path=path,
        host=host,
        scheme="http",
        protocol="HTTP/1.1",
    )
    request = ctx.Request(time=timestamp_pb2.Timestamp(seconds=int(time.time())), http=http)
    attributes = ctx(source=peer(40000), destination=peer(10000), request=request)
    return bytes(external_auth_pb2.CheckRequest(attributes=attributes).SerializeToString())


def grpc_frame(message: bytes) -> bytes:
    """`message` as one gRPC length-prefixed frame: no compression flag, 4-byte big-endian size."""
    return b"\x00" + len(message).to_bytes(4, "big") + message
