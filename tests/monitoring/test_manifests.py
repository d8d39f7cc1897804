"""The monitoring manifests: they validate against prometheus-operator's CRD schemas, the
component renders beside k8s/base, and what it scrapes is what the base exposes.

The CRD schemas (prometheus-operator 0.93.0, structure only) live in
``tests/data/prometheus-operator-crd-schemas.yaml``, made by
``tests/data/prometheus_operator_crd_schemas.py``, so a plain clone validates offline. They
are checked the way ``tests/test_manifests.py`` checks Istio's: unknown fields are errors.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers import load_script, without_comment_lines
from tests.monitoring.prometheus import MONITORING, tool
from tests.test_manifests import (
    _OBJECT_META,
    KUBERNETES_VERSIONS,
    _render,
    _strict,
    kubernetes_problems,
)

Obj = dict[str, Any]

REPO = MONITORING.parent.parent
K8S = REPO / "k8s"
CRDS = REPO / "tests" / "data" / "prometheus-operator-crd-schemas.yaml"
README = MONITORING / "README.md"
_YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)


def _label(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('name', '?')}"


def _python_patterns(schema: Any) -> Any:
    """``schema`` with Go's regular expressions made Python's: Go lets a flag such as ``(?i)``
    stand anywhere, applying to the rest; Python wants it first (same meaning after ``^``)."""
    if isinstance(schema, list):
        return [_python_patterns(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key != "pattern":
            out[key] = _python_patterns(value)
        elif isinstance(value, str) and "(?i)" in value[1:]:
            out[key] = "(?i)" + value.replace("(?i)", "")
        else:
            out[key] = value
    return out


@functools.cache
def _schemas() -> dict[str, dict[str, Any]]:
    """{"group/version kind": strict JSON Schema} for every served version of the CRDs."""
    if not CRDS.is_file():
        pytest.fail(f"prometheus-operator's CRDs are expected at {CRDS}")
    schemas = {}
    for crd in (doc for doc in yaml.safe_load_all(CRDS.read_text()) if doc):
        spec = crd["spec"]
        for version in spec["versions"]:
            if not version.get("served"):
                continue
            root = _strict(_python_patterns(version["schema"]["openAPIV3Schema"]))
            root["properties"] = {
                **root.get("properties", {}),
                "apiVersion": {"const": f"{spec['group']}/{version['name']}"},
                "kind": {"const": spec["names"]["kind"]},
                "metadata": _OBJECT_META,
            }
            root["required"] = sorted({"apiVersion", "kind", "metadata", *root.get("required", [])})
            jsonschema.Draft202012Validator.check_schema(root)
            schemas[f"{spec['group']}/{version['name']} {spec['names']['kind']}"] = root
    return schemas


def operator_problems(obj: Obj) -> list[str]:
    """Every way ``obj`` breaks its prometheus-operator CRD schema (empty: valid)."""
    schema = _schemas().get(f"{obj['apiVersion']} {obj['kind']}")
    if schema is None:
        return [f"{_label(obj)}: no served CRD version for {obj['apiVersion']} {obj['kind']}"]
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{_label(obj)}: {error.json_path}: {error.message} (prometheus-operator CRD schema)"
        for error in sorted(validator.iter_errors(obj), key=lambda e: e.json_path)
    ]


def problems(objects: list[Obj]) -> list[str]:
    found: list[str] = []
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            found += operator_problems(obj)
        else:
            for version in KUBERNETES_VERSIONS:
                found += kubernetes_problems(obj, version)
    return found


def _yaml_block(containing: str) -> str:
    (block,) = [b for b in _YAML_BLOCK.findall(README.read_text()) if containing in b]
    return str(block)


def _documented_overlay(tmp: Path) -> tuple[Obj, ...]:
    """The overlay k8s/monitoring/README.md shows, rendered where it says it goes."""
    block = _yaml_block("components:")
    header = re.match(r"# (k8s/\S+/kustomization\.yaml)", block)
    assert header, "the overlay example names where it goes"
    shutil.copytree(K8S, tmp / "k8s")
    target = tmp / header.group(1)
    target.parent.mkdir()
    target.write_text(block)
    return _render(target.parent)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Obj, ...]:
    return _documented_overlay(tmp_path_factory.mktemp("overlay"))


def _one(objects: tuple[Obj, ...] | list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def _file(name: str) -> Obj:
    loaded: Obj = yaml.safe_load((MONITORING / name).read_text())
    return loaded


# ------------------------------------------------------------------------------ the tests


def test_the_component_adds_its_objects_to_the_base(rendered: tuple[Obj, ...]) -> None:
    base = {(o["kind"], o["metadata"]["name"]) for o in _render(K8S / "base")}
    added = {(o["kind"], o["metadata"]["name"]) for o in rendered} - base
    assert added == {
        ("ServiceMonitor", "authz-server"),
        ("PrometheusRule", "authz-server"),
        ("ConfigMap", "authz-server-dashboard"),
    }
    assert {o["metadata"].get("namespace") for o in rendered if o["kind"] != "Namespace"} == {
        "authz-system"
    }


def test_every_object_the_component_adds_validates(rendered: tuple[Obj, ...]) -> None:
    # The base's objects are tests/test_manifests.py's.
    base = {(o["kind"], o["metadata"]["name"]) for o in _render(K8S / "base")}
    added = [o for o in rendered if (o["kind"], o["metadata"]["name"]) not in base]
    assert len(added) == 3
    found = problems(added)
    assert not found, "\n".join(found)


def test_the_podmonitor_alternative_validates() -> None:
    assert operator_problems(_file("podmonitor.yaml")) == []


def test_the_dashboard_configmap_holds_the_dashboard_for_grafanas_sidecar(
    rendered: tuple[Obj, ...],
) -> None:
    configmap = _one(rendered, "ConfigMap", "authz-server-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"] == {"authz-server.json": (MONITORING / "dashboard.json").read_text()}


def test_the_prometheusrule_is_the_generated_one(rendered: tuple[Obj, ...]) -> None:
    assert _one(rendered, "PrometheusRule") == _file("prometheusrule.yaml")


def test_the_monitors_scrape_the_metrics_port_of_the_base(rendered: tuple[Obj, ...]) -> None:
    service = _one(rendered, "Service", "authz-server")
    deployment = _one(rendered, "Deployment", "authz-server")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    metrics_port = {p["name"]: p["containerPort"] for p in container["ports"]}["http-metrics"]

    monitor = _one(rendered, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"

    pod_monitor = _file("podmonitor.yaml")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "http-metrics" and endpoint["path"] == "/metrics"
    # The job label comes from a pod label whose value is the ServiceMonitor's job.
    assert pod_labels[pod_monitor["spec"]["jobLabel"]] == service["metadata"]["name"]

    # The side port is the one the NetworkPolicy opens to the monitoring namespace.
    policy = _one(rendered, "NetworkPolicy")
    opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert metrics_port in opened


@pytest.mark.parametrize(
    ("kind", "mutate", "expected"),
    [
        (
            "ServiceMonitor",
            lambda o: o["spec"]["endpoints"][0].update(intervall="15s"),
            "Additional properties are not allowed ('intervall' was unexpected)",
        ),
        (
            "ServiceMonitor",
            lambda o: o["spec"]["endpoints"][0].update(interval="15 seconds"),
            "does not match",
        ),
        (
            "PrometheusRule",
            lambda o: o["spec"]["groups"][0]["rules"][0].pop("expr"),
            "'expr' is a required property",
        ),
        (
            "PodMonitor",
            lambda o: o["spec"].pop("selector"),
            "'selector' is a required property",
        ),
    ],
)
def test_a_broken_monitoring_object_is_caught(kind: str, mutate: Any, expected: str) -> None:
    source = {"ServiceMonitor": "servicemonitor.yaml", "PrometheusRule": "prometheusrule.yaml"}
    obj = copy.deepcopy(_file(source.get(kind, "podmonitor.yaml")))
    assert operator_problems(obj) == []
    mutate(obj)
    found = operator_problems(obj)
    assert any(expected in p for p in found), found


def _promtool_check_config(tmp_path: Path, config: Obj) -> None:
    (tmp_path / "rules.yaml").write_text((MONITORING / "rules.yaml").read_text())
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [tool("promtool"), "check", "config", "prometheus.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_the_documented_static_prometheus_configuration_passes_promtool(tmp_path: Path) -> None:
    _promtool_check_config(tmp_path, yaml.safe_load(_yaml_block("static_configs:")))


def test_the_documented_kubernetes_prometheus_configuration_passes_promtool(
    tmp_path: Path,
) -> None:
    config = yaml.safe_load(_yaml_block("kubernetes_sd_configs:"))
    (job,) = config["scrape_configs"]
    # NOTE: Debian builds Prometheus without Kubernetes discovery (promtool refuses the
    # field): promtool checks the rest, the discovery block is checked here.
    assert job.pop("kubernetes_sd_configs") == [
        {"role": "pod", "namespaces": {"names": ["authz-system"]}}
    ]
    job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    _promtool_check_config(tmp_path, config)
    keep, *labels = job["relabel_configs"]
    assert keep["regex"] == "authz-server;http-metrics" and keep["action"] == "keep"
    assert {r["target_label"] for r in labels} == {"namespace", "pod"}


def _schema_script() -> Any:
    return load_script(REPO / "tests" / "data" / "prometheus_operator_crd_schemas.py")


def test_the_crd_schema_file_is_the_scripts_output_and_carries_no_descriptions() -> None:
    script = _schema_script()
    kept = CRDS.read_text()
    # Reducing the reduced file changes nothing: no hand edits, nothing the script drops.
    assert without_comment_lines(script.render(CRDS)) == without_comment_lines(kept)
    assert "description:" not in without_comment_lines(kept)
    header = kept[: kept.index("apiVersion:")]
    for note in ("sha256:", "Release: 0.93.0", "Apache License 2.0", "prometheus_operator_crd"):
        assert note in header
    assert sorted(k.split()[1] for k in _schemas()) == sorted(script.KINDS)
