"""Configuration loading: one YAML stream (a file, or a directory of ``*.yaml``) mixing three kinds.

- ``kind: AuthzConfig`` (``apiVersion: authz-server/v1``): ``server``, ``providers``, ``policies``,
  and ``workloads`` with ``scoping`` and ``istio`` (see ``workloads``: which policies apply where).
- ``kind: RequestAuthentication`` (``security.istio.io/v1`` or ``v1beta1``): each ``jwtRules``
  entry becomes a provider.
- ``kind: AuthorizationPolicy`` (``security.istio.io/v1`` or ``v1beta1``): becomes a policy.

The fields each kind may hold are in ``specs``; the translation of Istio's kinds is in ``istio``.
This module reads the stream, checks what crosses documents (duplicate names, local key and TLS
files, scoping) and builds the results, ``Provider`` and ``Settings``.

``load(path)`` returns ``Settings`` or raises ``ConfigError`` listing every problem with its
document, field path and reason. Nothing here touches the network.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from authz_server.config.istio import (
    ISTIO_SECURITY_VERSIONS,
    MESH_KINDS_IGNORED,
    SCOPE_FIELDS,
    authorization_policy,
    istio_name,
    istio_scope,
    request_authentication,
)
from authz_server.config.specs import (
    NATIVE_API_VERSION,
    AuthzConfigDoc,
    Document,
    FoundProvider,
    IstioSpec,
    PolicySpec,
    ProviderSpec,
    ScopingSpec,
    ServerSpec,
    WorkloadSpec,
    problems_from,
)
from authz_server.credentials.apikeys import KeysFileError, parse_keys_file
from authz_server.doors.envoy_headers import RESERVED_HEADERS
from authz_server.errors import ConfigError, ConfigProblem
from authz_server.ops.tls import TlsFileError, read_material
from authz_server.policy.workloads import (
    IstioScope,
    NativeScope,
    Workload,
    client_chosen_scopes,
    istio_selection,
    native_selection,
    workload_problems,
)

# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Provider:
    """A provider ready for the verifier: its spec, a unique name and its resolved key source."""

    spec: ProviderSpec
    name: str
    origin: str  # "document: path" of the spec, for error messages and logs
    jwks_file: Path | None = None
    ca_file: Path | None = None
    shared_secret_file: Path | None = None
    # Introspection's client secret and the API keys file, resolved.
    client_secret_file: Path | None = None
    api_keys_file: Path | None = None
    # The DPoP nonce secret (dpop.nonceSecretFile), resolved.
    nonce_secret_file: Path | None = None


@dataclass(frozen=True)
class Settings:
    """A fully validated configuration."""

    server: ServerSpec
    providers: tuple[Provider, ...]
    policies: tuple[PolicySpec, ...]
    warnings: tuple[str, ...] = ()
    digest: str = ""
    sources: tuple[str, ...] = field(default_factory=tuple)
    # Scoping (on when workloads are declared): the workloads, and for each policy and
    # provider that does not apply everywhere, the names of the workloads it applies to.
    workloads: tuple[Workload, ...] = ()
    unknown_workload: Literal["deny", "allPolicies"] = "deny"
    policy_scopes: dict[str, frozenset[str]] = field(default_factory=dict)
    provider_scopes: dict[str, frozenset[str]] = field(default_factory=dict)


# ------------------------------------------------------------------------------- loading


def _config_files(path: Path) -> list[Path]:
    if path.is_dir():
        # NOTE: Kubernetes ConfigMap mounts hold `..data`-style hidden entries; skip dotfiles.
        return sorted(
            p
            for p in path.iterdir()
            if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
        )
    return [path]


def _read_documents(path: Path, problems: list[ConfigProblem]) -> Iterator[tuple[Document, bytes]]:
    if not path.exists():
        problems.append(ConfigProblem(str(path), "", "no such file or directory"))
        return
    files = _config_files(path)
    if not files:
        problems.append(ConfigProblem(str(path), "", "no *.yaml files in this directory"))
    for file in files:
        raw = file.read_bytes()
        try:
            bodies = list(yaml.safe_load_all(raw))
        except yaml.YAMLError as exc:
            problems.append(ConfigProblem(str(file), "", f"not valid YAML: {exc}"))
            continue
        for index, body in enumerate(bodies):
            if body is None:
                continue
            label = f"{file}#{index}"
            if not isinstance(body, dict):
                problems.append(ConfigProblem(label, "", "a document must be a mapping"))
                continue
            kind = body.get("kind")
            meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
            name = meta.get("name") if isinstance(meta, dict) else None
            label = f"{file}#{index} ({kind}{'/' + str(name) if name else ''})"
            yield Document(label, file.parent, body), raw


def _resolve_file(
    value: str | None,
    *,
    field_name: str,
    document: str,
    prefix: str,
    base_dir: Path,
    problems: list[ConfigProblem],
) -> tuple[Path | None, bool]:
    if value is None:
        return None, True
    path = Path(value)
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        problems.append(ConfigProblem(document, f"{prefix}.{field_name}", f"no such file: {path}"))
        return None, False
    return path, True


def _resolve_provider(
    spec: ProviderSpec, document: str, prefix: str, base_dir: Path, problems: list[ConfigProblem]
) -> tuple[dict[str, Path | None], bool]:
    """Check the provider's local files and inline keys; return (resolved paths, ok)."""
    ok = True
    if spec.jwks is not None:
        try:
            parsed = json.loads(spec.jwks)
        except json.JSONDecodeError as exc:
            problems.append(ConfigProblem(document, f"{prefix}.jwks", f"not valid JSON: {exc}"))
            ok = False
        else:
            if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
                problems.append(
                    ConfigProblem(
                        document, f"{prefix}.jwks", 'must be a JSON object {"keys": [...]}'
                    )
                )
                ok = False
            elif not parsed["keys"]:
                problems.append(
                    ConfigProblem(
                        document,
                        f"{prefix}.jwks",
                        "holds no keys: this provider could never verify a token "
                        "(and the server would never be ready)",
                    )
                )
                ok = False
    paths: dict[str, Path | None] = {}
    for attr, field_name in (
        ("jwks_file", "jwksFile"),
        ("ca_file", "caFile"),
        ("shared_secret_file", "sharedSecretFile"),
    ):
        paths[attr], found = _resolve_file(
            getattr(spec, attr),
            field_name=field_name,
            document=document,
            prefix=prefix,
            base_dir=base_dir,
            problems=problems,
        )
        ok = ok and found
    for attr, field_name, value in (
        (
            "client_secret_file",
            "introspection.clientSecretFile",
            spec.introspection.client_secret_file if spec.introspection else None,
        ),
        ("api_keys_file", "apiKeys.file", spec.api_keys.file if spec.api_keys else None),
        ("nonce_secret_file", "dpop.nonceSecretFile", spec.dpop.nonce_secret_file),
    ):
        paths[attr], found = _resolve_file(
            value,
            field_name=field_name,
            document=document,
            prefix=prefix,
            base_dir=base_dir,
            problems=problems,
        )
        ok = ok and found
    ok = _check_opaque_files(spec, paths, document, prefix, problems) and ok
    ca_file = paths["ca_file"]
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (ssl.SSLError, OSError) as exc:
            problems.append(
                ConfigProblem(document, f"{prefix}.caFile", f"not a usable CA bundle: {exc}")
            )
            ok = False
    nonce_secret = paths["nonce_secret_file"]
    if nonce_secret is not None and len(nonce_secret.read_bytes().strip()) < 32:
        problems.append(
            ConfigProblem(
                document,
                f"{prefix}.dpop.nonceSecretFile",
                "the secret must be at least 32 bytes (nonces derived from it must be unguessable)",
            )
        )
        ok = False
    secret = paths["shared_secret_file"]
    if secret is not None and len(secret.read_bytes().strip()) < 32:
        problems.append(
            ConfigProblem(
                document,
                f"{prefix}.sharedSecretFile",
                "the secret must be at least 32 bytes (RFC 7518 3.2)",
            )
        )
        ok = False
    return paths, ok


