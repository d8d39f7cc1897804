"""The HTTP door: Envoy's HTTP ext_authz protocol (``http_service``; Istio's
``envoyExtAuthzHttp``) in, an HTTP answer out. No decision logic here.

Envoy sends the client's method, path (after ``pathPrefix``) and headers as an HTTP/1.1
request; ``to_attributes`` reads them into the door-neutral ``RequestAttributes`` and
``HttpRenderer`` turns the ``Decision`` into the answer Envoy understands: 200 with the
identity headers (Envoy copies those in its ``allowed_upstream_headers`` onto the upstream
request) and ``x-envoy-auth-headers-to-remove``; or the denial's status, headers and body,
which Envoy sends to the client as they are.

The door runs one event loop (uvloop, with httptools' C parser) on its own thread, beside the
gRPC door's threads, over the same ``AuthorizationService``. A Check is decided on the loop
itself (tens of microseconds); one that would wait for a key-set refresh is decided again on a
small thread pool, and the connection waits for it (answers stay in request order). When every
pool thread is taken, it is decided at once without waiting, as the gRPC door does past its
waiting slots: a hanging IdP delays a few Checks, never the loop or the other providers.

Defences: limits on the request line (414), header count and size (431) and body (413); a
malformed request gets 400 and the connection is closed; a request must arrive whole within
``requestTimeout`` (else 408 and close: a slow client holds nothing for long); idle keep-alive
connections are closed after ``idleTimeout``; past ``maxConnections``, new connections are
closed at once. A client that stops reading its answers: once the connection's write buffer
is past its high-water mark, the door stops answering, parsing and reading it (what waits is
``_MAX_PIPELINED`` requests and a parse slice, and one buffer of answers), and closes it when
the answers are not taken within ``requestTimeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import stat
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httptools
import uvloop

from authz_server import responses
from authz_server.attributes import RequestAttributes
from authz_server.config.specs import HttpAuthzSpec
from authz_server.doors.envoy_headers import UNKNOWN_WITHOUT_HEADERS, read_attribute_headers
from authz_server.errors import WouldWait
from authz_server.ops.log import name_os_thread
from authz_server.responses import Decision

log = logging.getLogger("authz_server.http")

# What Envoy's HTTP ext_authz request does not carry: policies fail closed on these (unless
# server.httpAuthz.attributeHeaders has Envoy add them: doors/envoy_headers.py).
HTTP_UNKNOWN = UNKNOWN_WITHOUT_HEADERS
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"

_STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_CLOSE = b"connection: close\r\n"
_SWEEP_INTERVAL = 1.0
# Requests parsed ahead (pipelined) before the door stops reading from that connection.
_MAX_PIPELINED = 64
# What is parsed at a time: how far past _MAX_PIPELINED the requests waiting can go.
_PARSE_SLICE = 4096
# Header names as sent -> as read (lower case), kept per door: Envoy sends the same few.
_NAMES_KEPT = 256


def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Denied')}\r\n".encode("ascii")


def _header_line(name: str, value: str) -> bytes:
    # Values were checked printable where they were made (claims, fixed texts).
    return f"{name}: {value}\r\n".encode()


def render_allow(decision: Decision) -> bytes:
    """200, the headers to set, and the headers Envoy is to remove, with no body."""
    parts = [_status_line(200), b"content-length: 0\r\n"]
    parts.extend(_header_line(name, value) for name, value in decision.headers_to_set)
    if decision.headers_to_remove:
        parts.append(_header_line(HEADERS_TO_REMOVE, ",".join(decision.headers_to_remove)))
    parts.append(b"\r\n")
    return b"".join(parts)


def render_denial(decision: Decision, *, head: bool = False) -> bytes:
    """The denial's status, headers and body, for Envoy to send to the client. ``head``: the
    answer to a HEAD request, which has no body (its content-length is what GET would get;
    Envoy reads none, and bytes after the headers would break the connection)."""
    body = decision.body.encode()
    parts = [_status_line(decision.status)]
    parts.extend(_header_line(name, value) for name, value in decision.response_headers)
    parts.append(f"content-length: {len(body)}\r\n\r\n".encode("ascii"))
    if not head:
        parts.append(body)
    return b"".join(parts)


def _protocol_error(status: int, reason: str) -> bytes:
    """The answer to a request the door cannot read (never a decision: Envoy sent it badly)."""
    body = f'{{"error": "bad_request", "reason": "{reason}"}}'.encode("ascii")
    return (
        _status_line(status)
        + b"content-type: application/json\r\n"
        + _CLOSE
        + f"content-length: {len(body)}\r\n\r\n".encode("ascii")
        + body
    )


def _closing(answer: bytes) -> bytes:
    """``answer`` with ``connection: close`` after its status line."""
    end = answer.index(b"\r\n") + 2
    return answer[:end] + _CLOSE + answer[end:]


class HttpRenderer:
    """Decision → HTTP answer bytes, each distinct answer rendered once: denials by their
    content (few and bounded), allows by their headers (one per caller, in a bounded map)."""

    def __init__(self, allow_entries: int = 4096) -> None:
        self._denials: dict[tuple[Any, ...], bytes] = {}
        self._allows: dict[tuple[Any, ...], bytes] = {}
        self._allow_entries = allow_entries
        # The last decision answered (not to a HEAD) and its answer: a caller repeating its
        # request gets the same Decision object back, found here without hashing its headers.
        self._last: tuple[Decision | None, bytes] = (None, b"")

    def wire(self, decision: Decision, *, head: bool = False) -> bytes:
        """The answer to send; ``head``: the request was a HEAD (a denial goes without body)."""
        last = self._last
        if last[0] is decision and not head:
            return last[1]
        answer = self._render(decision, head)
        if not head:
            self._last = (decision, answer)
        return answer

    def _render(self, decision: Decision, head: bool) -> bytes:
        if decision.allowed:
            key: tuple[Any, ...] = (decision.headers_to_set, decision.headers_to_remove)
            answer = self._allows.get(key)
            if answer is None:
                if len(self._allows) >= self._allow_entries:
                    self._allows.clear()  # the busy callers come back at once
                answer = self._allows[key] = render_allow(decision)
            return answer
        key = (decision.status, decision.reason, decision.response_headers, decision.body, head)
        answer = self._denials.get(key)
        if answer is None:
            answer = self._denials[key] = render_denial(decision, head=head)
        return answer


class _Rejected(Exception):  # noqa: N818 (carries a status, not an error of ours)
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# A parsed request waiting for its answer: (attributes, keep-alive), or a protocol error
# answer that closes the connection.
_Pending = tuple[RequestAttributes, bool] | bytes


class _Connection(asyncio.Protocol):
    """One connection from Envoy: parses requests, answers them in order."""

    def __init__(self, door: HttpDoor) -> None:
        self.door = door
        self.limits = door.spec
        self.now = door.loop_time  # the loop's clock
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[_Pending] = deque()
        self.busy = False  # a Check of this connection is on the waiting pool
        self.rejected = False  # a protocol error is queued: nothing after it is read
        self.reading = True
        # The transport's write buffer is above its high-water mark (the client is not
        # reading): answers wait, and so does reading, so memory stays bounded.
        self.write_paused = False
        self.write_paused_at = 0.0
        self.closed = False
        # Loop time the request being received began (0: between requests); a new
        # connection must send its first request within requestTimeout too.
        self.started = self.now()
        self.last_active = self.started
        self.completed = 0  # requests completed in the slice being parsed
        # Received, not parsed yet (from offset on): parsing waits while answers do.
        self.unparsed = b""
        self.offset = 0
        self._reset()

    def _reset(self) -> None:
        self.in_head = True  # the request line and headers are still arriving
        self.head_bytes = 0
        self.url = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers: dict[str, str] = {}
        self.body_bytes = 0

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # NOTE: uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        self.transport = transport  # type: ignore[assignment]
        if len(self.door.connections) >= self.limits.max_connections:
            self.transport.abort()  # type: ignore[union-attr]
            return
        self.door.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.door.connections.discard(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_at = self.now()
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._work()

    def data_received(self, data: bytes) -> None:
        if self.started == 0.0:
            self.started = self.now()
        if self.offset < len(self.unparsed):  # bytes still held: these come after them
            self.unparsed = self.unparsed[self.offset :] + data
        elif (
            len(data) <= _PARSE_SLICE
            and not self.pending
            and not (self.busy or self.write_paused or self.rejected)
        ):
            # The usual read (a request or a few, nothing waiting): what _work does with one
            # slice, without slicing (and nothing is held back, so there is nothing to reset).
            self._parse(data)
            self._answer_pending()
            if not self.reading or self.pending or self.busy or self.write_paused or self.rejected:
                self._update_reading()
            return
        else:
            self.unparsed = data
        self.offset = 0
        self._work()

    def _holding(self) -> bool:
        """Whether parsing (and reading) waits: a Check of this connection is on the pool,
        the client is not taking its answers, many requests wait, or nothing more is read."""
        return self.busy or self.write_paused or self.rejected or len(self.pending) > _MAX_PIPELINED

    def _work(self) -> None:
        """Answer what is parsed, and parse what was received a slice at a time while the
        answers are taken: what waits for a client that stops reading is bounded by
        _MAX_PIPELINED requests and a slice, not by what one read brought."""
        while True:
            self._answer_pending()
            if self.closed or self.offset >= len(self.unparsed) or self._holding():
                break
            end = self.offset + _PARSE_SLICE
            piece = self.unparsed[self.offset : end]  # the whole of a small read: no copy
            self.offset = end
            self._parse(piece)
        if self.rejected or self.offset >= len(self.unparsed):
            self.unparsed, self.offset = b"", 0
        self._update_reading()

    def _parse(self, data: bytes) -> None:
        self.completed = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Envoy forwarded an Upgrade request's headers: answer it, then close (nothing
            # after it on this connection is HTTP/1.1 we could parse).
            last = self.pending[-1] if self.pending else None
            if isinstance(last, tuple):
                self.pending[-1] = (last[0], False)
                self.rejected = True
            else:
                self._reject(_Rejected(400, "malformed request"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Rejected):
                self._reject(cause)
            else:
                self._reject(_Rejected(400, "malformed request"))
        else:
            # NOTE: a request just ended and nothing of the next one was handed over: its
            # head has 0 bytes so far (_reset), nothing to count.
            if self.in_head and (not self.completed or self.url or self.raw_headers):
                self._count_head_bytes(len(data))

    def _count_head_bytes(self, received: int) -> None:
        """Bound what a head that never ends can make the parser hold (it buffers a header
        until its end): 431 past the limits. Only head bytes count: a body, or requests
        answered already, never make a later head "too large"."""
        if self.completed:
            # The slice also held the end of earlier requests (their bodies included): the
            # head being received counts what the parser has handed over of it so far. Its
            # unfinished header line (at most this slice) counts from the next slice on.
            self.head_bytes = len(self.url) + sum(
                len(name) + len(value) + 4 for name, value in self.raw_headers
            )
        else:
            self.head_bytes += received  # no request ended in this slice: all of it is head
        limits = self.limits
        if self.head_bytes > limits.max_header_bytes + limits.max_request_line_bytes:
            self._reject(_Rejected(431, "request head too large"))

    def _reject(self, rejected: _Rejected) -> None:
        self.pending.append(_protocol_error(rejected.status, rejected.reason))
        self.rejected = True
        self._update_reading()

    def _update_reading(self) -> None:
        """Read from the connection only when nothing received waits to be parsed and
        parsing may go on (see ``_holding``)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        wanted = not self._holding() and self.offset >= len(self.unparsed)
        if wanted != self.reading:
            self.reading = wanted
            if wanted:
                transport.resume_reading()
            else:
                transport.pause_reading()

    # --------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        if self.started == 0.0:
            self.started = self.now()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_request_line_bytes:
            raise _Rejected(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # NOTE: one call per header: kept to an append; the head is checked and read whole
        # in on_headers_complete (what a head that never ends can buffer is bounded in
        # data_received).
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        raw = self.raw_headers
        limits = self.limits
        if len(raw) > limits.max_headers:
            raise _Rejected(431, "too many headers")
        size = 0
        headers = self.headers
        names = self.door.header_names
        for name, value in raw:
            size += len(name) + len(value)
            key = names.get(name)
            if key is None:
                key = name.decode("latin-1").lower()
                if len(names) < _NAMES_KEPT:
                    names[name] = key
            if key in headers:
                # Repeated: joined as Envoy joins it (cookies with "; ", the others with ",").
                separator = "; " if key == "cookie" else ","
                headers[key] = f"{headers[key]}{separator}{value.decode('utf-8', 'replace')}"
            else:
                headers[key] = value.decode("utf-8", "replace")
        if size + 4 * len(raw) > limits.max_header_bytes:
            raise _Rejected(431, "headers too large")

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > self.limits.max_body_bytes:
            raise _Rejected(413, "body too large")

    def on_message_complete(self) -> None:
        parser = self.parser
        path = self.url.decode("latin-1")
        prefix = self.door.path_prefix
        if prefix:
            if not path.startswith(prefix) or path[len(prefix) : len(prefix) + 1] not in (
                "",
                "/",
                "?",
            ):
                raise _Rejected(400, "path does not start with server.httpAuthz.pathPrefix")
            path = path[len(prefix) :]
            if not path.startswith("/"):
                path = "/" + path
        attrs = to_attributes(
            parser.get_method().decode("ascii"),
            path,
            self.headers,
            attribute_headers=self.door.attribute_headers,
        )
        keep_alive = parser.should_keep_alive()
        self._reset()
        self.completed += 1
        self.started = 0.0
        if self.pending or self.busy or self.write_paused or parser.should_upgrade():
            # Answers go in order, and an Upgrade request's answer closes the connection
            # (_parse learns it after this): it waits its turn.
            self.pending.append((attrs, keep_alive))
        else:
            self._answer(attrs, keep_alive)  # nothing waits: answered at once

    # ------------------------------------------------------------------------ answers

    def _answer_pending(self) -> None:
        while self.pending and not self.busy and not self.write_paused:
            item = self.pending.popleft()
            if isinstance(item, bytes):  # a protocol error: answer it and close
                self._send(item, keep_alive=False)
                return
            if not self._answer(*item):
                return

    def _answer(self, attrs: RequestAttributes, keep_alive: bool) -> bool:
        """Decide ``attrs`` and send the answer, or hand it to the waiting pool (the
        connection is busy until it is decided). Returns whether the next request may be
        answered now (not busy, not closed)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False  # nothing can be answered: not decided (nor counted, nor logged)
        door = self.door
        head = attrs.method == "HEAD"
        try:
            decision = door.service.check(attrs, wait="defer")
        except WouldWait:
            if door.waiting < door.waiting_threads:
                self.busy = True
                self._update_reading()
                future = door.decide_waiting(attrs)
                future.add_done_callback(
                    functools.partial(self._waited, keep_alive=keep_alive, head=head)
                )
                return False
            decision = door.service.check(attrs, wait="no")
        return self._send(door.renderer.wire(decision, head=head), keep_alive)

    def _waited(self, future: asyncio.Future[Decision], keep_alive: bool, head: bool) -> None:
        self.busy = False
        self.door.waiting -= 1
        if self.closed:
            return
        try:
            decision = future.result()
        except Exception:
            log.exception("internal error in the HTTP door")
            decision = responses.internal_error()
        if self._send(self.door.renderer.wire(decision, head=head), keep_alive):
            self._work()

    def _send(self, answer: bytes, keep_alive: bool) -> bool:
        """Write ``answer``; close after it when the request or the door says so. Returns
        whether the connection stays open."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        self.last_active = self.now()
        if keep_alive and not self.door.draining:
            transport.write(answer)
            return True
        transport.write(answer if _CLOSE in answer else _closing(answer))
        transport.close()
        return False

    def idle(self) -> bool:
        return self.started == 0.0 and not self.pending and not self.busy


def to_attributes(
    method: str, path: str, headers: dict[str, str], *, attribute_headers: bool = False
) -> RequestAttributes:
    """The request Envoy forwarded, as the decision sees it (``path`` already without the
    door's prefix). Envoy's pseudo-headers are added as the gRPC door sees them.
    ``attribute_headers``: read the connection's attributes from the headers Envoy adds
    (``server.httpAuthz.attributeHeaders``); otherwise they are unknown."""
    host = headers.get("host", "")
    headers[":authority"] = host
    headers[":method"] = method
    headers[":path"] = path
    if attribute_headers:
        connection = read_attribute_headers(headers)
        request = RequestAttributes.of_http(method, host, path or "/", headers, connection.unknown)
        request.source_ip = connection.source_ip
        request.peer_principal = connection.peer_principal
        request.destination_ip = connection.destination_ip
        request.destination_port = connection.destination_port
        request.sni = connection.sni
        return request
    return RequestAttributes.of_http(method, host, path or "/", headers, HTTP_UNKNOWN)


def _bind_address(listen: str) -> tuple[str, int]:
    """(host, port) of a ``listen`` address, or (path, -1) of a ``unix:`` one."""
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:")
        if not path:
            raise ValueError(f"--http-authz-listen: empty Unix socket path in {listen!r}")
        return path, -1
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--http-authz-listen: expected host:port or unix:/path, got {listen!r}")
    return host.strip("[]"), int(port)


class HttpDoor:
    """The HTTP door's server: its event loop thread, its listening socket, its connections.

    ``service`` is anything with ``check(attributes, *, wait) -> Decision`` (the
    ``AuthorizationService``)."""

    def __init__(
        self,
        service: Any,
        spec: HttpAuthzSpec,
        *,
        listen: str,
        reuse_port: bool = False,
        waiting_threads: int = 4,
    ) -> None:
        self.service = service
        self.spec = spec
        self.listen = listen
        self.path_prefix = spec.path_prefix
        self.attribute_headers = spec.attribute_headers
        self.reuse_port = reuse_port
        self.renderer = HttpRenderer()
        self.header_names: dict[bytes, str] = {}
        self.connections: set[_Connection] = set()
        self.port = 0
        self.draining = False
        self.waiting_threads = waiting_threads
        self.waiting = 0  # Checks on the pool now (changed on the loop only)
        self._pool = ThreadPoolExecutor(max_workers=waiting_threads, thread_name_prefix="http-wait")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def loop_time(self) -> float:
        """The loop's clock (the loop's own ``time`` once started: see ``start``)."""
        assert self._loop is not None
        return self._loop.time()

    def decide_waiting(self, attrs: RequestAttributes) -> asyncio.Future[Decision]:
        """Decide ``attrs`` on the pool, where waiting for a key refresh is allowed."""
        assert self._loop is not None
        self.waiting += 1
        return self._loop.run_in_executor(self._pool, self._check_waiting, attrs)

    def _check_waiting(self, attrs: RequestAttributes) -> Decision:
        decision: Decision = self.service.check(attrs)
        return decision

    # ------------------------------------------------------------------------ running

    def start(self) -> None:
        """Bind and serve on a thread of its own; returns once listening (raises OSError or
        ValueError when the address cannot be bound)."""
        host, port = _bind_address(self.listen)
        loop = uvloop.new_event_loop()
        self._loop = loop
        # NOTE: read on every request: the loop's C method, not this class' (same clock).
        self.loop_time = loop.time  # type: ignore[method-assign]
        try:
            self._server = loop.run_until_complete(self._bind(host, port))
        except BaseException:
            loop.close()
            self._loop = None
            raise
        if port >= 0:
            sockets = getattr(self._server, "sockets", None) or ()
            self.port = sockets[0].getsockname()[1] if sockets else 0
        self._thread = threading.Thread(target=self._run, name="http-door", daemon=True)
        self._thread.start()

    async def _bind(self, host: str, port: int) -> asyncio.AbstractServer:
        def factory() -> _Connection:
            return _Connection(self)

        loop = asyncio.get_running_loop()
        if port < 0:  # host is a Unix socket path
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(host).st_mode):
                    os.unlink(host)  # a socket left by a previous run
            return await loop.create_unix_server(factory, host, backlog=1024)
        return await loop.create_server(
            factory, host, port, backlog=1024, reuse_port=self.reuse_port or None
        )

    def _run(self) -> None:
        name_os_thread("http-door")  # its CPU, apart from the gRPC door's, in top -H and /proc
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        loop.call_later(_SWEEP_INTERVAL, self._sweep)
        try:
            loop.run_forever()
        finally:
            loop.close()
            self._stopped.set()

    def _sweep(self) -> None:
        """Close connections whose request is overdue (408) or that idled too long."""
        assert self._loop is not None
        now = self._loop.time()
        request_timeout = self.spec.request_timeout
        idle_timeout = self.spec.idle_timeout
        for connection in list(self.connections):
            transport = connection.transport
            if transport is None:
                continue
            if connection.write_paused and now - connection.write_paused_at > request_timeout:
                transport.abort()  # its answers were not taken in time: it stopped reading
            elif connection.started and now - connection.started > request_timeout:
                if not connection.busy and not connection.pending:
                    transport.write(_protocol_error(408, "request not received in time"))
                    transport.close()
            elif connection.idle() and now - connection.last_active > idle_timeout:
                transport.close()
        self._loop.call_later(_SWEEP_INTERVAL, self._sweep)

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; let requests in progress finish within ``grace``; close the rest."""
        loop = self._loop
        if loop is None or self._thread is None:
            return
        done: Future[None] = asyncio.run_coroutine_threadsafe(self._drain(grace), loop)
        with contextlib.suppress(Exception):
            done.result(grace + 5)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(grace + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.listen.startswith("unix:"):
            with contextlib.suppress(OSError):
                os.unlink(self.listen.removeprefix("unix:"))

    async def _drain(self, grace: float) -> None:
        self.draining = True  # every answer from now on closes its connection
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            for connection in list(self.connections):
                if connection.idle() and connection.transport is not None:
                    connection.transport.close()
            if not self.connections or loop.time() >= deadline:
                break
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()

    def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the door's loop and return its result (for tests and stats)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(_call(function), self._loop).result(5)


async def _call(function: Callable[[], Any]) -> Any:
    return function()
