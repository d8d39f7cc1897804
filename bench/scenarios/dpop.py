"""What a DPoP Check costs next to a cached bearer Check, in process.

Per-call CPU (time.process_time, best of --rounds rounds of --calls calls, every round runs
each variant once, in turn) and wall time for the Redis variant (its round trip is waiting,
not CPU):
  bearer       AuthorizationService.check, a bearer token from the token cache (the baseline)
  dpop-memory  the same token bound to a key (cnf.jkt), sent as DPoP with a fresh proof per
               request: the token still comes from the cache; the proof is verified (one
               signature) and its jti written to the in-process replay cache
  dpop-redis   the same with the replay cache in a real redis-server (Unix socket, started and
               stopped here by PID): one SET NX PX per request
  proof-only   binding.verify_dpop_proof alone (the signature and the checks; the client's
               public key built once, as the service keeps it), for reference
  redis-set    RedisReplayCache.first_use alone: one SET NX PX through redis-py
Proofs are made before the timing (each request needs its own jti) and sent once each.

Run: python -m bench.scenarios.dpop [--calls 2000] [--rounds 5] [--proof-alg ES256|EdDSA|RS256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.credentials import binding
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from bench.harness.inprocess import AUDIENCE, ISSUER, bench_config

# The tests' real redis-server (started and stopped by PID): one way to start it.
from tests.redis_server import PASSWORD, running_redis

KINDS = {"ES256": "EC-P256", "EdDSA": "Ed25519", "RS256": "RSA"}
URL = "https://api.bench/api/orders"


def _service(tmp: Path, name: str, server: str, dpop: bool) -> AuthorizationService:
    text = bench_config(server=server, jwks_file="jwks.json")
    if dpop:
        text = text.replace(
            "    outputClaimToHeaders:",
            "    dpop: {mode: required, proofLifetime: 5m}\n    outputClaimToHeaders:",
            1,
        )
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    engine = Engine.build(config.load(path))
    for cache in engine.caches.values():
        assert cache.refresh()
    return AuthorizationService(engine)


def _request(headers: dict[str, str]) -> RequestAttributes:
    return RequestAttributes(
        method="GET", host="api.bench", path="/api/orders", headers=headers, scheme="https"
    )


def _wall_and_cpu(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - wall0) / calls, (time.process_time() - cpu0) / calls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--proof-alg", choices=list(KINDS), default="ES256")
    args = parser.parse_args()
    if args.calls < 1 or args.rounds < 1:
        parser.error("--calls and --rounds must be positive")

    issuer_key = devkeys.generate_key("RSA", kid="bench-idp")
    client_key = devkeys.generate_key(KINDS[args.proof_alg])
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "alice", "aud": AUDIENCE, "exp": now + 3600}
    bearer_token = issuer_key.sign({**claims, "groups": ["dev"]})
    bound_token = issuer_key.sign(
        {**claims, "groups": ["dev"], "cnf": {"jkt": client_key.thumbprint()}}
    )

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "jwks.json").write_text(json.dumps(devkeys.jwks(issuer_key)))
        (tmp / "redis").mkdir()
        with running_redis(tmp / "redis") as redis:
            (tmp / "password").write_text(PASSWORD)
            redis_server = (
                f"{{replayCache: {{redis: {{url: 'unix://{redis.socket_path}', "
                f"passwordFile: {tmp / 'password'}}}}}}}"
            )
            services = {
                "bearer": _service(tmp, "bearer", "{}", dpop=False),
                "dpop-memory": _service(
                    tmp, "memory", "{replayCache: {maxEntries: 1000000}}", True
                ),
                "dpop-redis": _service(tmp, "redis", redis_server, dpop=True),
            }
            total = args.calls * (args.rounds + 1)

            def proofs() -> Iterator[RequestAttributes]:
                # Made ahead (signing is the client's cost, not ours); each sent once.
                for _ in range(total):
                    proof = devkeys.dpop_proof(
                        client_key, method="GET", url=URL, access_token=bound_token
                    )
                    yield _request({"authorization": f"DPoP {bound_token}", "dpop": proof})

            requests = {name: list(proofs()) for name in ("dpop-memory", "dpop-redis")}
            bearer_request = _request({"authorization": f"Bearer {bearer_token}"})
            htu = binding.normalize_htu(URL)
            rules = services["dpop-memory"].engine.constraints["main"].dpop
            only = [r.headers["dpop"] for r in requests["dpop-memory"][: args.calls]]
            cursors = {name: iter(reqs) for name, reqs in requests.items()}
            proof_cursor = [0]
            proof_keys = binding.ProofKeyCache()
            replay_cache = services["dpop-redis"].engine.replay_cache
            set_cursor = [0]

            def bearer() -> object:
                return services["bearer"].check(bearer_request)

            def dpop(name: str) -> Callable[[], object]:
                def run() -> object:
                    return services[name].check(next(cursors[name]))

                return run

            def proof_only() -> object:
                proof = only[proof_cursor[0] % len(only)]
                proof_cursor[0] += 1
                return binding.verify_dpop_proof(
                    proof,
                    method="GET",
                    htu=htu,
                    access_token=bound_token,
                    now=time.time(),
                    rules=rules,
                    key_cache=proof_keys,
                )

            def redis_set() -> object:
                set_cursor[0] += 1
                return replay_cache.first_use(f"bench:{set_cursor[0]}", 300)

            variants = {
                "bearer": bearer,
                "dpop-memory": dpop("dpop-memory"),
                "dpop-redis": dpop("dpop-redis"),
                "proof-only": proof_only,
                "redis-set": redis_set,
            }
            # Warm up (and check every variant decides as expected), one round's worth.
            for name, fn in variants.items():
                for _ in range(args.calls):
                    result = fn()
                    if name not in ("proof-only", "redis-set"):
                        assert result.allowed, (name, result.reason)  # type: ignore[attr-defined]
            best_cpu = {name: float("inf") for name in variants}
            best_wall = dict(best_cpu)
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    wall, cpu = _wall_and_cpu(fn, args.calls)
                    best_cpu[name] = min(best_cpu[name], cpu)
                    best_wall[name] = min(best_wall[name], wall)
            replayed = services["dpop-redis"].check(requests["dpop-redis"][0])
            assert replayed.reason == "dpop_proof_replayed", replayed.reason
            for service in services.values():
                service.engine.close()

    base = best_cpu["bearer"]
    print(
        f"us per Check, best of {args.rounds} rounds x {args.calls} calls, interleaved; "
        f"proofs {args.proof_alg}, token RS256 (cached)"
    )
    print(f"{'variant':<12} {'CPU us':>8} {'x bearer':>9} {'wall us':>8}")
    for name in variants:
        print(
            f"{name:<12} {best_cpu[name] * 1e6:8.1f} {best_cpu[name] / base:9.2f} "
            f"{best_wall[name] * 1e6:8.1f}"
        )


if __name__ == "__main__":
    main()
