"""Prometheus metrics: one ``Metrics`` object owns every collector.

Label values are bounded by configuration (provider and policy names) and the fixed reason
codes; nothing request-controlled (sub, path, kid) is ever a label. Hot-path children are
bound once per label combination and kept (``.labels()`` costs microseconds; a dict lookup
does not). State that other objects already count (token cache, key sets, reloads) is read
at scrape time by a collector, so it costs the hot path nothing.

Checks are counted in batches: ``record`` adds to its thread's own tally (plain ints, no lock),
and every scrape (and every read of the registry) first adds what each tally grew by into the
Prometheus collectors, so ``/metrics`` is exact at the moment it is read.

Multi-process (``--workers``): with ``multiprocess_mode=True`` (and ``PROMETHEUS_MULTIPROC_DIR``
set before prometheus-client is imported) every worker writes its samples to that directory and
the supervisor's ``/metrics`` aggregates them. A scrape reaches the supervisor, not the workers,
so each worker copies its token cache and key set state into multi-process metrics now and
then (``publish_engine``): counters summed over workers, gauges as named per metric. The
supervisor adds what only it knows (``SupervisorCollector``): worker restarts, and CPU and
memory of every process of the server.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    multiprocess,
    platform_collector,
    process_collector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from authz_server.credentials.apikeys import ApiKeyTable
from authz_server.credentials.introspection import LATENCY_BUCKETS, Introspector
from authz_server.credentials.token_cache import TokenCache
from authz_server.decision_memo import MemoStats
from authz_server.keys.keyset import JWKSCache
from authz_server.responses import Decision


class EngineView(Protocol):
    """What a scrape reads of the engine in force (``service.Engine`` is one)."""

    @property
    def token_cache(self) -> TokenCache: ...

    @property
    def caches(self) -> Mapping[str, JWKSCache]: ...

    @property
    def memo_stats(self) -> MemoStats: ...


# 50 us to 1 s, dense below a millisecond where a Check usually lands.
CHECK_BUCKETS = (
    0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075,
    0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The doors a Check can come through (the `door` label).
DOORS = ("grpc", "http")


class _EngineCollector(Collector):
    """Scrape-time view of the current engine: token cache and key sets."""

    def __init__(self, current: Callable[[], EngineView | None]) -> None:
        self._current = current

    def collect(self) -> Iterator[Any]:
        engine = self._current()
        if engine is None:
            return
        cache = engine.token_cache
        yield CounterMetricFamily(
            "authz_token_cache_hits", "Verified-token cache hits.", value=cache.hits
        )
        yield CounterMetricFamily(
            "authz_token_cache_misses", "Verified-token cache misses.", value=cache.misses
        )
        yield CounterMetricFamily(
            "authz_token_cache_evictions",
            "Entries evicted from the verified-token cache (LRU bound).",
            value=cache.evictions,
        )
        yield GaugeMetricFamily(
            "authz_token_cache_entries", "Entries in the verified-token cache.", value=len(cache)
        )
        memo = engine.memo_stats
        yield CounterMetricFamily(
            "authz_decision_memo_hits", "Checks answered from the decision memo.", value=memo.hits
        )
        yield CounterMetricFamily(
            "authz_decision_memo_misses",
            "Checks the decision memo could have answered and did not (decided, then offered).",
            value=memo.misses,
        )
        fetches = CounterMetricFamily(
            "authz_jwks_fetches",
            "Key set loads by provider and result.",
            labels=["provider", "result"],
        )
        keys = GaugeMetricFamily("authz_jwks_keys", "Usable keys loaded.", labels=["provider"])
        last = GaugeMetricFamily(
            "authz_jwks_last_success_timestamp_seconds",
            "Unix time of the last successful key set load.",
            labels=["provider"],
        )
        stale = GaugeMetricFamily(
            "authz_jwks_stale_seconds",
            "Seconds the provider has served keys since refreshes started failing (0 = fresh).",
            labels=["provider"],
        )
        max_stale = GaugeMetricFamily(
            "authz_jwks_max_stale_seconds",
            "The provider's maxStale: stale keys are dropped (its tokens get 503) past it.",
            labels=["provider"],
        )
        for name, jwks in engine.caches.items():
            for result, count in jwks.fetches.items():
                fetches.add_metric([name, result], count)
            keyset = jwks.keyset
            # NOTE: an introspection or API keys provider holds no signing keys: a 0 here
            # would read as "no keys, 503s" (until its keys file is read, it does say that).
            if keyset is None or not keyset.may_be_empty:
                keys.add_metric([name], len(keyset.keys) if keyset is not None else 0)
            if jwks.last_success_wall is not None:
                last.add_metric([name], jwks.last_success_wall)
            stale.add_metric([name], jwks.stale_for())
            max_stale.add_metric([name], jwks.max_stale)
        yield from (fetches, keys, last, stale, max_stale)
        yield from _credential_families(engine.caches)


def _credential_families(caches: Mapping[str, JWKSCache]) -> Iterator[Any]:
    """Introspection providers' calls (by result), call latency and answer cache; API keys
    providers' key counts. Read from each provider's key source (``introspection``,
    ``apikeys``)."""
    calls = CounterMetricFamily(
        "authz_introspection_calls",
        "Introspection calls to the IdP by provider and result (active, inactive, or a failure).",
        labels=["provider", "result"],
    )
    latency = HistogramMetricFamily(
        "authz_introspection_duration_seconds",
        "Latency of introspection calls to the IdP.",
        labels=["provider"],
    )
    hits = CounterMetricFamily(
        "authz_introspection_cache_hits",
        "Checks answered from the introspection cache.",
        labels=["provider"],
    )
    misses = CounterMetricFamily(
        "authz_introspection_cache_misses",
        "Checks that needed an introspection call (or joined one in flight).",
        labels=["provider"],
    )
    entries = GaugeMetricFamily(
        "authz_introspection_cache_entries",
        "Answers held in the introspection cache.",
        labels=["provider"],
    )
    api_keys = GaugeMetricFamily(
        "authz_api_keys", "API keys loaded from the provider's keys file.", labels=["provider"]
    )
    for name, cache in caches.items():
        source = cache.source
        if isinstance(source, Introspector):
            stats = source.stats
            for result, count in stats.calls.items():
                calls.add_metric([name, result], count)
            cumulative, buckets = 0, []
            for bound, count in zip(LATENCY_BUCKETS, stats.bucket_counts, strict=True):
                cumulative += count
                buckets.append((repr(bound), float(cumulative)))
            buckets.append(("+Inf", float(stats.latency_count)))
            latency.add_metric([name], buckets, stats.latency_sum)
            hits.add_metric([name], stats.cache_hits)
            misses.add_metric([name], stats.cache_misses)
            entries.add_metric([name], len(source))
        elif isinstance(cache.keyset, ApiKeyTable):
            api_keys.add_metric([name], len(cache.keyset.by_digest))
    yield from (calls, latency, hits, misses, entries, api_keys)


class _DroppedLinesCollector(Collector):
    """Scrape-time view of the decision log's drop count (read, never imported)."""

    def __init__(self, dropped: Callable[[], int]) -> None:
        self._dropped = dropped

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "authz_decision_log_dropped",
            "Decision log lines dropped: the queue was full or the destination failed.",
            value=self._dropped(),
        )


