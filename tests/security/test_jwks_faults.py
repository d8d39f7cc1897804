"""An identity provider that turns hostile after the keys were loaded: it drips one byte at a
time, sends 100 MB, or redirects to itself. Each refresh ends within the provider's timeout
and a bounded amount of memory, and the last good keys keep verifying tokens."""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from authz_server import config, devkeys
from authz_server.attributes import RequestAttributes
from authz_server.service import AuthorizationService, Engine
from tests.helpers import AUDIENCE, ISSUER, claims_for, write_config

HUGE = 100 * 1024 * 1024


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

    def __init__(self, jwks: dict[str, object]) -> None:
        super().__init__(("127.0.0.1", 0), _Hostile)
        self.jwks = jwks
        self.mode = "good"
        self.closing = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/jwks.json"


@pytest.fixture
def idp() -> Iterator[tuple[HostileIdP, devkeys.SigningKey]]:
    key = devkeys.generate_key("EC-P256", kid="hostile")
    server = HostileIdP(devkeys.jwks(key))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, key
    finally:
        server.closing.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


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
    assert took < 3.0, f"{mode}: the fetch took {took:.1f}s past its 1s timeout"
    assert peak < 16 * 1024 * 1024, f"{mode}: {peak / 1e6:.0f} MB held for one fetch"
    assert cache.keyset is not None and cache.last_error  # kept, and the failure recorded
    decision = service.check(
        RequestAttributes(path="/x", headers={"authorization": f"Bearer {token}"})
    )
    assert decision.allowed, decision.reason  # stale keys keep working
    engine.close()
