"""The docs cannot drift: their YAML loads, their JSON parses, their links resolve, the
walkthrough shows the repo's files verbatim, and the reference names every configuration
field, command-line flag and reason the code knows."""

from __future__ import annotations

import argparse
import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from google.protobuf import any_pb2, json_format
from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from authz_server import cli, errors
from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.config import specs
from authz_server.policy.workloads import WorkloadIndex

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
SCOPING = ROOT / "docs" / "scoping.md"
TRACING = ROOT / "docs" / "tracing.md"
README = ROOT / "README.md"
CHANGELOG = ROOT / "CHANGELOG.md"
# Docs that show configurations (each must show at least one), and every doc a user reads.
CONFIG_DOCS = [README, WALKTHROUGH, REFERENCE, SCOPING, TRACING]
DOCS = [*CONFIG_DOCS, TROUBLESHOOTING, CHANGELOG]
_BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)
_JSON_BLOCK = re.compile(r"```json\n(.*?)```", re.DOTALL)
_FILE_HEADER = re.compile(r"^# file: (\S+)\n")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
OURS = {"AuthzConfig", "RequestAuthentication", "AuthorizationPolicy"}


def yaml_blocks(path: Path) -> list[str]:
    return _BLOCK.findall(path.read_text())


def _is_server_config(block: str) -> bool:
    documents = [d for d in yaml.safe_load_all(block) if isinstance(d, dict)]
    kinds = {d.get("kind") for d in documents}
    custom = any((d.get("spec") or {}).get("action") == "CUSTOM" for d in documents)
    return bool(kinds) and kinds <= OURS and not custom


def _load_block(block: str, path: Path) -> config.Settings:
    header = _FILE_HEADER.match(block)
    if header:  # a file of the repo, loaded from where it lives (relative paths work)
        return config.load(ROOT / header.group(1))
    path.write_text(block)
    return config.load(path)


@pytest.mark.parametrize("doc", CONFIG_DOCS, ids=lambda p: p.name)
def test_every_doc_that_teaches_configuration_shows_some(doc: Path) -> None:
    blocks = [b for b in yaml_blocks(doc) if _is_server_config(_FILE_HEADER.sub("", b))]
    assert blocks, f"{doc.name} shows no configuration"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_server_config_in_the_docs_is_accepted_by_the_server(
    doc: Path, tmp_path: Path
) -> None:
    for index, block in enumerate(yaml_blocks(doc)):
        documents = list(yaml.safe_load_all(_FILE_HEADER.sub("", block)))  # all YAML parses
        assert documents, f"{doc.name}: an empty YAML block"
        if _is_server_config(_FILE_HEADER.sub("", block)):
            settings = _load_block(block, tmp_path / f"block{index}.yaml")
            assert settings.providers or settings.policies


def test_every_yaml_block_of_the_reference_is_a_whole_configuration() -> None:
    """The reference shows no fragments: each example can be saved and run as it is."""
    for block in yaml_blocks(REFERENCE):
        assert _is_server_config(block), f"not a whole configuration:\n{block[:200]}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_json_in_the_docs_parses(doc: Path) -> None:
    for block in _JSON_BLOCK.findall(doc.read_text()):
        for line in block.strip().splitlines():  # JSON lines, as the logs are written
            json.loads(line)


def test_every_yaml_in_the_walkthrough_is_a_file_of_the_repo_verbatim() -> None:
    blocks = yaml_blocks(WALKTHROUGH)
    assert len(blocks) >= 4
    for block in blocks:
        header = _FILE_HEADER.match(block)
        assert header, f"walkthrough YAML without a '# file: PATH' line:\n{block[:200]}"
        path = ROOT / header.group(1)
        assert path.is_file(), f"{header.group(1)} is not in the repo"
        assert block[header.end() :].strip() == path.read_text().strip(), (
            f"the walkthrough's copy of {header.group(1)} differs from the file"
        )