class _TracingCollector(Collector):
    """Scrape-time view of the spans tracing exported and dropped (read, never imported)."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily(
            "authz_tracing_spans",
            "Spans handed to the OTLP exporter (exported) or lost: the export queue was full "
            "or the exporter failed (dropped).",
            labels=["outcome"],
        )
        for outcome, value in self._counts().items():
            family.add_metric([outcome], value)
        yield family


def _labels(decision: Decision, door: str) -> tuple[str, str, str, str, str]:
    """The labels of ``authz_checks_total`` for ``decision`` (the verdict first)."""
    verdict = "allow" if decision.allowed else "deny"
    return (verdict, decision.reason, decision.provider or "", decision.policy or "", door)


class _Tally:
    """One thread's Checks so far: a count per label set, and per (decision, door) the count
    of each duration bucket (+Inf last) followed by the sum of durations. Only its thread
    writes it, so an increment needs no lock; a scrape reads it (copying a dict or a list is
    atomic under the GIL) and adds what grew since the scrape before (``flushed``)."""

    __slots__ = ("counts", "durations", "flushed_counts", "flushed_durations", "thread")

    def __init__(self) -> None:
        self.thread = threading.current_thread()
        self.counts: dict[tuple[str, str, str, str, str], int] = {}
        self.durations: dict[tuple[str, str], list[float]] = {}
        # What the scrapes have added to the collectors so far (read and written by them only).
        self.flushed_counts: dict[tuple[str, str, str, str, str], int] = {}
        self.flushed_durations: dict[tuple[str, str], list[float]] = {}


class _FlushTallies(Collector):
    """Registered before the Check collectors: collecting it adds the tallies into them, so
    every scrape sees every Check recorded before it began. Yields nothing itself."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        self._flush()
        return iter(())


