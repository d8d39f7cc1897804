"""OpenTelemetry tracing of Checks: off unless ``server.tracing.enabled`` or ``serve --tracing``.

One span per Check (kind SERVER, ``authz.check``), a child of the context the request carries
(W3C ``traceparent``/``tracestate``, or B3 single or multi headers), with what was decided and
why: decision, status, reason, policy, provider, workload, door, credential kind, token cache
hit or miss. Never a token, a claim value, a principal, an API key or a header value.
A key-set refresh the Check waited for is a child span; a JWKS fetch made on its behalf
carries its ``traceparent`` (``request_trace``).

Everything else is OpenTelemetry's own configuration, the ``OTEL_*`` environment variables:
exporter endpoint, headers, timeout and protocol (``grpc`` or ``http/protobuf``), sampler and
its argument, service name and resource attributes, batch sizes (``OTEL_BSP_*``). Spans leave
in batches from the SDK's background thread; while the exporter is down or slow, spans past
the queue's capacity are dropped and counted (``authz_tracing_spans_total{outcome}``), so a
Check never waits for the exporter.

The SDK is imported by ``Tracing.from_environment`` only: a server without tracing never
loads it, and its Checks pay one ``None`` check.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from authz_server import __version__, request_trace
from authz_server.credentials.token_cache import TokenCache

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.trace import Tracer

    from authz_server.attributes import RequestAttributes
    from authz_server.identity import Identity
    from authz_server.responses import Decision

log = logging.getLogger("authz_server.tracing")

SPAN_NAME = "authz.check"
PROTOCOLS = ("grpc", "http/protobuf")
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
DEFAULT_SERVICE_NAME = "authz-server"
# authz.credential.kind: by where the token was read; "jwt_mixed" when tokens came from two.
CREDENTIAL_KINDS = {"header": "jwt_header", "param": "jwt_param", "cookie": "jwt_cookie"}
MIXED_CREDENTIALS = "jwt_mixed"
# The distribution whose files the OTLP exporters import, and the one that overwrites them.
OTLP_PROTOS = "opentelemetry-proto"
REPAIR_COMMAND = f"pip install --no-deps --force-reinstall {OTLP_PROTOS}=={{version}}"


class TracingError(ValueError):
    """Tracing cannot start as configured: the message names the variable or the fix."""


def otlp_protos_problem(
    distribution: importlib.metadata.Distribution | None = None,
) -> str | None:
    """Why the OTLP exporters would import the wrong ``opentelemetry.proto`` modules, or None.

    xds-protos (our Envoy messages) ships an old copy of opentelemetry-proto's files at the
    same paths; whichever package pip installed last owns them. The files on disk are compared
    with the hashes opentelemetry-proto recorded when it was installed (its RECORD).
    """
    try:
        dist = distribution or importlib.metadata.distribution(OTLP_PROTOS)
    except importlib.metadata.PackageNotFoundError:
        return f"{OTLP_PROTOS} is not installed (pip install {OTLP_PROTOS})"
    repair = REPAIR_COMMAND.format(version=dist.version)
    for file in dist.files or ():
        if file.hash is None or file.hash.mode != "sha256" or not file.name.endswith("_pb2.py"):
            continue
        try:
            data = file.read_binary()
        except OSError:
            return f"{file} of {OTLP_PROTOS} is missing (another package removed it): {repair}"
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        if digest != file.hash.value:
            return (
                f"{file} is not {OTLP_PROTOS} {dist.version}'s (xds-protos installs an old "
                f"copy at the same path): {repair}"
            )
    return None


class _Recorded(Protocol):
    """What ``service.CheckTrace`` recorded of a Check (read, never imported)."""

    @property
    def found(self) -> Sequence[Any]: ...

    @property
    def tokens(self) -> Sequence[tuple[Any, object]]: ...

    @property
    def scope(self) -> Any: ...


class _Counts:
    """Spans ended, exported and dropped; the queue they wait in is bounded here, counted."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.pending = 0
        self.exported = 0
        self.dropped = 0
        self.lock = threading.Lock()

    def admit(self) -> bool:
        with self.lock:
            if self.pending >= self.capacity:
                self.dropped += 1
                return False
            self.pending += 1
            return True

    def settle(self, count: int, *, exported: bool) -> None:
        with self.lock:
            self.pending = max(0, self.pending - count)
            if exported:
                self.exported += count
            else:
                self.dropped += count


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise TracingError(f"{name}={text!r}: not a whole number") from None
    if value <= 0:
        raise TracingError(f"{name}={text!r}: must be above 0")
    return value


