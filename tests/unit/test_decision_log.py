"""The decision log: one JSON line per decision with the documented fields, redaction,
claims only when listed, denyOnly, sampling, AUDIT policies, and the JSON formatter; then the
writer thread: lines leave the request thread, keep their order, a full queue drops and counts,
shutdown and reload lose nothing, and the drop count is on /metrics."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from authz_server import errors
from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.config.specs import DecisionLogSpec
from authz_server.doors.http import to_attributes as to_http_attributes
from authz_server.identity import Identity
from authz_server.ops import log as log_module
from authz_server.ops.log import DECISION_LOGGER, DecisionLog, JsonFormatter
from authz_server.responses import Decision
from authz_server.server import AuthzServer
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.e2e.harness import wait_until
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for, write_config

POLICIES = """
policies:
  - name: read
    rules:
      - from: [{source: {requestPrincipals: ["*"]}}]
        to: [{operation: {methods: ["GET"], paths: ["/api/*"]}}]
  - name: audit-orders
    action: AUDIT
    rules: [{to: [{operation: {paths: ["/api/orders*"]}}]}]
"""


class Captured:
    """A private logger whose JSON lines end up in memory. Reading flushes the decision logs
    made through ``log``: their writer thread has written every queued line by then."""

    def __init__(self, name: str) -> None:
        self.stream = io.StringIO()
        handler = logging.StreamHandler(self.stream)
        handler.setFormatter(JsonFormatter())
        self.logger = logging.getLogger(name)
        self.logger.handlers[:] = [handler]
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logs: list[DecisionLog] = []

    def log(self, spec: DecisionLogSpec, **options: Any) -> DecisionLog:
        decision_log = DecisionLog(spec, self.logger, **options)
        self.logs.append(decision_log)
        return decision_log

    @property
    def text(self) -> str:
        for decision_log in self.logs:
            assert decision_log.flush(timeout=10)
        return self.stream.getvalue()

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]


@pytest.fixture
def captured(request: pytest.FixtureRequest) -> Iterator[Captured]:
    out = Captured(f"test.decision.{request.node.name}")
    yield out
    for decision_log in out.logs:
        decision_log.close()
    out.logger.handlers.clear()


@pytest.fixture
def engine(tmp_path: Path, clock: Clock, rsa_key: SigningKey) -> Engine:
    jwks = json.dumps(json.dumps(devkeys.jwks(rsa_key)))
    text = f"""apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: main
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {jwks}
    fromCookies: [session]
    fromHeaders: [{{name: authorization, prefix: "Bearer "}}]
{POLICIES}"""
    engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    return engine


def service_with(engine: Engine, captured: Captured, **spec: Any) -> AuthorizationService:
    return AuthorizationService(engine, decision_log=captured.log(DecisionLogSpec(**spec)))


def request(
    token: str | None = None, path: str = "/api/orders", method: str = "GET", **headers: str
) -> RequestAttributes:
    all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    return RequestAttributes(
        method=method, host="api.test", path=path, headers=all_headers, source_ip="10.1.2.3"
    )


def test_a_line_says_which_door_the_check_came_through(
    engine: Engine, captured: Captured, make_token: Callable[..., str]
) -> None:
    service = service_with(engine, captured)
    token = make_token()
    service.check(request(token, x_request_id="by-grpc"))
    service.check(
        to_http_attributes(
            "GET",
            "/api/orders",
            {"host": "api.test", "authorization": f"Bearer {token}", "x-request-id": "by-http"},
        )
    )
    doors = {entry["request_id"]: entry["door"] for entry in captured.entries()}
    assert doors == {"by-grpc": "grpc", "by-http": "http"}


def test_a_line_has_every_documented_field(
    engine: Engine, captured: Captured, make_token: Callable[..., str]
) -> None:
    service = service_with(engine, captured)
    service.check(request(make_token(), path="/api/orders?page=2&q=x", x_request_id="req-42"))
    [entry] = captured.entries()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert entry["logger"] == captured.logger.name and entry["level"] == "INFO"
    assert {k: v for k, v in entry.items() if k not in ("time", "duration_us", "message")} == {
        "level": "INFO",
        "logger": captured.logger.name,
        "decision": "allow",
        "status": 200,
        "reason": "allowed",
        "provider": "main",
        "principal": f"{ISSUER}/alice",
        "policy": "read",
        "method": "GET",
        "host": "api.test",
        "path": "/api/orders",
        "source_ip": "10.1.2.3",
        "request_id": "req-42",
        "door": "grpc",
        "audit": ["audit-orders"],
    }
    assert isinstance(entry["duration_us"], float) and entry["duration_us"] > 0
    assert entry["message"] == "allow GET /api/orders -> 200 allowed"


def test_denials_are_logged_with_their_reason(
    engine: Engine, captured: Captured, make_token: Callable[..., str], clock: Clock
) -> None:
    service = service_with(engine, captured)
    service.check(request(make_token(exp=int(clock.now) - 3600), path="/api/x"))
    service.check(request(path="/api/x"))
    expired, anonymous = captured.entries()
    assert (expired["decision"], expired["status"], expired["reason"]) == (
        "deny",
        401,
        errors.TOKEN_EXPIRED,
    )
    assert expired["provider"] == "main" and expired["principal"] is None
    assert (anonymous["status"], anonymous["reason"]) == (401, errors.MISSING_CREDENTIALS)
    assert anonymous["principal"] is None and anonymous["request_id"] is None


def test_never_logs_the_token_secret_headers_or_unlisted_claims(
    engine: Engine, captured: Captured, make_token: Callable[..., str], clock: Clock
) -> None:
    service = service_with(engine, captured)
    token = make_token(email="alice@example.com", groups=["secret-group"])
    expired = make_token(exp=int(clock.now) - 3600, email="alice@example.com")
    service.check(request(token, path=f"/api/orders?access_token={token}"))
    service.check(request(expired, cookie="session=cookie-secret-value"))
    service.check(request(path="/api/orders", cookie=f"session={token}"))
    assert len(captured.entries()) == 3
    for secret in (
        token,
        *token.split("."),
        *expired.split("."),
        "Bearer",
        "cookie-secret-value",
        "alice@example.com",
        "secret-group",
    ):
        assert secret not in captured.text
    assert all("claims" not in e for e in captured.entries())


def test_only_listed_claims_are_logged(
    engine: Engine, captured: Captured, make_token: Callable[..., str]
) -> None:
    service = service_with(engine, captured, claims=["groups", "tenant"])
    service.check(request(make_token(email="alice@example.com", groups=["dev"])))
    [entry] = captured.entries()
    assert entry["claims"] == {"groups": ["dev"]}
    assert "alice@example.com" not in captured.text


def test_claims_and_fields_are_configured_in_camel_case(tmp_path: Path) -> None:
    text = """apiVersion: authz-server/v1