class Metrics:
    """Every collector of the server, registered on ``registry``."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_mode: bool = False
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess_mode = multiprocess_mode
        r = self.registry
        if not multiprocess_mode:
            process_collector.ProcessCollector(registry=r)
            platform_collector.PlatformCollector(registry=r)
            gc_collector.GCCollector(registry=r)
        # NOTE: workers' counts must reach their files for the supervisor's scrape, which
        # cannot ask them to flush: under --workers each Check is recorded as it is decided.
        self._batched = not multiprocess_mode
        self._local = threading.local()
        self._tallies: list[_Tally] = []
        self._tallies_lock = threading.Lock()  # adds a thread's tally; one flush at a time
        if self._batched:
            r.register(_FlushTallies(self.flush))
        self.check_duration = Histogram(
            "authz_check_duration_seconds",
            "Time to decide one Check, from request attributes to decision, by door.",
            ["decision", "door"],
            buckets=CHECK_BUCKETS,
            registry=r,
        )
        self.checks = Counter(
            "authz_checks",
            "Checks decided, by decision, reason, provider, deciding policy and door.",
            ["decision", "reason", "provider", "policy", "door"],
            registry=r,
        )
        self.dry_run = Counter(
            "authz_dry_run",
            "What dry-run policies would have done, per request.",
            ["policy", "would"],
            registry=r,
        )
        self.withheld = Counter(
            "authz_identity_headers_withheld",
            "Identity headers left out of allowed requests: the claim is there but its value "
            "cannot be a header value (an object, control characters, a list element with a "
            "comma).",
            ["header"],
            registry=r,
        )
        self.reloads = Counter(
            "authz_config_reloads", "Configuration reloads by result.", ["result"], registry=r
        )
        # NOTE: both series exist from the start, at 0: increase() cannot see the first failure
        # of a series that is born at 1, and the reload alert must.
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.last_reload = Gauge(
            "authz_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load.",
            registry=r,
            multiprocess_mode="max",
        )
        self.last_rejected = Gauge(
            "authz_config_last_reload_failure_timestamp_seconds",
            "Unix time of the last configuration reload that was refused (0: none yet).",
            registry=r,
            multiprocess_mode="max",
        )
        # livemax: a worker that died (and was restarted) no longer speaks for the pod.
        self.config_info = Gauge(
            "authz_config_info",
            "The configuration in force (1), by content hash.",
            ["hash"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._duration_children = {
            (d, door): self.check_duration.labels(d, door)
            for d in ("allow", "deny")
            for door in DOORS
        }
        self._children: dict[tuple[str, str, str, str, str], Any] = {}
        self._dry_children: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._engine_collector: _EngineCollector | None = None
        # Workers copy scrape-time collectors into the multi-process files instead.
        self._published = _Published(self.registry) if multiprocess_mode else None
        self._config_digest: str | None = None

    def watch_engine(self, current: Callable[[], EngineView | None]) -> None:
        """Expose the token cache and key sets of whatever engine ``current`` returns."""
        self._engine_collector = _EngineCollector(current)
        self._watch(self._engine_collector)

    def watch_decision_log(self, dropped: Callable[[], int]) -> None:
        """Expose ``dropped()``, the decision log lines lost so far, at each scrape."""
        self._watch(_DroppedLinesCollector(dropped))

    def watch_tracing(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Expose ``counts()``, spans by outcome (exported, dropped), at each scrape."""
        self._watch(_TracingCollector(counts))

    def _watch(self, collector: Collector) -> None:
        if self._published is not None:
            self._published.sources.append(collector)
        else:
            self.registry.register(collector)

    def publish_engine(self) -> None:
        """Copy scrape-time state into the multi-process files (workers only; no-op else)."""
        if self._published is not None:
            self._published.publish()

    def _child(self, key: tuple[str, str, str, str, str]) -> Any:
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.get(key) or self.checks.labels(*key)
                self._children[key] = child
        return child

    def record(self, decision: Decision, seconds: float, door: str = "grpc") -> None:
        """Count one decision (called once per Check) that came through ``door``: added to
        this thread's tally, which the next scrape adds into the collectors."""
        if not self._batched:
            self._record_now(decision, seconds, door)
            return
        try:
            tally: _Tally = self._local.tally
        except AttributeError:
            tally = self._new_tally()
        key = _labels(decision, door)
        verdict = key[0]
        counts = tally.counts
        counts[key] = counts.get(key, 0) + 1
        durations = tally.durations.get((verdict, door))
        if durations is None:
            durations = tally.durations[verdict, door] = [0] * (len(CHECK_BUCKETS) + 2)
        # The first bucket whose bound is >= seconds, as Histogram.observe counts (+Inf past
        # the last bound); the sum is the last element.
        durations[bisect_left(CHECK_BUCKETS, seconds)] += 1
        durations[-1] += seconds
        if decision.withheld or decision.dry_run:
            self._record_observed(decision)

    def _new_tally(self) -> _Tally:
        tally = self._local.tally = _Tally()
        with self._tallies_lock:
            self._tallies.append(tally)
        return tally

    def flush(self) -> None:
        """Add what every thread's tally grew by since the last flush into the collectors
        (each scrape does this first). A finished thread's tally is dropped once added."""
        with self._tallies_lock:
            kept: list[_Tally] = []
            for tally in self._tallies:
                alive = tally.thread.is_alive()  # read before the counts: none come after
                self._flush_tally(tally)
                if alive:
                    kept.append(tally)
            self._tallies[:] = kept

    def _flush_tally(self, tally: _Tally) -> None:
        flushed = tally.flushed_counts
        for key, count in tally.counts.copy().items():
            grown = count - flushed.get(key, 0)
            if grown:
                self._child(key).inc(grown)
                flushed[key] = count
        for labels, durations in tally.durations.copy().items():
            now = durations.copy()
            before = tally.flushed_durations.get(labels)
            if before is None:
                before = tally.flushed_durations[labels] = [0] * len(now)
            child = self._duration_children[labels]
            # NOTE: prometheus-client keeps one (non-cumulative) value per bucket in
            # `_buckets` and the sum in `_sum`; there is no public way to add counts in bulk.
            for index, observed in enumerate(now[:-1]):
                if observed != before[index]:
                    child._buckets[index].inc(observed - before[index])
            if now[-1] != before[-1]:
                child._sum.inc(now[-1] - before[-1])
            tally.flushed_durations[labels] = now

    def _record_now(self, decision: Decision, seconds: float, door: str) -> None:
        key = _labels(decision, door)
        self._duration_children[key[0], door].observe(seconds)
        self._child(key).inc()
        self._record_observed(decision)

    def _record_observed(self, decision: Decision) -> None:
        """Withheld identity headers and dry-run verdicts (rare: counted as they come)."""
        for header in decision.withheld:
            self.withheld.labels(header).inc()
        for policy, would in decision.dry_run:
            key = (policy, would)
            child = self._dry_children.get(key)
            if child is None:
                child = self._dry_children.setdefault(key, self.dry_run.labels(*key))
            child.inc()

    def config_loaded(self, digest: str, *, reload: bool) -> None:
        # NOTE: set the new hash before removing the old, so no scrape sees neither.
        self.config_info.labels(digest).set(1)
        if self._config_digest not in (None, digest):
            if self.multiprocess_mode:
                # prometheus-client cannot remove a series from the workers' files: 0 says
                # "no longer in force" (the query is `authz_config_info == 1`).
                self.config_info.labels(self._config_digest).set(0)
            else:
                self.config_info.remove(self._config_digest)
        self._config_digest = digest
        self.last_reload.set(time.time())
        if reload:
            self.reloads.labels("success").inc()

    def config_rejected(self) -> None:
        self.reloads.labels("failure").inc()
        self.last_rejected.set(time.time())

    def exposition(self) -> bytes:
        """The text format for ``/metrics`` (of this process; workers are read by
        ``aggregated_exposition``)."""
        return generate_latest(self.registry)


