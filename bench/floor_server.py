"""The floor: the least work a grpcio server can do to answer Envoy's Check.

A bare ``grpc.server`` with one generic handler for ``envoy.service.auth.v3.Authorization/Check``
that takes the request as raw bytes (never parsed) and answers with one OK CheckResponse
serialized once at start. Whatever authz-server spends above this per Check is its own cost;
what this server spends is grpcio's.

    python bench/floor_server.py --listen 127.0.0.1:0 --threads 8

Prints ``port N`` on stdout once it listens; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import status_pb2

from authz_server.config import ServerSpec

SERVICE = "envoy.service.auth.v3.Authorization"
OK_RESPONSE: bytes = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse()
).SerializeToString()


def answer_ok(request: bytes, context: Any) -> bytes:
    """The whole handler: no deserialization, no serialization, one prebuilt answer."""
    return OK_RESPONSE


def start(listen: str, threads: int) -> tuple[grpc.Server, int]:
    """Start the floor server on ``listen``; return it and the port it bound."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(answer_ok)}
    )
    # The same pool size and options as authz-server's gRPC server, so only the handler differs.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads), options=[("grpc.so_reuseport", 0)]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    server.start()
    return server, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument(
        "--threads",
        type=int,
        default=ServerSpec().threads,
        help="thread pool size (default: authz-server's server.threads default)",
    )
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server, port = start(args.listen, args.threads)
    print(f"port {port}", flush=True)
    stop.wait()
    server.stop(grace=1).wait(5)


if __name__ == "__main__":
    main()
