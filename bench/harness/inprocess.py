"""What the in-process scenarios share: one realistic configuration, a CheckRequest, and the
interleaved timing loop."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

ISSUER = "https://issuer.bench"
AUDIENCE = "bench"


def bench_config(
    *,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    jwks_file: str = "jwks.json",
    server: str = "{}",
    extra_providers: str = "",
    paths: Sequence[str] = ("/api/*",),
) -> str:
    """A configuration like a real one: one provider with output headers, a DENY policy and an
    ALLOW policy with a principal, an operation and a claim condition."""
    return f"""
apiVersion: authz-server/v1
kind: AuthzConfig
server: {server}
providers:
  - name: main
    issuer: {issuer}
    audiences: [{audience}]
    jwksFile: {jwks_file}
    outputClaimToHeaders: [{{header: x-user, claim: sub}}, {{header: x-groups, claim: groups}}]
{extra_providers}
policies:
  - name: deny-internal
    action: DENY
    rules: [{{to: [{{operation: {{paths: ["/internal/*"]}}}}]}}]
  - name: read
    rules:
      - from: [{{source: {{requestPrincipals: ["{issuer}/*"]}}}}]
        to: [{{operation: {{methods: ["GET"], paths: {json.dumps(list(paths))}}}}}]
        when: [{{key: "request.auth.claims[groups]", values: ["dev", "admin"]}}]
"""


Variant = tuple[str, Callable[[], object]]


def interleaved(variants: list[Variant], calls: int, rounds: int) -> dict[str, float]:
    """Best per-call CPU seconds of each variant; each round runs every variant once, so noise
    from the shared machine falls on all of them alike."""
    best = {name: float("inf") for name, _ in variants}
    for _ in range(rounds):
        for name, fn in variants:
            cpu0 = time.process_time()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.process_time() - cpu0) / calls)
    return best


def check_request(key: Any) -> Any:
    """A CheckRequest as Envoy sends it: GET /api/orders with a fresh token signed by ``key``
    that the bench configuration allows."""
    token = key.sign(
        {
            "iss": ISSUER,
            "sub": "alice",
            "aud": AUDIENCE,
            "exp": int(time.time()) + 3600,
            "groups": ["dev"],
        }
    )
    ctx = attribute_context_pb2.AttributeContext
    http = ctx.HttpRequest(
        method="GET",
        host="api.bench",
        path="/api/orders?page=2",
        headers={"authorization": f"Bearer {token}", "user-agent": "bench", "x-request-id": "abc"},
    )
    return external_auth_pb2.CheckRequest(attributes=ctx(request=ctx.Request(http=http)))
