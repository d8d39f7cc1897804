"""An identity provider that turns hostile after the keys were loaded: it drips one byte at a
time, sends 100 MB, or redirects to itself; or, over https, it presents a certificate that must
not be trusted, answers in plaintext, or breaks off or trickles the handshake. Each refresh ends
within the provider's timeout and a bounded amount of memory, the failure is logged and counted
(naming TLS where TLS failed), and the last good keys keep verifying tokens."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.ops.metrics import Metrics
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from tests.helpers import AUDIENCE, ISSUER, claims_for, write_config

HUGE = 100 * 1024 * 1024
# A fetch with a 1s timeout ends well within this, however busy the machine; unbounded, the
# slow IdPs here (drip, trickle) would hold it for 40 s or more.
BOUND = 5.0


class _Hostile(BaseHTTPRequestHandler):
    server: HostileIdP

    def do_GET(self) -> None:
        mode = self.server.mode
        if mode == "good":
            body = json.dumps(self.server.jwks).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif mode == "loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif mode == "drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):  # one byte every 0.1 s, until the client hangs up
                if self.server.closing.wait(0.1):
                    return
                try:
                    self.wfile.write(b"{")
                    self.wfile.flush()
                except OSError:
                    return
        else:  # huge
            self.send_response(200)
            self.send_header("Content-Length", str(HUGE))
            self.end_headers()
            chunk = b" " * 65536
            try:
                for _ in range(HUGE // len(chunk)):
                    self.wfile.write(chunk)
            except OSError:
                return

    def log_message(self, format: str, *args: object) -> None:
        pass


class HostileIdP(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, jwks: Mapping[str, object]) -> None:
        super().__init__(("127.0.0.1", 0), _Hostile)
        self.jwks = jwks
        self.mode = "good"
        self.closing = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/jwks.json"


@contextlib.contextmanager
def _serving(server: HostileIdP) -> Iterator[None]:
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        server.closing.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def idp() -> Iterator[tuple[HostileIdP, devkeys.SigningKey]]:
    key = devkeys.generate_key("EC-P256", kid="hostile")
    server = HostileIdP(devkeys.jwks(key))
    with _serving(server):
        yield server, key


@pytest.mark.parametrize("mode", ["drip", "huge", "loop"])
def test_a_hostile_idp_is_cut_off_in_bounded_time_and_memory_and_the_last_keys_serve(
    tmp_path: Path, idp: tuple[HostileIdP, devkeys.SigningKey], mode: str
) -> None:
    server, key = idp
    text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksUri: {server.url}
    timeout: 1s
    maxStale: 1h
policies:
  - name: signed-in
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""
    engine = Engine.build(config.load(write_config(tmp_path, text)))
    (cache,) = engine.caches.values()
    assert cache.refresh()  # the good keys, first
    service = AuthorizationService(engine)
    token = key.sign(claims_for(time.time()))

    server.mode = mode
    tracemalloc.start()
    try:
        started = time.monotonic()
        refreshed = cache.refresh()
        took = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refreshed is False
    assert took < BOUND, f"{mode}: the fetch took {took:.1f}s past its 1s timeout"
    assert peak < 16 * 1024 * 1024, f"{mode}: {peak / 1e6:.0f} MB held for one fetch"
    assert cache.keyset is not None and cache.last_error  # kept, and the failure recorded
    decision = service.check(
        RequestAttributes(path="/x", headers={"authorization": f"Bearer {token}"})
    )
    assert decision.allowed, decision.reason  # stale keys keep working
    engine.close()


# ------------------------------------------------------------------------- TLS failures


@dataclass(frozen=True)
class Pki:
    ca_file: Path  # the CA the provider trusts (its caFile)
    contexts: Mapping[str, ssl.SSLContext]  # server side, by the certificate they present


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    signer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    names: list[x509.GeneralName] | None = None,
    valid: tuple[datetime.datetime, datetime.datetime],
) -> x509.Certificate:
    """A certificate for ``key``, signed by ``signer`` (name, key) or by itself."""
    issuer, issuer_key = signer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
    )
    if names is None:  # a CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA, and server contexts presenting: a certificate for 127.0.0.1 from that CA
    ("good"), a self-signed one, an expired one from the CA, and one from the CA for another
    host."""
    directory = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    current = (now - datetime.timedelta(hours=1), now + datetime.timedelta(hours=1))
    expired = (now - datetime.timedelta(days=2), now - datetime.timedelta(days=1))
    loopback: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("authz-server test CA", ca_key, valid=current)
    signer = (ca.subject, ca_key)
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    other_host: list[x509.GeneralName] = [x509.DNSName("idp.example")]
    contexts: dict[str, ssl.SSLContext] = {}
    for label, by, names, valid in (
        ("good", signer, loopback, current),
        ("unknown_ca", None, loopback, current),
        ("expired", signer, loopback, expired),
        ("wrong_host", signer, other_host, current),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _certificate("idp", key, signer=by, names=names, valid=valid)
        pem = directory / f"{label}.pem"
        pem.write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        contexts[label] = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        contexts[label].load_cert_chain(pem)
    return Pki(ca_file, contexts)


# The first bytes of a TLS ServerHello record, and no more.
_SERVER_HELLO_START = b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03"


def _read_record(sock: socket.socket) -> bytes:
    """One whole TLS record from ``sock`` (the ClientHello). Read it all: closing a socket
    with unread bytes would reset the connection instead of ending it."""
    data = b""
    while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


class TlsIdP(HostileIdP):
    """The same identity provider over https. ``tls`` says what each new connection gets: a
    handshake with one of the ``contexts``' certificates (then the JWKS), a plaintext HTTP
    answer ("plaintext"), the start of a ServerHello and the end of the connection ("cut"),
    or a real handshake sent one byte every 50 ms ("trickle")."""

    def __init__(self, jwks: Mapping[str, object], contexts: Mapping[str, ssl.SSLContext]) -> None:
        super().__init__(jwks)
        self.contexts = contexts
        self.tls = "good"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}/jwks.json"

    def finish_request(self, request: Any, client_address: Any) -> None:
        tls = self.tls
        request.settimeout(5)  # whatever the client does, this thread ends
        if tls in self.contexts:
            try:
                wrapped = self.contexts[tls].wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return  # the client refused the certificate
            with wrapped:
                super().finish_request(wrapped, client_address)
            return
        try:
            hello = _read_record(request)
            if tls == "plaintext":
                request.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            elif tls == "cut":
                request.sendall(_SERVER_HELLO_START)
            else:
                self._trickle_handshake(request, hello)
            request.shutdown(socket.SHUT_WR)
            while request.recv(65536):  # until the client hangs up
                pass
        except OSError:
            return  # the client hung up first

    def _trickle_handshake(self, sock: socket.socket, hello: bytes) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        handshake = self.contexts["good"].wrap_bio(incoming, outgoing, server_side=True)
        incoming.write(hello)
        with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the client's Finished
            handshake.do_handshake()
        for byte in outgoing.read():  # ~1 KB: close to a minute at this pace
            if self.closing.wait(0.05):
                return
            sock.sendall(bytes((byte,)))