def _check_opaque_files(
    spec: ProviderSpec,
    paths: dict[str, Path | None],
    document: str,
    prefix: str,
    problems: list[ConfigProblem],
) -> bool:
    """The introspection client secret is not empty; the keys file is a valid keys file
    (each problem with its place in the file). Returns whether both are fine."""
    ok = True
    secret = paths.get("client_secret_file")
    if secret is not None and not secret.read_bytes().strip():
        problems.append(
            ConfigProblem(document, f"{prefix}.introspection.clientSecretFile", "the file is empty")
        )
        ok = False
    keys_file = paths.get("api_keys_file")
    if keys_file is not None:
        try:
            parse_keys_file(keys_file.read_bytes(), provider="", issuer=spec.issuer)
        except KeysFileError as exc:
            problems.extend(
                ConfigProblem(
                    document,
                    f"{prefix}.apiKeys.file",
                    f"{keys_file}: {where + ': ' if where else ''}{message}",
                )
                for where, message in exc.problems
            )
            ok = False
    return ok


def _opaque_location_problems(providers: list[FoundProvider]) -> list[ConfigProblem]:
    """A location read by two introspection or API keys providers is refused: trying them in
    turn would hand one party's tokens (or keys) to another party's endpoint, and which answer
    decides would depend on the order."""
    readers: dict[tuple[str, str, str], tuple[str, str]] = {}
    problems: list[ConfigProblem] = []
    for spec, document, prefix, _ in providers:
        if spec.kind == "jwt":
            continue
        for kind, name, location_prefix in spec.locations():
            location = (kind, name, location_prefix.lower())
            first = readers.get(location)
            if first is None:
                readers[location] = (spec.name or spec.issuer, f"{document}: {prefix}")
                continue
            problems.append(
                ConfigProblem(
                    document,
                    prefix,
                    f"{kind} {name!r} is read by another introspection or apiKeys provider "
                    f"({first[0]!r}, {first[1]}): give each its own header, parameter or "
                    "cookie",
                )
            )
    return problems


