"""Where a provider's keys come from: inline JWKS, a file, a URL, OIDC discovery, or a shared
secret. Each source's ``load`` returns a ``KeySet`` (and the HTTP ``max-age``, if any) or raises.

HTTP fetches are bounded (timeout, 1 MiB), verify TLS (optionally against ``caFile``), follow
redirects only to https (or, from an http URL on loopback, to loopback), and treat anything but
a 200 with a JSON body as a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from authz_server import request_trace
from authz_server.config.load import Provider
from authz_server.config.specs import HMAC_ALGORITHMS
from authz_server.credentials.apikeys import ApiKeysFileSource
from authz_server.credentials.introspection import Introspector
from authz_server.identity import DEFAULT_SPACE_DELIMITED
from authz_server.keys.keyset import KeySet, KeySource, VerificationKey, VerifyFn

MAX_DOCUMENT_BYTES = 1 << 20
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to https, or to loopback http when the original URL was one."""

    def __init__(self, original: str) -> None:
        self.original = urlsplit(original)

    def redirect_request(  # noqa: PLR0917 (urllib's signature)
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        target = urlsplit(newurl)
        allowed = target.scheme == "https" or (
            target.scheme == "http"
            and self.original.scheme == "http"
            and _is_loopback(self.original.hostname)
            and _is_loopback(target.hostname)
        )
        if not allowed:
            raise urllib.error.HTTPError(
                req.full_url, code, f"refusing redirect to {target.scheme}://", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def max_age(cache_control: str | None) -> float | None:
    """Seconds from a ``Cache-Control: max-age=N`` header, or None."""
    if not cache_control:
        return None
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None


class _Deadline:
    """One deadline for a whole fetch (connect, headers, body, redirects): when it passes,
    every socket opened for the fetch is shut down, which ends any read blocked on it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._duplicates: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            self._shut(sock)

    def track_connection(self, sock: socket.socket) -> None:
        """Track the connection under ``sock`` rather than the object: a TLS wrapper takes
        the descriptor over (the object is detached before the handshake), but shutting a
        duplicate of it down ends the connection, handshake included."""
        duplicate = socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno()))
        with self._lock:
            self._duplicates.append(duplicate)
        self.track(duplicate)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            self._shut(sock)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            duplicates, self._duplicates = self._duplicates, []
        for duplicate in duplicates:
            duplicate.close()


def _tracked(base: type[http.client.HTTPConnection], deadline: _Deadline) -> Any:
    class Tracked(base):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            create: Callable[..., socket.socket] = self._create_connection  # type: ignore[has-type]

            def create_tracked(*create_args: Any, **create_kwargs: Any) -> socket.socket:
                sock = create(*create_args, **create_kwargs)
                deadline.track_connection(sock)  # from before the TLS handshake
                return sock

            self._create_connection = create_tracked

    return Tracked


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: Any) -> Any:
        return self.do_open(_tracked(http.client.HTTPConnection, self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline, context: ssl.SSLContext | None) -> None:
        super().__init__(context=context)
        self.deadline = deadline
        self.ssl_context = context

    def https_open(self, req: Any) -> Any:
        context = self.ssl_context or ssl.create_default_context()
        return self.do_open(
            _tracked(http.client.HTTPSConnection, self.deadline), req, context=context
        )


def fetch_json(
    url: str, *, timeout: float, ssl_context: ssl.SSLContext | None = None
) -> tuple[Any, float | None]:
    """GET ``url``: (parsed JSON, Cache-Control max-age). Raises on any failure.

    ``timeout`` bounds the whole fetch, redirects included, not each read.
    """
    # A fetch made on a traced Check's behalf carries its trace context (traceparent).
    headers = {"Accept": "application/json", **request_trace.outgoing_headers()}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310
    with _Deadline(timeout) as deadline:
        opener = urllib.request.build_opener(
            _SafeRedirects(url),
            _HTTPHandler(deadline),
            _HTTPSHandler(deadline, ssl_context),
            urllib.request.ProxyHandler({}),
        )
        try:
            with opener.open(request, timeout=timeout) as response:
                if response.status != 200:
                    raise OSError(f"HTTP {response.status}")
                age = max_age(response.headers.get("Cache-Control"))
                chunks: list[bytes] = []
                size = 0
                while chunk := response.read1(65536):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_DOCUMENT_BYTES:
                        raise ValueError(f"response larger than {MAX_DOCUMENT_BYTES} bytes")
                body = b"".join(chunks)
        except Exception:
            if deadline.expired:
                raise TimeoutError(
                    f"timed out: response not complete within {timeout:g}s"
                ) from None
            raise
        if deadline.expired:  # a shut socket can also look like a clean end of the body
            raise TimeoutError(f"timed out: response not complete within {timeout:g}s")
    try:
        return json.loads(body), age
    except (ValueError, RecursionError):
        raise ValueError("response is not JSON") from None


@dataclass
class InlineSource:
    document: str
    description: str = "inline jwks"
    remote: bool = False
    watched: bool = False

    def load(self, allowed_algs: frozenset[str], origin: str) -> tuple[KeySet, float | None]:
        return KeySet.from_jwks(json.loads(self.document), allowed_algs, origin), None

    def changed(self) -> bool:
        return False


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)  # follows the ..data symlink a ConfigMap/Secret mount swaps
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class FileSource:
    """A JWKS file, re-read when it changes (a mounted Secret or ConfigMap is swapped)."""

    remote = True
    watched = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)
        self._loaded: tuple[int, int, int] | None = None

    def load(self, allowed_algs: frozenset[str], origin: str) -> tuple[KeySet, float | None]:
        # NOTE: remembered before parsing, so a broken file is retried on the backoff schedule
        # or when it changes again, not every second.
        self._loaded = _file_signature(self.path)
        return KeySet.from_jwks(json.loads(self.path.read_bytes()), allowed_algs, origin), None

    def changed(self) -> bool:
        return _file_signature(self.path) != self._loaded


class UrlSource:
    remote = True
    watched = False

    def __init__(self, url: str, *, timeout: float, ssl_context: ssl.SSLContext | None) -> None:
        self.url = url
        self.description = url
        self.timeout = timeout
        self.ssl_context = ssl_context

    def load(self, allowed_algs: frozenset[str], origin: str) -> tuple[KeySet, float | None]:
        document, age = fetch_json(self.url, timeout=self.timeout, ssl_context=self.ssl_context)
        return KeySet.from_jwks(document, allowed_algs, origin), age

    def changed(self) -> bool:
        return False


class DiscoverySource:
    """OIDC discovery: ``{issuer}/.well-known/openid-configuration`` names the ``jwks_uri``.

    The document's ``issuer`` must equal the configured one (OpenID Connect Discovery 4.3);
    the ``jwks_uri`` found is reused until a fetch fails, then discovered again.
    """

    remote = True
    watched = False

    def __init__(self, issuer: str, *, timeout: float, ssl_context: ssl.SSLContext | None) -> None:
        self.issuer = issuer
        self.discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        self.description = self.discovery_url
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.jwks_uri: str | None = None

    def _discover(self) -> str:
        document, _ = fetch_json(
            self.discovery_url, timeout=self.timeout, ssl_context=self.ssl_context
        )
        if not isinstance(document, dict):
            raise ValueError("the discovery document is not a JSON object")
        if document.get("issuer") != self.issuer:
            raise ValueError(
                f"the discovery document names issuer {str(document.get('issuer'))[:200]!r}, "
                f"not the configured {self.issuer!r}"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in ("http", "https"):
            raise ValueError("the discovery document has no http(s) jwks_uri")
        target, origin = urlsplit(jwks_uri), urlsplit(self.discovery_url)
        if target.scheme == "http" and not (
            origin.scheme == "http"
            and _is_loopback(origin.hostname)
            and _is_loopback(target.hostname)
        ):
            raise ValueError(f"refusing plain-http jwks_uri {jwks_uri[:200]!r}: keys need https")
        return jwks_uri

    def load(self, allowed_algs: frozenset[str], origin: str) -> tuple[KeySet, float | None]:
        if self.jwks_uri is None:
            self.jwks_uri = self._discover()
        try:
            document, age = fetch_json(
                self.jwks_uri, timeout=self.timeout, ssl_context=self.ssl_context
            )
        except Exception:
            self.jwks_uri = None  # maybe it moved: discover again next time
            raise
        return KeySet.from_jwks(document, allowed_algs, origin), age

    def changed(self) -> bool:
        return False


_HMAC_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "HS256": hashes.SHA256,
    "HS384": hashes.SHA384,
    "HS512": hashes.SHA512,
}


def _hmac_verifier(secret: bytes, alg: str) -> VerifyFn:
    hash_cls = _HMAC_HASHES[alg]

    def verify(message: bytes, signature: bytes) -> bool:
        mac = crypto_hmac.HMAC(secret, hash_cls())
        mac.update(message)
        return hmac.compare_digest(mac.finalize(), signature)

    return verify


class SecretSource:
    """A shared HMAC secret from a file (HS256/384/512 only; never a public key)."""

    remote = True
    watched = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"shared secret {path}"
        self._loaded: tuple[int, int, int] | None = None

    def load(self, allowed_algs: frozenset[str], origin: str) -> tuple[KeySet, float | None]:
        self._loaded = _file_signature(self.path)
        secret = self.path.read_bytes().strip()
        if len(secret) < 32:
            raise ValueError("the shared secret is shorter than 32 bytes")
        verifiers: dict[str, VerifyFn] = {
            a: _hmac_verifier(secret, a) for a in HMAC_ALGORITHMS if a in allowed_algs
        }
        digest = hashlib.sha256(secret).hexdigest()
        key = VerificationKey(kid="", kty="oct", verifiers=verifiers, fingerprint=f"oct:{digest}")
        return KeySet(keys=(key,)), None

    def changed(self) -> bool:
        return _file_signature(self.path) != self._loaded


def source_for(provider: Provider) -> KeySource:
    """The key source a provider's configuration names."""
    spec = provider.spec
    if spec.introspection is not None and provider.client_secret_file is not None:
        return Introspector(
            provider.name, spec.introspection, provider.client_secret_file, provider.ca_file
        )
    if spec.api_keys is not None and provider.api_keys_file is not None:
        return ApiKeysFileSource(
            provider.api_keys_file,
            provider=provider.name,
            issuer=spec.issuer,
            space_delimited=DEFAULT_SPACE_DELIMITED | frozenset(spec.space_delimited_claims),
        )
    context = None
    url = spec.jwks_uri or (spec.issuer if spec.discovery else "")
    if provider.ca_file is not None:
        context = ssl.create_default_context(cafile=str(provider.ca_file))
    elif url.startswith("https://"):
        # NOTE: built once: loading the system CA bundle costs ~40 ms per context.
        context = ssl.create_default_context()
    if spec.jwks is not None:
        return InlineSource(spec.jwks)
    if provider.jwks_file is not None:
        return FileSource(provider.jwks_file)
    if provider.shared_secret_file is not None:
        return SecretSource(provider.shared_secret_file)
    if spec.jwks_uri is not None:
        return UrlSource(spec.jwks_uri, timeout=spec.timeout, ssl_context=context)
    return DiscoverySource(spec.issuer, timeout=spec.timeout, ssl_context=context)
