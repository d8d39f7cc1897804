"""The soak's verdicts, its markdown summary and its PNG.

Windows: the first `WARMUP` of the run is warm-up (caches fill, thread pools grow, the
allocator settles) and judged for statuses only. Resources are compared between the first
window after it and the last window of the run, each `WINDOW` of the run long (with the
defaults, 60-90 s against 270-300 s of a 5-minute run):

- RSS: the median of the last window is less than 10% above the median of the first.
- threads, open fds other than sockets (files, pipes, epoll), sockets: the median of the last
  window is at most the largest value of the first plus a slack (`slack`) for the pools that
  grow on demand up to a bound, when a slow moment first needs them: threads 4 (the HTTP
  door's 4 threads for Checks that wait on a key refresh; gRPC Check threads up to
  `server.threads`), other fds 2, sockets 2 through the gRPC door (Envoy holds one HTTP/2
  connection per worker) and, through the HTTP door, one per request in flight (the load's
  connections and the probe's).

A leak tied to the work done climbs far past those: in 5 minutes the server answers ~100,000
Checks and fetches its key set ~250 times. A spike (a thread fetching keys) does not move a
median. What one reload or one rotation might leave behind (one thread, one fd) is below
what a single run can tell from a pool growing.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.harness.loadgen import percentile
from bench.soak import traffic
from bench.soak.run import EVENT_TIMEOUT_S, Event, SoakOptions, SoakResult, discard_workdir
from bench.soak.samples import Sample

WARMUP = 0.2
WINDOW = 0.1
RSS_GROWTH_LIMIT = 0.10


@dataclass(frozen=True)
class Verdict:
    name: str
    rule: str
    measured: str
    passed: bool


def _s(seconds: float) -> str:
    """Seconds for a table: whole ones, a tenth where that matters (short runs)."""
    return f"{seconds:.0f}" if seconds >= 30 else f"{seconds:.1f}".removesuffix(".0")


def _between(samples: Sequence[Sample], lo: float, hi: float) -> list[Sample]:
    return [s for s in samples if lo <= s.at_s < hi]


def comparison_windows(seconds: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(first window after warm-up, last window), each (start s, end s)."""
    first = (WARMUP * seconds, (WARMUP + WINDOW) * seconds)
    last = ((1 - WINDOW) * seconds, seconds + 1.0)  # the final sample may land just after
    return first, last


def _resource_verdicts(result: SoakResult) -> list[Verdict]:
    (f_lo, f_hi), (l_lo, l_hi) = comparison_windows(result.options.seconds)
    first = _between(result.samples, f_lo, f_hi)
    last = _between(result.samples, l_lo, l_hi)
    where = f"{_s(f_lo)}-{_s(f_hi)} s vs {_s(l_lo)}-{_s(result.options.seconds)} s"
    if not first or not last:
        missing = Verdict("resources", "samples in both windows", "no samples", False)
        return [missing]
    rss_first = statistics.median(s.rss_mib for s in first)
    rss_last = statistics.median(s.rss_mib for s in last)
    growth = rss_last / rss_first - 1
    verdicts = [
        Verdict(
            "RSS growth",
            f"median of the last window < {RSS_GROWTH_LIMIT:.0%} above the first's ({where})",
            f"{rss_first:.1f} -> {rss_last:.1f} MiB ({growth:+.1%})",
            growth < RSS_GROWTH_LIMIT,
        )
    ]
    for name, attribute in (
        ("threads", "threads"),
        ("open fds (not sockets)", "other_fds"),
        ("sockets", "sockets"),
    ):
        top = max(getattr(s, attribute) for s in first)
        median = statistics.median(getattr(s, attribute) for s in last)
        allowed = slack(attribute, result.options)
        verdicts.append(
            Verdict(
                name,
                f"median of the last window <= the largest of the first + {allowed} ({where})",
                f"first window max {top}, last window median {median:g}",
                median <= top + allowed,
            )
        )
    return verdicts


