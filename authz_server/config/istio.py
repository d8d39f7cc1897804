"""Istio's security documents (``security.istio.io``), translated into specs.

- ``kind: RequestAuthentication``: each ``spec.jwtRules`` entry becomes a ``ProviderSpec``
  (``request_authentication``).
- ``kind: AuthorizationPolicy``: becomes a ``PolicySpec`` named ``namespace/name``
  (``authorization_policy``); a bare service account name is qualified with the namespace.
- ``istio_scope``: where an object applies (namespace, ``selector``, ``targetRef(s)``), as Istio
  reads them.

Each function appends to ``problems`` (naming document and field path) rather than raising, so
that ``config.load`` reports every problem at once.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

from pydantic import ValidationError

from authz_server.config.specs import (
    CUSTOM_REFUSED,
    Document,
    FoundProvider,
    PolicySpec,
    ProviderSpec,
    problems_from,
)
from authz_server.errors import ConfigProblem
from authz_server.policy.workloads import IstioScope, TargetRef

ISTIO_SECURITY_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")

# Mesh YAML often sits next to the policies; these kinds are not about requests.
MESH_KINDS_IGNORED = frozenset({"PeerAuthentication"})

_ISTIO_JWT_RULE_FIELDS = frozenset(
    {
        "issuer",
        "audiences",
        "jwksUri",
        "jwks_uri",
        "jwks",
        "fromHeaders",
        "fromParams",
        "fromCookies",
        "outputPayloadToHeader",
        "forwardOriginalToken",
        "outputClaimToHeaders",
        "timeout",
        "spaceDelimitedClaims",
        "presence",
    }
)


def istio_name(body: dict[str, Any]) -> str | None:
    """``namespace/name`` (or ``name``) of an Istio object, None without a usable name."""
    meta = body.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        return None
    namespace = meta.get("namespace")
    return f"{namespace}/{meta['name']}" if namespace else str(meta["name"])


def _istio_meta(doc: Document, problems: list[ConfigProblem], warnings: list[str]) -> str | None:
    """Check the envelope of an Istio object; return its ``namespace/name`` or None if unusable."""
    body = doc.body
    name = istio_name(body)
    if name is None:
        problems.append(ConfigProblem(doc.label, "metadata.name", "required"))
        return None
    if "spec" not in body:
        problems.append(ConfigProblem(doc.label, "spec", "required"))
        return None
    spec = body["spec"]
    if spec is None:
        spec = {}
        body["spec"] = spec
    if not isinstance(spec, dict):
        problems.append(ConfigProblem(doc.label, "spec", "must be a mapping"))
        return None
    extra = set(body) - {"apiVersion", "kind", "metadata", "spec", "status"}
    for key in sorted(extra):
        problems.append(ConfigProblem(doc.label, key, "unknown field"))
    return name


# The fields of an Istio object that say where it applies.
SCOPE_FIELDS = ("selector", "targetRef", "targetRefs")


def istio_scope(doc: Document, problems: list[ConfigProblem]) -> IstioScope:
    """Where an Istio object applies: its namespace, ``selector.matchLabels``, target refs."""
    meta, spec = doc.body["metadata"], doc.body["spec"]
    namespace = meta.get("namespace")
    match_labels: dict[str, str] | None = None
    selector = spec.get("selector")
    if selector is not None:
        labels = selector.get("matchLabels") if isinstance(selector, dict) else None
        if (
            not isinstance(selector, dict)
            or set(selector) - {"matchLabels"}
            or not isinstance(labels, dict | None)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in (labels or {}).items())
        ):
            problems.append(
                ConfigProblem(doc.label, "spec.selector", "expected {matchLabels: {label: value}}")
            )
        elif labels:
            match_labels = dict(labels)
    raw_refs: list[tuple[str, object]] = []
    if "targetRef" in spec:
        raw_refs.append(("spec.targetRef", spec["targetRef"]))
    if "targetRefs" in spec:
        listed = spec["targetRefs"]
        if isinstance(listed, list):
            raw_refs.extend((f"spec.targetRefs[{i}]", ref) for i, ref in enumerate(listed))
        else:
            problems.append(ConfigProblem(doc.label, "spec.targetRefs", "must be a list"))
    refs: list[TargetRef] = []
    for path, ref in raw_refs:
        if (
            not isinstance(ref, dict)
            or not isinstance(ref.get("kind"), str)
            or not isinstance(ref.get("name"), str)
            or not isinstance(ref.get("namespace", ""), str)
        ):
            problems.append(ConfigProblem(doc.label, path, "expected {kind, name[, namespace]}"))
            continue
        refs.append(TargetRef(ref["kind"], ref["name"], ref.get("namespace") or None))
    return IstioScope(
        namespace if isinstance(namespace, str) and namespace else None, match_labels, tuple(refs)
    )


def request_authentication(
    doc: Document, problems: list[ConfigProblem], warnings: list[str]
) -> list[FoundProvider]:
    """The providers of a RequestAuthentication, one per valid ``spec.jwtRules`` entry."""
    if _istio_meta(doc, problems, warnings) is None:
        return []
    spec = doc.body["spec"]
    for key in sorted(set(spec) - {"jwtRules", "selector", "targetRef", "targetRefs"}):
        problems.append(ConfigProblem(doc.label, f"spec.{key}", "unknown field"))
    rules = spec.get("jwtRules") or []
    if not isinstance(rules, list):
        problems.append(ConfigProblem(doc.label, "spec.jwtRules", "must be a list"))
        return []
    out = []
    for i, rule in enumerate(rules):
        prefix = f"spec.jwtRules[{i}]"
        if not isinstance(rule, dict):
            problems.append(ConfigProblem(doc.label, prefix, "must be a mapping"))
            continue
        unknown = sorted(set(rule) - _ISTIO_JWT_RULE_FIELDS)
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(_ISTIO_JWT_RULE_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(ConfigProblem(doc.label, f"{prefix}.{key}", f"unknown field{hint}"))
        if unknown:
            continue
        fields = dict(rule)
        if "jwks_uri" in fields:
            if "jwksUri" in fields:
                problems.append(
                    ConfigProblem(doc.label, prefix, "only one of jwks_uri or jwksUri can be set")
                )
                continue
            fields["jwksUri"] = fields.pop("jwks_uri")
        if "jwksUri" not in fields and "jwks" not in fields:
            fields["discovery"] = True  # Istio finds the keys through OIDC discovery
        try:
            out.append((ProviderSpec.model_validate(fields), doc.label, prefix, doc.base_dir))
        except ValidationError as exc:
            problems.extend(problems_from(exc, doc.label, prefix))
    return out


def authorization_policy(
    doc: Document, problems: list[ConfigProblem], warnings: list[str]
) -> PolicySpec | None:
    """The policy an AuthorizationPolicy stands for; None if it has a problem."""
    name = _istio_meta(doc, problems, warnings)
    if name is None:
        return None
    spec = dict(doc.body["spec"])
    if spec.get("action") == "CUSTOM" or "provider" in spec:
        problems.append(ConfigProblem(doc.label, "spec.action", CUSTOM_REFUSED))
        return None
    for scope_field in SCOPE_FIELDS:
        spec.pop(scope_field, None)
    # NOTE: name and dry run come from metadata, the scope from namespace and selector;
    # PolicySpec would also take them from spec.
    for key in sorted(set(spec) & {"name", "dryRun", "dry_run", "appliesTo", "applies_to"}):
        problems.append(ConfigProblem(doc.label, f"spec.{key}", "unknown field"))
        spec.pop(key)
    meta = doc.body["metadata"]
    annotations = meta.get("annotations")
    if not isinstance(annotations, dict):
        annotations = {}
    dry_run = str(annotations.get("istio.io/dry-run", "false")).lower() == "true"
    namespace = meta.get("namespace")
    if isinstance(namespace, str) and namespace:
        _qualify_service_accounts(spec, namespace)
    try:
        return PolicySpec.model_validate({"name": name, "dryRun": dry_run, **spec})
    except ValidationError as exc:
        problems.extend(problems_from(exc, doc.label, "spec"))
        return None


def _qualify_service_accounts(spec: dict[str, Any], namespace: str) -> None:
    """Istio reads a bare service account name as one in the policy's own namespace."""
    rules = spec.get("rules")
    if not isinstance(rules, list):
        return
    spec["rules"] = rules = copy.deepcopy(rules)  # leave the document as it was read
    for rule in rules:
        froms = rule.get("from") if isinstance(rule, dict) else None
        for entry in froms if isinstance(froms, list) else []:
            source = entry.get("source") if isinstance(entry, dict) else None
            if not isinstance(source, dict):
                continue
            for key in ("serviceAccounts", "notServiceAccounts"):
                values = source.get(key)
                if isinstance(values, list):
                    source[key] = [
                        f"{namespace}/{v}" if isinstance(v, str) and v and "/" not in v else v
                        for v in values
                    ]
