"""The Explain API: ``authz_server.v1.Explain/Explain`` (proto/authz_server/v1/explain.proto).

An ``ExplainRequest`` in: the fields ``authz-server check`` takes, or a whole Envoy
``CheckRequest`` (read by the gRPC door's own ``to_attributes``). The explanation
``authz_server.explain.explain`` builds out, as an ``ExplainResponse`` whose field names are its
keys. Like the doors it holds no decision logic, and, unlike them, it decides nothing that
counts: ``explain`` runs its own service, without metrics or decision log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import grpc
from google.protobuf import json_format

from authz_server.attributes import RequestAttributes
from authz_server.credentials.binding import certificate_der_from_pem
from authz_server.doors import grpc as grpc_door
from authz_server.explain import explain, request_attributes
from authz_server.service import Engine
from authz_server.v1 import explain_pb2, explain_pb2_grpc

log = logging.getLogger("authz_server.explain_api")

EXPLAIN_SERVICE: str = explain_pb2.DESCRIPTOR.services_by_name["Explain"].full_name
NO_SUBJECT = (
    "ExplainRequest names no request: set `request` (method, host, path, headers, source_ip,"
    " context_extensions) or `check_request` (an envoy.service.auth.v3.CheckRequest)"
)


class NoSubjectError(ValueError):
    """The ExplainRequest holds neither ``request`` nor ``check_request``."""


def to_attributes(request: explain_pb2.ExplainRequest) -> RequestAttributes:
    """The request an ExplainRequest describes. Raises NoSubjectError when it holds none."""
    subject = request.WhichOneof("subject")
    if subject == "check_request":
        return grpc_door.to_attributes(request.check_request)
    if subject == "request":
        fields = request.request
        if fields.scheme not in ("", "http", "https"):
            raise ValueError(f"request.scheme {fields.scheme!r}: 'http' or 'https'")
        certificate = ""
        if fields.client_certificate:
            try:
                certificate_der_from_pem(fields.client_certificate)
            except ValueError as exc:
                raise ValueError(f"request.client_certificate: {exc}") from None
            # As Envoy sends it (include_peer_certificate): URL-encoded PEM.
            certificate = quote(fields.client_certificate, safe="")
        return request_attributes(
            method=fields.method or "GET",
            host=fields.host,
            path=fields.path or "/",
            headers=fields.headers,
            source_ip=fields.source_ip,
            context_extensions=fields.context_extensions,
            destination_principal=fields.destination_principal,
            scheme=fields.scheme,
            client_certificate=certificate,
        )
    raise NoSubjectError(NO_SUBJECT)


def to_response(result: Mapping[str, Any]) -> explain_pb2.ExplainResponse:
    """``explain()``'s dict as an ExplainResponse. Raises json_format.ParseError when a key has
    no field of that name (the proto lags behind explain.py: a test says so first)."""
    response = explain_pb2.ExplainResponse()
    json_format.ParseDict(result, response)
    return response


class ExplainServicer(explain_pb2_grpc.ExplainServicer):  # type: ignore[misc]
    """``authz_server.v1.Explain`` over the engine in force: ``engine()`` is read at each call,
    so a reload's new configuration explains the next request."""

    def __init__(self, engine: Callable[[], Engine]) -> None:
        self.engine = engine

    def Explain(  # noqa: N802 (gRPC method name)
        self, request: explain_pb2.ExplainRequest, context: grpc.ServicerContext
    ) -> explain_pb2.ExplainResponse:
        try:
            attributes = to_attributes(request)
        except ValueError as exc:  # no request in it (NoSubjectError), or a bad field
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort() raised already: this only tells the type checker
        try:
            return to_response(explain(self.engine(), attributes, show_claims=request.show_claims))
        except Exception:
            log.exception("internal error explaining a request")
            context.abort(grpc.StatusCode.INTERNAL, "internal error explaining the request")
            raise

    def register(self, server: grpc.Server) -> None:
        """Serve ``authz_server.v1.Explain`` on ``server``."""
        explain_pb2_grpc.add_ExplainServicer_to_server(self, server)