kind: AuthzConfig
server:
  decisionLog: {sampleRate: 0.25, denyOnly: true, claims: [groups], level: WARNING}
  allowEmpty: true
providers: []
policies: []
"""
    spec = config.load(write_config(tmp_path, text)).server.decision_log
    log = DecisionLog(spec)
    assert (log.sample_rate, log.deny_only, log.claims) == (0.25, True, ("groups",))
    assert log.level == logging.WARNING and log.logger.name == "authz_server.decision"


def test_deny_only_skips_allowed_decisions(
    engine: Engine, captured: Captured, make_token: Callable[..., str]
) -> None:
    service = service_with(engine, captured, deny_only=True)
    token = make_token()
    assert service.check(request(token, path="/api/x")).allowed
    assert not service.check(request(token, path="/api/x", method="POST")).allowed
    assert [e["decision"] for e in captured.entries()] == ["deny"]


def test_sample_rate_zero_logs_nothing_and_one_logs_everything(
    engine: Engine, captured: Captured, make_token: Callable[..., str]
) -> None:
    token = make_token()
    none = service_with(engine, captured, sample_rate=0.0)
    for _ in range(50):
        none.check(request(token, path="/api/x"))
        none.check(request(path="/api/x"))
    assert captured.text == ""
    every = service_with(engine, captured, sample_rate=1.0)
    for _ in range(50):
        every.check(request(token, path="/api/x"))
    assert len(captured.entries()) == 50


def test_a_fractional_sample_rate_logs_when_random_falls_below_it(
    engine: Engine,
    captured: Captured,
    make_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    draws = iter([0.05, 0.5, 0.0999, 0.1, 0.99])

    class Draws:
        @staticmethod
        def random() -> float:
            return next(draws)

    monkeypatch.setattr(log_module, "random", Draws())
    service = service_with(engine, captured, sample_rate=0.1)
    token = make_token()
    for sub in ("a", "b", "c", "d", "e"):
        service.check(request(token, path=f"/api/{sub}", x_request_id=sub))
    assert [e["request_id"] for e in captured.entries()] == ["a", "c"]


def test_a_fractional_sample_rate_keeps_about_that_fraction(
    captured: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_module, "random", random.Random(1234))  # noqa: S311
    log = captured.log(DecisionLogSpec(sample_rate=0.25))
    decision = Decision(allowed=True, status=200, reason="allowed")
    kept = sum(log.wants(decision) for _ in range(4000))
    assert 900 <= kept <= 1100


def test_audit_matches_are_logged_even_when_sampled_out_or_allowed_under_deny_only(
    engine: Engine, captured: Captured, make_token: Callable[..., str]
) -> None:
    service = service_with(engine, captured, sample_rate=0.0, deny_only=True)
    token = make_token()
    assert service.check(request(token, path="/api/orders/1", x_request_id="audited")).allowed
    assert service.check(request(token, path="/api/other")).allowed
    assert not service.check(request(path="/api/other")).allowed
    [entry] = captured.entries()
    assert (entry["request_id"], entry["audit"], entry["decision"]) == (
        "audited",
        ["audit-orders"],
        "allow",
    )


def test_disabled_logs_nothing_not_even_audits(
    engine: Engine, captured: Captured, make_token: Callable[..., str]
) -> None:
    service = service_with(engine, captured, enabled=False)
    service.check(request(make_token()))
    service.check(request(path="/api/orders", method="DELETE"))
    assert captured.text == ""


def test_the_configured_level_is_used_and_a_quieter_logger_costs_nothing(
    engine: Engine, captured: Captured, make_token: Callable[..., str]
) -> None:
    service = service_with(engine, captured, level="WARNING")
    service.check(request(make_token()))
    assert [e["level"] for e in captured.entries()] == ["WARNING"]
    captured.logger.setLevel(logging.ERROR)
    assert service.decision_log is not None
    assert not service.decision_log.wants(Decision(allowed=False, status=401, reason="x"))


def test_dry_run_verdicts_appear_in_the_line(captured: Captured) -> None:
    log = captured.log(DecisionLogSpec())
    decision = Decision(allowed=True, status=200, reason="allowed", dry_run=(("strict", "deny"),))
    log.write(RequestAttributes(path="/p?secret=1"), decision, None, 0.000123)
    [entry] = captured.entries()
    assert entry["dry_run"] == {"strict": "deny"}
    assert entry["duration_us"] == 123.0 and entry["path"] == "/p"


def test_json_formatter_includes_exception_text(captured: Captured) -> None:
    try:
        raise ValueError("boom happened")
    except ValueError:
        captured.logger.exception("while doing %s", "work")
    [entry] = captured.entries()
    assert entry["message"] == "while doing work" and entry["level"] == "ERROR"
    assert "Traceback (most recent call last)" in entry["exception"]
    assert "ValueError: boom happened" in entry["exception"]


def test_json_formatter_merges_fields_and_survives_unserialisable_values(
    captured: Captured,
) -> None:
    captured.logger.info("hello", extra={"fields": {"path": Path("/x"), "n": 1}})
    [entry] = captured.entries()
    assert (entry["path"], entry["n"], entry["message"]) == ("/x", 1, "hello")


# ------------------------------------------------------------------ the writer thread


class RecordingStream(io.StringIO):
    """A destination that notes which thread wrote and how many writes it took."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[str] = set()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writers.add(threading.current_thread().name)
        self.writes += 1
        return super().write(text)

    def lines(self) -> list[dict[str, Any]]:
        # NOTE: split on "\n" only: a line may hold U+2028, which str.splitlines splits on.
        return [json.loads(line) for line in self.getvalue().split("\n")[:-1]]


