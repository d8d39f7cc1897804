"""Key sources: bounded, validated HTTP fetches, safe redirects, discovery, caFile, files, secrets.

Fetch behaviour is exercised against real HTTP(S) servers on 127.0.0.1; nothing here sends
traffic anywhere else (a recorder on ``socket.create_connection`` proves it for redirects).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from authz_server import errors
from authz_server.config.load import Provider
from authz_server.config.specs import ASYMMETRIC_ALGORITHMS, ProviderSpec
from authz_server.credentials.jwt import ProviderRuntime, TokenVerifier
from authz_server.errors import AuthenticationError
from authz_server.keys.keyset import JWKSCache
from authz_server.keys.sources import (
    MAX_DOCUMENT_BYTES,
    DiscoverySource,
    FileSource,
    SecretSource,
    UrlSource,
    _SafeRedirects,
    fetch_json,
    max_age,
    source_for,
)
from authz_server.service import make_cache
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.certs import CertificateAuthority
from tests.e2e.harness import JWKSServer
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for

ALL = frozenset(ASYMMETRIC_ALGORITHMS)
SECRET = b"0123456789abcdef0123456789abcdef-shared"


@pytest.fixture
def idp(rsa_key: SigningKey) -> Iterator[JWKSServer]:
    with JWKSServer(devkeys.jwks(rsa_key)) as server:
        yield server


# ------------------------------------------------------------------ a tiny HTTP(S) server


class _TinyHandler(BaseHTTPRequestHandler):
    server: _TinyHTTPServer

    def do_GET(self) -> None:
        status, headers, body = self.server.routes.get(self.path, (404, {}, b"{}"))
        self.server.hits.append(self.path)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _TinyHTTPServer(HTTPServer):
    """One-thread HTTP (or, given a context, HTTPS) server on 127.0.0.1 with fixed routes."""

    def __init__(
        self,
        routes: dict[str, tuple[int, dict[str, str], bytes]],
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.routes = routes
        self.hits: list[str] = []
        super().__init__(("127.0.0.1", 0), _TinyHandler)
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that refused our certificate is the point of some tests

    def base_url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> _TinyHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every outgoing connection; refuse (without connecting) any non-loopback one."""
    seen: list[str] = []
    real = socket.create_connection

    def guarded(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        host = address[0]
        seen.append(host)
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise AssertionError(f"a test tried to connect to {host}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return seen


# ------------------------------------------------------------------------- Cache-Control


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("max-age=60", 60.0),
        ("public, max-age=120", 120.0),
        ("max-age=30, must-revalidate", 30.0),
        ("private,max-age=7", 7.0),
        ("MAX-AGE=5", 5.0),
        ('max-age="45"', 45.0),
        ("max-age = 15", 15.0),
        ("s-maxage=10, max-age=90", 90.0),
        ("max-age=0", 0.0),
        ("s-maxage=10", None),
        ("x-max-age=99", None),
        ("no-store", None),
        ("max-age=soon", None),
        ("max-age=-5", None),
        ("", None),
        (None, None),
    ],
)
def test_cache_control_max_age_is_parsed_strictly(
    header: str | None, seconds: float | None
) -> None:
    assert max_age(header) == seconds


def test_fetch_returns_the_document_and_the_servers_max_age(
    idp: JWKSServer, rsa_key: SigningKey
) -> None:
    idp.set_jwks(devkeys.jwks(rsa_key), headers={"Cache-Control": "public, max-age=90"})
    document, age = fetch_json(idp.jwks_url, timeout=2)
    assert document == devkeys.jwks(rsa_key)
    assert age == 90.0
    idp.set_jwks(devkeys.jwks(rsa_key))
    assert fetch_json(idp.jwks_url, timeout=2)[1] is None