def _reserved_header_problems(providers: list[FoundProvider]) -> list[ConfigProblem]:
    """With ``httpAuthz.attributeHeaders``, a provider may neither read its credential from nor
    write identity into an x-authz-* header: Envoy overwrites those on every request to the HTTP
    door with the connection's attributes."""
    problems: list[ConfigProblem] = []
    for spec, document, prefix, _ in providers:
        named = [(f"fromHeaders[{i}].name", h.name) for i, h in enumerate(spec.from_headers)]
        named += [
            (f"outputClaimToHeaders[{i}].header", h.header)
            for i, h in enumerate(spec.output_claim_to_headers)
        ]
        if spec.output_payload_to_header:
            named.append(("outputPayloadToHeader", spec.output_payload_to_header))
        problems.extend(
            ConfigProblem(
                document,
                f"{prefix}.{field_path}",
                f"{header!r} is reserved while server.httpAuthz.attributeHeaders is on: Envoy "
                "sets it to a connection attribute on every request to the HTTP door",
            )
            for field_path, header in named
            if header.lower() in RESERVED_HEADERS
        )
    return problems


# TlsFiles attribute -> the field's name in the configuration.
_TLS_FIELDS = {"cert_file": "certFile", "key_file": "keyFile", "client_ca_file": "clientCaFile"}


def _resolve_server_tls(
    server: ServerSpec, doc: Document, problems: list[ConfigProblem]
) -> ServerSpec:
    """``server`` with its TLS file paths made absolute (relative ones are read from the
    document's directory), after checking that the files hold a usable certificate, key and CA
    bundle; each problem names its field."""
    if server.tls is None:
        return server
    absolute = {
        attr: str((doc.base_dir / value).absolute())
        for attr in _TLS_FIELDS
        if (value := getattr(server.tls, attr)) is not None
    }
    tls = server.tls.model_copy(update=absolute)
    try:
        read_material(tls.files())
    except TlsFileError as exc:
        problems.extend(
            ConfigProblem(doc.label, f"server.tls.{_TLS_FIELDS[attr]}", message)
            for attr, message in exc.problems
        )
    return server.model_copy(update={"tls": tls})


