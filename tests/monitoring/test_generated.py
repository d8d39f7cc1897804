"""k8s/monitoring/ is what its one source makes, and the dashboard is one an operator can use.

``generate.py`` holds the panels and the alerts; ``dashboard.json``, ``rules.yaml`` and
``prometheusrule.yaml`` are written from it. A hand edit of a generated file, or a source edit
without regenerating, fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.monitoring.prometheus import MONITORING, dashboard_exprs, generator

REPO = MONITORING.parent.parent
REFERENCE = REPO / "docs" / "reference.md"
SELECTOR = '{namespace=~"$namespace", job=~"$job"'
# A metric name in a query: a word before `{` (functions and keywords are followed by `(`).
_METRIC = re.compile(r"\b([a-z_][a-z0-9_]*)\{")


def test_generated_files_are_what_the_source_makes() -> None:
    source = generator()
    for name, render in source.OUTPUTS.items():
        assert (MONITORING / name).read_text() == render(), (
            f"k8s/monitoring/{name} differs from generate.py: run `make monitoring`"
        )
    assert source.main(["--check"]) == 0


def test_check_mode_names_a_file_that_drifted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = generator()
    for name in source.OUTPUTS:
        (tmp_path / name).write_text((MONITORING / name).read_text())
    (tmp_path / "rules.yaml").write_text("groups: []\n")
    monkeypatch.setattr(source, "HERE", tmp_path)
    assert source.main(["--check"]) == 1
    assert "out of date with k8s/monitoring/generate.py: rules.yaml;" in capsys.readouterr().err


def test_the_plain_rules_and_the_prometheusrule_hold_the_same_groups() -> None:
    rules = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    operator = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule"
    assert operator["spec"]["groups"] == rules["groups"] == generator().rule_groups()


def _panels() -> list[dict[str, object]]:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_every_panel_says_what_it_shows_and_asks_the_chosen_datasource() -> None:
    panels = _panels()
    assert len(panels) == 23
    for panel in panels:
        assert isinstance(panel["description"], str) and len(panel["description"]) > 40
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
    ids = [p["id"] for p in json.loads((MONITORING / "dashboard.json").read_text())["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_fit_the_grid_without_overlapping() -> None:
    taken: set[tuple[int, int]] = set()
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_query_selects_the_dashboards_namespace_and_job() -> None:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    for title, expr in dashboard_exprs(dashboard):
        metrics = _METRIC.findall(expr)
        assert metrics, f"{title}: {expr}"
        assert expr.count(SELECTOR) == len(metrics), f"{title}: a metric without {SELECTOR}}}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["allValue"] == variables["job"]["allValue"] == ".*"


def test_the_dashboard_covers_what_an_operator_asked_for() -> None:
    exprs = " ".join(
        e for _, e in dashboard_exprs(json.loads((MONITORING / "dashboard.json").read_text()))
    )
    for needed in (
        "authz_checks_total",  # decisions by decision and reason
        "histogram_quantile(0.99",  # latency
        "authz_jwks_last_success_timestamp_seconds",  # key set age
        "authz_jwks_stale_seconds",  # stale or not
        "authz_jwks_fetches_total",  # fetch failures
        "authz_token_cache_hits_total",
        "authz_config_reloads_total",
        "authz_config_info",  # the hash in force
        "authz_dry_run_total",
        "sum by (door)",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert needed in exprs, needed


def test_the_401_reasons_of_the_alert_are_the_references_401_reasons() -> None:
    table = REFERENCE.read_text().split("## Reasons", 1)[1]
    documented = set(re.findall(r"^\| `(\w+)` \| 401\b", table, flags=re.MULTILINE))
    assert documented
    assert set(generator().UNAUTHENTICATED_REASONS) == documented


def test_the_readme_lists_every_panel_and_every_alert() -> None:
    readme = (MONITORING / "README.md").read_text()
    for row in generator().ROWS:
        for panel in row.panels:
            assert f"| {panel.title} |" in readme, panel.title
    for alert in generator().ALERTS:
        assert f"| `{alert.name}` | {alert.severity} |" in readme, alert.name
