"""Explain one decision offline: what ``authz-server check`` prints.

The decision comes from the same ``AuthorizationService`` the server runs; the explanation
adds what a reader needs to understand it: where a token was found, who it names, and which
policies matched. It never contains the token.
"""

from __future__ import annotations

from typing import Any

from authz_server.attributes import RequestAttributes
from authz_server.errors import AuthzError
from authz_server.service import AuthorizationService, Engine
from authz_server.tokens import Identity


def _identity(
    engine: Engine, request: RequestAttributes
) -> tuple[Identity | None, list[dict[str, Any]]]:
    tokens: list[dict[str, Any]] = []
    identity: Identity | None = None
    for found in engine.extractor.extract(request):
        entry: dict[str, Any] = {
            "location": found.location.describe(),
            "providers": [p.name for p in found.providers],
        }
        try:
            verified = engine.verifier.verify(found.token, found.providers, found.scope)
        except AuthzError as exc:
            entry["error"] = exc.reason
        else:
            entry["principal"] = verified.principal
            entry["provider"] = verified.provider
            identity = identity or verified
        tokens.append(entry)
    return identity, tokens


def explain(engine: Engine, request: RequestAttributes) -> dict[str, Any]:
    """The decision for ``request`` under ``engine``, with the reasons behind it."""
    decision = AuthorizationService(engine).check(request)
    identity, tokens = _identity(engine, request)
    policies = engine.policies
    matched = {
        kind: [p.name for p in group if p.matches(request, identity)]
        for kind, group in (
            ("deny", policies.deny),
            ("allow", policies.allow),
            ("audit", policies.audit),
            ("dry_run", policies.dry_run),
        )
    }
    return {
        "decision": "allow" if decision.allowed else "deny",
        "status": decision.status,
        "reason": decision.reason,
        "policy": decision.policy,
        "provider": decision.provider,
        "principal": decision.principal,
        "request": {
            "method": request.method,
            "host": request.host,
            "path": request.normalized_path,
        },
        "tokens": tokens,
        "policies_matched": matched,
        "enforced_allow_policies": len(policies.allow),
        "dry_run": dict(decision.dry_run),
        "headers_to_set": dict(decision.headers_to_set),
        "headers_to_remove": list(decision.headers_to_remove),
        "response_headers": dict(decision.response_headers),
    }