def _resolve_replay_cache(
    server: ServerSpec, doc: Document, problems: list[ConfigProblem]
) -> ServerSpec:
    """``server`` with the replay cache's Redis files (password, CA) made absolute, after
    checking they can be read; each problem names its field."""
    redis = server.replay_cache.redis
    if redis is None:
        return server
    absolute: dict[str, str] = {}
    for attr, field_name in (("password_file", "passwordFile"), ("ca_file", "caFile")):
        value = getattr(redis, attr)
        if value is None:
            continue
        path = (doc.base_dir / value).absolute()
        if not path.is_file():
            problems.append(
                ConfigProblem(
                    doc.label, f"server.replayCache.redis.{field_name}", f"no such file: {path}"
                )
            )
        absolute[attr] = str(path)
    replay_cache = server.replay_cache.model_copy(
        update={"redis": redis.model_copy(update=absolute)}
    )
    return server.model_copy(update={"replay_cache": replay_cache})


_Item = TypeVar("_Item", bound=BaseModel)


def _valid_items(raw: object, model: type[_Item]) -> Iterator[tuple[int, _Item]]:
    """(index, item) for each entry of the list ``raw`` that ``model`` accepts."""
    for index, entry in enumerate(raw if isinstance(raw, list) else []):
        try:
            yield index, model.model_validate(entry)
        except ValidationError:
            continue


# RFC 9110's methods and PATCH (RFC 5789): anything else in `methods` is most likely a typo
# (`DELTE`), which would match no request (or, under notMethods, every one).
STANDARD_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)


