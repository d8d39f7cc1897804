"""The decision log: one JSON line per decision with the documented fields, redaction,
claims only when listed, denyOnly, sampling, AUDIT policies, and the JSON formatter."""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from authz_server import config, devkeys, errors
from authz_server import log as log_module
from authz_server.attributes import RequestAttributes
from authz_server.config import DecisionLogSpec
from authz_server.devkeys import SigningKey
from authz_server.log import DecisionLog, JsonFormatter
from authz_server.responses import Decision
from authz_server.service import AuthorizationService, Engine
from tests.helpers import AUDIENCE, ISSUER, Clock, write_config

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
    """A private logger whose JSON lines end up in memory."""

    def __init__(self, name: str) -> None:
        self.stream = io.StringIO()
        handler = logging.StreamHandler(self.stream)
        handler.setFormatter(JsonFormatter())
        self.logger = logging.getLogger(name)
        self.logger.handlers[:] = [handler]
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]


@pytest.fixture
def captured(request: pytest.FixtureRequest) -> Iterator[Captured]:
    out = Captured(f"test.decision.{request.node.name}")
    yield out
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
    return AuthorizationService(
        engine, decision_log=DecisionLog(DecisionLogSpec(**spec), captured.logger)
    )


def request(
    token: str | None = None, path: str = "/api/orders", method: str = "GET", **headers: str
) -> RequestAttributes:
    all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    return RequestAttributes(
        method=method, host="api.test", path=path, headers=all_headers, source_ip="10.1.2.3"
    )


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
    log = DecisionLog(DecisionLogSpec(sample_rate=0.25), captured.logger)
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
    log = DecisionLog(DecisionLogSpec(), captured.logger)
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