def _config_models() -> list[type[BaseModel]]:
    """Every public pydantic model of the configuration, found rather than listed, so a model
    added tomorrow is checked too."""
    return [
        model
        for name, model in inspect.getmembers(specs, inspect.isclass)
        if issubclass(model, BaseModel)
        and model.__module__ == specs.__name__
        and not name.startswith("_")
    ]


def _documented_names(markdown: str) -> set[str]:
    """Names a reference documents: in the first cell of a table row, or in a heading (as
    `` `a.b[].c` ``, every dotted part counts)."""
    places = re.findall(r"^\|([^|\n]*)\|", markdown, re.MULTILINE)
    places += re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)
    names: set[str] = set()
    for place in places:
        for code in re.findall(r"`([^`]+)`", place):
            names.update(part for part in re.split(r"[.\[\]: ]+", code) if part)
    return names


def test_the_reference_names_every_field_of_every_configuration_model() -> None:
    documented = _documented_names(REFERENCE.read_text())
    models = _config_models()
    names = {m.__name__ for m in models}
    assert {"AuthzConfigDoc", "ServerSpec", "ProviderSpec", "PolicySpec"} <= names
    assert {"DecisionLogSpec", "TokenCacheSpec", "Source", "Operation", "Condition"} <= names
    missing = [
        f"{model.__name__}.{field.alias or to_camel(name)}"
        for model in models
        for name, field in model.model_fields.items()
        if (field.alias or to_camel(name)) not in documented
    ]
    assert not missing, f"docs/reference.md does not name: {', '.join(missing)}"


def test_the_reference_documents_the_durations_and_the_files_read() -> None:
    reference = REFERENCE.read_text()
    for example in ("`2s`", "`500ms`", "`1h30m`", "A bare number", "`*.yml`"):
        assert example in reference
    assert specs.parse_duration("1h30m") == 5400.0
    assert specs.parse_duration("500ms") == 0.5
    assert specs.parse_duration(2) == 2.0


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _flags(sub)
        flags |= {o for o in action.option_strings if o.startswith("--") and o != "--help"}
    return flags


def test_the_reference_names_every_command_line_flag() -> None:
    reference = REFERENCE.read_text()
    flags = _flags(cli._parser())
    assert {"--config", "--log-format", "--token-file", "--claim", "--ttl"} <= flags
    missing = sorted(f for f in flags if f not in reference)
    assert not missing, f"docs/reference.md does not name: {', '.join(missing)}"


def test_the_reference_lists_every_reason() -> None:
    reference = REFERENCE.read_text()
    reasons = [
        value
        for name, value in vars(errors).items()
        if name.isupper() and isinstance(value, str) and re.fullmatch(r"[a-z_]+", value)
    ]
    assert len(reasons) >= 14
    missing = [r for r in reasons if f"| `{r}` |" not in reference]
    assert not missing, f"docs/reference.md's reasons table lacks: {', '.join(missing)}"


def _reasons() -> list[str]:
    """Every reason code the code can give (the constants of ``errors``)."""
    return [
        value
        for name, value in vars(errors).items()
        if name.isupper() and isinstance(value, str) and re.fullmatch(r"[a-z_]+", value)
    ]


def test_the_readme_lists_every_reason() -> None:
    readme = README.read_text()
    (listed,) = re.findall(r"\*\*Reasons\*\* \(body, logs, metrics\):(.*?)\.\n", readme, re.S)
    missing = [r for r in _reasons() if f"`{r}`" not in listed]
    assert not missing, f"README's list of reasons lacks: {', '.join(missing)}"
    unknown = set(re.findall(r"`([a-z_]+)`", listed)) - set(_reasons())
    assert not unknown, f"README lists reasons the code never gives: {unknown}"