# What the warning must say, by what went wrong in the handshake. A certificate refused says
# why in OpenSSL's verify words; a broken handshake names OpenSSL's reason (wording varies
# between OpenSSL versions); a handshake too slow is the fetch's own timeout.
TLS_FAULTS = {
    "unknown_ca": r"\[SSL: CERTIFICATE_VERIFY_FAILED\] .*self.signed certificate",
    "expired": r"\[SSL: CERTIFICATE_VERIFY_FAILED\] .*certificate has expired",
    "wrong_host": r"\[SSL: CERTIFICATE_VERIFY_FAILED\] .*not valid for '127\.0\.0\.1'",
    "plaintext": r"\[SSL: [A-Z_]+\]",
    "cut": r"\[SSL: [A-Z_]+\]",
    "trickle": r"timed out",
}


@pytest.mark.parametrize("tls", list(TLS_FAULTS))
def test_an_idp_whose_tls_fails_is_cut_off_logged_and_counted_and_the_last_keys_serve(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, tls: str
) -> None:
    key = devkeys.generate_key("EC-P256", kid="tls")
    server = TlsIdP(devkeys.jwks(key), pki.contexts)
    text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksUri: {server.url}
    caFile: {pki.ca_file}
    timeout: 1s
    maxStale: 1h
policies:
  - name: signed-in
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""
    with _serving(server):
        engine = Engine.build(config.load(write_config(tmp_path, text)))
        registry = CollectorRegistry()
        Metrics(registry).watch_engine(lambda: engine)
        (cache,) = engine.caches.values()
        assert cache.refresh(), cache.last_error  # trusted: a certificate from the caFile CA
        service = AuthorizationService(engine)
        token = key.sign(claims_for(time.time()))

        server.tls = tls
        with caplog.at_level(logging.WARNING, logger="authz_server.jwks"):
            started = time.monotonic()
            refreshed = cache.refresh()
            took = time.monotonic() - started
        assert refreshed is False
        assert took < BOUND, f"{tls}: the fetch took {took:.1f}s past its 1s timeout"
        (warning,) = [r.getMessage() for r in caplog.records if r.name == "authz_server.jwks"]
        assert re.search(TLS_FAULTS[tls], warning), warning
        assert f"provider {ISSUER}:" in warning and "serving the last good keys" in warning

        def sample(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {"provider": ISSUER, **labels})

        assert sample("authz_jwks_fetches_total", result="failure") == 1
        assert sample("authz_jwks_keys") == 1  # still loaded
        decision = service.check(
            RequestAttributes(path="/x", headers={"authorization": f"Bearer {token}"})
        )
        assert decision.allowed, decision.reason  # stale keys keep working

        server.tls = "good"
        assert cache.refresh(), cache.last_error  # and fresh ones load when the IdP mends
        engine.close()
