"""CPU per Check by kind of credential, in process: a cached JWT, a cached introspection answer,
an API key (issue 21 asks the last two to cost at most 1.2x the first).

One configuration holds the three providers: the bench's JWT provider, an introspection
provider reading the same `Authorization: Bearer` header (so an opaque token meets the JWT
provider first, as in a mixed deployment), and an API keys provider on `x-api-key`. The
introspection endpoint is a local HTTP server answering `active: true`; it is asked once, then
every Check is a cache hit. Three layers: `core` (AuthorizationService.check on the request
model), `door` (CheckRequest -> CheckResponse through the gRPC servicer, no network), both
interleaved (``common.interleaved``), best of --rounds; and `server`: `authz-server serve` as
its own process, Checks sent over loopback gRPC one at a time, the server's own CPU
(/proc/PID/stat) per Check, kinds interleaved round by round.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from check_loop import _free_port, _process_cpu
from common import AUDIENCE, ISSUER, bench_config, check_request, interleaved
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from authz_server import config, devkeys
from authz_server.doors.grpc import AuthorizationServicer, to_attributes
from authz_server.service import AuthorizationService, Engine

ANSWER = {"active": True, "iss": ISSUER, "sub": "alice", "aud": AUDIENCE, "groups": ["dev"]}


class _Introspection(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).calls += 1
        body = json.dumps({**ANSWER, "exp": int(time.time()) + 3600}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _request(headers: dict[str, str]) -> Any:
    ctx = attribute_context_pb2.AttributeContext
    http = ctx.HttpRequest(
        method="GET",
        host="api.bench",
        path="/api/orders?page=2",
        headers={"user-agent": "bench", "x-request-id": "abc", **headers},
    )
    return external_auth_pb2.CheckRequest(attributes=ctx(request=ctx.Request(http=http)))


def measure_server(
    config_path: Path, requests: dict[str, Any], calls: int, rounds: int
) -> dict[str, float]:
    """Best server CPU seconds per Check of each kind, the server in its own process."""
    grpc_port, http_port = _free_port(), _free_port()
    argv = [sys.executable, "-m", "authz_server", "serve", "--config", str(config_path)]
    argv += ["--listen", f"127.0.0.1:{grpc_port}", "--http-listen", f"127.0.0.1:{http_port}"]
    argv += ["--log-level", "WARNING"]
    process = subprocess.Popen(argv)
    best = dict.fromkeys(requests, float("inf"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            for request in requests.values():
                assert stub.Check(request, timeout=5).status.code == 0
            for _ in range(rounds):
                for name, request in requests.items():
                    before = _process_cpu(process.pid)
                    for _ in range(calls):
                        stub.Check(request, timeout=5)
                    best[name] = min(best[name], (_process_cpu(process.pid) - before) / calls)
    finally:
        process.terminate()
        process.wait(timeout=15)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    key = devkeys.generate_key("RSA", kid="bench-1")
    api_key = secrets.token_urlsafe(32)
    opaque = secrets.token_urlsafe(32)
    idp = ThreadingHTTPServer(("127.0.0.1", 0), _Introspection)
    threading.Thread(target=idp.serve_forever, daemon=True).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            (directory / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
            (directory / "secret").write_text("bench-secret")
            digest = hashlib.sha256(api_key.encode()).hexdigest()
            (directory / "keys.yaml").write_text(
                f"keys:\n  - {{sub: alice, sha256: {digest}, claims: {{groups: [dev]}}}}\n"
            )
            endpoint = f"http://127.0.0.1:{idp.server_address[1]}/introspect"
            extra = f"""  - name: opaque
    issuer: {ISSUER}
    introspection: {{endpoint: {endpoint}, clientId: bench, clientSecretFile: secret}}
    outputClaimToHeaders: [{{header: x-user, claim: sub}}, {{header: x-groups, claim: groups}}]
  - name: keys
    issuer: {ISSUER}
    apiKeys: {{file: keys.yaml}}
    fromHeaders: [{{name: x-api-key}}]
    outputClaimToHeaders: [{{header: x-user, claim: sub}}, {{header: x-groups, claim: groups}}]
"""
            (directory / "config.yaml").write_text(bench_config(extra_providers=extra))
            engine = Engine.build(config.load(directory / "config.yaml"))
            for cache in engine.caches.values():
                assert cache.refresh()
            service = AuthorizationService(engine)
            servicer = AuthorizationServicer(service)
            requests = {
                "jwt": check_request(key),
                "introspected": _request({"authorization": f"Bearer {opaque}"}),
                "api key": _request({"x-api-key": api_key}),
            }
            variants = []
            for name, request in requests.items():
                attributes = to_attributes(request)
                decision = service.check(attributes)
                assert decision.allowed, (name, decision.reason)
                assert servicer.Check(request, None).status.code == 0

                def core(attrs: Any = attributes) -> object:
                    return service.check(attrs)

                def door(req: Any = request) -> object:
                    return servicer.Check(req, None)

                variants += [(f"core {name}", core), (f"door {name}", door)]
            best = interleaved(variants, args.calls, args.rounds)
            assert _Introspection.calls == 1, _Introspection.calls
            engine.close()
            server = measure_server(directory / "config.yaml", requests, args.calls, args.rounds)
            best.update({f"server {name}": value for name, value in server.items()})
    finally:
        idp.shutdown()
    for layer in ("core", "door", "server"):
        base = best[f"{layer} jwt"]
        for name in requests:
            value = best[f"{layer} {name}"]
            print(f"{layer} {name:<13} {value * 1e6:7.1f} us CPU/call  {value / base:5.2f}x jwt")


if __name__ == "__main__":
    main()
