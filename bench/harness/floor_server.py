"""The floor: the least work a grpcio server can do to answer Envoy's Check.

A bare ``grpc.server`` with one generic handler for ``envoy.service.auth.v3.Authorization/Check``
that takes the request as raw bytes (never parsed) and answers with one OK CheckResponse
serialized once at start. Whatever authz-server spends above this per Check is its own cost;
what this server spends is grpcio's.

    python bench/harness/floor_server.py --listen 127.0.0.1:0 --threads 8
    python bench/harness/floor_server.py --listen unix:/tmp/floor.sock
    python bench/harness/floor_server.py --option grpc.optimization_target=throughput --option ...
    python bench/harness/floor_server.py --aio

``--option KEY=VALUE`` adds a grpc core channel argument to the server's options (an integer
when VALUE is one); ``--aio`` serves with ``grpc.aio`` on one event loop instead of a thread
pool (bench/results/variants.md compared them). Prints ``port N`` on stdout once it listens
(for a ``unix:`` address N is whatever grpcio returns); stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from concurrent import futures
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import status_pb2

from authz_server.config.specs import ServerSpec

SERVICE = "envoy.service.auth.v3.Authorization"
BASE_OPTIONS: list[tuple[str, int | str]] = [("grpc.so_reuseport", 0)]
OK_RESPONSE: bytes = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse()
).SerializeToString()


def answer_ok(request: bytes, context: Any) -> bytes:
    """The whole handler: no deserialization, no serialization, one prebuilt answer."""
    return OK_RESPONSE


async def answer_ok_async(request: bytes, context: Any) -> bytes:
    """`answer_ok` for grpc.aio."""
    return OK_RESPONSE


def parse_option(text: str) -> tuple[str, int | str]:
    """``KEY=VALUE`` as a grpc option: VALUE an int when it is one. Raises ValueError."""
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("grpc."):
        raise ValueError(f"--option {text!r}: expected grpc.NAME=VALUE")
    return key, int(value) if value.lstrip("-").isdigit() else value


def start(
    listen: str, threads: int, extra_options: list[tuple[str, int | str]] | None = None
) -> tuple[grpc.Server, int]:
    """Start the floor server on ``listen``; return it and the port it bound."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(answer_ok)}
    )
    # The same pool size and options as authz-server's gRPC server, so only the handler differs.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads),
        options=[*BASE_OPTIONS, *(extra_options or [])],
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    server.start()
    return server, port


async def serve_aio(listen: str, extra_options: list[tuple[str, int | str]]) -> None:
    """The floor on grpc.aio until SIGTERM or SIGINT."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(answer_ok_async)}
    )
    server = grpc.aio.server(options=[*BASE_OPTIONS, *extra_options])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"port {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(grace=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument(
        "--threads",
        type=int,
        default=ServerSpec().threads,
        help="thread pool size (default: authz-server's server.threads default)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="grpc.NAME=VALUE",
        help="an extra grpc server option (repeatable)",
    )
    parser.add_argument("--aio", action="store_true", help="serve with grpc.aio")
    args = parser.parse_args()
    try:
        extra = [parse_option(text) for text in args.option]
    except ValueError as error:
        parser.error(str(error))
    if args.aio:
        asyncio.run(serve_aio(args.listen, extra))
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server, port = start(args.listen, args.threads, extra)
    print(f"port {port}", flush=True)
    stop.wait()
    server.stop(grace=1).wait(5)


if __name__ == "__main__":
    main()