def _proto_fields(descriptor: Any, seen: set[str] | None = None) -> set[str]:
    """The names of every field of ``descriptor`` and of the messages it holds."""
    seen = set() if seen is None else seen
    if descriptor.full_name in seen:
        return set()
    seen.add(descriptor.full_name)
    names: set[str] = set()
    for field in descriptor.fields:
        names.add(field.name)
        if field.message_type is not None:
            names |= _proto_fields(field.message_type, seen)
    return names


def _names_that_exist() -> set[str]:
    """Every snake_case name a user can meet: the keys of `check --json` and of the Explain
    API (the same fields), the decision log line's fields, the reasons, the metrics, the
    fields of the start-up error lines, the package's modules, and the fields of the Envoy
    configuration and ext_authz messages the docs show."""
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2,
    )
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
    from envoy.service.auth.v3 import external_auth_pb2

    from authz_server.ops import log, metrics
    from authz_server.v1 import explain_pb2

    names = set(_reasons())
    for message in (
        explain_pb2.ExplainRequest,
        explain_pb2.ExplainResponse,
        bootstrap_pb2.Bootstrap,
        http_connection_manager_pb2.HttpConnectionManager,
        ext_authz_pb2.ExtAuthz,
        ext_authz_pb2.ExtAuthzPerRoute,
        route_pb2.RouteConfiguration,
        external_auth_pb2.CheckRequest,
        external_auth_pb2.CheckResponse,
        tls_pb2.DownstreamTlsContext,
    ):
        names |= _proto_fields(message.DESCRIPTOR)
    entry = (
        0.0, ("", 20, ("sub",)), False, 403, "policy_denied", "p", "i/s", "x", ("a",),
        (("d", "deny"),), "GET", "h", "/", "10.0.0.1", "r", 0.001, {"sub": "s"}, "grpc",
        ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
    )  # fmt: skip
    names |= set(log._fields(entry))  # type: ignore[arg-type]
    # The values of span attributes, and the samplers (docs/tracing.md).
    from authz_server import request_trace
    from authz_server.ops import tracing

    names |= set(tracing.SAMPLERS) | set(tracing.CREDENTIAL_KINDS.values())
    names.add(tracing.MIXED_CREDENTIALS)
    names |= {request_trace.KEY_FOUND, request_trace.KEY_NOT_FOUND}
    # Some families are collected from live objects (caches, workers): read them all from
    # the module that names them, a counter's also with `_total`.
    for family in re.findall(r'"(authz_[a-z_]+)"', inspect.getsource(metrics)):
        for name in (family, f"{family}_total"):
            names |= {name, name.removeprefix("authz_")}
    from authz_server import server

    for module in (cli, server):  # the fields of their log lines
        names |= set(re.findall(r'"([a-z_]+)": ', inspect.getsource(module)))
    names |= {p.stem for p in (ROOT / "authz_server").rglob("*.py")}
    from authz_server.credentials import introspection

    names |= set(introspection.CALL_RESULTS)  # the `result` label of the introspection calls
    return names


