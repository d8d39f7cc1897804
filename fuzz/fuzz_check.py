"""Coverage-guided fuzzing (atheris, libFuzzer) of a Check: bytes become a token, a path, a
host, headers, or a whole HTTP request for the HTTP door. Any exception out of a Check, an
allow of a protected path (no input can hold a valid signature), or an HTTP answer that is not
HTTP is a crash that libFuzzer reports with its input.

    make fuzz                                       # FUZZ_SECONDS=120 by default
    .venv/bin/python fuzz/fuzz_check.py -max_total_time=60 [corpus_dir]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from authz_server.attributes import RequestAttributes, normalize_path
    from authz_server.config import load as config
    from authz_server.config.specs import HttpAuthzSpec
    from authz_server.doors.http import HttpDoor, _Connection
    from authz_server.service import AuthorizationService, Engine
    from authz_server.tools import devkeys

ISSUER = "https://idp.fuzz"
CONFIG = """
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - issuer: {issuer}
    audiences: [fuzz]
    jwks: {jwks}
    fromHeaders: [{{name: authorization, prefix: "Bearer "}}]
    fromParams: [access_token]
    fromCookies: [session]
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
policies:
  - name: signed-in-api
    rules:
      - from: [{{source: {{requestPrincipals: ["*"]}}}}]
        to: [{{operation: {{paths: ["/api/*"]}}}}]
  - name: public
    rules: [{{to: [{{operation: {{paths: ["/public/*"]}}}}]}}]
"""


def _service() -> AuthorizationService:
    key = devkeys.generate_key("EC-P256", kid="k")
    directory = Path(tempfile.mkdtemp(prefix="authz-fuzz-"))
    path = directory / "config.yaml"
    jwks = json.dumps(json.dumps(devkeys.jwks(key)))
    path.write_text(CONFIG.format(issuer=ISSUER, jwks=jwks))
    engine = Engine.build(config.load(path))
    for cache in engine.caches.values():
        assert cache.refresh()
    return AuthorizationService(engine)


SERVICE = _service()
DOOR = HttpDoor(SERVICE, HttpAuthzSpec(), listen="127.0.0.1:0")
DOOR.loop_time = lambda: 1.0  # type: ignore[method-assign]


class _Transport:
    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _check(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    where = fdp.ConsumeIntInRange(0, 3)
    token = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 600))
    path = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 60)) or "/api/x"
    host = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 30))
    headers = {
        fdp.ConsumeUnicodeNoSurrogates(10).lower(): fdp.ConsumeUnicodeNoSurrogates(40)
        for _ in range(fdp.ConsumeIntInRange(0, 8))
    }
    if where == 0:
        headers["authorization"] = f"Bearer {token}"
    elif where == 1:
        path = f"{path}?access_token={token}"
    elif where == 2:
        headers["cookie"] = f"session={token}"
    request = RequestAttributes(method="GET", host=host, path=path, headers=headers)
    decision = SERVICE.check(request)  # any exception is a crash
    if decision.allowed and normalize_path(path).startswith("/api/"):
        raise AssertionError(f"allowed {path!r} without a valid token")


def _http(data: bytes) -> None:
    connection = _Connection(DOOR)
    transport = _Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received(data)
    connection.connection_lost(None)
    for answer in transport.out:
        if not answer.startswith(b"HTTP/1.1 "):
            raise AssertionError(f"not an HTTP answer: {answer[:40]!r}")


def test_one_input(data: bytes) -> None:
    if data[:1] == b"H":
        _http(data[1:])
    else:
        _check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