# --------------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ({"status": 500, "body": b"oops"}, "500"),
        ({"status": 404}, "404"),
        ({"status": 204}, "HTTP 204"),
        ({"status": 200, "body": b"<html>not json"}, "not JSON"),
        ({"body": b'{"keys": [}'}, "not JSON"),
        ({"body": b"[" * 100_000 + b"]" * 100_000}, "not JSON"),
        ({"close_connection": True}, "closed connection"),
    ],
    ids=["500", "404", "204", "html", "truncated-json", "deep-json", "closed-connection"],
)
def test_fetch_failures_raise(idp: JWKSServer, failure: dict[str, Any], message: str) -> None:
    idp.set_failure(**failure)
    with pytest.raises((OSError, ValueError), match=message):
        fetch_json(idp.jwks_url, timeout=2)


def test_a_response_over_one_mib_is_refused(idp: JWKSServer, rsa_key: SigningKey) -> None:
    padded = devkeys.jwks(rsa_key) | {"padding": "x" * MAX_DOCUMENT_BYTES}
    idp.set_jwks(padded)
    with pytest.raises(ValueError, match="larger than 1048576 bytes"):
        fetch_json(idp.jwks_url, timeout=2)
    just_fits = devkeys.jwks(rsa_key) | {"padding": ""}
    room = MAX_DOCUMENT_BYTES - len(json.dumps(just_fits).encode())
    idp.set_jwks(devkeys.jwks(rsa_key) | {"padding": "x" * room})
    assert fetch_json(idp.jwks_url, timeout=2)[0]["keys"] == devkeys.jwks(rsa_key)["keys"]


def test_a_hanging_server_fails_after_the_timeout_not_later(idp: JWKSServer) -> None:
    idp.set_failure(hang_seconds=10)
    started = time.monotonic()
    with pytest.raises(OSError, match="timed out"):
        fetch_json(idp.jwks_url, timeout=0.3)
    assert time.monotonic() - started < 3
    idp.clear_failure()


@pytest.mark.parametrize(
    "failure",
    [
        {"status": 503},
        {"body": b"garbage"},
        {"body": b'{"keys": []}'},
        {"body": b'{"no": "keys"}'},
        {"close_connection": True},
    ],
    ids=["503", "garbage", "empty-set", "not-a-jwks", "closed-connection"],
)
def test_a_failed_fetch_never_replaces_good_keys(
    idp: JWKSServer, failure: dict[str, Any], rsa_key: SigningKey
) -> None:
    cache = JWKSCache(
        provider="p", allowed_algs=ALL, source=UrlSource(idp.jwks_url, timeout=2, ssl_context=None)
    )
    assert cache.refresh()
    good = cache.keyset
    idp.set_failure(**failure)
    assert not cache.refresh()
    assert cache.keyset is good and cache.last_error
    assert cache.fetches == {"success": 1, "failure": 1}


def test_a_set_with_only_unusable_keys_is_a_failed_fetch(idp: JWKSServer) -> None:
    weak = devkeys.generate_key("RSA-1024", kid="weak")
    idp.set_jwks(devkeys.jwks(weak))
    cache = JWKSCache(
        provider="p", allowed_algs=ALL, source=UrlSource(idp.jwks_url, timeout=2, ssl_context=None)
    )
    assert not cache.refresh()
    assert cache.keyset is None and "no usable keys" in (cache.last_error or "")


# -------------------------------------------------------------------------------- redirects


def _decide(original: str, target: str) -> urllib.request.Request:
    """What the redirect handler does with ``original`` → 302 → ``target`` (nothing is sent)."""
    request = urllib.request.Request(original)
    handler = _SafeRedirects(original)
    followed = handler.redirect_request(request, None, 302, "Found", Message(), target)
    assert isinstance(followed, urllib.request.Request)
    return followed


@pytest.mark.parametrize(
    ("original", "target"),
    [
        ("http://127.0.0.1:8080/jwks", "https://idp.example/jwks"),
        ("https://idp.example/jwks", "https://keys.idp.example/jwks"),
        ("http://127.0.0.1:8080/jwks", "http://127.0.0.1:9090/jwks"),
        ("http://localhost/jwks", "http://127.0.0.2/jwks"),
        ("http://[::1]:80/jwks", "http://localhost:81/jwks"),
    ],
)
def test_redirects_to_https_or_from_loopback_to_loopback_are_followed(
    original: str, target: str
) -> None:
    assert _decide(original, target).full_url == target


