"""The connection's attributes, carried to the HTTP door in headers Envoy adds
(``server.httpAuthz.attributeHeaders``).

Envoy's HTTP ext_authz request carries the client's request, not its connection: the client's
address, its mTLS identity, the SNI and the destination address and port are lost, and policies
on them fail closed through the HTTP door. Envoy can add them to the authorization request
(``http_service.authorization_request.headers_to_add``, Istio's
``includeAdditionalHeadersInCheck``), expanding its substitution formatters in each value.

``ATTRIBUTE_HEADERS`` names one reserved header per attribute and the value Envoy is to give it:
the formatter **in double quotes**. The quotes are what make the headers safe to believe:
Envoy *sets* (overwrites) each header of ``headers_to_add``, so a client-sent copy never reaches
the door, except that Envoy adds nothing when the value comes out empty, and then the client's
copy goes through (measured with Envoy 1.40: on a plaintext listener ``%DOWNSTREAM_PEER_URI_SAN%``
alone let a client-sent ``x-authz-peer-principal`` reach the server). Quoted, the value is never
empty (``""`` when there is no peer certificate), so Envoy always overwrites it.

``read_attribute_headers`` reads them back; a header that is absent or not what Envoy sends
(unquoted, a quote inside, an address that is not one) leaves its attribute unknown, so its
clauses fail closed exactly as without the setting.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import NamedTuple

from authz_server.attributes import (
    CONNECTION_SNI,
    CONTEXT_EXTENSIONS,
    DESTINATION_IP,
    DESTINATION_PORT,
    SOURCE_IP,
    SOURCE_PRINCIPAL,
)

SOURCE_IP_HEADER = "x-authz-source-ip"
PEER_PRINCIPAL_HEADER = "x-authz-peer-principal"
DESTINATION_IP_HEADER = "x-authz-destination-ip"
DESTINATION_PORT_HEADER = "x-authz-destination-port"
SNI_HEADER = "x-authz-sni"

# (header, the attribute it carries, the value Envoy gives it). The address formatters are the
# ones Envoy's gRPC ext_authz fills `source.address` and `destination.address` from; the peer's
# URI SAN is the SPIFFE identity Istio's `source.principal` reads; `%REQUESTED_SERVER_NAME%` is
# what the gRPC door receives as `tls_session.sni` (set by Envoy's tls_inspector).
ATTRIBUTE_HEADERS: tuple[tuple[str, str, str], ...] = (
    (SOURCE_IP_HEADER, SOURCE_IP, '"%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"'),
    (PEER_PRINCIPAL_HEADER, SOURCE_PRINCIPAL, '"%DOWNSTREAM_PEER_URI_SAN%"'),
    (DESTINATION_IP_HEADER, DESTINATION_IP, '"%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%"'),
    (DESTINATION_PORT_HEADER, DESTINATION_PORT, '"%DOWNSTREAM_LOCAL_PORT%"'),
    (SNI_HEADER, CONNECTION_SNI, '"%REQUESTED_SERVER_NAME%"'),
)
RESERVED_HEADERS = frozenset(header for header, _, _ in ATTRIBUTE_HEADERS)

# What the HTTP door cannot tell without the headers, and with them.
UNKNOWN_WITHOUT_HEADERS = frozenset(
    {SOURCE_IP, SOURCE_PRINCIPAL, DESTINATION_IP, DESTINATION_PORT, CONNECTION_SNI,
     CONTEXT_EXTENSIONS}
)  # fmt: skip
UNKNOWN_WITH_HEADERS = frozenset({CONTEXT_EXTENSIONS})


def door_unknown(attribute_headers: bool) -> frozenset[str]:
    """The attributes the HTTP door never knows, with ``attributeHeaders`` on or off (for the
    warnings at load; a request whose header is missing or malformed adds its attribute)."""
    return UNKNOWN_WITH_HEADERS if attribute_headers else UNKNOWN_WITHOUT_HEADERS


def _unquote(value: str | None) -> str | None:
    """The text between the quotes of ``"text"``, or None when ``value`` is absent or not one
    quoted text (two copies joined, ``"a","b"``, have a quote inside: refused)."""
    if value is None or len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return None
    text = value[1:-1]
    return None if '"' in text else text


def _address(value: str | None) -> str | None:
    """The IP address in ``value``, or None. NOTE: checked with inet_pton (C, a fraction of a
    microsecond; ipaddress takes several): the policies parse it only when they read it."""
    text = _unquote(value)
    if not text:
        return None
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except (OSError, ValueError):
        return None
    return text


def _port(value: str | None) -> int | None:
    text = _unquote(value)
    if text is None or not text.isdigit() or len(text) > 5:
        return None
    port = int(text)
    return port if 0 < port <= 65535 else None


class ConnectionAttributes(NamedTuple):
    """What the reserved headers said; an attribute in ``unknown`` has its empty value here."""

    source_ip: str
    destination_ip: str
    destination_port: int
    peer_principal: str
    sni: str
    unknown: frozenset[str]


def read_attribute_headers(headers: Mapping[str, str]) -> ConnectionAttributes:
    """The connection's attributes from the reserved headers of ``headers`` (lower-case
    names), and which of them stay unknown. A peer with several URI SANs is known by the first,
    as Envoy's gRPC ext_authz names it."""
    unknown = set(UNKNOWN_WITH_HEADERS)
    source_ip = _address(headers.get(SOURCE_IP_HEADER))
    if source_ip is None:
        unknown.add(SOURCE_IP)
    destination_ip = _address(headers.get(DESTINATION_IP_HEADER))
    if destination_ip is None:
        unknown.add(DESTINATION_IP)
    port = _port(headers.get(DESTINATION_PORT_HEADER))
    if port is None:
        unknown.add(DESTINATION_PORT)
    peer = _unquote(headers.get(PEER_PRINCIPAL_HEADER))
    if peer is None:
        unknown.add(SOURCE_PRINCIPAL)
    sni = _unquote(headers.get(SNI_HEADER))
    if sni is None:
        unknown.add(CONNECTION_SNI)
    return ConnectionAttributes(
        source_ip=source_ip or "",
        destination_ip=destination_ip or "",
        destination_port=port or 0,
        peer_principal=peer.split(",", 1)[0] if peer else "",
        sni=sni or "",
        unknown=UNKNOWN_WITH_HEADERS if len(unknown) == 1 else frozenset(unknown),
    )
