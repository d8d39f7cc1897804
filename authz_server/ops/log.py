"""Logging: JSON lines on stderr, and the decision log.

Redaction is a habit, not a filter: nothing logs a token, an Authorization or Cookie header,
or claim values, except the claims an operator lists in ``server.decisionLog.claims``.

The decision log keeps I/O off the request thread: a Check only appends a tuple of raw values
to a bounded queue; one writer thread turns them into lines and writes each batch with one
write, where the logger's handlers would have written them (stderr by default). A full queue
drops the line and counts it; it never blocks a Check.
"""

from __future__ import annotations

import json
import json.encoder
import logging
import os
import random
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO, TypeGuard

from authz_server.attributes import RequestAttributes
from authz_server.config.specs import DecisionLogSpec
from authz_server.identity import Identity
from authz_server.responses import Decision

DECISION_LOGGER = "authz_server.decision"
log = logging.getLogger("authz_server.log")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus a record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


# What a decision line adds to its message in text form: who, and which policy decided.
_TEXT_DECISION_FIELDS = ("principal", "policy")


def _text_value(value: Any) -> str:
    """``value`` as one token of a text line: bare when it is plain, else JSON-quoted (so a
    principal with a space or a line break can neither split nor forge a line)."""
    text = "-" if value is None else str(value)
    plain = text and text.isprintable() and not any(c in text for c in ' "=')
    return text if plain else json.dumps(text, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger message`` for a person, always on one line, as JSON lines are: a
    message or traceback with line breaks (a YAML error quoting the file) keeps them escaped.
    A decision line also says who the caller was and which policy decided."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping) and "decision" in fields:
            line += "".join(
                f" {name}={_text_value(fields.get(name))}" for name in _TEXT_DECISION_FIELDS
            )
        return line.replace("\r", "\\r").replace("\n", "\\n")


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Log to stderr at ``level``, as JSON lines (``fmt="json"``) or plain text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


_Encoder = Callable[[str], str]
# json.dumps(..., ensure_ascii=False) escapes strings with this very function.
_encode: _Encoder = json.encoder.encode_basestring

WRITER_THREAD = "decision-log"  # the writer thread's name, in Python and in the OS
DEFAULT_CAPACITY = 10_000
# Lines reach the destination at most this late. Measured in the server: at 0.05 s the writer's
# wake-ups cost ~3 us per line under load, at 0.2 s ~1 us (Envoy flushes its access log every 1 s).
DEFAULT_FLUSH_INTERVAL = 0.2
_MESSAGE = "%s %s %s -> %d %s"
_MILLIS = tuple(f"{ms:03d}" for ms in range(1000))  # a format spec per line costs more


@dataclass(frozen=True)
class _Rules:
    """What a ``DecisionLogSpec`` means at run time; swapped whole on reload."""

    enabled: bool
    sample_rate: float
    deny_only: bool
    claims: tuple[str, ...]
    level: int
    # What a queued line needs of the spec: (the constant middle of every line,
    # `"level": ..., "logger": ..., ` in json.dumps spacing; the level; the claims to log).
    # NOTE: atomic values only, so the collector untracks queued tuples at its first look
    # rather than promoting them through the generations.
    line: tuple[str, int, tuple[str, ...]]

    @classmethod
    def of(cls, spec: DecisionLogSpec, logger_name: str) -> _Rules:
        level: int = logging.getLevelName(spec.level)
        claims = tuple(spec.claims)
        head = f'"level": {_encode(spec.level)}, "logger": {_encode(logger_name)}, '
        return cls(
            enabled=spec.enabled,
            sample_rate=spec.sample_rate,
            deny_only=spec.deny_only,
            claims=claims,
            level=level,
            line=(head, level, claims),
        )


# One decision as captured on the request thread: raw values only (no Decision or request
# object kept alive until the writer runs), in a plain tuple (a NamedTuple costs a Python call
# per Check). Fields, in order: time, rules.line, allowed, status, reason, provider, principal,
# policy, audited, dry_run, method, host, path (with its query), source_ip, request_id,
# seconds, claims (the identity's claims when some are to be logged, else None), door,
# trace ids ((trace id, span id) of the Check's span when it is traced, else None).
_Entry = tuple[
    float,
    tuple[str, int, tuple[str, ...]],
    bool,
    int,
    str,
    str | None,
    str | None,
    str | None,
    tuple[str, ...],
    tuple[tuple[str, str], ...],
    str,
    str,
    str,
    str,
    str | None,
    float,
    Mapping[str, Any] | None,
    str,
    tuple[str, str] | None,
]


def _fields(entry: _Entry) -> dict[str, Any]:
    """The fields of ``entry``'s line after time, level, logger and message."""
    (_, (_, _, claim_names), allowed, status, reason, provider, principal, policy, audited,
     dry_run, method, host, path, source_ip, request_id, seconds, claims, door,
     trace_ids) = entry  # fmt: skip
    fields: dict[str, Any] = {
        "decision": "allow" if allowed else "deny",
        "status": status,
        "reason": reason,
        "provider": provider,
        "principal": principal,
        "policy": policy,
        "method": method,
        "host": host,
        "path": path.split("?", 1)[0],
        "source_ip": source_ip,
        "request_id": request_id,
        "door": door,
        "duration_us": round(seconds * 1e6, 1),
    }
    if audited:
        fields["audit"] = list(audited)
    if dry_run:
        fields["dry_run"] = dict(dry_run)
    if claims is not None:
        fields["claims"] = {c: claims[c] for c in claim_names if c in claims}
    if trace_ids is not None:
        fields["trace_id"], fields["span_id"] = trace_ids
    return fields


def _message_args(entry: _Entry) -> tuple[str, str, str, int, str]:
    verdict = "allow" if entry[2] else "deny"
    return verdict, entry[10], entry[12].split("?", 1)[0], entry[3], entry[4]


# What a line says of its decision, by (allowed, status, reason, provider, principal, policy):
# decisions repeat (one per caller and policy), so each is encoded once. Bounded: past this
# many, it starts over (the writer thread alone uses it).
_DECIDED_KEPT = 4096
_decided: dict[tuple[bool, int, str, str | None, str | None, str | None], tuple[str, str]] = {}


def _decided_parts(
    key: tuple[bool, int, str, str | None, str | None, str | None],
) -> tuple[str, str]:
    """(the message's end after the path, encoded without its opening quote; the fields from
    ``decision`` to ``policy``) for the decision ``key``."""
    allowed, status, reason, provider, principal, policy = key
    encode = _encode
    parts = (
        encode(f" -> {status} {reason}")[1:],
        f'"decision": "{"allow" if allowed else "deny"}", "status": {status}, '
        f'"reason": {encode(reason)}, '
        f'"provider": {"null" if provider is None else encode(provider)}, '
        f'"principal": {"null" if principal is None else encode(principal)}, '
        f'"policy": {"null" if policy is None else encode(policy)}, ',
    )
    if len(_decided) >= _DECIDED_KEPT:
        _decided.clear()
    _decided[key] = parts
    return parts


def _render_json(entries: list[_Entry], end: str) -> str:
    """``entries`` as the lines ``JsonFormatter`` writes for them (same keys, order and
    spacing, each followed by ``end``), built from pieces: no dict and no json.dumps, except
    for audit, dry-run and claims; the time's seconds formatted once a second, what a line
    says of its decision encoded once per decision."""
    encode, millis, decided = _encode, _MILLIS, _decided
    out: list[str] = []
    last_second = -1
    stamp = ""
    for entry in entries:
        (when, (head, _, _), allowed, status, reason, provider, principal, policy, audited,
         dry_run, method, host, path, source_ip, request_id, seconds, claims, door,
         trace_ids) = entry  # fmt: skip
        second = int(when)
        if second != last_second:
            last_second = second
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
        if "?" in path:
            path = path.split("?", 1)[0]
        verdict = "allow" if allowed else "deny"
        key = (allowed, status, reason, provider, principal, policy)
        message_end, decision_fields = decided.get(key) or _decided_parts(key)
        # NOTE: JSON string escaping goes character by character, so the message is encoded
        # in two pieces joined where the quotes meet. `:.1f` writes what repr(round(x, 1))
        # does below 1e16 (both round correctly).
        line = (
            f'{{"time": "{stamp}.{millis[int((when - second) * 1000)]}Z", {head}'
            f'"message": {encode(f"{verdict} {method} {path}")[:-1]}'
            f"{message_end}, {decision_fields}"
            f'"method": {encode(method)}, "host": {encode(host)}, "path": {encode(path)}, '
            f'"source_ip": {encode(source_ip)}, '
            f'"request_id": {"null" if request_id is None else encode(request_id)}, '
            f'"door": "{door}", "duration_us": {seconds * 1e6:.1f}'
        )
        if audited or dry_run or claims is not None:
            fields = _fields(entry)
            for name in ("audit", "dry_run", "claims"):
                if name in fields:
                    value = json.dumps(fields[name], default=str, ensure_ascii=False)
                    line += f', "{name}": {value}'
        if trace_ids is not None:  # hex digits only: nothing to escape
            line += f', "trace_id": "{trace_ids[0]}", "span_id": "{trace_ids[1]}"'
        out.append(line + "}" + end)
    return "".join(out)


def _is_json_stream(handler: logging.Handler) -> TypeGuard[logging.StreamHandler[TextIO]]:
    """A handler whose lines we can write ourselves, in one write per batch."""
    return (
        isinstance(handler, logging.StreamHandler)
        and type(handler.formatter) is JsonFormatter
        and not handler.filters
        and handler.stream is not None
    )


def _handlers_for(logger: logging.Logger, level: int) -> list[logging.Handler]:
    """The handlers a record of ``level`` from ``logger`` reaches (as Logger.callHandlers)."""
    out: list[logging.Handler] = []
    found = 0
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            found += 1
            if level >= handler.level:
                out.append(handler)
        current = current.parent if current.propagate else None
    last = logging.lastResort
    if not found and last is not None and level >= last.level:
        out.append(last)
    return out


class DecisionLog:
    """One structured line per decision, sampled, never with the token or secret headers.

    ``write`` only queues raw values; a writer thread (started by the first line) formats
    and writes them in batches, at most ``flush_interval`` seconds after they were queued.
    Lines go to ``stream`` when one is given, else where the logger's handlers would send
    them: a ``StreamHandler`` with ``JsonFormatter`` gets one write per batch under its lock;
    any other handler gets a ``LogRecord`` per line, still off the request thread.
    ``configure`` swaps the spec and keeps the queue and the writer.
    """

    def __init__(
        self,
        spec: DecisionLogSpec,
        logger: logging.Logger | None = None,
        *,
        stream: TextIO | None = None,
        capacity: int = DEFAULT_CAPACITY,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be at least 1, got {capacity}")
        self.logger = logger or logging.getLogger(DECISION_LOGGER)
        self._rules = _Rules.of(spec, self.logger.name)
        self._stream = stream
        self._capacity = capacity
        # Past this many queued lines the writer is hurried, well before the queue is full.
        self._high_water = max(1, capacity // 4)
        self._flush_interval = flush_interval
        self._queue: deque[_Entry | threading.Event] = deque()
        self._pending = threading.Event()  # the queue has something: the writer wakes
        self._awake = False  # _pending.is_set(), as a plain attribute for the request thread
        self._hurry = threading.Event()  # write now rather than gather a bigger batch
        self._lock = threading.Lock()  # starts and stops the writer
        self._write_lock = threading.Lock()  # one batch at a time, in queue order
        self._thread: threading.Thread | None = None
        self._dropped = 0
        self._dropped_lock = threading.Lock()
        # A forked child has no writer thread and may inherit held locks: start afresh there.
        forget = weakref.WeakMethod(self._forget_writer)
        os.register_at_fork(after_in_child=lambda: _call_if_alive(forget))

    def _forget_writer(self) -> None:
        """In a forked child: no writer yet, fresh locks, and none of the parent's queued
        lines (the parent writes those)."""
        self._queue.clear()
        self._thread = None
        self._awake = False
        self._pending = threading.Event()
        self._hurry = threading.Event()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._dropped_lock = threading.Lock()

    def configure(self, spec: DecisionLogSpec) -> None:
        """Apply ``spec`` from the next Check on; queued lines keep the spec they were taken
        under."""
        self._rules = _Rules.of(spec, self.logger.name)

    @property
    def enabled(self) -> bool:
        return self._rules.enabled

    @property
    def sample_rate(self) -> float:
        return self._rules.sample_rate

    @property
    def deny_only(self) -> bool:
        return self._rules.deny_only

    @property
    def claims(self) -> tuple[str, ...]:
        return self._rules.claims

    @property
    def level(self) -> int:
        return self._rules.level

    @property
    def dropped(self) -> int:
        """Lines lost so far: the queue was full, or the destination failed to take them."""
        return self._dropped

    def wants(self, decision: Decision) -> bool:
        """Whether this decision is logged (cheap: checked before building anything)."""
        rules = self._rules
        if not rules.enabled:
            return False
        if decision.audited:  # AUDIT policies exist to be logged: never sampled away
            return self.logger.isEnabledFor(rules.level)
        if rules.deny_only and decision.allowed:
            return False
        if rules.sample_rate < 1.0 and random.random() >= rules.sample_rate:  # noqa: S311
            return False
        return self.logger.isEnabledFor(rules.level)

    def write(
        self,
        request: RequestAttributes,
        decision: Decision,
        identity: Identity | None,
        seconds: float,
        trace_ids: tuple[str, str] | None = None,
    ) -> None:
        """Queue one line. Never blocks: with the queue full the line is dropped and counted.
        ``trace_ids``: the Check's (trace id, span id), when it is traced."""
        queue = self._queue
        if len(queue) >= self._capacity:
            self._count_dropped(1)
            return
        rules = self._rules
        queue.append(
            (
                time.time(),
                rules.line,
                decision.allowed,
                decision.status,
                decision.reason,
                decision.provider,
                decision.principal,
                decision.policy,
                decision.audited,
                decision.dry_run,
                request.method,
                request.host,
                request.path,
                request.source_ip,
                request.headers.get("x-request-id"),
                seconds,
                identity.claims if identity is not None and rules.claims else None,
                request.door,
                trace_ids,
            )
        )
        if not self._awake:
            self._wake()
        elif len(queue) >= self._high_water and not self._hurry.is_set():
            self._hurry.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every line queued before this call is written. Returns False when that
        takes longer than ``timeout`` (the destination blocks)."""
        written = threading.Event()
        self._queue.append(written)  # NOTE: past the capacity on purpose: a marker, not a line
        self._hurry.set()
        self._wake()
        return written.wait(timeout)

    def close(self, timeout: float = 5.0) -> bool:
        """Write every queued line and stop the writer (a later ``write`` starts a new one).
        Returns False when the destination did not take them within ``timeout``."""
        with self._lock:
            thread = self._thread
            if thread is not None:
                self._queue.append(_Stop())
                self._hurry.set()
                self._awake = True
                self._pending.set()
                thread.join(timeout)
                if thread.is_alive():
                    return False
                self._thread = None
            # Lines queued while the writer was stopping: the writer is gone, write them here.
            self._awake = False
            self._pending.clear()
            if not self._write_lock.acquire(timeout=timeout):
                return False
            try:
                self._write_queued()
            finally:
                self._write_lock.release()
            return True

    def _count_dropped(self, count: int) -> None:
        with self._dropped_lock:
            self._dropped += count

    def _wake(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=WRITER_THREAD, daemon=True)
                self._thread.start()
            self._awake = True
            self._pending.set()

    def _run(self) -> None:
        name_os_thread(WRITER_THREAD)
        while True:
            self._pending.wait()
            # Gather a batch: one write for many lines, one wake-up per interval at most.
            self._hurry.wait(self._flush_interval)
            self._hurry.clear()
            # NOTE: cleared before taking the batch, so a line queued meanwhile wakes us again.
            self._awake = False
            self._pending.clear()
            with self._write_lock:
                if self._write_queued():
                    return

    def _write_queued(self) -> bool:
        """Write everything queued now, in order, releasing each flush marker once the lines
        before it are out. Returns True when a stop marker was met (the rest is written too)."""
        queue = self._queue
        entries: list[_Entry] = []
        stopped = False
        for _ in range(len(queue)):
            item = queue.popleft()
            if type(item) is tuple:
                entries.append(item)
                continue
            assert isinstance(item, threading.Event)
            self._emit(entries)
            entries = []
            item.set()
            stopped = stopped or isinstance(item, _Stop)
        self._emit(entries)
        return stopped

    def _emit(self, entries: list[_Entry]) -> None:
        if not entries:
            return
        try:
            if self._stream is not None:
                self._emit_to(self._stream, None, entries)
                return
            if self.logger.disabled:
                return
            # Runs of lines taken under one spec (one level): a reload may change it mid-batch.
            start = 0
            while start < len(entries):
                line = entries[start][1]
                end = start + 1
                while end < len(entries) and entries[end][1] is line:
                    end += 1
                self._emit_run(entries[start:end], line[1])
                start = end
        except Exception as exc:  # the writer must outlive any one batch
            self._count_dropped(len(entries))
            # NOTE: the exception text may quote request data; log its type only.
            log.error("decision log: %d line(s) lost: %s", len(entries), type(exc).__name__)

    def _emit_run(self, entries: list[_Entry], level: int) -> None:
        logger = self.logger
        if logger.filters:
            for entry in entries:
                logger.handle(self._record(entry))
            return
        for handler in _handlers_for(logger, level):
            if _is_json_stream(handler):
                self._emit_to(handler.stream, handler, entries)
            else:
                for entry in entries:
                    handler.handle(self._record(entry))

    def _emit_to(
        self, stream: TextIO, handler: logging.Handler | None, entries: list[_Entry]
    ) -> None:
        """One write (and flush) for all ``entries``, under ``handler``'s lock if any, so
        other log lines on the same stream never interleave with these."""
        end = handler.terminator if isinstance(handler, logging.StreamHandler) else "\n"
        text = _render_json(entries, end)
        if handler is not None:
            handler.acquire()
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a broken pipe, a full disk, a closed file
            self._count_dropped(len(entries))
        finally:
            if handler is not None:
                handler.release()

    def _record(self, entry: _Entry) -> logging.LogRecord:
        """The LogRecord the request thread used to build, for the handlers we cannot batch."""
        when = entry[0]
        record = self.logger.makeRecord(
            self.logger.name,
            entry[1][1],
            "",
            0,
            _MESSAGE,
            _message_args(entry),
            None,
            extra={"fields": _fields(entry)},
        )
        record.created = when  # when the Check was decided, not when the line is written
        record.msecs = int((when - int(when)) * 1000) + 0.0
        return record


def name_os_thread(name: str) -> None:
    """Show the calling thread as ``name`` in ``top -H`` and /proc (Linux), so its CPU can be
    told apart; elsewhere nothing."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(name)
    except OSError:
        pass


def _call_if_alive(method: weakref.WeakMethod[Callable[[], None]]) -> None:
    bound = method()
    if bound is not None:
        bound()


class _Stop(threading.Event):
    """The marker ``close`` queues: the writer exits once it is reached."""
