"""Explain one decision: what ``authz-server check`` and ``authz-server test`` print.

The decision is the one ``AuthorizationService.check`` makes, with a ``CheckTrace`` recording
its way there: the tokens found, what verifying each gave, and the identity the policies saw.
Each policy is then walked clause by clause with the very compiled clauses that decided
(``CompiledRule.misses``), so the explanation cannot tell another story than the decision.
Nothing here runs on the serving path.

The explanation never contains a token: a value the request had that holds one is redacted,
and claim values appear only when asked for (``show_claims``).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from authz_server import errors
from authz_server.attributes import RequestAttributes
from authz_server.config.load import Provider, Settings
from authz_server.credentials.extract import DEFAULT_LOCATIONS, FoundToken, TokenLocation
from authz_server.credentials.introspection import Introspector
from authz_server.credentials.jwt import ProviderRuntime, decode_segments
from authz_server.errors import AuthenticationError, AuthzError
from authz_server.identity import Identity
from authz_server.keys.sources import InlineSource
from authz_server.policy.compile import Clause, CompiledPolicy
from authz_server.service import AuthorizationService, CheckTrace, Engine

REDACTED = "(redacted: holds a token)"
# An identity header's value (claims, the payload) without show_claims.
HIDDEN = "(hidden: claims are shown only when asked for)"
# How the text form names a kind of credential (a JWT goes unnamed: the usual kind).
_CREDENTIAL_NAMES = {"introspection": "opaque token, introspected", "apiKey": "API key"}
# What the reasons that end a decision before the policies mean, for the text form.
_EARLY = "no policy was evaluated: the credentials decided"
# A token present is still verified (a bad one is 401), but none is asked for.
NO_POLICY = "no policy: every request is allowed, with or without credentials"


def request_attributes(
    *,
    method: str = "GET",
    host: str = "",
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    source_ip: str = "",
    context_extensions: Mapping[str, str] | None = None,
    destination_principal: str = "",
    scheme: str = "",
    client_certificate: str = "",
) -> RequestAttributes:
    """A request as ``check``, ``test`` and the Explain API describe one (``client_certificate``
    as Envoy sends it: URL-encoded PEM). Raises ValueError for a source address that is not an
    IP address (it would silently match no ipBlocks)."""
    if source_ip:
        try:
            ipaddress.ip_address(source_ip)
        except ValueError:
            raise ValueError(f"source_ip {source_ip!r} is not an IP address") from None
    return RequestAttributes(
        method=method.upper(),
        host=host,
        path=path,
        headers={name.lower(): value for name, value in (headers or {}).items()},
        source_ip=source_ip,
        context_extensions=dict(context_extensions or {}),
        destination_principal=destination_principal,
        scheme=scheme,
        client_certificate=client_certificate,
    )


def substitute_keys(
    engine: Engine, jwks: str, description: str, providers: Collection[str] | None = None
) -> None:
    """Verify tokens with the keys of the JWKS document ``jwks`` instead of each provider's
    own key source (every provider's, or those named), to decide without the IdP. Takes
    effect at the next refresh of each key cache. Providers of opaque tokens and API keys
    verify no JWT: they keep their own."""
    jwt = {p.name for p in engine.providers if p.provider.spec.kind == "jwt"}
    for cache in engine.caches.values():
        if cache.provider in jwt and (providers is None or cache.provider in providers):
            cache.source = InlineSource(jwks, description=description)


def substitute_introspection(
    engine: Engine,
    answers: Mapping[str, Mapping[str, Any]],
    providers: Collection[str] | None = None,
) -> None:
    """Decide opaque tokens without the IdP: every introspection provider (or those named)
    answers from ``answers`` (the introspection answer by token; others are inactive)."""
    for cache in engine.caches.values():
        if isinstance(cache.source, Introspector) and (
            providers is None or cache.provider in providers
        ):
            cache.source.answer_offline(answers)


def token_location(provider: Provider | None) -> TokenLocation:
    """Where ``provider`` reads a token first: its first ``fromHeaders``, else its first
    ``fromParams``, else its first ``fromCookies``, else ``Authorization: Bearer``."""
    spec = provider.spec if provider is not None else None
    if spec is not None and spec.from_headers:
        header = spec.from_headers[0]
        return TokenLocation("header", header.name.lower(), header.prefix)
    if spec is not None and spec.from_params:
        return TokenLocation("param", spec.from_params[0])
    if spec is not None and spec.from_cookies:
        return TokenLocation("cookie", spec.from_cookies[0])
    return DEFAULT_LOCATIONS[0]


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` a token names, read without verifying: only to know which provider it is
    for (where to put it, whose keys to load). None for a malformed token."""
    try:
        _, payload, _ = decode_segments(token)
    except AuthenticationError:
        return None
    issuer = payload.get("iss")
    return issuer if isinstance(issuer, str) else None


def provider_for_token(settings: Settings, token: str) -> Provider | None:
    """The provider a token is for, by the ``iss`` it names, or the only provider; None when
    neither tells."""
    issuer = unverified_issuer(token)
    named = [p for p in settings.providers if p.spec.issuer == issuer and p.spec.kind == "jwt"]
    if named:
        return named[0]
    # Not a JWT of ours: an opaque token, for the (first) introspection provider.
    opaque = [p for p in settings.providers if p.spec.kind == "introspection"]
    if opaque:
        return opaque[0]
    return settings.providers[0] if len(settings.providers) == 1 else None


def place_token(
    headers: Mapping[str, str], path: str, location: TokenLocation, token: str
) -> tuple[dict[str, str], str]:
    """``headers`` and ``path`` with ``token`` put where ``location`` says."""
    placed = dict(headers)
    if location.kind == "header":
        placed[location.name] = location.prefix + token
    elif location.kind == "param":
        path += ("&" if "?" in path else "?") + f"{quote(location.name)}={quote(token)}"
    else:
        cookie = f"{location.name}={token}"
        placed["cookie"] = f"{placed['cookie']}; {cookie}" if "cookie" in placed else cookie
    return placed, path


def _redact(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        return REDACTED if any(secret in value for secret in secrets) else value
    if isinstance(value, list):
        return [_redact(item, secrets) for item in value]
    if isinstance(value, dict):
        return {key: _redact(item, secrets) for key, item in value.items()}
    return value


def _jsonable(value: Any) -> Any:
    """A claim or attribute as JSON would carry it (tuples as lists, the rest as text)."""
    return json.loads(json.dumps(value, default=str))


def _miss(
    clause: Clause,
    request: RequestAttributes,
    identity: Identity | None,
    *,
    show_claims: bool,
    secrets: Sequence[str],
) -> dict[str, Any]:
    entry: dict[str, Any] = {"field": clause.field, "wanted": list(clause.wanted)}
    if clause.needs is not None and clause.needs in request.unknown:
        entry["unknown"] = clause.needs  # the door never received it: the clause failed closed
    elif clause.claim and not show_claims:
        entry["hidden"] = True
    else:
        entry["had"] = _redact(_jsonable(clause.observe(request, identity)), secrets)
    return entry


def _policy(
    policy: CompiledPolicy,
    request: RequestAttributes,
    identity: Identity | None,
    *,
    show_claims: bool,
    secrets: Sequence[str],
) -> dict[str, Any]:
    rules: list[dict[str, Any]] = []
    for number, rule in enumerate(policy.rules, start=1):
        misses = rule.misses(request, identity)
        entry: dict[str, Any] = {"rule": number, "matched": not misses}
        if misses:
            entry["failed"] = [
                _miss(m, request, identity, show_claims=show_claims, secrets=secrets)
                for m in misses
            ]
        rules.append(entry)
    return {
        "name": policy.name,
        "action": policy.action,
        "dry_run": policy.dry_run,
        "matched": any(r["matched"] for r in rules),
        "rules": rules,
    }


# ------------------------------------------------------------------ why a token was refused
#
# A 401 over the wire says little (``error_description`` is short and never echoes the
# token). Offline (``check``, ``test``) and to an operator (the Explain API), the facts of the
# caller's own token against the configuration are said: its iss and aud (shown), how its
# times stand against now and the skew (absolute times only with show_claims), its alg and
# kid against what is configured and loaded. Nothing here runs on the serving path.

# The ways an iss may differ from a configured issuer and still be "the same" to a person.
_ISSUER_SLIPS = {
    "a trailing slash": lambda value: value.rstrip("/"),
    "the scheme (http/https)": lambda value: value.split("://", 1)[-1],
    "letter case": str.lower,
}


def closest_issuer(issuer: str, configured: Sequence[str]) -> tuple[str, str] | None:
    """The configured issuer that ``issuer`` differs from only by a trailing slash, the
    scheme or letter case, and how it differs ("a trailing slash and letter case"); None
    when none is that close."""
    for size in range(1, len(_ISSUER_SLIPS) + 1):
        for slips in itertools.combinations(_ISSUER_SLIPS, size):

            def normal(value: str, slips: tuple[str, ...] = slips) -> str:
                for slip in slips:
                    value = _ISSUER_SLIPS[slip](value)
                return value

            for candidate in configured:
                if candidate != issuer and normal(candidate) == normal(issuer):
                    return candidate, " and ".join(slips)
    return None


def _span(seconds: float) -> str:
    """``seconds`` as 1h2m3s (whole seconds), or in days and hours beyond two days."""
    left = round(abs(seconds))
    if left >= 2 * 86400:
        return f"{left // 86400}d{left % 86400 // 3600}h"
    hours, left = divmod(left, 3600)
    minutes, left = divmod(left, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return text + (f"{left}s" if left or not text else "")


def _when(value: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))


def _time_facts(
    payload: Mapping[str, Any], provider: ProviderRuntime, now: float, *, show_claims: bool
) -> list[str]:
    """How exp, nbf and iat stand against now and the provider's clock skew."""
    facts = []
    for claim, late in (("exp", False), ("nbf", True), ("iat", True)):
        value = payload.get(claim)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        offset = float(value) - now
        if not late and offset + provider.clock_skew <= 0:
            where = f"{_span(offset)} before now: expired"
        elif late and offset - provider.clock_skew > 0:
            where = f"{_span(offset)} after now: not valid yet"
        else:
            continue
        shown = f" ({_when(float(value))}, now {_when(now)})" if show_claims else ""
        facts.append(
            f"{claim} is {where}{shown}, beyond the clock skew of {provider.name} "
            f"({_span(provider.clock_skew)})"
        )
    return facts


def _json_list(values: Collection[str]) -> str:
    return ", ".join(json.dumps(v) for v in sorted(values)) or "none"


def rejection_details(
    engine: Engine, found: FoundToken, error: AuthzError, *, show_claims: bool
) -> list[str]:
    """What was wrong with the token ``found`` that ``error`` rejected, as sentences: the
    facts of the caller's token against the configuration. The token itself never appears;
    of its claims only iss and aud are quoted unless ``show_claims``."""
    details = [error.detail] if error.detail else []
    if error.credential not in (None, "jwt"):
        return details  # an API key or an opaque token: nothing to read in it
    token = found.token
    if token[:7].lower() == "bearer ":
        details.append(
            "the token starts with 'Bearer ': a token file (or a case's token) holds the "
            "token alone; the prefix is added where the provider reads it"
        )
        token = token[7:]
    try:
        header, payload, _ = decode_segments(token.strip())
    except AuthenticationError:
        return details
    issuer = payload.get("iss")
    configured = {p.issuer: p.name for p in found.providers}
    provider = next((p for p in found.providers if p.issuer == issuer), None)
    if provider is None and error.reason != errors.INVALID_ISSUER:
        return details  # refused before its issuer mattered (too long, say)
    if provider is None:
        listed = ", ".join(f"{json.dumps(i)} ({n})" for i, n in configured.items()) or "none"
        if not isinstance(issuer, str):
            details.append(f"the token has no iss (a string); issuers read here: {listed}")
            return details
        details.append(
            f"the token's iss {json.dumps(issuer)} is none of the issuers read here: {listed}"
        )
        close = closest_issuer(issuer, list(configured))
        if close is not None:
            details.append(
                f"closest: {json.dumps(close[0])} ({configured[close[0]]}), which differs "
                f"only by {close[1]}"
            )
        return details
    reason = error.reason
    if reason == errors.INVALID_AUDIENCE:
        aud = payload.get("aud")
        had = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        details.append(
            f"the token's aud [{_json_list([str(a) for a in had])}] is none of the audiences "
            f"{provider.name} accepts: [{_json_list(provider.audiences)}]"
        )
    elif reason in (errors.TOKEN_EXPIRED, errors.TOKEN_NOT_YET_VALID):
        details.extend(_time_facts(payload, provider, engine.clock(), show_claims=show_claims))
    elif reason == errors.UNSUPPORTED_ALGORITHM:
        details.append(
            f"the token's alg {json.dumps(str(header.get('alg')))}; {provider.name} allows "
            f"{', '.join(sorted(provider.algorithms))}"
        )
    elif reason == errors.UNKNOWN_KID:
        keyset = provider.keys.keyset
        kids = sorted(keyset.by_kid) if keyset is not None else []
        details.append(
            f"the token's kid {json.dumps(header.get('kid'))} is none of the key ids "
            f"{provider.name}'s key set has: {', '.join(kids) or 'none'}"
        )
    return details


def _tokens(engine: Engine, trace: CheckTrace, *, show_claims: bool) -> list[dict[str, Any]]:
    outcomes = {id(found): outcome for found, outcome in trace.tokens}
    entries: list[dict[str, Any]] = []
    for found in trace.found:
        entry: dict[str, Any] = {
            "location": found.location.describe(),
            "providers": [p.name for p in found.providers],
        }
        outcome = outcomes.get(id(found))
        if outcome is None:
            entry["result"] = "not tried"
        elif isinstance(outcome, AuthzError):
            entry["result"] = "rejected"
            entry["error"] = outcome.reason
            if outcome.description:
                entry["description"] = outcome.description
            if outcome.provider is not None:
                entry["provider"] = outcome.provider
                entry["credential"] = outcome.credential
            details = rejection_details(engine, found, outcome, show_claims=show_claims)
            if details:
                entry["details"] = details
        else:
            entry["result"] = "verified"
            entry["provider"] = outcome.provider
            entry["credential"] = outcome.credential
            entry["principal"] = outcome.principal
            if show_claims:
                entry["claims"] = _jsonable(dict(outcome.claims))
        entries.append(entry)
    return entries


def _workload(engine: Engine, trace: CheckTrace) -> dict[str, Any] | None:
    """Which workload the request was scoped to (None when no workloads are declared)."""
    if engine.workload_index is None:
        return None
    scope = trace.scope
    if scope is None:
        return {
            "name": None,
            "unknown": "deny",
            "policies_in_scope": [],
            "providers_in_scope": [],
        }
    groups = (scope.policies.deny, scope.policies.allow, scope.policies.audit)
    names = [p.name for group in (*groups, scope.policies.dry_run) for p in group]
    return {
        "name": scope.workload,
        "unknown": None if scope.workload is not None else "allPolicies",
        "policies_in_scope": names,
        "providers_in_scope": sorted(scope.providers)
        if scope.providers is not None
        else [p.name for p in engine.providers],
    }


def explain(
    engine: Engine, request: RequestAttributes, *, show_claims: bool = False
) -> dict[str, Any]:
    """The decision for ``request`` under ``engine``, with the way it was reached."""
    trace = CheckTrace()
    decision = AuthorizationService(engine).check(request, trace=trace)
    secrets = [found.token for found in trace.found]
    identity = trace.identity
    # The policies in the request's scope (every policy when no workloads are declared).
    policies = trace.scope.policies if trace.scope is not None else engine.policies
    traced: list[dict[str, Any]] = []
    if trace.policies_evaluated:
        for group in (policies.deny, policies.allow, policies.audit, policies.dry_run):
            for policy in group:
                entry = _policy(policy, request, identity, show_claims=show_claims, secrets=secrets)
                entry["decided"] = policy.name == decision.policy and not (
                    policy.dry_run or policy.action == "AUDIT"
                )
                traced.append(entry)
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
        "workload": _workload(engine, trace),
        "tokens": _tokens(engine, trace, show_claims=show_claims),
        "policies_evaluated": trace.policies_evaluated,
        # None in scope when an unknown workload was denied before any policy.
        "enforced_allow_policies": len(policies.allow) if trace.scope is not None else 0,
        "policies": traced,
        # Said in words when no policy applies: a token is not even asked for.
        "note": NO_POLICY if trace.policies_evaluated and not traced else "",
        "audited": list(decision.audited),
        "dry_run": dict(decision.dry_run),
        # Identity headers carry claims (outputClaimToHeaders, the whole payload).
        "headers_to_set": _redact(dict(decision.headers_to_set), secrets)
        if show_claims
        else dict.fromkeys(dict(decision.headers_to_set), HIDDEN),
        "headers_to_remove": list(decision.headers_to_remove),
        "query_params_to_remove": list(decision.query_params_to_remove),
        "response_headers": dict(decision.response_headers),
    }


# ------------------------------------------------------------------------------ text form


def _value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def describe_miss(miss: Mapping[str, Any]) -> str:
    """One failing clause as a line: the field, what it wanted, what the request had."""
    wanted = ", ".join(_value(v) for v in miss["wanted"])
    if "unknown" in miss:
        had = f"unknown ({miss['unknown']} is not sent to the HTTP door: fails closed)"
    elif miss.get("hidden"):
        had = "(a claim: --show-claims to see it)"
    elif miss.get("had") is None:
        had = "nothing"
    else:
        had = _value(miss["had"])
    verb = "wants none of" if ".not" in miss["field"] else "wants"
    return f"{miss['field']} {verb} [{wanted}], request had {had}"


def render_text(result: Mapping[str, Any]) -> str:
    """The compact form: the decision, each token, one line per policy with the failing
    clause of each rule beneath."""
    lines = [
        f"{result['decision'].upper()} {result['status']} {result['reason']}"
        + (f" (policy {result['policy']})" if result["policy"] else "")
    ]
    request = result["request"]
    lines.append(f"request: {request['method']} {request['host'] or '-'} {request['path']}")
    workload = result.get("workload")
    if workload is not None:
        if workload["name"] is not None:
            in_scope = ", ".join(workload["policies_in_scope"]) or "none"
            lines.append(f"workload: {workload['name']} (policies in scope: {in_scope})")
        else:
            lines.append(
                f"workload: not recognised (scoping.unknownWorkload: {workload['unknown']})"
            )
    if not result["tokens"]:
        lines.append("token: none found")
    for token in result["tokens"]:
        providers = ", ".join(token["providers"])
        outcome = token["result"]
        kind = _CREDENTIAL_NAMES.get(token.get("credential") or "jwt")
        by = f"{token.get('provider')}" + (f" ({kind})" if kind else "")
        if outcome == "verified":
            outcome = f"verified by {by}: {token['principal']}"
        elif outcome == "rejected" and "provider" in token:
            outcome = f"rejected by {by}: {token['error']}"
        elif outcome == "rejected":
            outcome = f"rejected: {token['error']}"
            if token.get("description"):
                # Which check failed (a DPoP proof's htm, htu, iat, ...): the reason alone
                # does not say.
                outcome += f" ({token['description']})"
        lines.append(f"token: {token['location']} (providers {providers}): {outcome}")
        lines.extend(f"    {detail}" for detail in token.get("details", ()))
        for name, value in (token.get("claims") or {}).items():
            lines.append(f"    claim {name} = {_value(value)}")
    if not result["policies_evaluated"]:
        lines.append(_EARLY)
    for policy in result["policies"]:
        kind = policy["action"] + (" dry-run" if policy["dry_run"] else "")
        state = "matched" if policy["matched"] else "not matched"
        if policy["decided"]:
            state += " -> decided"
        lines.append(f"  {kind:<7} {policy['name']}: {state}")
        for rule in policy["rules"]:
            if rule["matched"]:
                lines.append(f"      rule {rule['rule']}: matched")
                continue
            failed = rule["failed"]
            first, *others = failed
            lines.append(f"      rule {rule['rule']}: {describe_miss(first)}")
            lines.extend(f"          or {describe_miss(m)}" for m in others)
        if not policy["rules"]:
            lines.append("      (no rules: matches nothing)")
    if result.get("note"):
        lines.append(result["note"])
    for name, value in result["headers_to_set"].items():
        lines.append(f"upstream header {name}: {value}")
    return "\n".join(lines)