class BlockingStream(RecordingStream):
    """A destination whose writes wait until the test releases them (a stuck pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        assert self.release.wait(timeout=30), "the test never released the destination"
        return super().write(text)


class FailingStream(RecordingStream):
    """A destination whose first ``failures`` writes fail (a closed pipe, a full disk)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def write(self, text: str) -> int:
        if self.failures > 0:
            self.failures -= 1
            raise OSError("broken pipe")
        return super().write(text)


ALLOWED = Decision(allowed=True, status=200, reason="allowed", provider="main", policy="read")


def numbered(n: int) -> RequestAttributes:
    return RequestAttributes(path=f"/api/{n}", headers={"x-request-id": str(n)})


def write_lines(log: DecisionLog, numbers: range) -> None:
    for n in numbers:
        log.write(numbered(n), ALLOWED, None, 0.0001)


def ids(lines: list[dict[str, Any]]) -> list[int]:
    return [int(line["request_id"]) for line in lines]


@pytest.fixture
def logs() -> Iterator[list[DecisionLog]]:
    """Decision logs a test makes; their writers are stopped afterwards."""
    made: list[DecisionLog] = []
    yield made
    for log in made:
        log.close(timeout=1)


def stream_log(
    logs: list[DecisionLog], stream: io.StringIO, spec: DecisionLogSpec | None = None, **opts: Any
) -> DecisionLog:
    logger = logging.getLogger("test.decision.streams")
    logger.setLevel(logging.DEBUG)
    log = DecisionLog(spec or DecisionLogSpec(), logger, stream=stream, **opts)
    logs.append(log)
    return log


