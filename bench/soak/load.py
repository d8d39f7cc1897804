"""The load generator: a bounded number of HTTP/1.1 keep-alive connections to Envoy, each
sending one request at a time, paced to a total rate, every answer checked against the
status its request was sent to get.

asyncio, with httptools (a dependency of the server) parsing the responses. A request that
gets no answer (connection refused or reset, no answer within the timeout) counts as status
0, which no request expects.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field

import httptools

from bench.soak.traffic import Mix, Phase

# No answer within this long is a failure (Envoy's own ext_authz timeout is 1 s).
REQUEST_TIMEOUT_S = 5.0
UNEXPECTED_EXAMPLES = 20


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `send` writes a request and returns the status of its answer."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(ConnectionError(f"unparsable response: {error}"))
            self.close()

    def on_message_complete(self) -> None:  # httptools callback
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(self._parser.get_status_code())
        if not self._parser.should_keep_alive():
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"connection lost: {exc or 'closed by the peer'}"))

    def _fail(self, error: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    async def send(self, request: bytes) -> int:
        if self._transport is None or self.closed:
            raise ConnectionError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return await asyncio.wait_for(self._waiter, REQUEST_TIMEOUT_S)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


async def _connect(port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(_Connection, "127.0.0.1", port)
    return protocol


@dataclass(frozen=True)
class Unexpected:
    at_s: float
    kind: str
    expected: int
    got: int


@dataclass
class Recorder:
    """Every answer of the run: counts per (kind, expected, got); latencies of the expected
    answers per (kind, expected) and per interval of ``bin_s`` seconds (by when the answer
    came); the first unexpected answers."""

    bin_s: float
    counts: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    latencies: dict[tuple[str, int], array[float]] = field(default_factory=dict)
    bins: dict[int, array[float]] = field(default_factory=dict)
    unexpected: list[Unexpected] = field(default_factory=list)
    unexpected_total: int = 0

    def record(self, at_s: float, kind: str, expected: int, got: int, seconds: float) -> None:
        self.counts[kind, expected, got] += 1
        if got != expected:
            self.unexpected_total += 1
            if len(self.unexpected) < UNEXPECTED_EXAMPLES:
                self.unexpected.append(Unexpected(at_s, kind, expected, got))
            return
        self.latencies.setdefault((kind, expected), array("d")).append(seconds)
        self.bins.setdefault(int(at_s / self.bin_s), array("d")).append(seconds)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class Load:
    """``connections`` workers sending ``mix`` to 127.0.0.1:``port`` at ``rate`` requests per
    second in total (each worker at most one request in flight, so fewer when answers are slow).

    The driver changes `phase` with `switch`; `drain` waits until no request picked under an
    earlier phase is still in flight, so that no answer is judged against the wrong phase."""

    def __init__(
        self,
        port: int,
        mix: Mix,
        recorder: Recorder,
        *,
        phase: Phase,
        connections: int,
        rate: float,
        t0: float,
    ) -> None:
        if connections < 1 or rate <= 0:
            raise ValueError("connections must be at least 1 and rate positive")
        self.port = port
        self.phase = phase
        self._mix = mix
        self._recorder = recorder
        self._connections = connections
        self._period = connections / rate
        self._t0 = t0
        self._generation = 0
        self._in_flight: Counter[int] = Counter()
        self._stopping = False

    def switch(self, phase: Phase) -> None:
        """Send and judge by ``phase`` from the next request on."""
        self.phase = phase
        self._generation += 1

    async def drain(self, timeout: float = REQUEST_TIMEOUT_S + 1) -> None:
        """Wait until every request picked before the last `switch` is answered.

        Raises TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while any(n for g, n in self._in_flight.items() if g < self._generation):
                await asyncio.sleep(0.005)

    async def run(self) -> None:
        """Send until `stop`; returns when every worker has had its last answer."""
        workers = [
            asyncio.create_task(self._worker(index / self._connections))
            for index in range(self._connections)
        ]
        await asyncio.gather(*workers)

    def stop(self) -> None:
        self._stopping = True

    async def _worker(self, offset: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + offset * self._period
        connection: _Connection | None = None
        try:
            while not self._stopping:
                delay = next_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                    if self._stopping:
                        break
                # Paced, but never catching up in a burst after a slow answer.
                next_at = max(next_at + self._period, loop.time())
                kind, request, expected = self._mix.pick(self.phase)
                generation = self._generation
                self._in_flight[generation] += 1
                started = time.perf_counter()
                try:
                    if connection is None or connection.closed:
                        connection = await _connect(self.port)
                    got = await connection.send(request)
                except (OSError, TimeoutError):  # ConnectionError is an OSError
                    got = 0
                    if connection is not None:
                        connection.close()
                    connection = None
                finally:
                    self._in_flight[generation] -= 1
                seconds = time.perf_counter() - started
                self._recorder.record(loop.time() - self._t0, kind, expected, got, seconds)
        finally:
            if connection is not None:
                connection.close()


async def probe(port: int, request: bytes, want: int, timeout: float) -> float:
    """Send ``request`` through Envoy every 100 ms until it gets ``want``; return the seconds
    that took. Raises TimeoutError naming the last status after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    last: int | str = "none"
    connection: _Connection | None = None
    try:
        while loop.time() - started < timeout:
            try:
                if connection is None or connection.closed:
                    connection = await _connect(port)
                last = await connection.send(request)
            except (OSError, TimeoutError) as error:
                last = type(error).__name__
                if connection is not None:
                    connection.close()
                connection = None
            if last == want:
                return loop.time() - started
            await asyncio.sleep(0.1)
    finally:
        if connection is not None:
            connection.close()
    raise TimeoutError(f"still {last} instead of {want} after {timeout:.0f}s")