def slack(attribute: str, options: SoakOptions) -> int:
    """How far ``attribute`` (threads, other_fds, sockets) may rise after the first window
    without a leak: the pools that grow on demand up to a bound (see the module docstring)."""
    if attribute == "threads":
        return 4
    if attribute == "other_fds":
        return 2
    return 2 if options.door == "grpc" else options.connections + 1


def verdicts(result: SoakResult) -> list[Verdict]:
    """Every pass criterion of the run, passed or not."""
    recorder = result.recorder
    answered = {kind for kind, expected, got in recorder.counts if expected == got}
    unsent = [kind for kind in traffic.WEIGHTS if kind not in answered]
    invoices = {got for kind, _, got in recorder.counts if kind == "invoices"}
    late = [e.name for e in result.events if e.error is not None or e.effective_s is None]
    log = result.server_log
    healthy = (
        result.server_lost_at_s is None
        and result.server_exit == 0
        and log.errors == 0
        and log.tracebacks == 0
    )
    return [
        Verdict(
            "statuses",
            "every answer is the status its request was sent to get",
            f"{recorder.unexpected_total:,} unexpected of {recorder.total:,}",
            recorder.unexpected_total == 0 and recorder.total > 0,
        ),
        Verdict(
            "every kind",
            "each kind of request answered as expected at least once; /invoices 403 and 200",
            f"missing: {', '.join(unsent)}" if unsent else "all answered",
            not unsent and {200, 403} <= invoices,
        ),
        Verdict(
            "changes",
            f"rotation, retirement and reload each in force within {EVENT_TIMEOUT_S:.0f} s",
            "; ".join(_event_text(e) for e in result.events),
            not late,
        ),
        *_resource_verdicts(result),
        Verdict(
            "server",
            "ran to the end, exit 0 on SIGTERM, no ERROR line nor traceback in its log",
            f"exit {result.server_exit}, {log.errors} ERROR, {log.tracebacks} traceback(s)"
            + (f", gone at {result.server_lost_at_s:.0f} s" if result.server_lost_at_s else ""),
            healthy,
        ),
    ]


def _event_text(event: Event) -> str:
    if event.error is not None:
        return f"{event.name}: {event.error}"
    return f"{event.name} {event.took_s:.1f} s"


# ------------------------------------------------------------------------------ series


@dataclass(frozen=True)
class Interval:
    at_s: float  # middle of the interval
    rps: float
    p50_ms: float | None
    p99_ms: float | None


def intervals(result: SoakResult) -> list[Interval]:
    """Throughput and latency percentiles of the answers of each sampling interval."""
    step = result.recorder.bin_s
    count = int(result.options.seconds / step) + 1
    series = []
    for index in range(count):
        values = sorted(result.recorder.bins.get(index, ()))
        answered = sum(1 for _ in values)
        p50 = percentile(values, 0.5) * 1000 if values else None
        p99 = percentile(values, 0.99) * 1000 if values else None
        series.append(Interval((index + 0.5) * step, answered / step, p50, p99))
    return series


def cpu_percent(samples: Sequence[Sample]) -> list[tuple[float, float]]:
    """(time s, CPU % of one core) between consecutive samples."""
    return [
        (b.at_s, 100 * (b.cpu_s - a.cpu_s) / (b.at_s - a.at_s))
        for a, b in itertools.pairwise(samples)
        if b.at_s > a.at_s
    ]


# ---------------------------------------------------------------------------- markdown


def _ms(seconds: Sequence[float], fraction: float) -> str:
    return f"{percentile(sorted(seconds), fraction) * 1000:.2f}" if seconds else "-"


