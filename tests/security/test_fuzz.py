"""Property tests: random tokens and random requests, through both doors' wire formats, never
raise out of a Check, never allow a protected path without a valid token, and stay fast.

The budget here keeps `make test` quick; `make fuzz` runs the same properties with a larger
one (HYPOTHESIS_PROFILE=fuzz).
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_server.attributes import normalize_path
from authz_server.config import load as config
from authz_server.doors.grpc import AuthorizationServicer
from authz_server.doors.http import HEADERS_TO_REMOVE, HttpDoor, _Connection
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from authz_server.tools.devkeys import b64url_encode
from tests.helpers import AUDIENCE, ISSUER, RecordingTransport, claims_for, write_config

settings.register_profile(
    "suite",
    max_examples=150,
    # CI replays the same examples every run (a red build is never a roll of the dice);
    # locally each run explores new ones.
    derandomize=bool(os.environ.get("CI")),
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "fuzz",
    max_examples=20_000,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "suite")

CONFIG = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{jwks}}
    fromHeaders: [{{{{name: authorization, prefix: "Bearer "}}}}, {{{{name: x-token}}}}]
    fromParams: [access_token]
    fromCookies: [session]
    outputClaimToHeaders: [{{{{header: x-user, claim: sub}}}}]
policies:
  - name: no-admin
    action: DENY
    rules: [{{{{to: [{{{{operation: {{{{hosts: ["admin.example.com"]}}}}}}}}]}}}}]
  - name: signed-in-api
    rules:
      - from: [{{{{source: {{{{requestPrincipals: ["*"]}}}}}}}}]
        to: [{{{{operation: {{{{paths: ["/api/*"]}}}}}}}}]
  - name: public
    rules: [{{{{to: [{{{{operation: {{{{paths: ["/public/*"]}}}}}}}}]}}}}]
"""


class _Context:
    def set_code(self, code: Any) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> AuthorizationService:
    key = devkeys.generate_key("EC-P256", kid="k")  # the fuzzer never holds its private half
    jwks = json.dumps(json.dumps(devkeys.jwks(key)))
    path = write_config(tmp_path_factory.mktemp("fuzz"), CONFIG.format(jwks=jwks))
    engine = Engine.build(config.load(path))
    for cache in engine.caches.values():
        assert cache.refresh()
    return AuthorizationService(engine)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
structured_tokens = st.builds(
    lambda header, payload, signature: ".".join(
        (
            b64url_encode(json.dumps(header).encode()),
            b64url_encode(json.dumps(payload).encode()),
            b64url_encode(signature),
        )
    ),
    st.fixed_dictionaries(
        {
            "alg": st.sampled_from(["ES256", "RS256", "none", "HS256", "EdDSA"]),
            "kid": st.sampled_from(["k", "x"]),
        },
        optional={"crit": json_values, "jwk": json_values, "typ": json_values},
    ),
    st.fixed_dictionaries(
        {"iss": st.sampled_from([ISSUER, ISSUER + "/", "x"]), "sub": json_values},
        optional={"aud": json_values, "exp": json_values, "nbf": json_values, "iat": json_values},
    ),
    st.binary(max_size=80),
)
tokens = structured_tokens | st.text(max_size=200) | st.binary(max_size=200).map(b64url_encode)
header_names = st.sampled_from(
    ["authorization", "x-token", "cookie", "x-user", "x_user", "host", "x-forwarded-for"]
) | st.text(min_size=1, max_size=12)
paths = st.sampled_from(
    ["/api/orders", "/api/../public/x", "/public/%2e%2e/api/x", "//api//x", "/%61pi/x"]
) | st.text(max_size=40)


def _protected(path: str) -> bool:
    return normalize_path(path).startswith("/api/")


