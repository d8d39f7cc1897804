"""Server-side CPU per Check for alternative gRPC edges over the same real handler.

Every variant serves AuthorizationServicer over the real AuthorizationService (RS256 token,
the policy of bench/check_loop.py) from its own process; this process is the client and
sends Checks over loopback gRPC, sequentially and from 4 threads on one channel.

Variants (``--variants``, comma separated):
  real       AuthzServer.start() as shipped (sync server, server.threads=16, health, reflection)
  sync1/4/16 grpc.server + ThreadPoolExecutor(max_workers=N), so_reuseport=0 as shipped
  sync16def  sync16 with no channel options at all (gRPC defaults)
  sync16tp   sync16 plus ("grpc.optimization_target", "throughput")
  aio        grpc.aio server, async Check calling the sync servicer inline (no executor)
  aiouv      aio on uvloop (skipped when uvloop is not importable)

Rounds are interleaved (every variant once per round, order reversed on odd rounds).
The server's CPU is read by the server itself (time.process_time, all threads, ns
resolution) before and after each round over a stdin/stdout control pipe. Prints, per
variant and client mode, the best (and median) round's server CPU us/Check, its excess over
the in-process door cost (servicer.Check without gRPC, measured here each round), the
client-observed wall us/Check, and ratios to sync16.

    .venv/bin/python bench/grpc_edge.py [--calls 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from common import bench_config, check_request
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz_server import config, devkeys
from authz_server.doors.grpc import AuthorizationServicer
from authz_server.server import AuthzServer
from authz_server.service import AuthorizationService, Engine

SHIPPED_OPTIONS = [("grpc.so_reuseport", 0)]
SYNC = {
    "sync1": (1, SHIPPED_OPTIONS),
    "sync4": (4, SHIPPED_OPTIONS),
    "sync16": (16, SHIPPED_OPTIONS),
    "sync16def": (16, []),
    "sync16tp": (16, [*SHIPPED_OPTIONS, ("grpc.optimization_target", "throughput")]),
}
ALL_VARIANTS = ["real", *SYNC, "aio", "aiouv"]
BASELINE = "sync16"
MODES = {"seq": 1, "c4": 4}
MAX_CONTROL_LINES = 1_000_000
REPLY_TIMEOUT = 60.0


# --- server side (child process) -------------------------------------------------------------


def _service(config_path: Path) -> AuthorizationService:
    settings = config.load(config_path)
    engine = Engine.build(settings)
    for cache in engine.caches.values():
        if not cache.refresh():
            raise SystemExit(f"cannot load keys for {cache.provider}")
        cache.start()
    return AuthorizationService(engine)


def _control(port: int) -> None:
    """Reply to ``cpu`` with this process's CPU seconds; return on ``quit`` or EOF."""
    print(f"port {port}", flush=True)
    for line in itertools.islice(sys.stdin, MAX_CONTROL_LINES):
        command = line.strip()
        if command == "cpu":
            print(f"{time.process_time():.9f}", flush=True)
        elif command == "quit":
            return


def _serve_real(config_path: Path) -> None:
    settings = config.load(config_path)
    server = AuthzServer(settings, listen="127.0.0.1:0", http_listen="127.0.0.1:0")
    server.start()
    try:
        _control(server.grpc_port)
    finally:
        server.stop(grace=0)


def _serve_sync(config_path: Path, threads: int, options: list[tuple[str, Any]]) -> None:
    servicer = AuthorizationServicer(_service(config_path))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=options)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        _control(port)
    finally:
        server.stop(0).wait(10)