def _root_ratio(environ: Mapping[str, str]) -> tuple[bool, float]:
    """(whether the sampler follows the parent's decision, the share of Checks without a
    parent that start a trace), from OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG (the
    SDK's default: parentbased_always_on). Raises TracingError naming a bad value."""
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if name not in SAMPLERS:
        raise TracingError(f"OTEL_TRACES_SAMPLER={name!r}: use one of {', '.join(SAMPLERS)}")
    arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    ratio = 1.0
    if name.endswith("traceidratio") and arg:
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TracingError(f"OTEL_TRACES_SAMPLER_ARG={arg!r}: a ratio from 0 to 1")
    if name.endswith("always_off"):
        ratio = 0.0
    return name.startswith("parentbased_"), ratio


def _protocol(environ: Mapping[str, str]) -> str:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(name, "").strip()
        if value:
            if value not in PROTOCOLS:
                raise TracingError(f"{name}={value!r}: use one of {', '.join(PROTOCOLS)}")
            return value
    return "http/protobuf"  # the OTLP specification's default


def _exporter(protocol: str) -> SpanExporter:
    """The OTLP exporter for ``protocol``; it reads its endpoint, headers, timeout,
    compression and certificates from the OTEL_EXPORTER_OTLP_* variables itself."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter()


def _counting_exporter(exporter: SpanExporter, counts: _Counts) -> SpanExporter:
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        SpanExporter,
        SpanExportResult,
    )

    class CountingExporter(SpanExporter):
        """Counts each batch as exported or dropped (the exporter failed or gave up)."""

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            try:
                result = exporter.export(spans)
            except Exception:  # an exporter bug must not kill the SDK's thread
                result = SpanExportResult.FAILURE
            counts.settle(len(spans), exported=result == SpanExportResult.SUCCESS)
            return result

        def shutdown(self) -> None:
            exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return exporter.force_flush(timeout_millis)

    return CountingExporter()


def _resource_attributes(
    environ: Mapping[str, str], from_env: Mapping[str, Any], worker: int | None
) -> dict[str, Any]:
    """Our defaults for what the environment does not say, and the worker's identity."""
    attributes: dict[str, Any] = {"service.version": __version__, "process.pid": os.getpid()}
    if not environ.get("OTEL_SERVICE_NAME") and "service.name" not in from_env:
        attributes["service.name"] = DEFAULT_SERVICE_NAME
    if "service.instance.id" not in from_env:
        # NOTE: one instance per process: every worker exports its own spans.
        instance = socket.gethostname()
        attributes["service.instance.id"] = (
            f"{instance}/worker-{worker}" if worker is not None else instance
        )
    if worker is not None:
        attributes["authz.worker"] = worker
    return attributes