@settings(settings.get_profile(PROFILE))
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "", "G ET", "ПОЛУЧИТЬ"]),
    host=st.sampled_from(["", "api.example.com", "admin.example.com:80", "ADMIN.example.com."])
    | st.text(max_size=30),
    path=paths,
    token=tokens,
    where=st.sampled_from(["bearer", "x-token", "query", "cookie"]),
    extra=st.dictionaries(header_names, st.text(max_size=40), max_size=30),
)
def test_grpc_checks_of_random_requests_never_raise_and_never_allow_without_a_token(
    service: AuthorizationService,
    *,
    method: str,
    host: str,
    path: str,
    token: str,
    where: str,
    extra: dict[str, str],
) -> None:
    headers = {k.lower(): v for k, v in extra.items()}
    if where == "bearer":
        headers["authorization"] = f"Bearer {token}"
    elif where == "x-token":
        headers["x-token"] = token
    elif where == "cookie":
        headers["cookie"] = f"session={token}"
    else:
        path = f"{path}?access_token={token}"
    ctx = attribute_context_pb2.AttributeContext
    request = external_auth_pb2.CheckRequest(
        attributes=ctx(
            request=ctx.Request(
                http=ctx.HttpRequest(method=method, host=host, path=path, headers=headers)
            )
        )
    )
    servicer = AuthorizationServicer(service)
    answer = external_auth_pb2.CheckResponse.FromString(
        servicer.check_bytes(request.SerializeToString(), _Context())
    )
    if answer.status.code == 0 and _protected(path):
        pytest.fail(f"allowed {method} {path!r} on {host!r} with a token no key signed")
    if answer.status.code == 0:
        assert (
            "authorization" in answer.ok_response.headers_to_remove
            or "authorization" not in headers
        )
    if answer.status.code == 0 and host.lower().rstrip(".").split(":")[0] == "admin.example.com":
        pytest.fail(f"allowed a request for {host!r}")


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[AuthorizationService, str]:
    """A service over a key this test holds, and a valid token for ``alice``."""
    key = devkeys.generate_key("EC-P256", kid="k")
    jwks = json.dumps(json.dumps(devkeys.jwks(key)))
    path = write_config(tmp_path_factory.mktemp("fuzz-signed"), CONFIG.format(jwks=jwks))
    engine = Engine.build(config.load(path))
    for cache in engine.caches.values():
        assert cache.refresh()
    return AuthorizationService(engine), key.sign(claims_for(time.time()))


FORGED = (
    ".".join(
        b64url_encode(json.dumps(part).encode()) for part in ({"alg": "none"}, {"sub": "admin"})
    )
    + "."
)
# Cookie and parameter names as clients spell them: spaces around, another case, a twin.
cookie_names = st.sampled_from(
    ["session", " session", "session ", "\tsession", "Session", "a", "a, session"]
)
param_names = st.sampled_from(
    ["access_token", "x", "access_token ", "access%5Ftoken", "Access_Token", "ACCESS%5fTOKEN"]
)
crumb_values = st.sampled_from(["VALID", "FORGED", "1", " VALID ", '"VALID"'])
cookie_separators = st.sampled_from(["; ", ";", ",", ", ", " ,"])
query_separators = st.sampled_from(["&", ";"])


def _upstream_readings(cookie: str) -> list[dict[str, list[str]]]:
    """The cookies an upstream may read in ``cookie``: split on ``;`` only, or on ``,`` too
    (as it reads two Cookie headers), names trimmed either way."""
    readings = []
    for separators in (";", ";,"):
        jar: dict[str, list[str]] = {}
        parts = [cookie]
        for separator in separators:
            parts = [piece for part in parts for piece in part.split(separator)]
        for part in parts:
            name, sep, value = part.partition("=")
            if sep:
                jar.setdefault(name.strip(), []).append(value)
        readings.append(jar)
    return readings


def _query_readings(query: str, removed: tuple[str, ...]) -> list[list[str]]:
    """The parameter names an upstream may read in ``query`` once Envoy has removed those in
    ``removed`` (Envoy splits on ``&`` and matches exact names): split on ``&`` only, or on
    ``;`` too; decoded (and, unlike cookie names, not trimmed: common upstreams keep a query
    name's spaces; the caller compares them in any case, as ASP.NET does)."""
    kept = [p for p in query.split("&") if unquote(p.partition("=")[0]) not in removed]
    return [
        [unquote(p.partition("=")[0]) for p in kept],
        [unquote(p.partition("=")[0]) for part in kept for p in part.split(";")],
    ]


def _through_grpc(
    service: AuthorizationService, path: str, headers: list[tuple[str, str]]
) -> tuple[bool, dict[str, str], set[str], tuple[str, ...]]:
    """(allowed, headers set, headers removed, query parameters removed) from the gRPC door,
    the request's headers merged as Envoy merges them (repeated names joined with ",")."""
    merged: dict[str, str] = {}
    for name, value in headers:
        merged[name] = f"{merged[name]},{value}" if name in merged else value
    ctx = attribute_context_pb2.AttributeContext
    request = external_auth_pb2.CheckRequest(
        attributes=ctx(
            request=ctx.Request(http=ctx.HttpRequest(method="GET", path=path, headers=merged))
        )
    )
    answer = external_auth_pb2.CheckResponse.FromString(
        AuthorizationServicer(service).check_bytes(request.SerializeToString(), _Context())
    )
    ok = answer.ok_response
    return (
        answer.status.code == 0,
        {h.header.key: h.header.value for h in ok.headers},
        set(ok.headers_to_remove),
        tuple(ok.query_parameters_to_remove),
    )


