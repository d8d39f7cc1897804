"""What observability costs a Check, and how long a reload takes.

Per-Check CPU (time.process_time, best of --rounds rounds of --calls calls; every round runs
each variant once, in turn, since the machine is noisy) of AuthorizationService.check for an
allowed RS256 request whose token is already in the verified-token cache, over one engine:
  bare         no metrics, no decision log
  metrics      Metrics on a fresh CollectorRegistry (histogram + counter, bound children)
  metrics+log  metrics and the decision log (sampleRate 1), JSON lines through a
               StreamHandler on an open /dev/null
  metrics+log10  the same with sampleRate 0.1
  log only     the decision log (sampleRate 1) without metrics, to split the costs
Each is printed in µs CPU per Check with its overhead over `bare`.

Reload latency (wall time, median and best of --reloads applies, on a started AuthzServer):
  config.load      reading and validating the configuration file
  apply: policy    AuthzServer.apply when only a policy changed (every key cache is kept)
  apply: +provider AuthzServer.apply adding a provider whose JWKS a local HTTP server serves
                   (its keys are fetched before the swap)
  apply: -provider AuthzServer.apply removing that provider (its refresher thread is stopped)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.config.load import Settings
from authz_server.config.specs import DecisionLogSpec
from authz_server.ops.log import DecisionLog, JsonFormatter
from authz_server.ops.metrics import Metrics
from authz_server.server import AuthzServer
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from bench.harness import endpoints
from bench.harness.inprocess import AUDIENCE, ISSUER, Variant, bench_config, interleaved

PARTNER = "https://partner.bench"
PARTNER_PROVIDER = """
  - name: partner
    issuer: {issuer}
    audiences: [{audience}]
    jwksUri: {url}