def test_lines_are_written_by_the_writer_thread_not_the_request_thread(
    engine: Engine, make_token: Callable[..., str], logs: list[DecisionLog]
) -> None:
    stream = RecordingStream()
    service = AuthorizationService(engine, decision_log=stream_log(logs, stream))
    service.check(request(make_token(), x_request_id="first"))
    [line] = wait_until(stream.lines, what="the line, without any flush")
    assert line["request_id"] == "first" and line["reason"] == "allowed"
    assert stream.writers == {"decision-log"}
    # The OS sees the name too (top -H, /proc), so the writer's CPU can be told apart.
    writers = [t for t in threading.enumerate() if t.name == "decision-log"]
    assert writers
    if sys.platform == "linux":
        for writer in writers:
            comm = Path(f"/proc/self/task/{writer.native_id}/comm").read_text().strip()
            assert comm == "decision-log"


def test_many_lines_keep_their_order_go_out_in_few_writes_and_all_of_them_at_close(
    logs: list[DecisionLog],
) -> None:
    stream = RecordingStream()
    log = stream_log(logs, stream, capacity=5000)
    write_lines(log, range(3000))
    assert log.close()
    assert ids(stream.lines()) == list(range(3000))
    assert log.dropped == 0
    assert stream.writes < 300  # batches, not a write per line