@pytest.mark.parametrize(
    ("original", "target"),
    [
        ("http://127.0.0.1:8080/jwks", "http://idp.example/jwks"),
        ("http://127.0.0.1:8080/jwks", "http://10.0.0.1/jwks"),
        ("https://idp.example/jwks", "http://127.0.0.1/jwks"),
        ("https://idp.example/jwks", "http://idp.example/jwks"),
        ("http://idp.example/jwks", "http://127.0.0.1/jwks"),
        ("http://idp.example/jwks", "http://idp.example/other"),
    ],
)
def test_redirects_to_plain_http_elsewhere_are_refused(original: str, target: str) -> None:
    with pytest.raises(urllib.error.HTTPError, match="refusing redirect to http://"):
        _decide(original, target)


def test_fetch_follows_a_loopback_redirect_to_loopback(
    idp: JWKSServer, rsa_key: SigningKey, loopback_only: list[str]
) -> None:
    routes = {"/old": (302, {"Location": idp.jwks_url}, b"")}
    with _TinyHTTPServer(routes) as redirector:
        document, _ = fetch_json(redirector.base_url() + "/old", timeout=2)
    assert document == devkeys.jwks(rsa_key)
    assert idp.fetch_count() == 1
    assert loopback_only == ["127.0.0.1", "127.0.0.1"]


def test_fetch_refuses_a_redirect_to_plain_http_elsewhere_without_contacting_it(
    loopback_only: list[str],
) -> None:
    routes = {"/jwks": (301, {"Location": "http://192.0.2.1/jwks.json"}, b"")}
    with _TinyHTTPServer(routes) as redirector:
        with pytest.raises(urllib.error.HTTPError, match="refusing redirect") as caught:
            fetch_json(redirector.base_url() + "/jwks", timeout=2)
        caught.value.close()
        assert redirector.hits == ["/jwks"]
    assert loopback_only == ["127.0.0.1"]


# -------------------------------------------------------------------------------- discovery


def test_discovery_finds_the_jwks_uri_and_reuses_it(idp: JWKSServer, rsa_key: SigningKey) -> None:
    source = DiscoverySource(idp.url, timeout=2, ssl_context=None)
    keyset, _ = source.load(ALL, "d")
    assert set(keyset.by_kid) == {rsa_key.kid}
    assert source.jwks_uri == idp.jwks_url
    source.load(ALL, "d")
    assert idp.fetch_count("/.well-known/openid-configuration") == 1
    assert idp.fetch_count() == 2


def test_discovery_with_another_issuer_is_refused_naming_both(idp: JWKSServer) -> None:
    idp.set_issuer("https://impostor.test")
    cache = JWKSCache(
        provider="d", allowed_algs=ALL, source=DiscoverySource(idp.url, timeout=2, ssl_context=None)
    )
    assert not cache.refresh()
    assert cache.keyset is None
    error = cache.last_error or ""
    assert "'https://impostor.test'" in error and repr(idp.url) in error
    assert idp.fetch_count() == 0  # the impostor's keys are never fetched


def test_discovery_issuer_must_match_exactly_including_a_trailing_slash(
    idp: JWKSServer,
) -> None:
    idp.set_issuer(idp.url + "/")
    source = DiscoverySource(idp.url, timeout=2, ssl_context=None)
    with pytest.raises(ValueError, match="not the configured"):
        source.load(ALL, "d")


@pytest.mark.parametrize(
    "extra",
    [{}, {"jwks_uri": None}, {"jwks_uri": 42}, {"jwks_uri": "file:///etc/passwd"}],
    ids=["missing", "null", "number", "file-scheme"],
)
def test_discovery_without_an_http_jwks_uri_is_refused(
    idp: JWKSServer, extra: dict[str, Any]
) -> None:
    document = {"issuer": idp.url} | extra
    idp.set_failure(body=json.dumps(document).encode(), path="/.well-known/openid-configuration")
    source = DiscoverySource(idp.url, timeout=2, ssl_context=None)
    with pytest.raises(ValueError, match="no http\\(s\\) jwks_uri"):
        source.load(ALL, "d")


