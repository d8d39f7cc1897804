"""The gRPC door: Envoy's ``CheckRequest`` in, ``CheckResponse`` out. No decision logic here.

``to_attributes`` reads the wire message into the door-neutral ``RequestAttributes``;
``render`` turns a ``Decision`` into a ``CheckResponse``. Answers repeat (one denial per
reason, one allow per caller), so each distinct answer is rendered and serialized once: the
server registers ``check_bytes``, which parses the request itself and answers with those
bytes, so grpcio serializes nothing per Check.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from authz_server import responses
from authz_server.attributes import RequestAttributes, computed_once
from authz_server.doors import struct_wire
from authz_server.responses import Decision
from authz_server.service import AuthorizationService

log = logging.getLogger("authz_server.grpc")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_parse = external_auth_pb2.CheckRequest.FromString
AUTHORIZATION_SERVICE: str = external_auth_pb2.DESCRIPTOR.services_by_name[
    "Authorization"
].full_name


def _headers(http: Any) -> Mapping[str, str]:
    if http.headers or not http.HasField("header_map"):
        return http.headers  # type: ignore[no-any-return]
    # Envoy sends header_map instead when the filter sets encode_raw_headers.
    merged: dict[str, str] = {}
    for entry in http.header_map.headers:
        value = entry.value or entry.raw_value.decode("utf-8", "replace")
        key = entry.key.lower()
        merged[key] = f"{merged[key]},{value}" if key in merged else value
    return merged


class _CheckAttributes(RequestAttributes):
    """RequestAttributes over one CheckRequest: the request line and headers read at once
    (every Check reads them), the peers, TLS session and context extensions read from the
    message when something asks (a decision memo hit reads only what its scope's policies
    name; each read of a nested message field builds wrapper objects)."""

    door = "grpc"
    unknown: frozenset[str] = frozenset()

    def __init__(self, request: Any) -> None:
        attrs = request.attributes
        http = attrs.request.http
        self._attrs = attrs
        self.method = http.method
        self.host = http.host
        self.path = http.path or "/"
        self.headers = _headers(http)
        self.scheme = http.scheme

    @computed_once
    def source_ip(self) -> str:
        return self._attrs.source.address.socket_address.address  # type: ignore[no-any-return]

    @computed_once
    def source_port(self) -> int:
        return self._attrs.source.address.socket_address.port_value  # type: ignore[no-any-return]

    @computed_once
    def peer_principal(self) -> str:
        return self._attrs.source.principal  # type: ignore[no-any-return]

    @computed_once
    def destination_ip(self) -> str:
        return self._attrs.destination.address.socket_address.address  # type: ignore[no-any-return]

    @computed_once
    def destination_port(self) -> int:
        return self._attrs.destination.address.socket_address.port_value  # type: ignore[no-any-return]

    @computed_once
    def destination_principal(self) -> str:
        return self._attrs.destination.principal  # type: ignore[no-any-return]

    @computed_once
    def sni(self) -> str:
        return self._attrs.tls_session.sni  # type: ignore[no-any-return]

    @computed_once
    def context_extensions(self) -> Mapping[str, str]:
        return self._attrs.context_extensions  # type: ignore[no-any-return]

    @computed_once
    def client_certificate(self) -> str:
        return self._attrs.source.certificate  # type: ignore[no-any-return]


def to_attributes(request: Any) -> RequestAttributes:
    """Read an ``envoy.service.auth.v3.CheckRequest`` into RequestAttributes (the fields past
    the request line and headers are read from the message when first asked for)."""
    return _CheckAttributes(request)


def _header_options(pairs: tuple[tuple[str, str], ...]) -> list[Any]:
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=k, value=v), append_action=_OVERWRITE
        )
        for k, v in pairs
    ]


def _render_denial(decision: Decision) -> Any:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=decision.grpc_code, message=decision.reason),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            headers=_header_options(decision.response_headers),
            body=decision.body,
        ),
    )


_DenialKey = tuple[int, int, str, tuple[tuple[str, str], ...], str]


_AllowKey = tuple[tuple[tuple[str, str], ...], tuple[str, ...], tuple[str, ...], int]
_BareAllowKey = tuple[tuple[tuple[str, str], ...], tuple[str, ...], tuple[str, ...]]


def _render_allow_headers(decision: Decision) -> Any:
    """The allow for ``decision`` without its dynamic metadata (``_metadata_field``)."""
    ok = external_auth_pb2.OkHttpResponse(
        headers=_header_options(decision.headers_to_set),
        headers_to_remove=decision.headers_to_remove,
        query_parameters_to_remove=decision.query_params_to_remove,
    )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=responses.GRPC_OK), ok_response=ok
    )


# dynamic_metadata's key on the wire (field number, length-delimited): a serialized Struct
# behind it, appended to a serialized CheckResponse, sets that field (fields come in any order).
_METADATA_TAG = struct_wire.varint(
    external_auth_pb2.CheckResponse.DESCRIPTOR.fields_by_name["dynamic_metadata"].number << 3 | 2
)


def _metadata_field(metadata: Mapping[str, Any]) -> bytes:
    """``metadata`` as the CheckResponse's serialized dynamic_metadata field. Raises what
    ``Struct.update`` raises on values a Struct cannot hold."""
    try:
        body = struct_wire.struct_body(metadata)
    except (struct_wire.UnsupportedValueError, ValueError, OverflowError):
        struct = struct_pb2.Struct()
        struct.update(metadata)  # protobuf's own verdict on what we do not write
        body = struct.SerializeToString()
    return _METADATA_TAG + struct_wire.varint(len(body)) + body


class Renderer:
    """Decision → CheckResponse. Denials are memoized (few and bounded); allows are kept by
    their headers and metadata, since a caller repeating a token gets the same answer
    (building one costs ~10 us: the Struct and the header messages)."""

    def __init__(self, allow_entries: int = 4096) -> None:
        # NOTE: only the serialized answers are kept: a message with its Struct costs ~4 KB
        # of memory, its bytes a few hundred.
        self._denials: dict[_DenialKey, bytes] = {}
        # Plain dicts emptied when full, as the engine's and the HTTP door's answers are: the
        # busy callers come back at once. An LRU's bookkeeping (a lock, a reordering) would
        # cost every new token its share and saves only a re-render after a clear. Each
        # operation is one dict call, atomic under the GIL: no lock.
        self._allow_entries = max(1, allow_entries)
        self._allows: dict[_AllowKey, tuple[object, bytes]] = {}
        # The allow without its metadata, by the headers and parameters it names (the bytes
        # are a function of the key alone): a caller's new token differs from their last one in
        # its metadata only, so only the Struct is built for it (~5 us less per new token).
        self._bare_allows: dict[_BareAllowKey, bytes] = {}

    def _without_metadata(self, key: _BareAllowKey, decision: Decision) -> bytes:
        """The serialized allow for ``decision`` without its dynamic metadata."""
        rendered = self._bare_allows.get(key)
        if rendered is None:
            rendered = _render_allow_headers(decision).SerializeToString()
            if len(self._bare_allows) >= self._allow_entries:
                self._bare_allows.clear()
            self._bare_allows[key] = rendered
        return rendered

    def _allow(self, decision: Decision) -> bytes:
        metadata = decision.metadata
        bare_key = (
            decision.headers_to_set,
            decision.headers_to_remove,
            decision.query_params_to_remove,
        )
        key = (*bare_key, id(metadata))
        cached = self._allows.get(key)
        # NOTE: the entry holds the metadata itself, so an id reused after GC never matches.
        if cached is not None and cached[0] is metadata:
            return cached[1]
        rendered = self._without_metadata(bare_key, decision)
        if metadata:
            rendered += _metadata_field(metadata)
        if len(self._allows) >= self._allow_entries:
            self._allows.clear()
        self._allows[key] = (metadata, rendered)
        return rendered

    def wire(self, decision: Decision) -> bytes:
        """The serialized CheckResponse for ``decision``, rendered once per distinct answer."""
        if decision.allowed:
            return self._allow(decision)
        key = (
            decision.status,
            decision.grpc_code,
            decision.reason,
            decision.response_headers,
            decision.body,
        )
        rendered = self._denials.get(key)
        if rendered is None:
            rendered = self._denials.setdefault(key, _render_denial(decision).SerializeToString())
        return rendered

    def render(self, decision: Decision) -> Any:
        """The CheckResponse for ``decision`` as a message (a new one: parsed from the wire)."""
        return external_auth_pb2.CheckResponse.FromString(self.wire(decision))


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """``envoy.service.auth.v3.Authorization`` over the decision core."""

    def __init__(self, service: AuthorizationService) -> None:
        self.service = service
        self.renderer = Renderer()

    def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
        try:
            attributes = to_attributes(request)
            if self.service.tracing is not None and context is not None:
                attributes.trace_carrier = context.invocation_metadata()
            decision = self.service.check(attributes)
            return self.renderer.render(decision)
        except Exception:
            log.exception("internal error in the gRPC door")
            return self.renderer.render(responses.internal_error())

    def check_bytes(self, data: bytes, context: Any) -> bytes:
        """``Check`` on the wire: a serialized CheckRequest in, a serialized CheckResponse out
        (registered with no (de)serializers, so the prebuilt answers are sent as they are)."""
        try:
            request = _parse(data)
        except DecodeError:
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details("not a serialized envoy.service.auth.v3.CheckRequest")
            return b""
        try:
            attributes = to_attributes(request)
            if self.service.tracing is not None:  # Envoy's span context is in the metadata
                attributes.trace_carrier = context.invocation_metadata()
            decision = self.service.check(attributes)
            return self.renderer.wire(decision)
        except Exception:
            log.exception("internal error in the gRPC door")
            return self.renderer.wire(responses.internal_error())

    def method_handlers(self) -> Any:
        """The generic handler that serves ``Authorization/Check`` with ``check_bytes``."""
        return grpc.method_handlers_generic_handler(
            AUTHORIZATION_SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(self.check_bytes)}
        )
