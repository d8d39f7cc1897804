"""The door-neutral request model: what a Check is about, whatever wire format brought it.

A door (gRPC ``CheckRequest``, or Envoy's HTTP ext_authz request) fills a
``RequestAttributes``; the core decides on it. A door that cannot know an attribute (the HTTP
door sees the client's address, its mTLS identity or the destination port only in headers
Envoy adds, ``server.httpAuthz.attributeHeaders``) names it in
``unknown``, and the policies treat it as unknown rather than absent: they fail closed.
Derived views (normalized path, query parameters, cookies, client address, peer identity) are
computed on first use and kept for the rest of the Check.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_UNRESERVED_ESCAPE = re.compile(
    r"%(2[dDeE]|3[0-9]|4[1-9a-fA-F]|5[0-9aAfF]|6[1-9a-fA-F]|7[0-9aAeE])"
)
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SLASHES = re.compile(r"/{2,}")

# The attributes a door may be unable to tell (RequestAttributes.unknown).
SOURCE_IP = "source.ip"
SOURCE_PRINCIPAL = "source.principal"
DESTINATION_IP = "destination.ip"
DESTINATION_PORT = "destination.port"
CONNECTION_SNI = "connection.sni"
CONTEXT_EXTENSIONS = "context_extensions"


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group(0)


def normalize_path(raw: str) -> str:
    """Return the path part of ``raw`` as an upstream would resolve it.

    Drops query and fragment, decodes percent-escaped unreserved characters (RFC 3986 6.2.2.2),
    removes dot segments (5.2.4) and merges repeated slashes, so that ``/api/../admin`` and
    ``//admin`` are judged as ``/admin``. Encoded slashes (``%2F``) stay encoded.
    """
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        path = _UNRESERVED_ESCAPE.sub(_decode_unreserved, path)
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "." in path and ("/." in path or path.startswith(".")):
        out: list[str] = []
        segments = path.split("/")
        for seg in segments:
            if seg == "..":
                if len(out) > 1:
                    out.pop()
            elif seg != ".":
                out.append(seg)
        if segments[-1] in (".", ".."):
            out.append("")
        path = "/".join(out)
    if not path.startswith("/"):
        path = "/" + path
    return path


def split_authority(authority: str) -> tuple[str, str]:
    """(host, port) of ``host:port``, ``[v6]:port``, ``host`` or ``[v6]``; port "" when none
    (a bare IPv6 address has no port)."""
    if authority.startswith("["):
        end = authority.find("]")
        if end > 0 and authority[end + 1 : end + 2] == ":" and authority[end + 2 :].isdigit():
            return authority[: end + 1], authority[end + 2 :]
        return authority, ""
    name, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name, port
    return authority, ""


def fold_cookie_name(name: str) -> str:
    """A cookie's name as the most lenient upstream matches it: trimmed (``session =x`` is
    ``session`` to Python, Node and Go) and in lower case (ASP.NET reads ``Session`` as
    ``session``)."""
    return name.strip().lower()


def cookie_name(crumb: str) -> str:
    """The name of one cookie (``name=value``), folded (``fold_cookie_name``); ``""`` when it
    has no ``=``."""
    name, sep, _ = crumb.partition("=")
    return fold_cookie_name(name) if sep else ""


def read_cookies(header: str) -> dict[str, list[str]]:
    """Every value of each cookie in the Cookie header ``header`` by ``cookie_name``, in
    order, values trimmed and unquoted: ``;`` and ``,`` both separate cookies (Envoy joins
    two Cookie headers with ``,``; older servers split on it)."""
    jar: dict[str, list[str]] = {}
    crumbs = header.split(";")
    if "," in header:
        crumbs = [crumb for part in crumbs for crumb in part.split(",")]
    for crumb in crumbs:
        name, sep, value = crumb.partition("=")
        if sep:
            # NOTE: fold_cookie_name, inlined: this runs on every Check with a Cookie header.
            name = name.strip().lower()
            if name:
                jar.setdefault(name, []).append(value.strip().strip('"'))
    return jar


def _parse_ip(value: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None


_T = TypeVar("_T")


class computed_once(Generic[_T]):  # noqa: N801 (used as a decorator, like cached_property)
    """``functools.cached_property`` without its lock (Python 3.11 takes one on every first
    access): a RequestAttributes belongs to one Check on one thread."""

    def __init__(self, compute: Callable[[Any], _T]) -> None:
        self._compute = compute
        self._name = compute.__name__
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, instance: Any, owner: type | None = None) -> _T:
        if instance is None:
            return self  # type: ignore[return-value]
        value = self._compute(instance)
        instance.__dict__[self._name] = value  # later reads find the value, not us
        return value


class RequestAttributes:
    """One request as the decision sees it. Header names are lower case."""

    # The trace context of the call that brought the request, when it is not in the request's
    # own headers: Envoy's gRPC ext_authz puts its span's context in the call's metadata. Set
    # by a door only while tracing is on (a class default: no cost per request otherwise).
    trace_carrier: Sequence[tuple[str, str]] | None = None
    # The span of a Check that raised WouldWait, resumed when the door decides it again.
    trace_span: Any = None
    # What ``__init__`` sets when not told otherwise, also as class defaults: ``of_http``
    # sets only what the HTTP door knows (a store per field costs its Check).
    source_ip: str = ""
    source_port: int = 0
    peer_principal: str = ""
    destination_ip: str = ""
    destination_port: int = 0
    destination_principal: str = ""
    sni: str = ""
    context_extensions: Mapping[str, str] = MappingProxyType({})
    trusted_proxy_hops: int = 0
    scheme: str = ""
    client_certificate: str = ""

    def __init__(
        self,
        *,
        method: str = "GET",
        host: str = "",
        path: str = "/",
        headers: Mapping[str, str] | None = None,
        source_ip: str = "",
        source_port: int = 0,
        peer_principal: str = "",
        destination_ip: str = "",
        destination_port: int = 0,
        destination_principal: str = "",
        sni: str = "",
        context_extensions: Mapping[str, str] | None = None,
        trusted_proxy_hops: int = 0,
        door: str = "grpc",
        unknown: frozenset[str] = frozenset(),
        scheme: str = "",
        client_certificate: str = "",
    ) -> None:
        self.method = method
        self.host = host
        self.path = path
        self.headers: Mapping[str, str] = headers or {}
        self.source_ip = source_ip
        self.source_port = source_port
        self.peer_principal = peer_principal
        self.destination_ip = destination_ip
        self.destination_port = destination_port
        # The mTLS identity of the workload the request is for (a sidecar's SPIFFE ID).
        self.destination_principal = destination_principal
        self.sni = sni
        self.context_extensions: Mapping[str, str] = context_extensions or {}
        self.trusted_proxy_hops = trusted_proxy_hops
        self.door = door  # which door brought it: "grpc" or "http" (metrics, decision log)
        self.unknown = unknown
        # The scheme Envoy saw ("http"/"https"; "" when the door cannot tell) and the client's
        # certificate as Envoy sends it (URL-encoded PEM; "" when none or not sent): what a
        # DPoP proof's htu and a certificate-bound token are checked against.
        self.scheme = scheme
        self.client_certificate = client_certificate

    @classmethod
    def of_http(
        cls, method: str, host: str, path: str, headers: Mapping[str, str], unknown: frozenset[str]
    ) -> RequestAttributes:
        """A request as the HTTP door reads it: what ``__init__`` makes of these arguments
        with ``door="http"``, every other field at its default."""
        request = object.__new__(cls)
        request.method = method
        request.host = host
        request.path = path
        request.headers = headers
        request.door = "http"
        request.unknown = unknown
        return request

    @computed_once
    def normalized_path(self) -> str:
        return normalize_path(self.path)

    @computed_once
    def host_lower(self) -> str:
        return self.host.lower()

    @computed_once
    def host_forms(self) -> tuple[str, ...]:
        """The host as ``hosts`` patterns match it: the authority in lower case without a
        trailing dot on its name, and, when it has a port, also the name alone. So a rule on
        ``admin.example.com`` matches ``Admin.Example.com.:80`` too (Istio matches the
        authority as sent and tells users to add ``admin.example.com:*``)."""
        name, port = split_authority(self.host_lower)
        if name.endswith("."):
            name = name[:-1]
        return (f"{name}:{port}", name) if port else (name,)

    @computed_once
    def query_string(self) -> str:
        """The raw query (after ``?``, before ``#``), or ``""``."""
        if "?" not in self.path:
            return ""
        return self.path.split("?", 1)[1].split("#", 1)[0]

    @computed_once
    def query_params(self) -> dict[str, list[str]]:
        """Every value of each query parameter, URL-decoded, in order, with ``&`` and ``;``
        both separating parameters, as the most lenient upstream reads them (a token location
        repeated with two values is ambiguous, not first-come)."""
        query = self.query_string
        if not query:
            return {}
        params: dict[str, list[str]] = {}
        for key, value in parse_qsl(query.replace(";", "&"), keep_blank_values=True):
            params.setdefault(key, []).append(value)
        return params

    @computed_once
    def query_names_beside_semicolon(self) -> frozenset[str]:
        """The (URL-decoded) names of the query parameters that share an ``&``-separated
        part with a ``;``: upstreams that split on ``&`` only read another parameter, or
        another value, there than those that split on ``;`` too."""
        query = self.query_string
        if ";" not in query:
            return frozenset()
        return frozenset(
            key
            for part in query.split("&")
            if ";" in part
            for key, _ in parse_qsl(part.replace(";", "&"), keep_blank_values=True)
        )

    @computed_once
    def cookies(self) -> dict[str, list[str]]:
        """Every value of each cookie in the ``cookie`` header by ``cookie_name`` (trimmed,
        lower case), in order, read as the most lenient upstream reads them."""
        return read_cookies(self.headers.get("cookie", ""))

    @computed_once
    def cookies_beside_comma(self) -> frozenset[str]:
        """The names of the cookies that share a ``;``-separated part of the ``cookie``
        header with a ``,``: upstreams that split on ``;`` only read another cookie, or
        another value, there than those that split on ``,`` too (and Envoy joins two
        ``Cookie`` headers with ``,``)."""
        raw = self.headers.get("cookie", "")
        if "," not in raw:
            return frozenset()
        return frozenset(
            name for part in raw.split(";") if "," in part for name in read_cookies(part)
        )

    @computed_once
    def source_address(self) -> IPAddress | None:
        return _parse_ip(self.source_ip)

    @computed_once
    def destination_address(self) -> IPAddress | None:
        return _parse_ip(self.destination_ip)

    @computed_once
    def remote_address(self) -> IPAddress | None:
        """The client address: from X-Forwarded-For, skipping ``trusted_proxy_hops`` from the right.

        Only entries appended by trusted proxies are believed; the client controls the rest.
        As Envoy does, falls back to the direct peer when the header is absent, has fewer
        entries than that, or the chosen entry is not an IP address.
        """
        xff = self.headers.get("x-forwarded-for", "")
        hops = [h.strip() for h in xff.split(",") if h.strip()]
        index = len(hops) - 1 - self.trusted_proxy_hops
        if index >= 0:
            address = _parse_ip(hops[index])
            if address is not None:
                return address
        return self.source_address

    @computed_once
    def peer_identity(self) -> tuple[str, str, str, str] | None:
        """(principal, trust domain, namespace, service account) from a SPIFFE peer URI."""
        raw = self.peer_principal
        if not raw:
            return None
        principal = raw.removeprefix("spiffe://")
        trust_domain, _, rest = principal.partition("/")
        namespace = service_account = ""
        parts = rest.split("/")
        if len(parts) >= 4 and parts[0] == "ns" and parts[2] == "sa":
            namespace, service_account = parts[1], parts[3]
        return principal, trust_domain, namespace, service_account
