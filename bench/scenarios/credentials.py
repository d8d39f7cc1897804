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
import tempfile
import time
from pathlib import Path
from typing import Any

from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from authz_server.config import load as config
from authz_server.doors.grpc import AuthorizationServicer, to_attributes
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from bench.harness import endpoints, servers
from bench.harness.inprocess import AUDIENCE, ISSUER, bench_config, check_request, interleaved

ANSWER = {"active": True, "iss": ISSUER, "sub": "alice", "aud": AUDIENCE, "groups": ["dev"]}


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
    best = dict.fromkeys(requests, float("inf"))
    with servers.running(config_path) as server:
        for request in requests.values():
            assert server.check(request) == 0
        for _ in range(rounds):
            for name, request in requests.items():
                best[name] = min(best[name], server.cpu_per_check(request, calls))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    key = devkeys.generate_key("RSA", kid="bench-1")
    api_key = secrets.token_urlsafe(32)
    opaque = secrets.token_urlsafe(32)

    def introspection_answer() -> bytes:
        return json.dumps({**ANSWER, "exp": int(time.time()) + 3600}).encode()

    with endpoints.serving(introspection_answer) as idp, tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
        (directory / "secret").write_text("bench-secret")
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        (directory / "keys.yaml").write_text(
            f"keys:\n  - {{sub: alice, sha256: {digest}, claims: {{groups: [dev]}}}}\n"
        )
        endpoint = f"{idp.url}/introspect"
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
        assert idp.calls == 1, idp.calls
        engine.close()
        server = measure_server(directory / "config.yaml", requests, args.calls, args.rounds)
        best.update({f"server {name}": value for name, value in server.items()})
    for layer in ("core", "door", "server"):
        base = best[f"{layer} jwt"]
        for name in requests:
            value = best[f"{layer} {name}"]
            print(f"{layer} {name:<13} {value * 1e6:7.1f} us CPU/call  {value / base:5.2f}x jwt")


if __name__ == "__main__":
    main()
