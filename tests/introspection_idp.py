"""A real OAuth2 introspection endpoint (RFC 7662) on 127.0.0.1 that a test controls: which
tokens are active with which answer, and how the endpoint misbehaves (slow, 500, garbage,
redirect, an answer without ``active``). It records each call (the form and the
Authorization header), over http or, given a certificate, https."""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from tests.certs import CertificateAuthority
from tests.e2e.harness import _BackgroundServer, _QuietHandler, _Server

CLIENT_ID = "authz-server"
CLIENT_SECRET = "s3cret:with/odd chars"


@dataclass
class Call:
    form: dict[str, list[str]]
    authorization: str
    content_type: str
    traceparent: str = ""


@dataclass
class Behaviour:
    """How the endpoint answers: normally (None), or one way of failing."""

    status: int | None = None  # e.g. 500, or 302 with a Location
    body: bytes | None = None  # raw body (garbage, an answer without `active`)
    hang_seconds: float = 0.0  # wait before answering (past the client's timeout)
    release: threading.Event = field(default_factory=threading.Event)


class _IntrospectionHandler(_QuietHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        owner: IntrospectionServer = self.server.owner
        raw = self._read_body()
        call = Call(
            parse_qs(raw.decode("ascii", "replace")),
            self.headers.get("Authorization", ""),
            self.headers.get("Content-Type", ""),
            self.headers.get("traceparent", ""),
        )
        behaviour = owner.record(call)
        try:
            if behaviour.hang_seconds:
                # Ends early when the test releases it, so that stopping the server is quick.
                behaviour.release.wait(behaviour.hang_seconds)
        finally:
            # NOTE: counted out before the answer leaves: a client holding the answer may start
            # its next call before this thread runs again, and that is not two at once.
            owner.done()
        self._answer(owner, behaviour, call)

    def _answer(self, owner: IntrospectionServer, behaviour: Behaviour, call: Call) -> None:
        if behaviour.status is not None and 300 <= behaviour.status < 400:
            self._send(behaviour.status, b"", {"Location": owner.url + "/elsewhere"})
            return
        if behaviour.status is not None or behaviour.body is not None:
            self._send(behaviour.status or 200, behaviour.body or b"")
            return
        token = call.form.get("token", [""])[0]
        answer = owner.answers.get(token, {"active": False})
        self._send(200, json.dumps(answer).encode())


class IntrospectionServer(_BackgroundServer):
    _handler = _IntrospectionHandler

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        super().__init__()
        self._context = context
        self._lock = threading.Lock()
        self.answers: dict[str, dict[str, Any]] = {}
        self.calls: list[Call] = []
        self.behaviour = Behaviour()
        self.in_flight = 0
        self.max_in_flight = 0  # the most calls it was answering at once

    @property
    def url(self) -> str:
        scheme = "https" if self._context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return self.url + "/oauth2/introspect"

    def start(self) -> IntrospectionServer:
        self._httpd = _Server(self._handler, self)
        if self._context is not None:
            self._httpd.socket = self._context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="IntrospectionServer",
            daemon=True,
        )
        self._thread.start()
        return self

    def record(self, call: Call) -> Behaviour:
        with self._lock:
            self.calls.append(call)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.behaviour

    def done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def call_count(self) -> int:
        with self._lock:
            return len(self.calls)

    def fail(self, **how: Any) -> None:
        with self._lock:
            self.behaviour.release.set()
            self.behaviour = Behaviour(**how)

    def recover(self) -> None:
        self.fail()

    def active(self, token: str, **claims: Any) -> None:
        """``token`` is active, with ``claims`` (an `exp` an hour away unless given)."""
        self.answers[token] = {"active": True, "exp": int(time.time()) + 3600, **claims}

    def _before_stop(self) -> None:
        self.behaviour.release.set()


def https_context(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for 127.0.0.1 signed by a new CA, and the CA's file."""
    ca = CertificateAuthority()
    cert_path, key_path = ca.issue("127.0.0.1", server=True).write(directory, "idp")
    ca_path = directory / "idp-ca.pem"
    ca_path.write_bytes(ca.cert_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context, ca_path