def _traffic_rows(result: SoakResult) -> list[str]:
    recorder = result.recorder
    rows = []
    for kind in traffic.WEIGHTS:
        expectations = sorted({e for k, e, _ in recorder.counts if k == kind})
        for expected in expectations:
            got = {g: n for (k, e, g), n in recorder.counts.items() if k == kind and e == expected}
            answered = sum(got.values())
            got_text = ", ".join(f"{g or 'no answer'}: {n:,}" for g, n in sorted(got.items()))
            latencies = recorder.latencies.get((kind, expected), ())
            rows.append(
                f"| `{kind}` | {traffic.DESCRIPTIONS[kind]} | {expected} | {answered:,} "
                f"| {got_text} | {_ms(latencies, 0.5)} | {_ms(latencies, 0.99)} |"
            )
    return rows


def _window_rows(result: SoakResult) -> list[str]:
    seconds = result.options.seconds
    cpu = cpu_percent(result.samples)
    rows = []
    steps = round(1 / WINDOW)
    for index in range(steps):
        lo, hi = index * WINDOW * seconds, (index + 1) * WINDOW * seconds
        if index == steps - 1:
            hi += 1.0
        bins = [
            latency
            for b, values in result.recorder.bins.items()
            if lo <= b * result.recorder.bin_s < hi
            for latency in values
        ]
        samples = _between(result.samples, lo, hi)
        cpus = [c for t, c in cpu if lo <= t < hi]
        label = f"{_s(lo)}-{_s(min(hi, seconds))} s"
        if index < round(WARMUP / WINDOW):
            label += " (warm-up)"
        if samples:
            rss = f"{statistics.median(s.rss_mib for s in samples):.1f}"
            fds = (
                f"{statistics.median(s.other_fds for s in samples):g}"
                f" / {max(s.other_fds for s in samples)}"
            )
            sockets = (
                f"{statistics.median(s.sockets for s in samples):g}"
                f" / {max(s.sockets for s in samples)}"
            )
            threads = (
                f"{statistics.median(s.threads for s in samples):g}"
                f" / {max(s.threads for s in samples)}"
            )
        else:
            rss = fds = sockets = threads = "-"
        cpu_text = f"{statistics.mean(cpus):.0f}" if cpus else "-"
        rps = len(bins) / (min(hi, seconds) - lo)
        rows.append(
            f"| {label} | {rps:,.0f} | {_ms(bins, 0.5)} | {_ms(bins, 0.99)} | {rss} | {fds} "
            f"| {sockets} | {threads} | {cpu_text} |"
        )
    return rows


def markdown(result: SoakResult, checks: Sequence[Verdict], png_name: str) -> str:
    """The summary of the run."""
    options = result.options
    recorder = result.recorder
    failed = [v.name for v in checks if not v.passed]
    door = "gRPC door" if options.door == "grpc" else "HTTP door"
    rate = recorder.total / result.duration_s if result.duration_s else 0.0
    length = f"{options.seconds / 60:g} min" if options.seconds >= 60 else f"{options.seconds:g} s"
    verdict = "**passed**" if not failed else f"**FAILED**: {', '.join(failed)}"
    lines = [
        f"# Soak: {length} through a real Envoy ({door})",
        "",
        f"`make soak` (`python -m bench.soak --seconds {options.seconds:g} --door {options.door}`)"
        f" on {result.started}: {verdict}. {recorder.total:,} requests at {rate:,.0f} req/s"
        f" (paced at {options.rate:g} over {options.connections} keep-alive connections),"
        f" {recorder.unexpected_total:,} unexpected statuses.",
        "",
        "## Verdicts",
        "",
        "| criterion | rule | measured | |",
        "|---|---|---|---|",
        *(
            f"| {v.name} | {v.rule} | {v.measured} | {'pass' if v.passed else '**FAIL**'} |"
            for v in checks
        ),
        "",
        "## Traffic",
        "",
        "Latency: from writing the request to the end of the answer, at the load generator;",
        "only answers with the expected status.",
        "",
        "| kind | request | expected | answered | got | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
        *_traffic_rows(result),
        "",
        "## Changes under load",
        "",
        "| change | what | scheduled at | started at | in force after |",
        "|---|---|---|---|---|",
        *(
            f"| {e.name} | {e.what} | {_s(e.at_s)} s | "
            + (f"{e.started_s:.1f} s" if e.started_s is not None else "-")
            + " | "
            + (f"{e.took_s:.2f} s" if e.took_s is not None else f"**{e.error}**")
            + " |"
            for e in result.events
        ),
        "",
        f"Key set fetches served by the JWKS endpoint: {result.jwks_fetches:,}. "
        f"Configuration reloads: {_counts(result.reloads)}. "
        f"Envoy ext_authz: {_counts(_short(result.envoy_stats))}. "
        f"Server log: {result.server_log.lines:,} lines, {result.server_log.warnings} WARNING, "
        f"{result.server_log.errors} ERROR.",
        "",
        "## The server over time",
        "",
        f"Sampled from /proc every {options.sample_interval:g} s: RSS (VmRSS), open fds"
        " (/proc/PID/fd: sockets, and the others), threads, CPU (utime + stime, % of one core)."
        " fds, sockets and threads: median / max.",
        "",
        "| window | req/s | p50 ms | p99 ms | RSS MiB | fds (not sockets) | sockets | threads"
        " | CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
        *_window_rows(result),
        "",
        f"![RSS, latency, fds and threads over the run]({png_name})",
        "",
    ]
    if recorder.unexpected:
        lines += [
            "## Unexpected statuses (first ones)",
            "",
            *(
                f"- {u.at_s:.2f} s: `{u.kind}` expected {u.expected}, got {u.got or 'no answer'}"
                for u in recorder.unexpected
            ),
            "",
        ]
    if failed and result.workdir is not None:
        lines += [f"Logs and configuration kept in `{result.workdir}`.", ""]
    lines += _how_it_ran(result)
    return "\n".join(lines)