def aggregated_exposition(*extra: Collector) -> bytes:
    """``/metrics`` over every worker's files in ``PROMETHEUS_MULTIPROC_DIR``, and ``extra``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _cpu_and_memory(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, resident bytes) of process ``pid`` from /proc; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
    except OSError:
        return None
    # After the ")" that ends the command name: state is field 3 of proc(5), utime 14, stime 15.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS, int(statm.split()[1]) * _PAGE_SIZE


class SupervisorCollector(Collector):
    """What only the ``--workers`` supervisor knows, read at each scrape: worker restarts, and
    CPU and memory of the whole server (the workers' process collectors are off in
    multi-process mode). CPU and memory keep the single-process names, so one dashboard reads
    both; the CPU of exited workers stays counted (the supervisor reaped them), so a restart
    does not look like a counter reset."""

    def __init__(
        self, restarts: Callable[[], int], worker_pids: Callable[[], Iterable[int]]
    ) -> None:
        self._restarts = restarts
        self._worker_pids = worker_pids

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "authz_worker_restarts",
            "Worker processes that exited while the server ran and were restarted.",
            value=self._restarts(),
        )
        own = resource.getrusage(resource.RUSAGE_SELF)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
        memory = (_cpu_and_memory(os.getpid()) or (0.0, 0))[1]
        for pid in self._worker_pids():
            usage = _cpu_and_memory(pid)
            if usage is not None:
                cpu += usage[0]
                memory += usage[1]
        yield CounterMetricFamily(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds (the supervisor and its workers).",
            value=cpu,
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory size in bytes (the supervisor and its live workers).",
            value=memory,
        )


# How each scrape-time gauge combines across live workers.
_GAUGE_MODES = {
    "authz_token_cache_entries": "livesum",
    "authz_jwks_keys": "livemin",  # the worker with the fewest usable keys
    "authz_jwks_last_success_timestamp_seconds": "livemin",  # the stalest worker
    "authz_jwks_stale_seconds": "livemax",
    "authz_jwks_max_stale_seconds": "livemin",
    "authz_introspection_cache_entries": "livesum",
    "authz_api_keys": "livemax",
}


class _Published:
    """A worker's copy of its scrape-time collectors' samples in multi-process metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sources: list[Collector] = []
        self._registry = registry
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._histograms: dict[str, Histogram] = {}
        self._histogram_last: dict[tuple[Any, ...], float] = {}
        self._last: dict[tuple[str, tuple[str, ...]], float] = {}
        self._lock = threading.Lock()

    def publish(self) -> None:
        with self._lock:
            for family in (f for source in self.sources for f in source.collect()):
                if family.type == "histogram":
                    self._add_histogram(family)
                    continue
                for sample in family.samples:
                    labels = tuple(sample.labels.values())
                    if family.type == "counter":
                        self._add(family, sample.name, labels, sample.value)
                    elif family.name in _GAUGE_MODES:
                        gauge = self._gauge(family)
                        (gauge.labels(*labels) if labels else gauge).set(sample.value)

    def _add(self, family: Any, name: str, labels: tuple[str, ...], value: float) -> None:
        counter = self._counters.get(family.name)
        if counter is None:
            counter = self._counters[family.name] = Counter(
                family.name,
                family.documentation,
                list(family.samples[0].labels),
                registry=self._registry,
            )
        previous = self._last.get((name, labels), 0.0)
        # A new engine (reload) may restart a count below what was published: add from zero.
        delta = value - previous if value >= previous else value
        self._last[(name, labels)] = value
        if delta > 0:
            (counter.labels(*labels) if labels else counter).inc(delta)

    def _add_histogram(self, family: Any) -> None:
        """A scrape-time histogram added into a multi-process ``Histogram``: the growth of
        each bucket and of the sum since the last publish."""
        buckets = sorted(
            {float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")}
            - {float("inf")}
        )
        if not buckets:
            return
        labelnames = [k for k in family.samples[0].labels if k != "le"]
        histogram = self._histograms.get(family.name)
        if histogram is None:
            histogram = self._histograms[family.name] = Histogram(
                family.name,
                family.documentation,
                labelnames,
                buckets=buckets,
                registry=self._registry,
            )
        cumulative: dict[tuple[str, ...], dict[float, float]] = {}
        sums: dict[tuple[str, ...], float] = {}
        for sample in family.samples:
            labels = tuple(v for k, v in sample.labels.items() if k != "le")
            if sample.name.endswith("_bucket"):
                cumulative.setdefault(labels, {})[float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                sums[labels] = sample.value
        for labels, counts in cumulative.items():
            child = histogram.labels(*labels) if labels else histogram
            below = 0.0
            # NOTE: prometheus-client keeps one (non-cumulative) value per bucket in
            # `_buckets` and the sum in `_sum`; there is no public way to add counts in bulk.
            for index, bound in enumerate([*buckets, float("inf")]):
                count = counts.get(bound, below)
                self._grow(child._buckets[index], (family.name, labels, bound), count - below)
                below = count
            self._grow(child._sum, (family.name, labels, "sum"), sums.get(labels, 0.0))

    def _grow(self, value: Any, key: tuple[Any, ...], current: float) -> None:
        previous = self._histogram_last.get(key, 0.0)
        delta = current - previous if current >= previous else current  # a new engine: anew
        self._histogram_last[key] = current
        if delta > 0:
            value.inc(delta)

    def _gauge(self, family: Any) -> Gauge:
        gauge = self._gauges.get(family.name)
        if gauge is None:
            gauge = self._gauges[family.name] = Gauge(
                family.name,
                family.documentation,
                list(family.samples[0].labels),
                registry=self._registry,
                multiprocess_mode=_GAUGE_MODES[family.name],  # type: ignore[arg-type]
            )
        return gauge
