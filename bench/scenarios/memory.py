"""Resident memory of the running server with N distinct callers in its token cache.

Starts `authz-server serve` (one worker) on the bench configuration, sends one Check for each
of N distinct tokens (RS256, realistic claims) over loopback gRPC, checks every one was
allowed and is cached, and prints the server's VmRSS (from /proc) before and after.

    .venv/bin/python -m bench.scenarios.memory [--tokens 10000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from authz_server.tools import devkeys
from bench.harness import servers
from bench.harness.inprocess import AUDIENCE, ISSUER, bench_config
from bench.harness.procs import http_get


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _metric(url: str, name: str) -> float:
    """The value of the unlabelled metric `name` on the /metrics page at `url` (0 if absent)."""
    for line in http_get(url)[1].decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        return measure(Path(tmp), args.tokens)


def measure(directory: Path, tokens: int) -> int:
    """Print the server's RSS with 1 and with `tokens` cached callers; return 0."""
    key = devkeys.generate_key("RSA", kid="bench")
    (directory / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
    (directory / "config.yaml").write_text(bench_config())
    now = int(time.time())
    ctx = attribute_context_pb2.AttributeContext
    requests = []
    for i in range(tokens):
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

    # Default settings (the decision log on, to the server's log file).
    with servers.running(directory / "config.yaml", args=()) as server:
        server.check(requests[0])
        before = _rss_mib(server.proc.pid)
        for request in requests:
            if server.check(request) != 0:
                raise SystemExit("a Check was denied: the bench configuration is off")
        entries = _metric(server.metrics_url, "authz_token_cache_entries")
        after = _rss_mib(server.proc.pid)
    print(f"server RSS, 1 cached token:       {before:6.1f} MiB")
    print(f"server RSS, {int(entries):,} cached tokens: {after:6.1f} MiB")
    print(f"per cached token: {(after - before) * 1024 / max(1, entries - 1):.2f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