# Snake_case names the docs use that are none of the above, each for a stated reason.
_OTHER_NAMES = {
    "error_description": "RFC 6750's WWW-Authenticate parameter",
    "access_token": "RFC 6750's query parameter, an example of fromParams",
    "x_user": "a header's underscore twin (CGI spelling), removed as a spoof",
    "x_groups": "the same",
    "x_jwt": "the same",
    "x_jwt_groups": "the same",
    "ext_authz": "Envoy's filter",
    "jwt_authn": "Envoy's filter",
    "http_connection_manager": "Envoy's filter",
    "ext_authz_denied": "Envoy's ext_authz statistic",
    "ext_authz_error": "Envoy's ext_authz statistic",
    "process_cpu_seconds_total": "Prometheus' standard process collector",
    "process_resident_memory_bytes": "the same",
    "jwks_uri": "Istio's spelling of jwksUri, accepted",
    "client_id": "RFC 7662's introspection answer member",
    "client_secret_basic": "RFC 6749's client authentication by HTTP Basic",
}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_snake_case_field_the_docs_name_exists(doc: Path) -> None:
    named = set(re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`", doc.read_text()))
    unknown = sorted(named - _names_that_exist() - set(_OTHER_NAMES))
    assert not unknown, f"{doc.name} names what exists nowhere: {', '.join(unknown)}"


def test_the_reference_lists_every_field_that_needs_a_restart() -> None:
    from authz_server.server import RESTART_FIELDS

    reference = REFERENCE.read_text()
    (said,) = re.findall(r"\*\*Fields that need a restart\.\*\*(.*?)\n\n", reference, re.S)
    missing = [f for f in RESTART_FIELDS if f"`server.{to_camel(f)}`" not in said]
    assert not missing, f"the reference does not say these need a restart: {missing}"


def test_the_docs_say_check_prints_text_and_json_only_when_asked() -> None:
    readme = README.read_text()
    assert "as JSON (never the token)" not in readme
    assert "--json: the whole trace as JSON" in readme
    run = cli._parser().parse_args(["check", "--config", "x"])
    assert run.json is False  # text unless --json


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_grpcurl_is_shown_as_the_venvs_binary(doc: Path) -> None:
    for match in re.finditer(r"(\S*)grpcurl -", doc.read_text()):
        assert match.group(1).endswith(".venv/bin/"), f"{doc.name}: {match.group(0)!r}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_between_the_docs_resolves(doc: Path) -> None:
    for target in _LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        assert path.exists(), f"{doc.name}: broken link {target}"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc.name}: no heading for {target}"


# ------------------------------------------------------------------------- docs/scoping.md

_PER_ROUTE = "envoy.filters.http.ext_authz"


def _scoping_configs(tmp_path: Path) -> list[config.Settings]:
    blocks = [b for b in yaml_blocks(SCOPING) if _is_server_config(b)]
    return [_load_block(b, tmp_path / f"scoping{i}.yaml") for i, b in enumerate(blocks)]


def _envoy_documents(kind: str) -> list[dict[str, Any]]:
    """The Envoy YAML of docs/scoping.md: ``route_config`` blocks, or EnvoyFilter documents."""
    found = []
    for block in yaml_blocks(SCOPING):
        for document in yaml.safe_load_all(block):
            if kind == "route_config" and isinstance(document, dict) and "route_config" in document:
                found.append(document["route_config"])
            elif isinstance(document, dict) and document.get("kind") == kind:
                found.append(document)
    return found


def _context_extensions(typed_per_filter_config: dict[str, Any] | None) -> dict[str, str]:
    """The context extensions an ext_authz ``typed_per_filter_config`` sets, read through
    Envoy's own message (a misspelled field is an error)."""
    if not typed_per_filter_config or _PER_ROUTE not in typed_per_filter_config:
        return {}
    message = json_format.ParseDict(typed_per_filter_config[_PER_ROUTE], any_pb2.Any())
    per_route = ext_authz_pb2.ExtAuthzPerRoute()
    assert message.Unpack(per_route), message.type_url
    return dict(per_route.check_settings.context_extensions)


def test_the_scoping_doc_shows_each_way_to_recognise_a_workload(tmp_path: Path) -> None:
    configs = _scoping_configs(tmp_path)
    workloads = [w for settings in configs for w in settings.workloads]

    assert len(configs) >= 3
    assert all(settings.workloads for settings in configs)
    assert any(w.destination_principals for w in workloads)
    assert any(w.context_extensions for w in workloads)
    assert any(w.hosts for w in workloads)


def test_the_envoy_routes_of_the_scoping_doc_are_envoy_configuration(tmp_path: Path) -> None:
    """Each route's context extensions (its virtual host's merged with its own, as Envoy
    merges them) recognise, in one of the doc's configurations, the workload the route
    leads to."""
    routes = _envoy_documents("route_config")
    assert routes, "docs/scoping.md shows no Envoy route_config"
    indexes = [WorkloadIndex(settings.workloads) for settings in _scoping_configs(tmp_path)]
    checked = 0
    for route_config in routes:
        json_format.ParseDict(route_config, route_pb2.RouteConfiguration())  # field names
        for host in route_config["virtual_hosts"]:
            shared = _context_extensions(host.get("typed_per_filter_config"))
            for route in host["routes"]:
                extensions = shared | _context_extensions(route.get("typed_per_filter_config"))
                request = RequestAttributes(context_extensions=extensions)
                found = {w.name for i in indexes if (w := i.identify(request)) is not None}
                assert found == {route["route"]["cluster"]}, (route["match"], found)
                checked += 1
    assert checked >= 2


def test_the_envoy_filter_of_the_scoping_doc_sets_what_a_workload_lists(tmp_path: Path) -> None:
    filters = _envoy_documents("EnvoyFilter")
    assert filters, "docs/scoping.md shows no EnvoyFilter"
    configs = _scoping_configs(tmp_path)
    for document in filters:
        assert document["apiVersion"] == "networking.istio.io/v1alpha3"
        spec = document["spec"]
        assert set(spec) <= {"workloadSelector", "configPatches", "targetRefs", "priority"}
        labels = spec["workloadSelector"]["labels"]
        for patch in spec["configPatches"]:
            assert set(patch) == {"applyTo", "match", "patch"}
            assert patch["applyTo"] == "VIRTUAL_HOST"
            assert patch["match"]["context"] in {"SIDECAR_INBOUND", "GATEWAY", "ANY"}
            assert patch["patch"]["operation"] == "MERGE"
            value = patch["patch"]["value"]
            json_format.ParseDict(value, route_components_pb2.VirtualHost())  # field names
            request = RequestAttributes(
                context_extensions=_context_extensions(value["typed_per_filter_config"])
            )
            recognised = [
                w
                for settings in configs
                if settings.workloads
                and (w := WorkloadIndex(settings.workloads).identify(request)) is not None
            ]
            # The workload the filter's sidecars belong to, by the labels it selects.
            assert recognised, f"no workload of the doc lists {request.context_extensions}"
            assert all(labels.items() <= dict(w.labels).items() for w in recognised)


def test_the_custom_policy_of_the_scoping_doc_names_the_mesh_provider() -> None:
    mesh = yaml.safe_load((ROOT / "k8s" / "istio" / "mesh-config.yaml").read_text())
    providers = {p["name"] for p in mesh["spec"]["meshConfig"]["extensionProviders"]}
    custom = [
        document
        for block in yaml_blocks(SCOPING)
        for document in yaml.safe_load_all(block)
        if isinstance(document, dict) and (document.get("spec") or {}).get("action") == "CUSTOM"
    ]
    assert custom
    assert all(d["spec"]["provider"]["name"] in providers for d in custom)


def test_the_envoy_tracing_of_the_tracing_doc_is_envoy_configuration() -> None:
    from envoy.config.trace.v3 import opentelemetry_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm,
    )

    [block] = [b for b in yaml_blocks(TRACING) if b.startswith("tracing:")]
    tracing = json_format.ParseDict(
        yaml.safe_load(block)["tracing"], hcm.HttpConnectionManager.Tracing()
    )
    config = opentelemetry_pb2.OpenTelemetryConfig()
    assert tracing.provider.typed_config.Unpack(config)
    assert config.grpc_service.envoy_grpc.cluster_name == "otel"


def test_the_tracing_doc_names_every_variable_the_server_reads() -> None:
    text = TRACING.read_text()
    source = (ROOT / "authz_server" / "ops" / "tracing.py").read_text()
    for name in sorted(set(re.findall(r"\bOTEL_[A-Z_]*[A-Z]\b(?!_)", source))):
        assert f"`{name}`" in text, f"docs/tracing.md does not name {name}"