def _unusual_methods(policy: PolicySpec, document: str, prefix: str) -> Iterator[str]:
    """A warning for each method a rule of ``policy`` names that is not a standard HTTP
    method; ``prefix`` is the policy's field path in ``document``."""
    for r, rule in enumerate(policy.rules or []):
        for t, to in enumerate(rule.to or []):
            for field_name in ("methods", "not_methods"):
                for method in getattr(to.operation, field_name) or []:
                    # NOTE: methods match exactly, as Istio's do: `get` never matches GET.
                    if "*" in method or method in STANDARD_METHODS:
                        continue
                    where = f"{prefix}.rules[{r}].to[{t}].operation.{to_camel(field_name)}"
                    close = difflib.get_close_matches(method.upper(), STANDARD_METHODS, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    yield (
                        f"{document}: {where}: {method!r} is not a standard HTTP method"
                        f"{hint}: it matches only requests with exactly that method"
                    )


def _workloads_without_policy(
    workloads: tuple[Workload, ...],
    policies: list[PolicySpec],
    policy_scopes: dict[str, frozenset[str]],
) -> Iterator[str]:
    """A warning for each workload no policy applies to: its requests are all allowed, with or
    without credentials (a policy not in ``policy_scopes`` applies to every workload)."""
    if any(p.name not in policy_scopes for p in policies):
        return
    covered = frozenset().union(*(policy_scopes[p.name] for p in policies))
    for workload in workloads:
        if workload.name not in covered:
            yield (
                f"workload {workload.name!r} (namespace {workload.namespace!r}) has no policy "
                "in its scope: every request for it is allowed, with or without credentials"
            )


def _referenced_files(providers: list[FoundProvider], server: ServerSpec | None) -> list[Path]:
    """Every local file the configuration names, found or not (``jwksFile``, ``caFile``,
    ``sharedSecretFile``, ``introspection.clientSecretFile``, ``apiKeys.file``,
    ``server.tls``)."""
    files = [
        base_dir / value  # an absolute value stays itself
        for spec, _, _, base_dir in providers
        for value in (
            spec.jwks_file,
            spec.ca_file,
            spec.shared_secret_file,
            spec.introspection.client_secret_file if spec.introspection else None,
            spec.api_keys.file if spec.api_keys else None,
            spec.dpop.nonce_secret_file,
        )
        if value is not None
    ]
    if server is not None and server.tls is not None:
        tls = server.tls.files()
        files += [tls.cert_file, tls.key_file]
        if tls.client_ca_file is not None:
            files.append(tls.client_ca_file)
    return files


def load(path: str | Path, *, referenced: list[Path] | None = None) -> Settings:
    """Read, validate and resolve the configuration at ``path`` (file or directory).
    ``referenced``, when given, receives every local file the configuration names, found or
    not, whether it is accepted or refused (a reload watches them: a configuration refused for
    a file that is not there yet is tried again when it appears).

    Returns Settings. Raises ConfigError listing every problem found.
    """
    root = Path(path)
    problems: list[ConfigProblem] = []
    warnings: list[str] = []
    server: ServerSpec | None = None
    server_fields_set: set[str] = set()
    providers: list[FoundProvider] = []
    policies: list[PolicySpec] = []
    # (name, document label, field path of the name) of every policy, valid or not, so that a
    # duplicate name is reported together with the other problems.
    policy_names: list[tuple[str, str, str]] = []
    # Scoping: the declared workloads (spec, document, field path), where each Istio policy
    # and provider says it applies, each native policy's appliesTo.
    workload_specs: list[tuple[WorkloadSpec, str, str]] = []
    scoping_spec: ScopingSpec | None = None
    istio_spec: IstioSpec | None = None
    istio_policy_scopes: dict[str, tuple[IstioScope, str]] = {}
    istio_provider_scopes: dict[int, tuple[IstioScope, str]] = {}
    native_scopes: dict[str, tuple[NativeScope, str, str]] = {}
    scoped_documents: list[tuple[str, str]] = []  # (document, the scope field it sets)
    digest = hashlib.sha256()
    # NOTE: keyed by id() but holding the bytes, so a freed file's id is never reused.
    seen_raw: dict[int, bytes] = {}

    documents = 0
    for doc, raw in _read_documents(root, problems):
        documents += 1
        if id(raw) not in seen_raw:
            seen_raw[id(raw)] = raw
            digest.update(raw)
        api_version, kind = doc.body.get("apiVersion"), doc.body.get("kind")
        if kind == "AuthzConfig" or api_version == NATIVE_API_VERSION:
            try:
                native = AuthzConfigDoc.model_validate(doc.body)
            except ValidationError as exc:
                problems.extend(problems_from(exc, doc.label, ""))
                # The valid providers and policies of a broken document still take part in the
                # checks across documents (key files, duplicate names), so that every problem
                # is reported at once.
                providers.extend(
                    (spec, doc.label, f"providers[{i}]", doc.base_dir)
                    for i, spec in _valid_items(doc.body.get("providers"), ProviderSpec)
                )
                raw_policies = doc.body.get("policies")
                policy_names.extend(
                    (entry["name"], doc.label, f"policies[{i}].name")
                    for i, entry in enumerate(
                        raw_policies if isinstance(raw_policies, list) else []
                    )
                    if isinstance(entry, dict) and isinstance(entry.get("name"), str)
                )
                continue
            if native.server is not None:
                server_part = _resolve_server_tls(native.server, doc, problems)
                server_part = _resolve_replay_cache(server_part, doc, problems)
                # A document may set some server fields, another the others (a kustomize
                # component adds a file to the ConfigMap: k8s/components/replay-cache-redis);
                # a field set twice is refused, never silently merged.
                given = native.server.model_fields_set
                for field_name in sorted(given & server_fields_set):
                    alias = ServerSpec.model_fields[field_name].alias or field_name
                    problems.append(
                        ConfigProblem(doc.label, f"server.{alias}", "set in more than one document")
                    )
                server = (
                    server_part
                    if server is None
                    else server.model_copy(update={f: getattr(server_part, f) for f in given})
                )
                server_fields_set |= given
                if server_part.http_listen is not None:
                    warnings.append(
                        f"{doc.label}: server.httpListen is deprecated, use "
                        "server.metricsListen (the /metrics, /healthz and /readyz port; the "
                        "HTTP door is server.httpAuthz.listen)"
                    )
            for key, value in (("scoping", native.scoping), ("istio", native.istio)):
                if value is None:
                    continue
                if (scoping_spec if key == "scoping" else istio_spec) is not None:
                    problems.append(ConfigProblem(doc.label, key, "set in more than one document"))
                if isinstance(value, ScopingSpec):
                    scoping_spec = value
                elif isinstance(value, IstioSpec):
                    istio_spec = value
            workload_specs.extend(
                (w, doc.label, f"workloads[{i}]") for i, w in enumerate(native.workloads)
            )
            for i, scoped in enumerate(native.policies):
                if scoped.applies_to is not None:
                    to = scoped.applies_to
                    native_scopes[scoped.name] = (
                        NativeScope(
                            tuple(to.workloads),
                            tuple(to.namespaces),
                            tuple(to.hosts),
                            dict(to.context_extensions),
                        ),
                        doc.label,
                        f"policies[{i}]",
                    )
            providers.extend(
                (p, doc.label, f"providers[{i}]", doc.base_dir)
                for i, p in enumerate(native.providers)
            )
            policies.extend(native.policies)
            for i, native_policy in enumerate(native.policies):
                warnings.extend(_unusual_methods(native_policy, doc.label, f"policies[{i}]"))
            policy_names.extend(
                (p.name, doc.label, f"policies[{i}].name") for i, p in enumerate(native.policies)
            )
        elif kind in ("RequestAuthentication", "AuthorizationPolicy"):
            if api_version not in ISTIO_SECURITY_VERSIONS:
                problems.append(
                    ConfigProblem(
                        doc.label,
                        "apiVersion",
                        f"expected one of {', '.join(ISTIO_SECURITY_VERSIONS)}, "
                        f"got {api_version!r}",
                    )
                )
            elif kind == "RequestAuthentication":
                first = len(providers)
                providers.extend(request_authentication(doc, problems, warnings))
                if len(providers) > first:
                    scope = istio_scope(doc, problems)
                    for index in range(first, len(providers)):
                        istio_provider_scopes[index] = (scope, doc.label)
            else:
                policy = authorization_policy(doc, problems, warnings)
                if policy is not None:
                    policies.append(policy)
                    warnings.extend(_unusual_methods(policy, doc.label, "spec"))
                    istio_policy_scopes[policy.name] = (istio_scope(doc, problems), doc.label)
                name = istio_name(doc.body)
                if name is not None:
                    policy_names.append((name, doc.label, "metadata.name"))
            spec_body = doc.body.get("spec")
            if isinstance(spec_body, dict):
                scoped_documents.extend(
                    (doc.label, key) for key in SCOPE_FIELDS if key in spec_body
                )
        elif not isinstance(api_version, str) or not isinstance(kind, str):
            problems.append(
                ConfigProblem(
                    doc.label,
                    "apiVersion" if not isinstance(api_version, str) else "kind",
                    "required: every document needs apiVersion and kind",
                )
            )
        elif kind in MESH_KINDS_IGNORED and api_version.startswith("security.istio.io/"):
            warnings.append(
                f"{doc.label}: {kind} configures the mesh's mTLS, not requests; ignored"
            )
        elif api_version.startswith(("security.istio.io/", "authz-server/")):
            problems.append(
                ConfigProblem(
                    doc.label,
                    "kind",
                    f"unsupported kind {kind!r}; expected AuthzConfig, RequestAuthentication "
                    "or AuthorizationPolicy",
                )
            )
        else:
            warnings.append(f"{doc.label}: kind {kind!r} ({api_version}) is not ours; ignored")

    resolved: list[Provider] = []
    names: dict[str, int] = {}
    provider_names: dict[int, str] = {}
    for index, (spec, document, prefix, base_dir) in enumerate(providers):
        paths, ok = _resolve_provider(spec, document, prefix, base_dir, problems)
        name = spec.name or spec.issuer
        if name in names:
            if spec.name:
                problems.append(
                    ConfigProblem(document, f"{prefix}.name", f"duplicate provider name {name!r}")
                )
                continue
            names[name] += 1
            name = f"{name}#{names[name]}"
        else:
            names[name] = 1
        provider_names[index] = name
        if ok:
            origin = f"{document}: {prefix}"
            resolved.append(Provider(spec=spec, name=name, origin=origin, **paths))

    problems.extend(_opaque_location_problems(providers))
    if server is not None and server.http_authz.attribute_headers:
        problems.extend(_reserved_header_problems(providers))
    seen_names: set[str] = set()
    for name, document, name_path in policy_names:
        if name in seen_names:
            problems.append(ConfigProblem(document, name_path, f"duplicate policy name {name!r}"))
        seen_names.add(name)

    if documents == 0 and not problems:
        problems.append(
            ConfigProblem(
                str(root),
                "",
                "no configuration documents (the file is empty or holds only comments): "
                "refused, since an empty configuration would allow every request",
            )
        )
    elif not providers and not policies and not problems:
        if server is None or not server.allow_empty:
            problems.append(
                ConfigProblem(
                    str(root),
                    "",
                    "no providers and no policies: this configuration would allow every "
                    "request, which is what a truncated file or an empty ConfigMap looks like. "
                    "Set server.allowEmpty: true if allowing everything is meant",
                )
            )
        else:
            warnings.append(
                f"{root}: server.allowEmpty is set and there are no providers and no "
                "policies: every request is allowed"
            )
    elif not policies and not problems:
        # Providers but no policy: every request is allowed, with or without a token (a token
        # present is verified, an absent one is not asked for). That is what a lost or emptied
        # policy file beside a provider file looks like, so it too needs saying.
        if server is None or not server.allow_empty:
            problems.append(
                ConfigProblem(
                    str(root),
                    "policies",
                    f"{len(providers)} provider(s) but no policy: this configuration would "
                    "allow every request, with or without credentials, which is what a lost "
                    "or emptied policy file looks like. Add a policy (a DENY policy with "
                    'notRequestPrincipals: ["*"] requires a valid token), or set '
                    "server.allowEmpty: true if allowing everything is meant",
                )
            )
        else:
            warnings.append(
                f"{root}: server.allowEmpty is set and there is no policy: every request is "
                "allowed, with or without credentials"
            )
    workloads = tuple(spec.workload() for spec, _, _ in workload_specs)
    policy_scopes: dict[str, frozenset[str]] = {}
    provider_scopes: dict[str, frozenset[str]] = {}
    if workloads:
        for index, field_name, message in workload_problems(workloads):
            _, document, path = workload_specs[index]
            where = f"{path}.{field_name}" if field_name else path
            problems.append(ConfigProblem(document, where, message))
        for index, message in client_chosen_scopes(workloads):
            _, document, path = workload_specs[index]
            warnings.append(f"{document}: {path}.hosts: {message}")
        root_namespace = (istio_spec or IstioSpec()).root_namespace
        istio_scopes: list[tuple[str, IstioScope, str, dict[str, frozenset[str]]]] = [
            (name, scope, document, policy_scopes)
            for name, (scope, document) in istio_policy_scopes.items()
        ]
        istio_scopes += [
            (provider_names[index], scope, document, provider_scopes)
            for index, (scope, document) in istio_provider_scopes.items()
            if index in provider_names
        ]
        for name, scope, document, into in istio_scopes:
            selected, found = istio_selection(scope, workloads, root_namespace)
            problems.extend(ConfigProblem(document, where, message) for where, message in found)
            if not found and not selected:
                warnings.append(
                    f"{document}: applies to no declared workload (namespace "
                    f"{scope.namespace!r}, selector {dict(scope.match_labels or {})}): inert"
                )
            into[name] = selected
        for name, (native_scope, document, path) in native_scopes.items():
            selected, found = native_selection(native_scope, workloads)
            problems.extend(
                ConfigProblem(document, f"{path}.{where}", message) for where, message in found
            )
            if not found and not selected:
                warnings.append(
                    f"{document}: {path}.appliesTo selects no declared workload: the policy "
                    "applies nowhere"
                )
            policy_scopes[name] = selected
        if policies:
            warnings.extend(_workloads_without_policy(workloads, policies, policy_scopes))
    else:
        for document, key in scoped_documents:
            warnings.append(
                f"{document}: spec.{key} is ignored: no workloads are declared, so every "
                "policy applies to every request (declare workloads to scope policies)"
            )
        for _, document, path in native_scopes.values():
            problems.append(
                ConfigProblem(
                    document,
                    f"{path}.appliesTo",
                    "needs workloads: declare the workloads it selects among (without them "
                    "every policy applies everywhere)",
                )
            )

    if referenced is not None:
        referenced.extend(_referenced_files(providers, server))
    if problems:
        raise ConfigError(problems)
    return Settings(
        server=server or ServerSpec(),
        providers=tuple(resolved),
        policies=tuple(policies),
        warnings=tuple(warnings),
        digest=digest.hexdigest()[:16],
        sources=tuple(str(p) for p in _config_files(root)),
        workloads=workloads,
        unknown_workload=(scoping_spec or ScopingSpec()).unknown_workload,
        policy_scopes=policy_scopes,
        provider_scopes=provider_scopes,
    )
