"""The trace of the Check being decided, as the lower layers see it: no OpenTelemetry here.

``tracing`` sets ``current`` for the length of a sampled Check; the key caches read it on the
slow paths only (a key-set refresh a request waits for, a fetch made on its behalf), so a
Check without tracing never touches it. A refresh thread started for a request runs in a copy
of the request's context (``contextvars.copy_context``) and so sees the same value.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Protocol


class RequestTrace(Protocol):
    """What a lower layer may do with the current Check's span."""

    def outgoing_headers(self) -> Mapping[str, str]:
        """The headers (``traceparent``, ``tracestate``) that carry the Check's trace context
        on a request made on its behalf."""
        ...

    def waited(self, what: str, started_ns: int, ended_ns: int, outcome: str) -> None:
        """Record that the Check waited from ``started_ns`` to ``ended_ns`` (``time.time_ns``)
        for ``what`` (a bounded name such as ``jwks.refresh``), with a bounded ``outcome``."""
        ...


# The outcomes of a key-set refresh a Check waited for (``RequestTrace.waited``).
KEY_FOUND = "key_found"
KEY_NOT_FOUND = "key_not_found"

current: ContextVar[RequestTrace | None] = ContextVar("authz_request_trace", default=None)


def outgoing_headers() -> Mapping[str, str]:
    """The trace headers for a request made now on a Check's behalf; empty when none is
    traced."""
    trace = current.get()
    return trace.outgoing_headers() if trace is not None else {}
