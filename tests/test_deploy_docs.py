"""The deployment says one thing: the manifests, README's "Deployment" section,
``k8s/README.md``, ``k8s/istio/README.md`` and ``docs/walkthrough.md`` agree on how a
configuration change reaches the pods, which image version runs, and how the Istio overlay
protects the server. The alternatives the docs offer (a hashed ConfigMap name, an ``images:``
override, an overlay with the HTTP door) are rendered with kubectl and do what the docs say.
The standalone Envoy examples (``examples/envoy/``) ask the doors the manifests open.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from authz_server.config import load as config
from authz_server.config import specs
from authz_server.tools.envoy_config import output_headers
from tests.test_manifests import (
    HTTP_DOOR_PORT,
    K8S,
    MESH_CONFIG,
    MESH_CONFIG_HTTP,
    Obj,
    _headers_the_server_reads,
    _one,
    _render,
)
from tests.unit.test_envoy_config import _clusters, _envoy_validate, _example_generator, _ext_authz

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
WALKTHROUGH = REPO / "docs" / "walkthrough.md"
K8S_README = K8S / "README.md"
ISTIO_README = K8S / "istio" / "README.md"
EXAMPLES = REPO / "examples" / "envoy"
EXAMPLES_README = EXAMPLES / "README.md"
SERVER_CONFIG = K8S / "base" / "config.yaml"

_YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)
_IMAGE_TAG = re.compile(r"\bauthz-server:(dev|latest|v?\d[\w.+-]*\w)")
_ROLL = re.compile(r"\broll(s|ed|ing)?\b.*\bpods?\b", re.IGNORECASE)


def _section(text: str, heading: str) -> str:
    """Return the markdown under ``heading`` up to the next heading of its level or above."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n") + 1
    headings = re.finditer(rf"^#{{1,{len(level)}}} ", text, re.MULTILINE)
    ends = [m.start() for m in headings if m.start() > start]
    return text[start : ends[0] if ends else len(text)]


def _readme_deployment() -> str:
    return _section(README.read_text(), "## Deployment")


DOCS = {
    "README.md#Deployment": _readme_deployment,
    "docs/walkthrough.md": WALKTHROUGH.read_text,
    "k8s/README.md": K8S_README.read_text,
    "k8s/istio/README.md": ISTIO_README.read_text,
}


def _doc(name: str) -> str:
    return DOCS[name]()


def _sentences(markdown: str) -> list[str]:
    return re.split(r"(?<=[.!?:;])\s+", " ".join(markdown.split()))


def _yaml_block(path: Path, containing: str) -> str:
    (block,) = [b for b in _YAML_BLOCK.findall(path.read_text()) if containing in b]
    return str(block)


def _package_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def _configmap_name(objects: tuple[Obj, ...]) -> str:
    return str(_one(objects, "ConfigMap")["metadata"]["name"])


def _mounted_configmaps(objects: tuple[Obj, ...]) -> list[str]:
    volumes = _one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    return [v["configMap"]["name"] for v in volumes if "configMap" in v]


def _image(objects: tuple[Obj, ...]) -> str:
    (container,) = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return str(container["image"])


# -------------------------------------------------------------- configuration changes


@pytest.mark.parametrize("doc", ["README.md#Deployment", "docs/walkthrough.md", "k8s/README.md"])
def test_docs_promise_the_hot_reload_that_the_manifests_give(doc: str) -> None:
    text = _doc(doc)
    for overlay in ("base", "istio"):
        objects = _render(K8S / overlay)
        # The docs name the ConfigMap the pods mount, and only a stable name stays that name:
        # an apply updates the mounted files in place.
        name = _configmap_name(objects)
        assert _mounted_configmaps(objects) == [name]
        assert f"`{name}`" in text
    assert "without a restart" in text
    # Rolling the pods is only ever offered as the alternative.
    rolls = [s for s in _sentences(text) if _ROLL.search(s) and "instead" not in s]
    assert not rolls, rolls
    assert not re.search(r"authz-server-config-[a-z0-9]{10}\b", text)


def test_the_documented_roll_on_change_alternative_hashes_the_name(tmp_path: Path) -> None:
    lines = _yaml_block(K8S_README, "disableNameSuffixHash")
    kustomization = (K8S / "base" / "kustomization.yaml").read_text()
    assert lines in kustomization, "k8s/README.md quotes lines that are not in the file"
    names = []
    for edit in ("", "# an edit\n"):
        base = tmp_path / f"base{len(names)}"
        shutil.copytree(K8S / "base", base)
        (base / "kustomization.yaml").write_text(kustomization.replace(lines, ""))
        config = base / "config.yaml"
        config.write_text(config.read_text() + edit)
        objects = _render(base)
        name = _configmap_name(objects)
        assert re.fullmatch(r"authz-server-config-[a-z0-9]{10}", name), name
        # kustomize points the Deployment at the hashed name: a change is a new pod template.
        assert _mounted_configmaps(objects) == [name]
        names.append(name)
    assert names[0] != names[1]