class Tracing:
    """The tracer provider of this process and the per-Check span it starts."""

    def __init__(
        self,
        provider: TracerProvider,
        tracer: Tracer,
        w3c: TextMapPropagator,
        b3: TextMapPropagator,
        counts: _Counts,
    ) -> None:
        self.provider = provider
        self.tracer = tracer
        self.w3c = w3c
        self.b3 = b3
        self.counts = counts
        self.root_ratio = 1.0  # the share of Checks without a parent that are traced
        from opentelemetry.trace import (  # noqa: PLC0415
            SpanKind,
            get_current_span,
            set_span_in_context,
        )

        self._server = SpanKind.SERVER
        self._internal = SpanKind.INTERNAL
        self._in_context = set_span_in_context
        self._span_of = get_current_span

    @classmethod
    def from_environment(
        cls,
        *,
        worker: int | None = None,
        exporter: SpanExporter | None = None,
    ) -> Tracing:
        """Tracing configured by the process' OTEL_* variables.
        ``worker``: this process' worker number (``serve --workers``), in the resource.
        ``exporter``: instead of the OTLP exporter the variables describe (tests).
        Raises TracingError naming the variable that is wrong, or the install fix when the
        OTLP protos on disk are xds-protos' old copy."""
        env = os.environ
        parent_based, root_ratio = _root_ratio(env)
        protocol = _protocol(env)
        kind = env.get("OTEL_TRACES_EXPORTER", "otlp").strip() or "otlp"
        if kind != "otlp":
            raise TracingError(f"OTEL_TRACES_EXPORTER={kind!r}: only otlp is supported")
        if exporter is None:
            problem = otlp_protos_problem()
            if problem is not None:
                raise TracingError(problem)
        capacity = _env_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        # NOTE: imported here, not at module level: a server without tracing never loads them.
        from opentelemetry.propagators.b3 import B3MultiFormat  # noqa: PLC0415
        from opentelemetry.sdk.resources import (  # noqa: PLC0415
            OTELResourceDetector,
            Resource,
        )
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
        from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
            TraceContextTextMapPropagator,
        )

        from_env = OTELResourceDetector().detect().attributes
        resource = Resource.create(_resource_attributes(os.environ, from_env, worker))
        counts = _Counts(capacity)
        try:
            processor = BatchSpanProcessor(
                _counting_exporter(exporter or _exporter(protocol), counts),
                max_queue_size=capacity,
            )
        except ValueError as exc:  # the SDK's word on the OTEL_BSP_* values together
            raise TracingError(f"OTEL_BSP_* variables: {exc}") from None
        if parent_based:
            # NOTE: a Check without a parent is sampled here, by one random draw at the root
            # ratio, before anything is built: at 1% the other 99% cost three header lookups
            # and the draw (the SDK's sampler would make ids and a span first). A Check with a
            # parent follows the parent's decision, as the SDK's ParentBased sampler does.
            from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased  # noqa: PLC0415

            sampler = ParentBased(ALWAYS_ON)
            provider = TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False)
            prefilter = root_ratio
        else:  # the SDK's own sampler, as the OTEL_TRACES_SAMPLER* variables say
            provider = TracerProvider(resource=resource, shutdown_on_exit=False)
            prefilter = 1.0
        # NOTE: no shutdown at interpreter exit: the SDK's would wait for an exporter that
        # hangs; the server stops tracing itself, within a bounded wait (``shutdown``).
        provider.add_span_processor(_admission(processor, counts))
        tracer = provider.get_tracer("authz_server", __version__)
        # W3C trace context, else B3 (its extract reads the single `b3` header or the X-B3-*
        # set): with both, W3C's wins (``_extract``).
        tracing = cls(provider, tracer, TraceContextTextMapPropagator(), B3MultiFormat(), counts)
        tracing.root_ratio = prefilter
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT", "the default endpoint"
        )
        log.info(
            "tracing on: OTLP %s to %s, sampler %s (%.4g of Checks without a parent)",
            protocol,
            endpoint.rpartition("@")[2],  # NOTE: never user:password@ in a log line
            env.get("OTEL_TRACES_SAMPLER") or "parentbased_always_on",
            root_ratio,
        )
        return tracing

    def begin(self, request: RequestAttributes) -> CheckSpan | None:
        """The span of the Check of ``request``, current for the lower layers until it ends;
        None when the sampler leaves this Check out."""
        suspended = request.trace_span
        if suspended is not None:  # decided again after WouldWait: its span goes on
            request.trace_span = None
            suspended.attach()
            return suspended  # type: ignore[no-any-return]
        parent = self._extract(request.headers)
        carrier = request.trace_carrier
        if carrier:  # the call's own context (Envoy's ext_authz span) is the nearer parent
            from_call = self._extract(dict(carrier))
            if from_call is not None:
                parent = from_call
        if parent is None and self.root_ratio < 1.0 and random.random() >= self.root_ratio:  # noqa: S311
            return None
        span = self.tracer.start_span(SPAN_NAME, context=parent, kind=self._server)
        if not span.is_recording():
            return None
        return CheckSpan(self, span)  # type: ignore[arg-type]

    def _extract(self, headers: Mapping[str, str]) -> Context | None:
        """The context ``headers`` carry: W3C's when it is valid, else B3's (single or multi);
        None when they carry neither (the common unsampled case pays three lookups)."""
        if "traceparent" in headers:
            context = self.w3c.extract(headers)
            if self._span_of(context).get_span_context().is_valid:
                return context
        if "b3" in headers or "x-b3-traceid" in headers:
            context = self.b3.extract(headers)
            if self._span_of(context).get_span_context().is_valid:
                return context
        return None

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Export what is queued and stop, waiting at most ``timeout`` (an exporter that hangs
        does not hold the server's exit). Returns False when that took longer."""
        stopper = threading.Thread(target=self.provider.shutdown, name="tracing-stop", daemon=True)
        stopper.start()
        stopper.join(timeout)
        return not stopper.is_alive()

    def counts_by_outcome(self) -> dict[str, int]:
        """Spans exported and dropped so far (the metric's values)."""
        return {"exported": self.counts.exported, "dropped": self.counts.dropped}


def _admission(inner: SpanProcessor, counts: _Counts) -> SpanProcessor:
    """``inner`` behind a bounded, counted queue of ``counts.capacity`` spans."""
    from opentelemetry.sdk.trace import SpanProcessor  # noqa: PLC0415

    class Admission(SpanProcessor):
        """Hands ended spans to the batch processor while its queue has room; drops and
        counts the others (the SDK's own queue would drop them with only a warning)."""

        def on_start(self, span: Span, parent_context: Context | None = None) -> None:
            return None

        def on_end(self, span: ReadableSpan) -> None:
            if counts.admit():
                inner.on_end(span)

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(inner.force_flush(timeout_millis))

    return Admission()


def _credential_kind(recorded: _Recorded) -> str:
    if not recorded.found:
        return "none"
    kinds = {token.location.kind for token in recorded.found}
    if len(kinds) != 1:
        return MIXED_CREDENTIALS
    return CREDENTIAL_KINDS.get(kinds.pop(), MIXED_CREDENTIALS)


def _token_cache_use(recorded: _Recorded, token_cache: TokenCache, started: float) -> str | None:
    """``hit`` when every verified token's identity came from the cache, ``miss`` when one was
    verified here, None when no token got that far."""
    use: str | None = None
    for token, outcome in recorded.tokens:
        if isinstance(outcome, Exception):
            return use or "miss"
        entry = token_cache.peek(TokenCache.digest(token.token, token.scope))
        if entry is not None and entry.identity is outcome and entry.stored_at < started:
            use = use or "hit"
        else:
            use = "miss"
    return use


class CheckSpan:
    """One Check's span while it is decided (``request_trace.RequestTrace`` for the lower
    layers)."""

    __slots__ = ("_reset", "span", "started", "tracing")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self.tracing = tracing
        self.span = span
        self.started = time.perf_counter()
        self._reset: Token[request_trace.RequestTrace | None] | None = None
        self.attach()

    def attach(self) -> None:
        """Make this the span the lower layers see (``request_trace.current``)."""
        self._reset = request_trace.current.set(self)

    @property
    def ids(self) -> tuple[str, str]:
        """(trace id, span id) as the W3C header writes them, for the decision log."""
        context = self.span.get_span_context()
        return format(context.trace_id, "032x"), format(context.span_id, "016x")

    def outgoing_headers(self) -> Mapping[str, str]:
        context = self.span.get_span_context()
        headers = {
            "traceparent": (
                f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
            )
        }
        state = context.trace_state.to_header()
        if state:
            headers["tracestate"] = state
        return headers

    def waited(self, what: str, started_ns: int, ended_ns: int, outcome: str) -> None:
        tracing = self.tracing
        child = tracing.tracer.start_span(
            f"authz.{what}",
            context=tracing._in_context(self.span),
            kind=tracing._internal,
            start_time=started_ns,
            attributes={"authz.outcome": outcome},
        )
        child.end(end_time=ended_ns)

    def _detach(self) -> None:
        if self._reset is not None:
            request_trace.current.reset(self._reset)
            self._reset = None

    def suspend(self, request: RequestAttributes) -> None:
        """The Check raised ``WouldWait``: the door decides ``request`` again, maybe on another
        thread, and ``Tracing.begin`` resumes this span there (a refresh it started already
        carries this span's context)."""
        self._detach()
        request.trace_span = self

    def finish(
        self,
        request: RequestAttributes,
        decision: Decision,
        recorded: _Recorded | None,
        token_cache: TokenCache,
        identity: Identity | None = None,
    ) -> None:
        """Set what was decided and end the span. Values are bounded names and numbers, never
        anything the client sent (``identity`` only says whether one was established)."""
        self._detach()
        attributes: dict[str, str | int | bool] = {
            "authz.decision": "allow" if decision.allowed else "deny",
            "authz.status": decision.status,
            "authz.reason": decision.reason,
            "authz.door": request.door,
            "authz.authenticated": identity is not None,
        }
        if decision.policy is not None:
            attributes["authz.policy"] = decision.policy
        if decision.provider is not None:
            attributes["authz.provider"] = decision.provider
        if recorded is not None:
            scope = recorded.scope
            if scope is not None and scope.workload is not None:
                attributes["authz.workload"] = scope.workload
            attributes["authz.credential.kind"] = _credential_kind(recorded)
            # When the Check began, on the cache's clock: an entry stored before it was a hit.
            began = token_cache.now() - (time.perf_counter() - self.started)
            cache_use = _token_cache_use(recorded, token_cache, began)
            if cache_use is not None:
                attributes["authz.token_cache"] = cache_use
        span = self.span
        span.set_attributes(attributes)
        if decision.status >= 500:
            from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415

            span.set_status(Status(StatusCode.ERROR, decision.reason))
        span.end()