"""


def write(directory: Path, name: str, paths: list[str], extra: str = "") -> Path:
    path = directory / name
    path.write_text(bench_config(extra_providers=extra, paths=paths))
    return path


def token_for(key: devkeys.SigningKey, issuer: str = ISSUER) -> str:
    now = int(time.time())
    claims = {"iss": issuer, "sub": "alice", "aud": AUDIENCE, "iat": now, "exp": now + 3600}
    return key.sign({**claims, "groups": ["dev"]})


def null_logger(devnull: Any) -> logging.Logger:
    """The decision logger of a real deployment, writing JSON lines to /dev/null."""
    handler = logging.StreamHandler(devnull)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("bench.decision")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def check_cost(tmp: Path, key: devkeys.SigningKey, args: argparse.Namespace) -> None:
    engine = Engine.build(config.load(write(tmp, "check.yaml", ["/api/*"])))
    for cache in engine.caches.values():
        assert cache.refresh()
    headers = {
        "authorization": f"Bearer {token_for(key)}",
        "user-agent": "bench",
        "x-request-id": "abc",
    }

    def make() -> RequestAttributes:
        return RequestAttributes(
            method="GET",
            host="api.bench",
            path="/api/orders?page=2",
            headers=headers,
            source_ip="10.0.0.1",
        )

    with open(os.devnull, "w") as devnull:
        logger = null_logger(devnull)
        every, tenth = DecisionLogSpec(), DecisionLogSpec(sample_rate=0.1)
        services = {
            "bare": AuthorizationService(engine),
            "metrics": AuthorizationService(engine, metrics=Metrics(CollectorRegistry())),
            "metrics+log": AuthorizationService(
                engine,
                metrics=Metrics(CollectorRegistry()),
                decision_log=DecisionLog(every, logger),
            ),
            "metrics+log10": AuthorizationService(
                engine,
                metrics=Metrics(CollectorRegistry()),
                decision_log=DecisionLog(tenth, logger),
            ),
            "log only": AuthorizationService(engine, decision_log=DecisionLog(every, logger)),
        }
        for service in services.values():
            assert service.check(make()).allowed  # also warms the token cache
        hits = engine.token_cache.hits
        variants: list[Variant] = [(name, bound(s.check, make)) for name, s in services.items()]
        best = interleaved(variants, args.calls, args.rounds)
        assert engine.token_cache.misses == 1 and engine.token_cache.hits > hits

    metrics = services["metrics"].metrics
    assert metrics is not None
    counted = metrics.registry.get_sample_value(
        "authz_checks_total",
        {
            "decision": "allow",
            "reason": "allowed",
            "provider": "main",
            "policy": "read",
            "door": "grpc",
        },
    )
    assert counted == 1 + args.calls * args.rounds, counted

    print(
        f"Check CPU, allowed RS256, token cache warm: best of {args.rounds} rounds x "
        f"{args.calls} calls, interleaved"
    )
    print(f"{'variant':<14} {'us/Check':>9} {'overhead':>9} {'':>7}")
    base = best["bare"] * 1e6
    for name, seconds in best.items():
        us = seconds * 1e6
        print(f"{name:<14} {us:9.2f} {us - base:+9.2f} {100 * (us - base) / base:+6.1f}%")


def bound(
    check: Callable[[RequestAttributes], object], make: Callable[[], RequestAttributes]
) -> Callable[[], object]:
    return lambda: check(make())


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def reload_cost(tmp: Path, key: devkeys.SigningKey, args: argparse.Namespace) -> None:
    partner_key = devkeys.generate_key("RSA", kid="bench-partner")
    jwks = json.dumps(devkeys.jwks(partner_key)).encode()
    with endpoints.serving(lambda: jwks) as jwks_endpoint:
        _reload_cost(tmp, args, partner_key, f"{jwks_endpoint.url}/jwks.json")


def _reload_cost(
    tmp: Path, args: argparse.Namespace, partner_key: devkeys.SigningKey, url: str
) -> None:
    """Time config.load and AuthzServer.apply; the partner provider's keys are at `url`."""
    partner = PARTNER_PROVIDER.format(issuer=PARTNER, audience=AUDIENCE, url=url)

    path_a = write(tmp, "a.yaml", ["/api/*"])
    path_b = write(tmp, "b.yaml", ["/api/*", "/v2/*"])
    with_partner = config.load(write(tmp, "c.yaml", ["/api/*"], partner))
    policy_only: list[Settings] = [config.load(path_a), config.load(path_b)]
    server = AuthzServer(
        policy_only[0],
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        metrics=Metrics(CollectorRegistry()),
    )
    logging.getLogger("authz_server").setLevel(logging.WARNING)
    server.start()
    partner_token = token_for(partner_key, PARTNER)
    request = RequestAttributes(
        method="GET", path="/api/x", headers={"authorization": f"Bearer {partner_token}"}
    )
    try:
        loads = timed(lambda: config.load(path_b), args.reloads)
        flip = [0]

        def apply_policy() -> None:
            flip[0] ^= 1
            server.apply(policy_only[flip[0]])

        policy = timed(apply_policy, args.reloads)
        main_cache = server.engine.caches["main"]
        added: list[float] = []
        removed: list[float] = []
        for _ in range(args.reloads):
            added += timed(lambda: server.apply(with_partner), 1)
            # Verified at once: the keys were there at the swap (the policy then says no).
            assert server.service.check(request).principal == f"{PARTNER}/alice"
            assert server.engine.caches["main"] is main_cache
            removed += timed(lambda: server.apply(policy_only[0]), 1)
            assert server.service.check(request).reason == "invalid_issuer"
    finally:
        server.stop(grace=0)

    print(f"\nReload latency, wall ms over {args.reloads} reloads")
    print(f"{'step':<18} {'median':>8} {'best':>8}")
    for name, values in (
        ("config.load", loads),
        ("apply: policy", policy),
        ("apply: +provider", added),
        ("apply: -provider", removed),
    ):
        print(f"{name:<18} {statistics.median(values):8.2f} {min(values):8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reloads", type=int, default=20)
    args = parser.parse_args()
    if args.calls < 1 or args.rounds < 1 or args.reloads < 1:
        parser.error("--calls, --rounds and --reloads must be positive")
    key = devkeys.generate_key("RSA", kid="bench-main")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
        check_cost(tmp, key, args)
        reload_cost(tmp, key, args)


if __name__ == "__main__":
    main()
