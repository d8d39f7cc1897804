"""The bare HTTP floor: the least an HTTP/1.1 server on uvloop + httptools can do per request.

A raw ``asyncio.Protocol`` feeds every byte to httptools' C parser and answers each complete
request ``200`` with ``content-length: 0``; nothing about the request is kept or looked at.
Whatever the HTTP door of authz-server spends above this per request is its own cost.

    python bench/harness/http_floor.py --listen 127.0.0.1:0 --port-file /tmp/floor.port

Keep-alive and pipelining: the answers to every request completed by one read go out in one
write, in order; a request that does not keep the connection alive (``Connection: close``,
HTTP/1.0, an Upgrade) gets ``connection: close`` and the connection ends after it. A request
httptools cannot parse gets a 400 and the connection ends. Prints ``port N`` once it listens
(and writes N to ``--port-file``); stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path
from typing import cast

import httptools
import uvloop

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
OK_CLOSE = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class FloorProtocol(asyncio.Protocol):
    """One connection: parse, count the complete requests, answer them all at once."""

    _transport: asyncio.Transport  # set by connection_made, before any data arrives

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._complete = 0  # requests answered by the next write
        self._last: bytes | None = None  # the answer that ends the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass but has its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._last is not None:
            return  # the connection is ending: nothing after its last request is answered
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if self._last is None:  # bytes after a closing request are no error of its own
                self._last = BAD_REQUEST
        self._answer()

    def on_message_complete(self) -> None:  # httptools callback
        if self._last is not None:
            return
        # httptools parses nothing after an Upgrade request: answer it and end the connection.
        if self._parser.should_keep_alive() and not self._parser.should_upgrade():
            self._complete += 1
        else:
            self._last = OK_CLOSE

    def _answer(self) -> None:
        answers = OK * self._complete
        self._complete = 0
        if self._last is None:
            if answers:
                self._transport.write(answers)
            return
        self._transport.write(answers + self._last)
        self._transport.close()

    # NOTE: a client that pipelines without reading its answers must not grow our buffer
    # without bound: stop reading while the transport's write buffer is full.
    def pause_writing(self) -> None:
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._transport.resume_reading()


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` too) as (host, port). Raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--listen {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


async def serve(host: str, port: int, port_file: Path | None) -> None:
    """Serve on `host`:`port` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(FloorProtocol, host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    if port_file is not None:
        # Written whole, then renamed: a reader never sees half a number.
        partial = port_file.with_name(port_file.name + ".partial")
        partial.write_text(f"{bound}\n")
        os.replace(partial, port_file)
    print(f"port {bound}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free)")
    parser.add_argument("--port-file", type=Path, help="write the bound port to this file")
    args = parser.parse_args()
    try:
        host, port = parse_listen(args.listen)
    except ValueError as error:
        parser.error(str(error))
    uvloop.run(serve(host, port, args.port_file))


if __name__ == "__main__":
    main()