def test_lines_from_many_threads_are_all_written_each_thread_in_its_order(
    logs: list[DecisionLog],
) -> None:
    stream = RecordingStream()
    log = stream_log(logs, stream)
    threads = [
        threading.Thread(target=write_lines, args=(log, range(k * 1000, k * 1000 + 500)))
        for k in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert log.close()
    written = ids(stream.lines())
    assert sorted(written) == [n for k in range(4) for n in range(k * 1000, k * 1000 + 500)]
    for k in range(4):
        assert [n for n in written if n // 1000 == k] == list(range(k * 1000, k * 1000 + 500))


def test_a_full_queue_drops_and_counts_instead_of_blocking_the_check(
    logs: list[DecisionLog],
) -> None:
    stream = BlockingStream()
    log = stream_log(logs, stream, capacity=5)
    write_lines(log, range(1))
    assert stream.entered.wait(timeout=10)  # the writer holds line 0 and is stuck in write()
    writer = threading.Thread(target=write_lines, args=(log, range(1, 13)))
    writer.start()
    writer.join(timeout=10)
    assert not writer.is_alive(), "a Check blocked on the decision log"
    assert log.dropped == 7  # 5 queued behind the stuck line, the other 7 dropped
    stream.release.set()
    assert log.close()
    assert ids(stream.lines()) == list(range(6))
    assert log.dropped == 7


def test_the_drop_count_is_exported_as_a_counter(logs: list[DecisionLog]) -> None:
    from prometheus_client import CollectorRegistry

    from authz_server.ops.metrics import Metrics

    metrics = Metrics(CollectorRegistry())
    stream = BlockingStream()
    log = stream_log(logs, stream, capacity=1)
    metrics.watch_decision_log(lambda: log.dropped)
    assert metrics.registry.get_sample_value("authz_decision_log_dropped_total") == 0
    write_lines(log, range(1))
    assert stream.entered.wait(timeout=10)
    write_lines(log, range(1, 5))
    assert metrics.registry.get_sample_value("authz_decision_log_dropped_total") == 3
    stream.release.set()


def test_a_failing_destination_counts_the_lost_lines_and_the_writer_carries_on(
    logs: list[DecisionLog],
) -> None:
    stream = FailingStream(failures=1)
    log = stream_log(logs, stream)
    write_lines(log, range(3))
    assert log.flush()
    assert (log.dropped, stream.lines()) == (3, [])
    write_lines(log, range(3, 5))
    assert log.flush()
    assert ids(stream.lines()) == [3, 4] and log.dropped == 3


def test_a_closed_log_starts_its_writer_again_for_a_late_line(logs: list[DecisionLog]) -> None:
    stream = RecordingStream()
    log = stream_log(logs, stream)
    write_lines(log, range(2))
    assert log.close() and log.close()  # closing twice is harmless
    write_lines(log, range(2, 3))
    assert log.close()
    assert ids(stream.lines()) == [0, 1, 2]


TRICKY = [
    "",
    'quote " backslash \\ slash /',
    "controls \x00\x01\x08\t\n\r\x1f\x7f",
    "unicode é ü 中文 😀 \u2028 \u2029 \ufeff",
    "</script><!--",
    "%s %d {} {{}}",
]


def tricky_strings() -> list[str]:
    rng = random.Random(20241129)  # noqa: S311 (fixed seed: the same strings every run)
    alphabet = [chr(c) for c in (*range(0, 128), 0xE9, 0x4E2D, 0x1F600, 0x2028)]
    return TRICKY + ["".join(rng.choices(alphabet, k=rng.randint(1, 40))) for _ in range(40)]


@pytest.mark.parametrize("value", tricky_strings())
def test_lines_are_byte_for_byte_what_the_json_formatter_writes(
    value: str, logs: list[DecisionLog], clock: Clock
) -> None:
    """The writer builds lines from pieces; they equal json.dumps of the documented fields."""
    stream = RecordingStream()
    log = stream_log(logs, stream, DecisionLogSpec(claims=["groups", "n", "missing"]))
    identity = Identity(
        provider="p",
        issuer="i",
        subject="s",
        claims={"groups": [value, "dev"], "n": 1.5, "other": value},
        audiences=(),
        presenter=None,
        payload_segment="",
    )
    decision = Decision(
        allowed=False,
        status=403,
        reason=value or "r",
        provider=value,
        principal=value or None,
        policy=value,
        audited=(value, "audit-2"),
        dry_run=((value, "deny"), ("strict", "allow")),
    )
    attrs = RequestAttributes(
        method=value,
        host=value,
        path=f"{value}?q={value}",
        headers={"x-request-id": value},
        source_ip=value,
    )
    before = time.time()
    log.write(attrs, decision, identity, 0.000123)
    after = time.time()
    assert log.close()
    [line, end] = stream.getvalue().split("\n")
    assert end == ""
    stamp = datetime.strptime(json.loads(line)["time"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    assert int(before * 1000) / 1000 <= stamp <= after  # when the Check was decided
    path = value.split("?", 1)[0]
    reason = value or "r"
    expected = {
        "time": json.loads(line)["time"],
        "level": "INFO",
        "logger": "test.decision.streams",
        "message": f"deny {value} {path} -> 403 {reason}",
        "decision": "deny",
        "status": 403,
        "reason": reason,
        "provider": value,
        "principal": value or None,
        "policy": value,
        "method": value,
        "host": value,
        "path": path,
        "source_ip": value,
        "request_id": value,
        "door": "grpc",
        "duration_us": 123.0,
        "audit": [value, "audit-2"],
        "dry_run": {value: "deny", "strict": "allow"},
        "claims": {"groups": [value, "dev"], "n": 1.5},
    }
    assert line == json.dumps(expected, ensure_ascii=False)


def test_many_distinct_principals_keep_the_writers_memory_bounded_and_each_line_its_own(
    logs: list[DecisionLog],
) -> None:
    """What a line says of its decision is encoded once per decision and kept: callers each
    with their own principal (an attacker minting subjects) never grow it past its bound, and
    each line still names its own principal after it starts over."""
    from authz_server.ops import log as decision_log

    stream = RecordingStream()
    log = stream_log(logs, stream)
    count = decision_log._DECIDED_KEPT + 50
    attrs = RequestAttributes(method="GET", host="h", path="/p")
    for n in range(count):
        decision = Decision(allowed=True, status=200, reason="allowed", principal=f"user-{n}")
        log.write(attrs, decision, None, 0.0)
    assert log.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["principal"] for line in lines] == [f"user-{n}" for n in range(count)]
    assert all(line["message"] == "allow GET /p -> 200 allowed" for line in lines)
    assert len(decision_log._decided) <= decision_log._DECIDED_KEPT


# ------------------------------------------------------------- in the running server


SERVER_CONFIG = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
server: SERVER
providers:
  - issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksFile: jwks.json
policies:
  - name: authenticated
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""


def server_config(tmp_path: Path, server: str = "{}") -> Path:
    return write_config(tmp_path, SERVER_CONFIG.replace("SERVER", server))


@pytest.fixture
def decision_logger() -> Iterator[logging.Logger]:
    """The server's own decision logger, its lines kept apart from the test run's logs."""
    logger = logging.getLogger(DECISION_LOGGER)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def running(tmp_path: Path, rsa_key: SigningKey) -> Iterator[AuthzServer]:
    (tmp_path / "jwks.json").write_text(json.dumps(devkeys.jwks(rsa_key)))
    server = AuthzServer(
        config.load(server_config(tmp_path)), listen="127.0.0.1:0", http_listen="127.0.0.1:0"
    )
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=1)


def grpc_check(server: AuthzServer, token: str, request_id: str) -> int:
    ctx = attribute_context_pb2.AttributeContext
    http = ctx.HttpRequest(
        method="GET",
        host="api.test",
        path="/orders",
        headers={"authorization": f"Bearer {token}", "x-request-id": request_id},
    )
    request = external_auth_pb2.CheckRequest(attributes=ctx(request=ctx.Request(http=http)))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        code: int = stub.Check(request, timeout=5).status.code
        return code


def test_a_reload_loses_no_queued_line_and_stop_writes_them_all(
    tmp_path: Path,
    running: AuthzServer,
    decision_logger: logging.Logger,
    rsa_key: SigningKey,
) -> None:
    stream = BlockingStream()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    decision_logger.handlers[:] = [handler]
    token = rsa_key.sign(claims_for(time.time(), groups=["dev"]))
    assert grpc_check(running, token, "0") == 0
    assert stream.entered.wait(timeout=10)  # line 0 is stuck in the destination
    for n in range(1, 5):
        assert grpc_check(running, token, str(n)) == 0
    # The reload asks for WARNING lines with the groups claim, from the next Check on.
    new = server_config(tmp_path, "{decisionLog: {level: WARNING, claims: [groups]}}")
    running.apply(config.load(new))
    for n in range(5, 10):
        assert grpc_check(running, token, str(n)) == 0
    stream.release.set()
    running.stop(grace=1)
    lines = stream.lines()
    assert ids(lines) == list(range(10))
    assert [line["level"] for line in lines] == ["INFO"] * 5 + ["WARNING"] * 5
    assert ["claims" in line for line in lines] == [False] * 5 + [True] * 5
    assert lines[-1]["claims"] == {"groups": ["dev"]}
    assert running.decision_log.dropped == 0


def test_the_running_server_exports_the_drop_count_on_metrics(
    running: AuthzServer, decision_logger: logging.Logger, rsa_key: SigningKey
) -> None:
    stream = RecordingStream()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    decision_logger.handlers[:] = [handler]
    assert grpc_check(running, rsa_key.sign(claims_for(time.time())), "m") == 0
    url = f"http://127.0.0.1:{running.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    assert re.search(r"^authz_decision_log_dropped_total 0\.0$", text, re.MULTILINE), text
    [line] = wait_until(stream.lines, what="the Check's line")
    assert line["request_id"] == "m"


def test_a_text_handler_gets_text_lines_and_handler_levels_still_filter(
    logs: list[DecisionLog],
) -> None:
    logger = logging.getLogger("test.decision.handlers")
    text_stream, json_stream, quiet_stream = io.StringIO(), io.StringIO(), io.StringIO()
    text = logging.StreamHandler(text_stream)
    text.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    as_json = logging.StreamHandler(json_stream)
    as_json.setFormatter(JsonFormatter())
    quiet = logging.StreamHandler(quiet_stream)
    quiet.setFormatter(JsonFormatter())
    quiet.setLevel(logging.ERROR)
    logger.handlers[:] = [text, as_json, quiet]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        log = DecisionLog(DecisionLogSpec(), logger)
        logs.append(log)
        write_lines(log, range(2))
        assert log.close()
        assert text_stream.getvalue().splitlines() == [
            f"INFO test.decision.handlers allow GET /api/{n} -> 200 allowed" for n in range(2)
        ]
        assert [json.loads(line)["request_id"] for line in json_stream.getvalue().splitlines()] == [
            "0",
            "1",
        ]
        assert quiet_stream.getvalue() == ""
    finally:
        logger.handlers.clear()


@pytest.mark.parametrize(
    "seconds", [0.0, 1e-8, 5e-8, 0.00012345, 0.000123449, 0.0123456789, 0.25, 1.5, 12.3456789]
)
def test_durations_are_written_in_microseconds_to_a_tenth_as_before(
    seconds: float, logs: list[DecisionLog]
) -> None:
    stream = RecordingStream()
    log = stream_log(logs, stream)
    log.write(numbered(1), ALLOWED, None, seconds)
    assert log.close()
    text = stream.getvalue()
    assert f'"duration_us": {json.dumps(round(seconds * 1e6, 1))}' in text
    assert stream.lines()[0]["duration_us"] == round(seconds * 1e6, 1)


def test_close_gives_up_on_a_stuck_destination_and_a_later_close_writes_everything(
    logs: list[DecisionLog],
) -> None:
    stream = BlockingStream()
    log = stream_log(logs, stream)
    write_lines(log, range(3))
    assert stream.entered.wait(timeout=10)
    assert not log.close(timeout=0.2)  # a shutdown is not held forever by a stuck pipe
    stream.release.set()
    assert log.close()
    assert ids(stream.lines()) == [0, 1, 2]


class PipeStream(io.StringIO):
    """Writes to a pipe; blocks in the process ``blocking_pid`` until released."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.blocking_pid = os.getpid()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        if os.getpid() == self.blocking_pid:
            self.entered.set()
            assert self.release.wait(timeout=30)
        return os.write(self.fd, text.encode())


def test_a_forked_child_writes_its_own_lines_and_not_the_parents_queued_ones(
    logs: list[DecisionLog],
) -> None:
    read_end, write_end = os.pipe()
    stream = PipeStream(write_end)
    log = stream_log(logs, stream)
    write_lines(log, range(1))
    assert stream.entered.wait(timeout=10)  # the parent's writer is stuck with line 0
    write_lines(log, range(1, 2))  # line 1 is queued when the process forks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # the child: no pytest from here on, only an exit code
        try:
            write_lines(log, range(2, 3))
            os._exit(0 if log.flush(timeout=10) else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    stream.release.set()
    assert log.close()
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        written = [json.loads(line) for line in pipe.read().decode().splitlines()]
    assert ids(written) == [2, 0, 1]  # the child's own line; the parent's two, once


def test_a_closed_destination_counts_its_lines_as_dropped(logs: list[DecisionLog]) -> None:
    stream = RecordingStream()
    log = stream_log(logs, stream)
    stream.close()  # as stderr may be at interpreter exit: writes raise ValueError
    write_lines(log, range(4))
    assert log.close()
    assert log.dropped == 4


def test_a_text_decision_line_says_who_and_which_policy_on_one_line(
    engine: Engine, make_token: Callable[..., str]
) -> None:
    from authz_server.ops.log import TextFormatter

    out = Captured("test.decision.text-format")
    out.logger.handlers[0].setFormatter(TextFormatter())
    try:
        service = AuthorizationService(engine, decision_log=out.log(DecisionLogSpec()))
        service.check(request(make_token(sub="alice")))
        service.check(request(make_token(sub="eve\nFORGED ERROR line"), path="/other"))
        service.check(request(None, path="/other"))
        lines = out.text.splitlines()
    finally:
        for decision_log in out.logs:
            decision_log.close()
    assert len(lines) == 3
    assert lines[0].endswith(
        f"allow GET /api/orders -> 200 allowed principal={ISSUER}/alice policy=read"
    )
    # A line break in a claim can neither split the line nor forge another.
    assert lines[1].endswith(f'principal="{ISSUER}/eve\\nFORGED ERROR line" policy=-')
    assert lines[2].endswith("principal=- policy=-")


def test_a_multi_line_message_stays_one_text_line() -> None:
    import logging as logging_module

    from authz_server.ops.log import TextFormatter

    record = logging_module.LogRecord(
        "authz_server.cli",
        logging_module.ERROR,
        "",
        0,
        "invalid configuration: %s",
        ("x.yaml: not valid YAML: while parsing\n  in \"x.yaml\", line 3\nexpected ','",),
        None,
    )
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert line.endswith("not valid YAML: while parsing\\n  in \"x.yaml\", line 3\\nexpected ','")