# ----------------------------------------------------------------------- image version


def test_make_image_and_the_deployment_use_the_package_version() -> None:
    image = f"authz-server:{_package_version()}"
    dry_run = subprocess.run(
        ["make", "--no-print-directory", "-n", "image"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    tags = re.findall(r"\bbuild -t (\S+) \.", dry_run)
    assert tags and set(tags) == {image}, dry_run
    for overlay in ("base", "istio"):
        assert _image(_render(K8S / overlay)) == image


def test_every_image_tag_in_the_docs_and_files_is_the_package_version() -> None:
    files = [
        README,
        REPO / "Dockerfile",
        REPO / "Makefile",
        *sorted((REPO / "docs").rglob("*.md")),
        *sorted(p for p in K8S.rglob("*") if p.suffix in (".md", ".yaml")),
    ]
    found = {str(p.relative_to(REPO)): _IMAGE_TAG.findall(p.read_text()) for p in files}
    wrong = {path: tags for path, tags in found.items() if set(tags) - {_package_version()}}
    assert not wrong, f"tags other than {_package_version()}: {wrong}"
    mentioned = {path for path, tags in found.items() if tags}
    assert {"README.md", "Dockerfile", "docs/walkthrough.md", "k8s/README.md"} <= mentioned
    override = yaml.safe_load(_yaml_block(K8S_README, "images:"))
    assert override["images"][0]["newTag"] == _package_version()


def test_the_documented_images_override_runs_the_registrys_image(tmp_path: Path) -> None:
    block = _yaml_block(K8S_README, "images:")
    header = re.match(r"# (k8s/\S+/kustomization\.yaml)", block)
    assert header, "the override example names where it goes"
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    target = tmp_path / header.group(1)
    target.parent.mkdir(parents=True)
    target.write_text(block)
    (override,) = yaml.safe_load(block)["images"]
    assert override["name"] == _image(_render(K8S / "base")).split(":")[0]
    objects = _render(target.parent)
    assert _image(objects) == f"{override['newName']}:{override['newTag']}"
    # Nothing but the image changes.
    istio = {(o["kind"], o["metadata"]["name"]) for o in _render(K8S / "istio")}
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == istio


# --------------------------------------------------------------------------------- Istio


def _custom_policy() -> Obj:
    return _one(_render(K8S / "istio"), "AuthorizationPolicy")


@pytest.mark.parametrize("doc", list(DOCS))
def test_docs_say_the_gateway_checks_every_path_but_the_listed_exceptions(doc: str) -> None:
    text = _doc(doc)
    (rule,) = _custom_policy()["spec"]["rules"]
    assert "notPaths" in text
    for exception in rule["to"][0]["operation"]["notPaths"]:
        assert f"`{exception}`" in text
    # The old promise, "CUSTOM for /api/* only", is gone everywhere.
    narrow = [s for s in _sentences(text) if "CUSTOM" in s and "/api/*" in s]
    assert not narrow, narrow


@pytest.mark.parametrize("doc", list(DOCS))
def test_docs_say_the_gateway_asks_only_for_the_apis_hosts(doc: str) -> None:
    text = _doc(doc)
    (rule,) = _custom_policy()["spec"]["rules"]
    assert rule["to"][0]["operation"]["hosts"]
    assert "`hosts`" in text


def test_the_walkthrough_says_what_a_shared_gateway_needs() -> None:
    text = _section(WALKTHROUGH.read_text(), "### A gateway shared with other teams")
    hosts = _custom_policy()["spec"]["rules"][0]["to"][0]["operation"]["hosts"]
    for host in hosts:
        assert f"`{host}`" in text
    assert "unchecked" in text  # a routed host missing from the list is the open door
    assert "kustomize patch" in text


def test_the_documented_hosts_patch_scopes_the_policy_to_your_hosts(tmp_path: Path) -> None:
    block = _yaml_block(ISTIO_README, "path: /spec/rules/0/to/0/operation/hosts")
    header = re.match(r"# (k8s/\S+/kustomization\.yaml)", block)
    assert header, "the patch example names where it goes"
    shutil.copytree(K8S, tmp_path / "k8s")
    target = tmp_path / header.group(1)
    target.parent.mkdir()
    target.write_text(block)
    objects = _render(target.parent)
    (patch,) = yaml.safe_load(block)["patches"]
    wanted = yaml.safe_load(patch["patch"])[0]["value"]
    policy = _one(objects, "AuthorizationPolicy")
    assert policy["spec"]["rules"][0]["to"][0]["operation"]["hosts"] == wanted
    # Nothing but the hosts changes.
    # NOTE: a copy: _render's objects are cached for the whole process, shared by other tests.
    original = copy.deepcopy(_custom_policy())
    original["spec"]["rules"][0]["to"][0]["operation"]["hosts"] = wanted
    assert policy == original
    assert len(objects) == len(_render(K8S / "istio"))


@pytest.mark.parametrize(
    "doc", ["README.md#Deployment", "docs/walkthrough.md", "k8s/istio/README.md"]
)
def test_docs_say_why_the_mesh_normalises_paths(doc: str) -> None:
    text = _doc(doc)
    mesh = yaml.safe_load(MESH_CONFIG.read_text())["spec"]["meshConfig"]
    assert mesh["pathNormalization"]["normalization"] in text
    for spelling in ("//api/orders", "/api%2Forders"):
        assert f"`{spelling}`" in text


@pytest.mark.parametrize("doc", list(DOCS))
def test_docs_say_checks_travel_over_strict_mtls(doc: str) -> None:
    text = _doc(doc)
    peer = _one(_render(K8S / "istio"), "PeerAuthentication")
    assert peer["spec"]["mtls"]["mode"] in text
    assert "PeerAuthentication" in text
    assert "token" in text


# ------------------------------------------------------------------------------ HTTP door


def test_k8s_readme_says_how_to_open_the_http_door() -> None:
    text = K8S_README.read_text()
    for name in (
        "`k8s/components/http-door`",
        "`kubectl apply -k k8s/istio-http`",
        "`k8s/istio/mesh-config-http.yaml`",
        f"`--http-authz-listen 0.0.0.0:{HTTP_DOOR_PORT}`",
        "`http-authz`",
        "`server.httpAuthz`",
    ):
        assert name in text, name
    assert f"port {HTTP_DOOR_PORT}" in text


def test_the_documented_http_door_overlay_opens_the_door(tmp_path: Path) -> None:
    block = _yaml_block(K8S_README, "components:")
    header = re.match(r"# (k8s/\S+/kustomization\.yaml)", block)
    assert header, "the overlay example names where it goes"
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    target = tmp_path / header.group(1)
    target.parent.mkdir()
    target.write_text(block)
    objects = _render(target.parent)
    base = _render(K8S / "base")
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == {
        (o["kind"], o["metadata"]["name"]) for o in base
    }
    (container,) = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["args"][-2:] == ["--http-authz-listen", f"0.0.0.0:{HTTP_DOOR_PORT}"]
    ports = {p["name"]: p["port"] for p in _one(objects, "Service")["spec"]["ports"]}
    assert ports["http-authz"] == HTTP_DOOR_PORT


def _http_provider() -> Obj:
    (provider,) = yaml.safe_load(MESH_CONFIG_HTTP.read_text())["spec"]["meshConfig"][
        "extensionProviders"
    ]
    return dict(provider["envoyExtAuthzHttp"])


def test_istio_readme_explains_every_setting_of_the_http_provider() -> None:
    text = _section(ISTIO_README.read_text(), "## The HTTP door instead of gRPC")
    http = _http_provider()
    for name in (
        "`mesh-config-http.yaml`",
        "`kubectl apply -k k8s/istio-http`",
        "`envoyExtAuthzHttp`",
    ):
        assert name in text, name
    for field in http:
        if field not in ("service", "port"):
            assert f"`{field}" in text, field
    for header in (
        *http["includeRequestHeadersInCheck"],
        *http["headersToUpstreamOnAllow"],
        *http["headersToDownstreamOnDeny"],
    ):
        assert f"`{header}`" in text, header
    assert f'`statusOnError: "{http["statusOnError"]}"`' in text
    assert f"`failOpen: {str(http['failOpen']).lower()}`" in text
    # The gRPC variant stays the one the walkthrough and the rest of the README install.
    assert "`mesh-config.yaml`" in text
    assert "envoyExtAuthzGrpc" in MESH_CONFIG.read_text()


# ---------------------------------------------------------------- standalone Envoy examples


def _example(name: str) -> Obj:
    return dict(yaml.safe_load((EXAMPLES / name).read_text()))


def test_committed_http_example_is_what_the_generator_produces() -> None:
    generator = _example_generator()
    assert (EXAMPLES / "envoy-http.yaml").read_text() == generator.render_http(), (
        "examples/envoy/envoy-http.yaml is stale: run .venv/bin/python examples/envoy/generate.py"
    )
    # --check covers both files.
    assert generator.main(["--check"]) == 0


def test_envoy_validates_the_committed_http_example() -> None:
    _envoy_validate(EXAMPLES / "envoy-http.yaml")


def test_the_examples_ask_the_doors_the_manifests_open() -> None:
    service = _one(_render(K8S / "istio-http"), "Service")
    meta = service["metadata"]
    host = f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    for name, port_name in (("envoy.yaml", "grpc"), ("envoy-http.yaml", "http-authz")):
        authz = _clusters(_example(name))["authz"]
        endpoint = authz["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert endpoint["address"]["socket_address"] == {
            "address": host,
            "port_value": ports[port_name],
        }, name


def test_the_http_example_fails_closed_and_passes_on_the_configs_identity_headers() -> None:
    bootstrap = _example("envoy-http.yaml")
    ext_authz = _ext_authz(bootstrap)
    assert ext_authz["failure_mode_allow"] is False
    assert ext_authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert "with_request_body" not in ext_authz
    assert "grpc_service" not in ext_authz
    service = ext_authz["http_service"]
    assert service["server_uri"]["cluster"] == "authz"
    assert service["server_uri"]["timeout"] == "1.000s"
    settings = config.load(SERVER_CONFIG)
    # Envoy prepends path_prefix; the server removes its pathPrefix: the two agree.
    assert service.get("path_prefix", "") == settings.server.http_authz.path_prefix
    patterns = service["authorization_response"]["allowed_upstream_headers"]["patterns"]
    assert [p["exact"] for p in patterns] == output_headers([p.spec for p in settings.providers])
    assert [p["exact"] for p in patterns] == ["x-user-id"]
    # HTTP/1.1 to the door, and Envoy, not the door, closes idle connections.
    options = _clusters(bootstrap)["authz"]["typed_extension_protocol_options"]
    (http_options,) = options.values()
    assert "http_protocol_options" in http_options["explicit_http_config"]
    idle = specs.parse_duration(http_options["common_http_protocol_options"]["idle_timeout"])
    assert idle < settings.server.http_authz.idle_timeout


def test_examples_readme_names_both_files_and_their_doors() -> None:
    text = EXAMPLES_README.read_text()
    for name in ("`envoy.yaml`", "`envoy-http.yaml`", "gRPC door", "HTTP door"):
        assert name in text, name
    assert ":9001`" in text and f":{HTTP_DOOR_PORT}`" in text
    assert "`k8s/components/http-door`" in text
    assert "`x-user-id`" in text and "`x_user_id`" in text


# Envoy sends an HTTP authorization server these whatever allowed_headers says (its
# ext_authz.proto); every other header only when allowed_headers matches it.
_ENVOY_ALWAYS_SENDS = {"host", "content-length", "authorization"}


def _string_matcher_matches(pattern: Obj, name: str) -> bool:
    """Envoy's StringMatcher on a header name (names are lower case)."""
    fold = (lambda v: v.lower()) if pattern.get("ignore_case") else (lambda v: v)
    if "exact" in pattern:
        return fold(name) == fold(pattern["exact"])
    if "prefix" in pattern:
        return fold(name).startswith(fold(pattern["prefix"]))
    if "suffix" in pattern:
        return fold(name).endswith(fold(pattern["suffix"]))
    if "contains" in pattern:
        return fold(pattern["contains"]) in fold(name)
    if "safe_regex" in pattern:
        return re.fullmatch(pattern["safe_regex"]["regex"], name) is not None
    raise AssertionError(f"unknown StringMatcher {pattern}")


def test_the_http_example_sends_the_door_every_header_the_config_reads() -> None:
    # Envoy 1.40 sends an HTTP authorization server only Host, Content-Length and
    # Authorization (with the method and path) unless allowed_headers lists more: without
    # the rest, cookies, custom token headers, X-Forwarded-For and X-Request-Id would never
    # reach the server.
    service = _ext_authz(_example("envoy-http.yaml"))["http_service"]
    patterns = (
        service.get("authorization_request", {}).get("allowed_headers", {}).get("patterns", [])
    )
    missing = sorted(
        header
        for header in _headers_the_server_reads(config.load(SERVER_CONFIG))
        if header not in _ENVOY_ALWAYS_SENDS
        and not any(_string_matcher_matches(p, header) for p in patterns)
    )
    assert not missing, f"Envoy would not send the HTTP door: {', '.join(missing)}"
