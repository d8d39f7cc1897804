"""A real OTLP trace receiver for the tests: the collector's gRPC ``TraceService/Export``
(from the opentelemetry-proto package) and OTLP/HTTP ``POST /v1/traces``, on 127.0.0.1.

It keeps every exported byte as received (``raw``), so a test can search all of it for a
secret, and the spans parsed from them. ``hang=True`` makes it take requests and never answer
until stopped: an exporter that hangs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.e2e.harness import wait_until

_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


@dataclass(frozen=True)
class ReceivedSpan:
    resource: dict[str, Any]
    span: trace_pb2.Span

    @property
    def attributes(self) -> dict[str, Any]:
        return attribute_dict(self.span.attributes)

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()


def attribute_dict(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        value: common_pb2.AnyValue = pair.value
        out[pair.key] = getattr(value, value.WhichOneof("value") or "string_value")
    return out


class OtlpReceiver:
    def __init__(self, *, hang: bool = False) -> None:
        self.hang = hang
        self.raw: list[bytes] = []
        self.received: list[ReceivedSpan] = []
        self.calls = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self.grpc_port = 0
        self.http_port = 0

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _take(self, body: bytes) -> None:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        with self._lock:
            self.calls += 1
            self.raw.append(body)
            for resource_spans in request.resource_spans:
                resource = attribute_dict(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.received.append(ReceivedSpan(resource, span))
        if self.hang:
            self._release.wait(60)

    def start(self) -> Self:
        def export(body: bytes, _context: grpc.ServicerContext) -> bytes:
            self._take(body)
            return trace_service_pb2.ExportTraceServiceResponse().SerializeToString()

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(export)},  # raw bytes in and out
        )
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._grpc.add_generic_rpc_handlers((handler,))
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver._take(body)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._grpc is not None:
            self._grpc.stop(0)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spans(self, name: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.received if name is None or s.span.name == name]

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], what: str, timeout: float = 15.0
    ) -> list[ReceivedSpan]:
        wait_until(lambda: predicate(self.spans()), timeout=timeout, what=what)
        return self.spans()

    def all_bytes(self) -> bytes:
        with self._lock:
            return b"".join(self.raw)