def test_discovery_document_that_is_not_an_object_is_refused(idp: JWKSServer) -> None:
    idp.set_failure(body=b"[]", path="/.well-known/openid-configuration")
    with pytest.raises(ValueError, match="not a JSON object"):
        DiscoverySource(idp.url, timeout=2, ssl_context=None).load(ALL, "d")


def test_discovery_runs_again_after_a_failed_jwks_fetch(
    idp: JWKSServer, rsa_key: SigningKey
) -> None:
    source = DiscoverySource(idp.url, timeout=2, ssl_context=None)
    source.load(ALL, "d")
    idp.set_failure(status=500, path="/jwks.json")
    with pytest.raises(urllib.error.HTTPError) as caught:
        source.load(ALL, "d")
    caught.value.close()
    assert source.jwks_uri is None
    assert idp.fetch_count("/.well-known/openid-configuration") == 1
    idp.clear_failure()
    keyset, _ = source.load(ALL, "d")
    assert set(keyset.by_kid) == {rsa_key.kid}
    assert idp.fetch_count("/.well-known/openid-configuration") == 2


def test_discovery_config_builds_a_discovery_source(idp: JWKSServer) -> None:
    spec = ProviderSpec(issuer=idp.url, discovery=True, timeout="2s")
    source = source_for(Provider(spec=spec, name="d", origin="test"))
    assert isinstance(source, DiscoverySource)
    assert source.discovery_url == idp.discovery_url and source.timeout == 2.0


# ---------------------------------------------------------------------------------- caFile


def _make_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    ca = CertificateAuthority()
    cert_path, key_path = ca.issue("127.0.0.1", server=True).write(directory, "server")
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.cert_pem)
    return ca_path, cert_path, key_path