def _short(stats: dict[str, int]) -> dict[str, float]:
    return {name.rsplit(".", 1)[-1]: float(value) for name, value in stats.items() if value}


def _counts(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:,.0f}" for name, value in sorted(values.items())) or "none"


def _how_it_ran(result: SoakResult) -> list[str]:
    options = result.options
    (f_lo, f_hi), (l_lo, _) = comparison_windows(options.seconds)
    mix = ", ".join(f"`{kind}` {weight}" for kind, weight in traffic.WEIGHTS.items())
    return [
        "## How it ran",
        "",
        "- All on 127.0.0.1, ports picked at run time: a JWKS endpoint (HTTP, a thread of the"
        " driver, `tests/e2e/harness.py`'s `JWKSServer`), authz-server (`serve`, one process,"
        " default settings but a token cache of"
        f" {traffic.TOKEN_CACHE_ENTRIES} entries and key refresh every 2 s, 1 s at least"
        " between unknown-kid refreshes), Envoy (`--concurrency 2`, the shipped bootstrap of"
        " `render_bootstrap` with a direct-response route, `bench/harness/envoy_bootstrap.py`),"
        " ext_authz through the "
        + ("gRPC door." if options.door == "grpc" else "HTTP door (`--http-authz-listen`)."),
        "- Load: asyncio + httptools, HTTP/1.1 keep-alive, one request in flight per"
        " connection, paced to the total rate (fewer when answers are slow). Mix per 100"
        f" requests: {mix} (ES256 tokens, all made before the run; `retired_key` only after"
        " k1 is gone, `invoices` not while the reload is under way).",
        "- Every request's status is fixed before it is sent, by the phase of the run: a"
        " change switches the phase only once a probe through Envoy shows it in force, and"
        " requests of a kind whose answer a change alters are stopped and drained first.",
        f"- Warm-up: the first {WARMUP:.0%} of the run. Resources compared:"
        f" {_s(f_lo)}-{_s(f_hi)} s against {_s(l_lo)}-{_s(options.seconds)} s"
        " (see the rules in the verdicts).",
        "- The machine is shared: latencies and rates vary with what else runs on it.",
        "",
    ]


# ------------------------------------------------------------------------------ the PNG


