"""``make dashboard-preview``: draw the dashboard's main panels from a real Prometheus run.

The monitored stack of the tests (the server under ``--workers 2`` behind a real Envoy, a JWKS
server, Prometheus scraping every second) runs about 80 seconds of scripted traffic and
events; then each main panel's query (as in ``dashboard.json``, variables replaced) is asked of
Prometheus over the run and drawn with matplotlib into one PNG::

    python -m tests.monitoring.preview docs/dashboard-preview.png

It shows what the dashboard's queries return, not Grafana's look.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from authz_server.tools import devkeys
from tests.helpers import claims_for
from tests.monitoring.prometheus import MONITORING, for_grafana, generator
from tests.monitoring.stack import (
    JOB,
    NAMESPACE,
    REFUSED,
    MonitoredStack,
    monitored_stack,
)

RATE_WINDOW = "5s"  # $__rate_interval for a 1s scrape: sharp enough to see each event


class Traffic:
    """Requests through Envoy at ``rate`` per second from a background thread; what each
    second sends is ``mix(second)``: a list of (path, token) to cycle through."""

    def __init__(self, stack: MonitoredStack, rate: float) -> None:
        self.stack = stack
        self.rate = rate
        self.mix: Callable[[], list[tuple[str, str | None]]] = list
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            mix = self.mix()
            if mix:
                path, token = mix[self.sent % len(mix)]
                self.stack.status(path, token)
                self.sent += 1
            # Paced to ``rate``: the wait is the schedule, not a test waiting for a condition.
            self._stop.wait(max(0.0, start + self.sent / self.rate - time.monotonic()))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def run_story(stack: MonitoredStack, pause: Callable[[float], None]) -> list[tuple[float, str]]:
    """The scripted run; returns (unix time, what happened) for the markers."""
    events: list[tuple[float, str]] = []

    def mark(what: str) -> None:
        events.append((time.time(), what))

    repeat = stack.token()
    fresh = [stack.token(jti=str(i)) for i in range(40)]
    forged = devkeys.generate_key("RSA", kid="monitoring").sign(claims_for(time.time()))
    normal = (
        [("/api/orders", repeat)] * 8
        + [("/api/orders", t) for t in fresh[:4]]
        + [("/api/admin", repeat), ("/other", repeat)]
        + [("/api/orders", None)] * 2
    )
    with Traffic(stack, rate=40) as traffic:
        traffic.mix = lambda: normal
        pause(15)
        mark("401 spike:\nforged tokens")
        traffic.mix = lambda: normal + [("/api/orders", forged)] * 10
        pause(10)
        traffic.mix = lambda: normal
        stack.reload_and_wait(stack.config_text(["/api/admin*", "/api/v0*"], max_stale="40s"))
        mark("reload")
        pause(7)
        mark("worker killed")
        stack.kill_worker(1)
        pause(7)
        mark("JWKS down")
        stack.break_key_set()
        pause(18)
        stack.heal_key_set()
        mark("JWKS back")
        pause(10)
        stack.refuse(REFUSED)
        mark("refused\nreload")
        pause(8)
    return events


def query_range(stack: MonitoredStack, expr: str, start: float, end: float) -> list[Any]:
    answer = stack.prometheus.api(
        "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1"
    )
    assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
    result: list[Any] = answer["data"]["result"]
    return result


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for name, value in labels.items():
        text = text.replace("{{" + name + "}}", value)
    return text


def draw(
    stack: MonitoredStack, start: float, end: float, events: list[tuple[float, str]], out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    mains = [p for row in generator().ROWS for p in row.panels if p.main]
    variables = {"$__rate_interval": RATE_WINDOW, "$namespace": NAMESPACE, "$job": JOB}
    figure, axes = plt.subplots(3, 2, figsize=(14, 11.5), sharex=True)
    for ax, panel in zip(axes.flat, mains, strict=True):
        panel_json = next(p for p in dashboard["panels"] if p["title"] == panel.title)
        for target in panel_json["targets"]:
            expr = for_grafana(target["expr"], variables)
            for series in query_range(stack, expr, start, end):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=legend(target.get("legendFormat", ""), series["metric"]))
        for i, (when, what) in enumerate(events):
            ax.axvline(when - start, color="grey", linestyle=":", linewidth=1)
            if ax in axes[0]:
                ax.annotate(
                    what,
                    (when - start, 1.0 + 0.07 * (i % 2)),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    va="bottom",
                    ha="center",
                )
        if panel.unit == "percentunit":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        unit = {"reqps": " (req/s)", "s": " (s)", "percentunit": ""}.get(panel.unit, "")
        ax.set_title(panel.title + unit, fontsize=10, pad=30 if ax in axes[0] else 6)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("seconds")
    figure.suptitle(
        "authz-server dashboard, main panels: a real Prometheus scraping the server "
        "(--workers 2) behind Envoy, 1 s scrapes",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(out, dpi=80)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--workdir", type=Path, help="keep the logs there (default: a temp dir)")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="dashboard-preview-") as tmp,
        monitored_stack(args.workdir or Path(tmp), max_stale="40s") as stack,
    ):
        stack.prometheus.wait_for(f'up{{job="{JOB}"}} == 1')
        start = time.time()
        events = run_story(stack, time.sleep)
        end = time.time()
        # The last scrape in: Prometheus has seen everything the story did.
        stack.prometheus.wait_for(f'timestamp(up{{job="{JOB}"}}) > {end:.3f}')
        draw(stack, start, end, events, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