@pytest.fixture
def https_idp(tmp_path: Path, rsa_key: SigningKey) -> Iterator[tuple[_TinyHTTPServer, Path]]:
    ca_path, cert_path, key_path = _make_pki(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    body = json.dumps(devkeys.jwks(rsa_key)).encode()
    routes = {"/jwks.json": (200, {"Content-Type": "application/json"}, body)}
    with _TinyHTTPServer(routes, context) as server:
        yield server, ca_path


def _https_provider(url: str, ca_file: Path | None) -> Provider:
    fields = {"issuer": ISSUER, "jwksUri": url, "timeout": "2s"}
    if ca_file is not None:
        fields["caFile"] = str(ca_file)
    spec = ProviderSpec.model_validate(fields)
    return Provider(spec=spec, name="tls", origin="test", ca_file=ca_file)


def test_https_to_a_private_ca_fails_without_ca_file_and_works_with_it(
    https_idp: tuple[_TinyHTTPServer, Path], rsa_key: SigningKey
) -> None:
    server, ca_path = https_idp
    url = server.base_url("https") + "/jwks.json"

    untrusting = make_cache(_https_provider(url, None))
    assert not untrusting.refresh()
    assert "CERTIFICATE_VERIFY_FAILED" in (untrusting.last_error or "")

    trusting = make_cache(_https_provider(url, ca_path))
    assert trusting.refresh(), trusting.last_error
    assert trusting.keyset is not None and set(trusting.keyset.by_kid) == {rsa_key.kid}
    assert server.hits == ["/jwks.json"]  # the refused handshake never got to a request


# ------------------------------------------------------------------------------ file source


def test_file_source_reports_a_change_and_rereads_the_file(
    tmp_path: Path, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(devkeys.jwks(rsa_key)))
    source = FileSource(path)
    assert source.changed()  # never loaded
    assert set(source.load(ALL, "f")[0].by_kid) == {rsa_key.kid}
    assert not source.changed()
    path.write_text(json.dumps(devkeys.jwks(rsa_key, ec_key)))
    assert source.changed()
    assert set(source.load(ALL, "f")[0].by_kid) == {rsa_key.kid, ec_key.kid}
    assert not source.changed()


def test_file_touched_with_the_same_size_counts_as_changed(
    tmp_path: Path, rsa_key: SigningKey
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(devkeys.jwks(rsa_key)))
    source = FileSource(path)
    source.load(ALL, "f")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert source.changed()


def _configmap_dir(root: Path, version: str, document: dict[str, Any]) -> None:
    """Write a kubelet-style ConfigMap version directory ``..<version>/jwks.json``."""
    target = root / f"..{version}"
    target.mkdir()
    (target / "jwks.json").write_text(json.dumps(document))


def test_file_source_follows_a_configmap_data_symlink_swap(
    tmp_path: Path, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    # The kubelet's layout: jwks.json -> ..data/jwks.json, ..data -> ..<timestamp>, swapped
    # atomically by renaming a new ..data link over the old one.
    _configmap_dir(tmp_path, "2024_01", devkeys.jwks(rsa_key))
    (tmp_path / "..data").symlink_to("..2024_01")
    (tmp_path / "jwks.json").symlink_to("..data/jwks.json")
    clock = Clock()
    cache = JWKSCache(
        provider="cm",
        allowed_algs=ALL,
        source=FileSource(tmp_path / "jwks.json"),
        clock=clock,
        jitter=lambda: 1.0,
    )
    assert cache.refresh()
    assert cache.keyset is not None and set(cache.keyset.by_kid) == {rsa_key.kid}

    cache.tick()  # nothing changed, nothing due
    assert cache.fetches["success"] == 1

    _configmap_dir(tmp_path, "2024_02", devkeys.jwks(ec_key))
    (tmp_path / "..data_tmp").symlink_to("..2024_02")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    cache.tick()  # no clock movement: the change alone triggers the reload
    assert cache.fetches["success"] == 2
    assert set(cache.keyset.by_kid) == {ec_key.kid}


def test_a_swap_to_a_same_size_file_with_the_same_mtime_is_still_seen(
    tmp_path: Path, rsa_key: SigningKey
) -> None:
    first, second = (rsa_key.public_jwk() | {"kid": kid} for kid in ("k-1", "k-2"))
    _configmap_dir(tmp_path, "v1", {"keys": [first]})
    _configmap_dir(tmp_path, "v2", {"keys": [second]})
    old, new = (tmp_path / f"..{v}" / "jwks.json" for v in ("v1", "v2"))
    stat = old.stat()
    os.utime(new, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert new.stat().st_size == stat.st_size
    (tmp_path / "..data").symlink_to("..v1")
    source = FileSource(tmp_path / "..data" / "jwks.json")
    source.load(ALL, "f")
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert source.changed()
    assert set(source.load(ALL, "f")[0].by_kid) == {"k-2"}


def test_a_broken_file_keeps_the_last_good_keys(tmp_path: Path, rsa_key: SigningKey) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(devkeys.jwks(rsa_key)))
    cache = JWKSCache(provider="f", allowed_algs=ALL, source=FileSource(path), clock=Clock())
    assert cache.refresh()
    good = cache.keyset
    path.write_text("{ half a document")
    cache.tick()
    assert cache.keyset is good and "JSONDecodeError" in (cache.last_error or "")
    path.unlink()
    cache.tick()
    assert cache.keyset is good and "FileNotFoundError" in (cache.last_error or "")


# ---------------------------------------------------------------------------- shared secret


def _secret_runtime(path: Path, **spec: Any) -> ProviderRuntime:
    fields: dict[str, Any] = {
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "sharedSecretFile": str(path),
    } | spec
    provider = Provider(
        spec=ProviderSpec(**fields), name="hmac", origin="test", shared_secret_file=path
    )
    cache = make_cache(provider)
    assert isinstance(cache.source, SecretSource)
    assert cache.refresh(), cache.last_error
    return ProviderRuntime.build(provider, cache)


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_shared_secret_verifies_hmac_tokens(tmp_path: Path, alg: str) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")  # a trailing newline, as `kubectl create secret` leaves
    clock = Clock()
    token = devkeys.hmac_token(claims_for(clock.now), SECRET, alg=alg)
    identity = TokenVerifier(clock).verify(token, [_secret_runtime(path)])
    assert identity.subject == "alice" and identity.provider == "hmac"


def test_shared_secret_refuses_another_secret_and_asymmetric_tokens(
    tmp_path: Path, rsa_key: SigningKey
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    clock = Clock()
    verifier = TokenVerifier(clock)
    runtime = _secret_runtime(path)
    forged = devkeys.hmac_token(claims_for(clock.now), SECRET[::-1])
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(forged, [runtime])
    assert caught.value.reason == errors.INVALID_SIGNATURE
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(rsa_key.sign(claims_for(clock.now)), [runtime])
    assert caught.value.reason == errors.UNSUPPORTED_ALGORITHM


def test_shared_secret_only_serves_the_allowed_hmac_algorithms(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    clock = Clock()
    runtime = _secret_runtime(path, algorithms=["HS512"])
    token = devkeys.hmac_token(claims_for(clock.now), SECRET, alg="HS256")
    with pytest.raises(AuthenticationError) as caught:
        TokenVerifier(clock).verify(token, [runtime])
    assert caught.value.reason == errors.UNSUPPORTED_ALGORITHM


def test_shared_secret_accepts_an_hmac_token_that_carries_a_kid(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    clock = Clock()
    token = devkeys.hmac_token(claims_for(clock.now), SECRET, kid="2024-01")
    verifier = TokenVerifier(clock, unknown_kid_wait=0.2)
    assert verifier.verify(token, [_secret_runtime(path)]).subject == "alice"


def test_a_short_shared_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"x" * 31 + b"\n")
    with pytest.raises(ValueError, match="shorter than 32 bytes"):
        SecretSource(path).load(frozenset({"HS256"}), "s")
    cache = JWKSCache(provider="s", allowed_algs=frozenset({"HS256"}), source=SecretSource(path))
    assert not cache.refresh()
    assert cache.keyset is None and "shorter than 32 bytes" in (cache.last_error or "")


def test_a_rotated_shared_secret_file_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    clock = Clock()
    runtime = _secret_runtime(path)
    new_secret = b"N" * 40
    path.write_bytes(new_secret)
    assert runtime.keys.source.changed()
    runtime.keys.tick()
    verifier = TokenVerifier(clock)
    assert verifier.verify(devkeys.hmac_token(claims_for(clock.now), new_secret), [runtime])
    with pytest.raises(AuthenticationError):
        verifier.verify(devkeys.hmac_token(claims_for(clock.now), SECRET), [runtime])


def test_discovery_refuses_a_plain_http_jwks_uri_off_loopback(idp: JWKSServer) -> None:
    document = {"issuer": idp.url, "jwks_uri": "http://keys.example.com/jwks.json"}
    idp.set_failure(body=json.dumps(document).encode(), path="/.well-known/openid-configuration")
    source = DiscoverySource(idp.url, timeout=2, ssl_context=None)
    with pytest.raises(ValueError, match="plain-http jwks_uri"):
        source.load(ALL, "d")
    assert idp.fetch_count("/jwks.json") == 0


class _TrickleHandler(BaseHTTPRequestHandler):
    server: _TrickleServer

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "40")
        self.end_headers()
        # A byte at a time, each well within the socket timeout, the whole far beyond it.
        for _ in range(40):
            self.wfile.write(b" ")
            self.wfile.flush()
            if self.server.release.wait(0.1):
                return

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _TrickleServer(HTTPServer):
    def __init__(self) -> None:
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), _TrickleHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the client hangs up on purpose


def test_a_server_trickling_bytes_is_cut_off_at_the_overall_timeout() -> None:
    server = _TrickleServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="not complete within"):
            fetch_json(f"http://127.0.0.1:{server.server_address[1]}/", timeout=0.5)
        assert time.monotonic() - started < 2.0  # 40 bytes x 0.1 s would be 4 s
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


class _SlowHeadersHandler(BaseHTTPRequestHandler):
    server: _TrickleServer

    def do_GET(self) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(60):  # a header line a byte at a time: 6 s in all
            self.wfile.write(b"X")
            self.wfile.flush()
            if self.server.release.wait(0.1):
                return

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_slow_headers_are_cut_off_at_the_overall_timeout_too() -> None:
    server = _TrickleServer()
    server.RequestHandlerClass = _SlowHeadersHandler
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="timed out"):
            fetch_json(f"http://127.0.0.1:{server.server_address[1]}/", timeout=0.5)
        assert time.monotonic() - started < 2.0
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
