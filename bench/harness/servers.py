"""authz-server as its own process, for the scenarios that send it Checks from this process.

`running` starts ``authz-server serve`` on free ports of 127.0.0.1 (its output to a log file),
waits until its side port says it is ready, yields a `RunningServer`, and stops it by PID
(SIGTERM, then SIGKILL after a bounded wait) however the block ends. A server that exits
early raises with the tail of its log.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from bench.harness.procs import Proc, free_port, http_status


@dataclass(frozen=True)
class RunningServer:
    proc: Proc
    stub: Any  # an AuthorizationStub on one channel to the server's gRPC port
    metrics_url: str  # the side port's /metrics

    def check(self, request: Any) -> int:
        """Send one Check; return the gRPC status code of the answer (0: allowed)."""
        return int(self.stub.Check(request, timeout=5).status.code)

    def cpu_per_check(self, request: Any, calls: int) -> float:
        """Send `request` `calls` times, one after the other; return the server's CPU seconds
        (the process and its children, from /proc/PID/stat) per Check."""
        before = self.proc.cpu_seconds()
        for _ in range(calls):
            self.stub.Check(request, timeout=5)
        return (self.proc.cpu_seconds() - before) / calls


@contextlib.contextmanager
def running(
    config_path: Path,
    *,
    name: str = "authz-server",
    args: Sequence[str] = ("--log-level", "WARNING"),
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 60,
) -> Iterator[RunningServer]:
    """``authz-server serve --config config_path`` plus `args`, in `env` when given; its log
    is NAME.log beside the configuration. Yields it once ready; stops it on exit."""
    grpc_port, http_port = free_port(), free_port()
    argv = [sys.executable, "-m", "authz_server", "serve", "--config", str(config_path)]
    argv += ["--listen", f"127.0.0.1:{grpc_port}", "--metrics-listen", f"127.0.0.1:{http_port}"]
    proc = Proc(name, [*argv, *args], config_path.parent / f"{name}.log", None, env=env)
    side = f"http://127.0.0.1:{http_port}"
    try:
        proc.start()
        proc.wait_ready(lambda: http_status(f"{side}/readyz") == 200, ready_timeout)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            yield RunningServer(proc, stub, f"{side}/metrics")
    finally:
        proc.stop()
