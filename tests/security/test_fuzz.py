"""Property tests: random tokens and random requests, through both doors' wire formats, never
raise out of a Check, never allow a protected path without a valid token, and stay fast.

The budget here keeps `make test` quick; `make fuzz` runs the same properties with a larger
one (HYPOTHESIS_PROFILE=fuzz).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_server import config, devkeys
from authz_server.attributes import normalize_path
from authz_server.devkeys import b64url_encode
from authz_server.doors.grpc import AuthorizationServicer
from authz_server.doors.http import HttpDoor, _Connection
from authz_server.service import AuthorizationService, Engine
from tests.helpers import AUDIENCE, ISSUER, write_config

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


class _Transport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


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
def door(service: AuthorizationService) -> HttpDoor:
    from authz_server.specs import HttpAuthzSpec

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
    transport = _Transport()
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
