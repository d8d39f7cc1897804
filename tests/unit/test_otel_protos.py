"""The dependency trap: xds-protos ships an old copy of opentelemetry-proto's files at the same
paths. In one process, Envoy's messages that use OpenTelemetry protos and the real OTLP
exporter both work (the install made opentelemetry-proto's files win), and a copy that is not
opentelemetry-proto's is found and named with its fix."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
from pathlib import Path

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from authz_server.ops.tracing import otlp_protos_problem
from tests.otlp import OtlpReceiver


def test_envoy_opentelemetry_messages_and_the_otlp_exporter_work_in_one_process() -> None:
    from envoy.config.trace.v3 import opentelemetry_pb2 as tracer_pb2
    from envoy.extensions.access_loggers.open_telemetry.v3 import logs_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2

    # Envoy's access logger config holds opentelemetry.proto.common.v1 messages.
    logger = logs_service_pb2.OpenTelemetryAccessLogConfig()
    logger.body.string_value = "%REQ(:METHOD)%"
    logger.attributes.values.add(key="route", value=common_pb2.AnyValue(string_value="r"))
    again = logs_service_pb2.OpenTelemetryAccessLogConfig.FromString(logger.SerializeToString())
    assert again.attributes.values[0].value.string_value == "r"
    assert tracer_pb2.OpenTelemetryConfig(service_name="envoy").service_name == "envoy"

    # ...and the exporter, which needs opentelemetry-proto's current messages.
    with OtlpReceiver() as receiver:
        exporter = OTLPSpanExporter(endpoint=receiver.grpc_endpoint, insecure=True, timeout=5)
        provider = TracerProvider(resource=Resource.create({"service.name": "trap"}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        provider.get_tracer("test").start_span("one").end()
        provider.shutdown()
        [span] = receiver.wait_for(lambda s: len(s) == 1, "the exported span")
    assert span.span.name == "one"
    assert span.resource["service.name"] == "trap"
    assert otlp_protos_problem() is None


def _fake_distribution(root: Path, recorded: bytes, on_disk: bytes | None) -> Path:
    """An installed opentelemetry-proto whose RECORD says ``recorded`` and whose file holds
    ``on_disk`` (None: the file is gone)."""
    module = root / "opentelemetry/proto/common/v1/common_pb2.py"
    module.parent.mkdir(parents=True)
    if on_disk is not None:
        module.write_bytes(on_disk)
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    info = root / "opentelemetry_proto-9.9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: opentelemetry-proto\nVersion: 9.9.9\n"
    )
    (info / "RECORD").write_text(
        f"opentelemetry/proto/common/v1/common_pb2.py,sha256={digest},{len(recorded)}\n"
        "opentelemetry_proto-9.9.9.dist-info/RECORD,,\n"
    )
    return info


def test_xds_protos_copy_on_disk_is_found_and_the_fix_named(tmp_path: Path) -> None:
    info = _fake_distribution(tmp_path, b"InstrumentationScope", b"InstrumentationLibrary")
    problem = otlp_protos_problem(importlib.metadata.PathDistribution(info))
    assert problem is not None
    assert "common_pb2.py is not opentelemetry-proto 9.9.9's" in problem
    assert "pip install --no-deps --force-reinstall opentelemetry-proto==9.9.9" in problem


def test_a_file_removed_by_uninstalling_xds_protos_is_found(tmp_path: Path) -> None:
    info = _fake_distribution(tmp_path, b"InstrumentationScope", None)
    problem = otlp_protos_problem(importlib.metadata.PathDistribution(info))
    assert problem is not None and "is missing" in problem


def test_opentelemetry_protos_own_files_pass(tmp_path: Path) -> None:
    info = _fake_distribution(tmp_path, b"InstrumentationScope", b"InstrumentationScope")
    assert otlp_protos_problem(importlib.metadata.PathDistribution(info)) is None
