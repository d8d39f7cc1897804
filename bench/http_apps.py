"""The bare apps that uvicorn and granian serve in bench/http_candidates.py: 200, no body.

``asgi_ok`` (ASGI, for uvicorn and granian ``--interface asgi``) and ``rsgi_ok`` (granian's
RSGI) answer every request 200 with ``content-length: 0`` from messages built once, never
reading the request: the floor of each server, comparable with bench/http_floor.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Message = dict[str, Any]

_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-length", b"0")],
}
_BODY: Message = {"type": "http.response.body", "body": b""}


async def asgi_ok(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """ASGI: 200 to every HTTP request; lifespan startup and shutdown acknowledged."""
    if scope["type"] == "http":
        await send(_START)
        await send(_BODY)
    elif scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def rsgi_ok(scope: Any, protocol: Any) -> None:
    """RSGI: 200 with an empty body to every request."""
    protocol.response_empty(200, [])
