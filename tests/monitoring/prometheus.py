"""A real Prometheus for the monitoring tests: the binaries, a process on 127.0.0.1, its API.

Debian's ``prometheus`` package brings both ``prometheus`` and ``promtool``; ``make test`` (and
``make monitoring-tools``) installs it. Without it the tests fail, saying how to install it.
Prometheus runs with a generated configuration and a temporary storage directory, on a port
picked at run time, and is stopped by PID: never Debian's system service.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import sys
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Self

import yaml

from tests.e2e.harness import REPO_ROOT, _Process, free_port, http_request, wait_until

MONITORING = REPO_ROOT / "k8s" / "monitoring"
INSTALL_HINT = (
    "install Debian's prometheus package (it brings promtool): `make monitoring-tools`, "
    "or as root `apt-get update && apt-get install -y --no-install-recommends prometheus`"
)


class MissingToolError(AssertionError):
    """A binary the monitoring tests need is not installed."""


def tool(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; MissingToolError (a test failure) when absent."""
    found = shutil.which(name)
    if found is None:
        raise MissingToolError(f"`{name}` not found on PATH: {INSTALL_HINT}")
    return found


@functools.cache
def generator() -> ModuleType:
    """k8s/monitoring/generate.py, the source of the dashboard and the rules (a script)."""
    path = MONITORING / "generate.py"
    spec = importlib.util.spec_from_file_location("monitoring_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def dashboard_exprs(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel of a Grafana dashboard JSON."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def for_grafana(expr: str, variables: Mapping[str, str]) -> str:
    """``expr`` with the dashboard's variables (``$name``) replaced as Grafana would."""
    # Longest first: `$__rate_interval` is not `$__rate` followed by text, say.
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    return expr


def rule_exprs(rules: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(alert or record name, expr) of every rule of a rules file."""
    return [
        (rule.get("alert") or rule["record"], rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


class PrometheusProcess(_Process):
    """``prometheus`` scraping ``targets`` every ``scrape_interval``, rules from ``rule_files``,
    on 127.0.0.1:<free port> with its storage in a temporary directory (removed on stop)."""

    name = "prometheus"

    def __init__(
        self,
        targets: Sequence[str],
        *,
        job: str = "authz-server",
        target_labels: Mapping[str, str] | None = None,
        rule_files: Sequence[Path] = (),
        scrape_interval: str = "1s",
        log_path: Path | str | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        super().__init__(log_path)
        self.targets = list(targets)
        self.job = job
        self.target_labels = dict(target_labels or {})
        self.rule_files = [str(p) for p in rule_files]
        self.scrape_interval = scrape_interval
        self.ready_timeout = ready_timeout
        self.port = 0
        self._workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "rule_files": self.rule_files,
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": self.targets, "labels": self.target_labels}],
                }
            ],
        }

    def start(self) -> Self:
        binary = tool("prometheus")
        self._workdir = Path(tempfile.mkdtemp(prefix="prometheus-"))
        config = self._workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.port = free_port()
        self._spawn(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self._workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ]
        )
        self._wait_ready(f"{self.url}/-/ready", self.ready_timeout)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        code = super().stop(timeout)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    # ------------------------------------------------------------------------------- API

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET /api/v1/<path>; the decoded body, whatever its status (errors included)."""
        query = urllib.parse.urlencode(params)
        _, _, body = http_request(f"{self.url}/api/v1/{path}?{query}", timeout=10)
        result: dict[str, Any] = json.loads(body)
        return result

    def query(self, expr: str, **params: str) -> dict[str, Any]:
        """An instant query; the whole answer (``status``, ``data`` or ``error``)."""
        return self.api("query", query=expr, **params)

    def vector(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now; AssertionError if it does not parse."""
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr!r}: {answer.get('error')}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        """The single value of ``expr`` now."""
        result = self.vector(expr)
        assert len(result) == 1, f"{expr!r}: expected one series, got {result}"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Poll until ``expr`` returns a non-empty vector; return it."""
        return wait_until(
            lambda: self.vector(expr), timeout=timeout, interval=0.2, what=f"Prometheus: {expr}"
        )