def plot(result: SoakResult, path: Path) -> None:
    """Write the PNG: RSS, latency p50/p99, fds and threads, req/s and CPU, over the run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    samples = result.samples
    series = [i for i in intervals(result) if i.at_s <= result.options.seconds]
    # NOTE: fixed margins: the constrained layout took a second more to draw.
    figure = Figure(figsize=(10, 10))
    figure.subplots_adjust(left=0.08, right=0.91, top=0.95, bottom=0.06, hspace=0.12)
    FigureCanvasAgg(figure)
    rss, latency, counts, throughput = figure.subplots(4, 1, sharex=True)
    times = [s.at_s for s in samples]

    rss.plot(times, [s.rss_mib for s in samples], color="tab:blue")
    rss.set_ylabel("RSS (MiB)")
    low = min((s.rss_mib for s in samples), default=0.0)
    rss.set_ylim(bottom=max(0.0, low * 0.9))

    measured = [i for i in series if i.p50_ms is not None]
    latency.plot([i.at_s for i in measured], [i.p50_ms for i in measured], label="p50")
    latency.plot([i.at_s for i in measured], [i.p99_ms for i in measured], label="p99")
    latency.set_yscale("log")
    latency.set_ylabel("latency (ms)")
    latency.legend(loc="upper left")

    counts.plot(times, [s.fds for s in samples], label="open fds", drawstyle="steps-post")
    counts.plot(times, [s.sockets for s in samples], label="sockets", drawstyle="steps-post")
    counts.plot(times, [s.threads for s in samples], label="threads", drawstyle="steps-post")
    counts.set_ylabel("count")
    counts.set_ylim(bottom=0)
    counts.legend(loc="upper left")

    throughput.plot([i.at_s for i in series], [i.rps for i in series], label="req/s")
    throughput.set_ylabel("req/s")
    throughput.set_ylim(bottom=0)
    cpu_axis = throughput.twinx()
    cpu = cpu_percent(samples)
    cpu_axis.plot([t for t, _ in cpu], [c for _, c in cpu], color="tab:red", label="server CPU")
    cpu_axis.set_ylabel("server CPU (% of a core)")
    cpu_axis.set_ylim(bottom=0)
    throughput.legend(loc="upper left")
    cpu_axis.legend(loc="upper right")
    throughput.set_xlabel("seconds into the run")

    (f_lo, f_hi), (l_lo, _) = comparison_windows(result.options.seconds)
    for axis in (rss, latency, counts, throughput):
        axis.axvspan(0, f_lo, color="0.9", zorder=0)
        axis.axvspan(f_lo, f_hi, color="tab:green", alpha=0.08, zorder=0)
        axis.axvspan(l_lo, result.options.seconds, color="tab:green", alpha=0.08, zorder=0)
        for event in result.events:
            if event.started_s is not None:
                axis.axvline(event.started_s, color="0.4", linestyle=":", linewidth=1)
        axis.grid(True, alpha=0.3)
    for event in result.events:
        if event.started_s is not None:
            rss.annotate(
                event.name,
                (event.started_s, 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
            )
    door = "gRPC" if result.options.door == "grpc" else "HTTP"
    figure.suptitle(
        f"authz-server soak, {door} door, {result.recorder.total:,} requests"
        " (grey: warm-up; green: the windows compared)"
    )
    figure.savefig(path, dpi=90)


def write_results(result: SoakResult) -> tuple[Path, Path, bool]:
    """Write NAME.md and NAME.png into the output directory; return their paths and whether
    every criterion passed. The run's logs are removed when it passed, kept otherwise."""
    output = result.options.output
    output.mkdir(parents=True, exist_ok=True)
    checks = verdicts(result)
    passed = all(v.passed for v in checks)
    if passed:
        discard_workdir(result)
    summary = output / f"{result.options.name}.md"
    image = output / f"{result.options.name}.png"
    plot(result, image)
    summary.write_text(markdown(result, checks, image.name))
    return summary, image, passed
