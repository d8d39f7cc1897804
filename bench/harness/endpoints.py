"""HTTP endpoints the scenarios serve from their own process: an identity provider's JWKS or
introspection endpoint, an OTLP sink. Each answers every GET and POST 200 with the bytes of a
function, on a free port of 127.0.0.1, from daemon threads, and counts the requests it read.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Endpoint:
    url: str  # http://127.0.0.1:PORT, no path: every path gets the same answer
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self) -> None:
        with self._lock:
            self.calls += 1


@contextlib.contextmanager
def serving(
    answer: Callable[[], bytes], content_type: str = "application/json"
) -> Iterator[Endpoint]:
    """An endpoint answering ``answer()`` (called per request) until the block ends."""
    endpoint = Endpoint("")

    class Handler(BaseHTTPRequestHandler):
        # Headers and body go out in two writes; with Nagle on, the client's delayed ACK would
        # add ~20 ms to every request, a cost of this server, not of what is measured.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            endpoint.count()
            body = answer()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    endpoint.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, name="bench-endpoint", daemon=True).start()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
