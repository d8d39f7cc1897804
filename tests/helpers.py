"""Test helpers shared by unit and end-to-end tests (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from authz_server.identity import DEFAULT_SPACE_DELIMITED, Identity

ISSUER = "https://issuer.test"
AUDIENCE = "orders-api"


class Clock:
    """A clock the test moves by hand: ``clock()`` is the time, ``advance`` moves it."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def claims_for(now: float, **overrides: Any) -> dict[str, Any]:
    """Valid claims for ISSUER/AUDIENCE, one hour left; ``overrides`` replace or add (None
    removes a claim)."""
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "iat": int(now),
        "exp": int(now) + 3600,
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def write_config(directory: Path, text: str, name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def identity(
    sub: str = "alice",
    *,
    iss: str = "https://idp.example.com",
    claims: Mapping[str, Any] | None = None,
    audiences: Sequence[str] = (),
    presenter: str | None = None,
    space_delimited: frozenset[str] = DEFAULT_SPACE_DELIMITED,
) -> Identity:
    """A verified caller for policy tests: ``iss`` and ``sub`` are in its claims too."""
    return Identity(
        provider="idp",
        issuer=iss,
        subject=sub,
        claims={"iss": iss, "sub": sub, **(claims or {})},
        audiences=tuple(audiences),
        presenter=presenter,
        payload_segment="",
        space_delimited=space_delimited,
    )


def grpc_check_code(address: str, token: str, path: str) -> int:
    """The gRPC status code of one Check (GET api.test ``path`` with ``token``) over a new
    connection to ``address``."""

    ctx = attribute_context_pb2.AttributeContext
    request = external_auth_pb2.CheckRequest(
        attributes=ctx(
            request=ctx.Request(
                http=ctx.HttpRequest(
                    method="GET",
                    host="api.test",
                    path=path,
                    headers={"authorization": f"Bearer {token}"},
                )
            )
        )
    )
    with grpc.insecure_channel(address) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        code: int = stub.Check(request, timeout=5).status.code
        return code


def load_script(path: Path) -> ModuleType:
    """A Python file that is a script, not a module of a package (tests/data/*.py)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without_comment_lines(text: str) -> str:
    """``text`` without its ``#`` lines (a generated file's header)."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


class RecordingTransport:
    """An asyncio transport for driving an HTTP door connection by hand: what the connection
    writes is kept in ``out``; reading is never paused for real."""

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
