"""Per-Check CPU cost, measured with a simple local loop (no Envoy, no load generator).

Three layers, each a bounded loop over the same RS256 token and policy:
  core   AuthorizationService.check on RequestAttributes (verify + policy + decision)
  door   CheckRequest -> attributes -> check -> CheckResponse, in process
  grpc   a real Check over a loopback gRPC channel to the in-process server
           (client and server share the process: CPU is both sides together)
  server the server as its own process (`authz-server serve`), Checks sent from here over
           loopback gRPC; the server's own CPU (/proc/PID/stat) divided by the Checks
Prints microseconds of CPU per call (best of --repeats rounds) and wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz_server.config import load as config
from authz_server.doors.grpc import AuthorizationServicer, to_attributes
from authz_server.server import AuthzServer
from authz_server.tools import devkeys
from bench.harness import servers
from bench.harness.inprocess import bench_config, check_request


def measure(name: str, fn: Callable[[], object], calls: int, repeats: int) -> None:
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            fn()
        best_cpu = min(best_cpu, (time.process_time() - cpu0) / calls)
        best_wall = min(best_wall, (time.perf_counter() - wall0) / calls)
    print(f"{name:<6} {best_cpu * 1e6:8.1f} us CPU/call {best_wall * 1e6:8.1f} us wall/call")


def measure_server_process(config_path: Path, request: object, calls: int, repeats: int) -> None:
    with servers.running(config_path) as server:
        assert server.check(request) == 0
        best = min(server.cpu_per_check(request, calls) for _ in range(repeats))
    print(f"server {best * 1e6:8.1f} us CPU/call (server process only, sequential client)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    key = devkeys.generate_key("RSA", kid="bench-1")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
        (Path(tmp) / "config.yaml").write_text(bench_config(server="{threads: 4}"))
        settings = config.load(Path(tmp) / "config.yaml")
        server = AuthzServer(settings, listen="127.0.0.1:0", http_listen="127.0.0.1:0")
        server.start()
        try:
            request = check_request(key)
            servicer = AuthorizationServicer(server.service)
            assert servicer.Check(request, None).status.code == 0
            measure(
                "core",
                lambda: server.service.check(to_attributes(request)),
                args.calls,
                args.repeats,
            )
            measure("door", lambda: servicer.Check(request, None), args.calls, args.repeats)
            with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                assert stub.Check(request, timeout=5).status.code == 0
                measure(
                    "grpc",
                    lambda: stub.Check(request, timeout=5),
                    args.calls // 2,
                    args.repeats,
                )
        finally:
            server.stop(grace=1)
        measure_server_process(Path(tmp) / "config.yaml", request, args.calls, args.repeats)


if __name__ == "__main__":
    main()