def _through_http(
    door: HttpDoor, path: str, headers: list[tuple[str, str]]
) -> tuple[bool, dict[str, str], set[str], tuple[str, ...]]:
    """The same from the HTTP door, each header on its own line (two Cookie lines stay two);
    this door cannot remove a query parameter."""
    head = f"GET {path} HTTP/1.1\r\nhost: api.example.com\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    connection = _Connection(door)
    transport = RecordingTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received((head + "\r\n").encode())
    connection.connection_lost(None)
    answer = b"".join(transport.out).decode()
    status_line, _, rest = answer.partition("\r\n")
    lines = rest.partition("\r\n\r\n")[0].split("\r\n")
    answered = dict(line.split(": ", 1) for line in lines if ": " in line)
    removed = set(filter(None, answered.pop(HEADERS_TO_REMOVE, "").split(",")))
    return status_line.startswith("HTTP/1.1 200"), answered, removed, ()


@settings(settings.get_profile(PROFILE))
@given(
    cookies=st.lists(
        st.tuples(cookie_names, crumb_values, cookie_separators, st.booleans()), max_size=5
    ),
    params=st.lists(st.tuples(param_names, crumb_values, query_separators), max_size=4),
    bearer=st.booleans(),
    through=st.sampled_from(["grpc", "http"]),
)
def test_no_token_cookie_or_parameter_reaches_the_upstream_in_any_reading(
    signed: tuple[AuthorizationService, str],
    signed_door: HttpDoor,
    *,
    cookies: list[tuple[str, str, str, bool]],
    params: list[tuple[str, str, str]],
    bearer: bool,
    through: str,
) -> None:
    # Two Cookie headers (a crumb flagged True starts another), spaces around names, "," and
    # ";" between cookies, ";" between parameters, repeated names, through either door's wire
    # format: whatever the server allows, no upstream reading finds a session cookie or an
    # access_token parameter in what it passes on (so neither a forged token nor the
    # verified one).
    service, valid = signed

    def value(name: str) -> str:
        return name.replace("VALID", valid).replace("FORGED", FORGED)

    cookie_headers: list[str] = []
    for number, (name, crumb, separator, new_header) in enumerate(cookies):
        if new_header or number == 0:
            cookie_headers.append("")
        cookie_headers[-1] += f"{name}={value(crumb)}{separator}"
    query = "".join(f"{n}={value(v)}{sep}" for n, v, sep in params).rstrip("&;")
    headers = [("cookie", c) for c in cookie_headers if c.strip()]
    if bearer:
        headers.append(("authorization", f"Bearer {valid}"))
    path = f"/public/x?{query}" if query else "/public/x"
    if through == "grpc":
        allowed, set_headers, removed, query_removed = _through_grpc(service, path, headers)
    else:
        allowed, set_headers, removed, query_removed = _through_http(signed_door, path, headers)
    if not allowed:
        return
    # What Envoy sends on: the Cookie header set, or none, or the client's (two stay two).
    if "cookie" in set_headers:
        sent = [set_headers["cookie"]]
    else:
        sent = [] if "cookie" in removed else [c for _, c in headers if _ == "cookie"]
    for cookie in sent:
        for jar in _upstream_readings(cookie):
            assert "session" not in {n.lower() for n in jar}, (cookie_headers, sent)
    if through == "grpc":
        for names in _query_readings(query, query_removed):
            assert "access_token" not in {n.lower() for n in names}, (query, names)


@pytest.fixture(scope="module")
def signed_door(signed: tuple[AuthorizationService, str]) -> HttpDoor:
    from authz_server.config.specs import HttpAuthzSpec

    door = HttpDoor(signed[0], HttpAuthzSpec(), listen="127.0.0.1:0")
    door.loop_time = lambda: 1.0  # type: ignore[method-assign]
    return door


@pytest.fixture(scope="module")
def door(service: AuthorizationService) -> HttpDoor:
    from authz_server.config.specs import HttpAuthzSpec

    door = HttpDoor(
        service, HttpAuthzSpec(maxHeaders=16, maxHeaderBytes=4096), listen="127.0.0.1:0"
    )
    door.loop_time = lambda: 1.0  # type: ignore[method-assign]
    return door


@settings(settings.get_profile(PROFILE))
@given(
    data=st.binary(max_size=2000)
    | st.builds(
        lambda a, b: a + b,
        st.sampled_from([b"GET /api/x HTTP/1.1\r\n", b"POST / HTTP/1.0\r\n", b""]),
        st.binary(max_size=500),
    )
)
def test_the_http_door_answers_any_bytes_with_http_or_nothing(door: HttpDoor, data: bytes) -> None:
    connection = _Connection(door)
    transport = RecordingTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received(data)
    connection.connection_lost(None)
    for answer in transport.out:
        assert answer.startswith(b"HTTP/1.1 "), answer[:40]
        status = int(answer[9:12])
        assert status != 200 or b"/api/" not in data.split(b"\r\n", 1)[0], "allowed without a token"


def test_the_example_database_stays_out_of_git() -> None:
    ignored = (Path(__file__).resolve().parents[2] / ".gitignore").read_text().splitlines()
    assert ".hypothesis/" in ignored