class _AioServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Async Check that runs the sync decision code inline on the event loop."""

    def __init__(self, inner: AuthorizationServicer) -> None:
        self.inner = inner

    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
        return self.inner.Check(request, context)


async def _serve_aio_main(config_path: Path) -> None:
    servicer = _AioServicer(AuthorizationServicer(_service(config_path)))
    server = grpc.aio.server(options=SHIPPED_OPTIONS)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await asyncio.get_running_loop().run_in_executor(None, _control, port)
    finally:
        await server.stop(0)


def serve(variant: str, config_path: Path) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if variant == "real":
        _serve_real(config_path)
    elif variant in SYNC:
        threads, options = SYNC[variant]
        _serve_sync(config_path, threads, options)
    elif variant == "aio":
        asyncio.run(_serve_aio_main(config_path))
    elif variant == "aiouv":
        import uvloop  # noqa: PLC0415 (optional, experiment only)

        uvloop.run(_serve_aio_main(config_path))
    else:
        raise SystemExit(f"unknown variant {variant!r}")


# --- client side (this process) --------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen[str]
    port: int = 0
    channel: grpc.Channel | None = None
    stub: Any = None
    cpu: dict[str, list[float]] = field(default_factory=dict)
    wall: dict[str, list[float]] = field(default_factory=dict)

    def _reply(self) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], REPLY_TIMEOUT)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"{self.name}: server (pid {self.process.pid}) did not answer")
        return line.strip()

    def server_cpu(self) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write("cpu\n")
        self.process.stdin.flush()
        return float(self._reply())

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        try:
            if self.process.stdin is not None and self.process.poll() is None:
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
            self.process.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(timeout=15)


def start_server(variant: str, config_path: Path) -> Server:
    argv = [sys.executable, __file__, "serve", "--variant", variant, "--config", str(config_path)]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    server = Server(variant, process)
    reply = server._reply()
    if not reply.startswith("port "):
        raise RuntimeError(f"{variant}: unexpected first line {reply!r}")
    server.port = int(reply.split()[1])
    server.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    grpc.channel_ready_future(server.channel).result(timeout=20)
    server.stub = external_auth_pb2_grpc.AuthorizationStub(server.channel)
    return server


def _worker(stub: Any, request: Any, calls: int, errors: list[BaseException]) -> None:
    try:
        for _ in range(calls):
            stub.Check(request, timeout=5)
    except BaseException as exc:
        errors.append(exc)


def run_round(server: Server, request: Any, mode: str, calls: int) -> None:
    """``calls`` Checks in total from MODES[mode] client threads; record us/Check."""
    threads = MODES[mode]
    per_thread = calls // threads
    errors: list[BaseException] = []
    workers = [
        threading.Thread(target=_worker, args=(server.stub, request, per_thread, errors))
        for _ in range(threads)
    ]
    cpu0, wall0 = server.server_cpu(), time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=600)
    wall = time.perf_counter() - wall0
    cpu = server.server_cpu() - cpu0
    if errors or any(worker.is_alive() for worker in workers):
        raise RuntimeError(f"{server.name}/{mode}: client failed: {errors[:1]}")
    total = per_thread * threads
    server.cpu.setdefault(mode, []).append(cpu / total * 1e6)
    server.wall.setdefault(mode, []).append(wall / total * 1e6)


def door_cpu(servicer: AuthorizationServicer, request: Any, calls: int) -> float:
    """In-process CPU us of servicer.Check alone (no gRPC): the floor under every edge."""
    cpu0 = time.process_time()
    for _ in range(calls):
        servicer.Check(request, None)
    return (time.process_time() - cpu0) / calls * 1e6


def report(servers: list[Server], door: list[float]) -> None:
    print(f"door (servicer.Check in process, no gRPC): best {min(door):.1f} us CPU/Check")
    base = next((s for s in servers if s.name == BASELINE), None)
    header = ("variant", "srv CPU us", "ratio", "median", "edge us", "wall us", "ratio")
    for mode, threads in MODES.items():
        print(f"\nclient {mode} ({threads} thread(s)); best round; ratio vs {BASELINE}")
        print("{:<10} {:>10} {:>6} {:>7} {:>8} {:>8} {:>6}".format(*header))
        for server in servers:
            cpu, wall = min(server.cpu[mode]), min(server.wall[mode])
            cpu_ratio = cpu / min(base.cpu[mode]) if base else float("nan")
            wall_ratio = wall / min(base.wall[mode]) if base else float("nan")
            edge = cpu - min(door)
            print(
                f"{server.name:<10} {cpu:10.1f} {cpu_ratio:6.2f}"
                f" {statistics.median(server.cpu[mode]):7.1f} {edge:8.1f} {wall:8.1f}"
                f" {wall_ratio:6.2f}  rounds: " + " ".join(f"{v:.0f}" for v in server.cpu[mode])
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command")
    serve_parser = sub.add_parser("serve", help="internal: run one server variant")
    serve_parser.add_argument("--variant", required=True)
    serve_parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=2000, help="Checks per round (total)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS))
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.variant, args.config)
        return

    variants = [v for v in args.variants.split(",") if v]
    if "aiouv" in variants:
        try:
            import uvloop  # noqa: F401, PLC0415
        except ImportError:
            print("uvloop not installed: skipping aiouv")
            variants.remove("aiouv")
    key = devkeys.generate_key("RSA", kid="bench-1")
    request = check_request(key)
    servers: list[Server] = []
    door: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
        (Path(tmp) / "config.yaml").write_text(bench_config(server="{threads: 16}"))
        servicer = AuthorizationServicer(_service(Path(tmp) / "config.yaml"))
        assert servicer.Check(request, None).status.code == 0
        try:
            for variant in variants:
                server = start_server(variant, Path(tmp) / "config.yaml")
                servers.append(server)
                assert server.stub.Check(request, timeout=5).status.code == 0, variant
                for mode in MODES:
                    run_round(server, request, mode, args.warmup)
                server.cpu.clear()
                server.wall.clear()
            for round_no in range(args.rounds):
                order = servers if round_no % 2 == 0 else servers[::-1]
                for mode in MODES:
                    for server in order:
                        run_round(server, request, mode, args.calls)
                door.append(door_cpu(servicer, request, args.calls))
                print(f"round {round_no + 1}/{args.rounds} done", flush=True)
        finally:
            for server in servers:
                server.stop()
    report(servers, door)


if __name__ == "__main__":
    main()
