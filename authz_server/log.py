"""Logging: JSON lines on stderr, and the decision log.

Redaction is a habit, not a filter: nothing logs a token, an Authorization or Cookie header,
or claim values, except the claims an operator lists in ``server.decisionLog.claims``.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Mapping
from typing import Any

from authz_server.attributes import RequestAttributes
from authz_server.config import DecisionLogSpec
from authz_server.responses import Decision
from authz_server.tokens import Identity

DECISION_LOGGER = "authz_server.decision"


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


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Log to stderr at ``level``, as JSON lines (``fmt="json"``) or plain text."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class DecisionLog:
    """One structured line per decision, sampled, never with the token or secret headers."""

    def __init__(self, spec: DecisionLogSpec, logger: logging.Logger | None = None) -> None:
        self.enabled = spec.enabled
        self.sample_rate = spec.sample_rate
        self.deny_only = spec.deny_only
        self.claims = tuple(spec.claims)
        self.level = logging.getLevelName(spec.level)
        self.logger = logger or logging.getLogger(DECISION_LOGGER)

    def wants(self, decision: Decision) -> bool:
        """Whether this decision is logged (cheap: checked before building anything)."""
        if not self.enabled:
            return False
        if decision.audited:  # AUDIT policies exist to be logged: never sampled away
            return self.logger.isEnabledFor(self.level)
        if self.deny_only and decision.allowed:
            return False
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:  # noqa: S311
            return False
        return self.logger.isEnabledFor(self.level)

    def write(
        self,
        request: RequestAttributes,
        decision: Decision,
        identity: Identity | None,
        seconds: float,
    ) -> None:
        fields: dict[str, Any] = {
            "decision": "allow" if decision.allowed else "deny",
            "status": decision.status,
            "reason": decision.reason,
            "provider": decision.provider,
            "principal": decision.principal,
            "policy": decision.policy,
            "method": request.method,
            "host": request.host,
            "path": request.path.split("?", 1)[0],
            "source_ip": request.source_ip,
            "request_id": request.headers.get("x-request-id"),
            "duration_us": round(seconds * 1e6, 1),
        }
        if decision.audited:
            fields["audit"] = list(decision.audited)
        if decision.dry_run:
            fields["dry_run"] = dict(decision.dry_run)
        if identity is not None and self.claims:
            fields["claims"] = {c: identity.claims[c] for c in self.claims if c in identity.claims}
        # NOTE: makeRecord + handle skips logging's caller lookup (~4 us a line), which the
        # JSON lines never print.
        record = self.logger.makeRecord(
            self.logger.name,
            self.level,
            "",
            0,
            "%s %s %s -> %d %s",
            (fields["decision"], request.method, fields["path"], decision.status, decision.reason),
            None,
            extra={"fields": fields},
        )
        self.logger.handle(record)
