"""Resident memory of the running server with N distinct callers in its token cache.

Starts `authz-server serve` (one worker) on the bench configuration, sends one Check for each
of N distinct tokens (RS256, realistic claims) over loopback gRPC, checks every one was
allowed and is cached, and prints the server's VmRSS (from /proc) before and after.

    .venv/bin/python bench/memory.py [--tokens 10000]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from common import AUDIENCE, ISSUER, bench_config
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from authz_server import devkeys


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _metric(url: str, name: str) -> float:
    import urllib.request  # noqa: PLC0415

    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000)
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    key = devkeys.generate_key("RSA", kid="bench")
    (directory / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
    (directory / "config.yaml").write_text(bench_config())
    now = int(time.time())
    ctx = attribute_context_pb2.AttributeContext
    requests = []
    for i in range(args.tokens):
        claims = {
            "iss": ISSUER,
            "sub": f"user-{i:06d}",
            "aud": AUDIENCE,
            "exp": now + 3600,
            "iat": now,
            "groups": ["dev"],
            "email": f"user{i}@example.com",
            "scope": "orders:read orders:write",
        }
        http = ctx.HttpRequest(
            method="GET",
            host="api.bench",
            path="/api/orders",
            headers={"authorization": f"Bearer {key.sign(claims)}", "x-request-id": str(i)},
        )
        requests.append(
            external_auth_pb2.CheckRequest(attributes=ctx(request=ctx.Request(http=http)))
        )

    grpc_port, http_port = _free_port(), _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "authz_server",
            "serve",
            "--config",
            str(directory / "config.yaml"),
            "--listen",
            f"127.0.0.1:{grpc_port}",
            "--metrics-listen",
            f"127.0.0.1:{http_port}",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            stub.Check(requests[0], timeout=5)
            before = _rss_mib(server.pid)
            for request in requests:
                if stub.Check(request, timeout=5).status.code != 0:
                    raise SystemExit("a Check was denied: the bench configuration is off")
        entries = _metric(f"http://127.0.0.1:{http_port}/metrics", "authz_token_cache_entries")
        after = _rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    print(f"server RSS, 1 cached token:       {before:6.1f} MiB")
    print(f"server RSS, {int(entries):,} cached tokens: {after:6.1f} MiB")
    print(f"per cached token: {(after - before) * 1024 / max(1, entries - 1):.2f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
