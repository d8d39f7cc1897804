"""Does a Check cost more when the configuration has more policies? In process, no network.

For N = 1, 10, 100, 1000 ALLOW policies (plus 3 DENY), a Check that only the last ALLOW policy
matches, in two shapes:
  hosts  every ALLOW policy on its own host and path prefix (a gateway for many APIs)
  paths  one host, every ALLOW policy on its own path prefix (one API, many routes)
Each ALLOW policy also names a method (GET/POST/PUT/DELETE in turn), the token's issuer and a
group claim. Measured, indexed evaluation against linear (PolicySet(..., indexed=False)), each
pair interleaved round by round, best CPU per call of --rounds:
  evaluate  PolicySet.evaluate on the request's attributes and the verified identity
  check     the whole in-process Check: CheckRequest -> attributes -> token (cached) ->
            evaluate -> CheckResponse, as the gRPC door runs it (check_loop.py's "door")
  load      building the PolicySet from the parsed configuration (once per load or reload)
Prints a table and the ratios N=1000 / N=1. The target (issue 9): check at N=1000 <= 2x N=1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from authz_server.config import load as config
from authz_server.doors.grpc import AuthorizationServicer, to_attributes
from authz_server.policy.compile import PolicySet
from authz_server.server import AuthzServer
from authz_server.tools import devkeys
from bench.harness.inprocess import AUDIENCE, ISSUER

SIZES = (1, 10, 100, 1000)
METHODS = ("GET", "POST", "PUT", "DELETE")
SHAPES = ("hosts", "paths")


def _host(shape: str, i: int) -> str:
    return f"svc-{i}.bench" if shape == "hosts" else "api.bench"


def config_text(shape: str, count: int) -> str:
    """A configuration with 3 DENY policies, then ``count`` ALLOW policies of ``shape``."""
    policies: list[dict[str, Any]] = [
        {"name": "deny-internal", "action": "DENY", "rules": [_to(paths=["/internal/*"])]},
        {"name": "deny-blocked", "action": "DENY", "rules": [_to(hosts=["blocked.bench"])]},
        {
            "name": "deny-banned",
            "action": "DENY",
            "rules": [{"when": [{"key": "request.auth.claims[banned]", "values": ["true"]}]}],
        },
    ]
    for i in range(count):
        rule = {
            "from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}],
            **_to(hosts=[_host(shape, i)], methods=[METHODS[i % 4]], paths=[f"/svc-{i}/*"]),
            "when": [{"key": "request.auth.claims[groups]", "values": ["dev", "admin"]}],
        }
        policies.append({"name": f"allow-{i}", "rules": [rule]})
    document = {
        "apiVersion": "authz-server/v1",
        "kind": "AuthzConfig",
        "providers": [
            {
                "name": "main",
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "jwksFile": "jwks.json",
                "outputClaimToHeaders": [{"header": "x-user", "claim": "sub"}],
            }
        ],
        "policies": policies,
    }
    return json.dumps(document)  # JSON is YAML


def _to(**operation: list[str]) -> dict[str, Any]:
    return {"to": [{"operation": operation}]}


def check_request(key: Any, shape: str, count: int) -> Any:
    """A CheckRequest as Envoy sends it, for the last ALLOW policy, with a valid token."""
    last = count - 1
    token = key.sign(
        {
            "iss": ISSUER,
            "sub": "alice",
            "aud": AUDIENCE,
            "exp": int(time.time()) + 3600,
            "groups": ["dev"],
        }
    )
    ctx = attribute_context_pb2.AttributeContext
    http = ctx.HttpRequest(
        method=METHODS[last % 4],
        host=_host(shape, last),
        path=f"/svc-{last}/orders?page=2",
        headers={"authorization": f"Bearer {token}", "user-agent": "bench", "x-request-id": "abc"},
    )
    return external_auth_pb2.CheckRequest(attributes=ctx(request=ctx.Request(http=http)))


def _calls_for(fn: Callable[[], object], budget: float) -> int:
    """How many calls of ``fn`` fit in about ``budget`` CPU seconds."""
    cpu0 = time.process_time()
    for _ in range(5):
        fn()
    per_call = max((time.process_time() - cpu0) / 5, 1e-7)
    return max(5, min(20_000, int(budget / per_call)))


def interleaved(
    variants: dict[str, Callable[[], object]], rounds: int, budget: float
) -> dict[str, float]:
    """Best CPU seconds per call of each variant; every round runs each once, in turn."""
    calls = {name: _calls_for(fn, budget) for name, fn in variants.items()}
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, fn in variants.items():
            cpu0 = time.process_time()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.process_time() - cpu0) / calls[name])
    return best


class Scenario:
    """One running in-process server for ``count`` policies of ``shape``, with the calls to time."""

    def __init__(self, key: Any, shape: str, count: int, tmp: Path) -> None:
        folder = tmp / f"{shape}-{count}"
        folder.mkdir()
        (folder / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
        (folder / "config.yaml").write_text(config_text(shape, count))
        self.specs = config.load(folder / "config.yaml").policies
        self.server = AuthzServer(
            config.load(folder / "config.yaml"), listen="127.0.0.1:0", http_listen="127.0.0.1:0"
        )
        self.server.start()  # loads the key set from the file
        engine = self.server.engine
        self.indexed = PolicySet(self.specs)
        self.linear = PolicySet(self.specs, indexed=False)
        self.request = check_request(key, shape, count)
        self.attributes = to_attributes(self.request)
        found = engine.extractor.extract(self.attributes)[0]
        self.identity = engine.verifier.verify(found.token, found.providers, found.scope)
        self.servicer = AuthorizationServicer(self.server.service)
        for policies in (self.indexed, self.linear):
            engine.policies = policies
            decision = self.server.service.check(to_attributes(self.request))
            assert decision.allowed and decision.policy == f"allow-{count - 1}", decision
            assert self.servicer.Check(self.request, None).status.code == 0

    def evaluate(self, policies: PolicySet) -> Callable[[], object]:
        return lambda: policies.evaluate(self.attributes, self.identity)

    def check(self, policies: PolicySet) -> Callable[[], object]:
        engine, servicer, request = self.server.engine, self.servicer, self.request

        def check() -> object:
            engine.policies = policies  # the same cost for both variants
            return servicer.Check(request, None)

        return check

    def load(self, *, indexed: bool) -> Callable[[], object]:
        return lambda: PolicySet(self.specs, indexed=indexed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.05, help="CPU seconds per variant")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = parser.parse_args()

    key = devkeys.generate_key("RSA", kid="bench-1")
    columns = ["evaluate indexed", "evaluate linear", "check indexed", "check linear"]
    with tempfile.TemporaryDirectory() as tmp:
        scenarios = {
            (shape, n): Scenario(key, shape, n, Path(tmp)) for shape in SHAPES for n in args.sizes
        }
        try:
            variants: dict[str, Callable[[], object]] = {}
            for (shape, n), scenario in scenarios.items():
                variants[f"{shape} {n} evaluate indexed"] = scenario.evaluate(scenario.indexed)
                variants[f"{shape} {n} evaluate linear"] = scenario.evaluate(scenario.linear)
                variants[f"{shape} {n} check indexed"] = scenario.check(scenario.indexed)
                variants[f"{shape} {n} check linear"] = scenario.check(scenario.linear)
            # Every size in every round, so the ratios compare like with like on a shared machine.
            best = interleaved(variants, args.rounds, args.budget)
            loads = {
                f"{shape} {n} load {kind}": scenario.load(indexed=kind == "indexed")
                for (shape, n), scenario in scenarios.items()
                for kind in ("indexed", "linear")
            }
            best.update(interleaved(loads, max(1, args.rounds // 2), args.budget))
        finally:
            for scenario in scenarios.values():
                scenario.server.stop(grace=1)

    print(f"CPU per call, best of {args.rounds} interleaved rounds (us); load in ms")
    print(f"{'shape':<6} {'N':>5} " + " ".join(f"{c:>17}" for c in columns) + "  load idx/lin ms")
    for shape, n in scenarios:
        cells = " ".join(f"{best[f'{shape} {n} {c}'] * 1e6:17.1f}" for c in columns)
        load = " /".join(
            f"{best[f'{shape} {n} load {k}'] * 1e3:7.1f}" for k in ("indexed", "linear")
        )
        print(f"{shape:<6} {n:>5} {cells}  {load}")
    low, high = min(args.sizes), max(args.sizes)
    print(f"\nratios N={high} / N={low}")
    for shape in SHAPES:
        ratios = " ".join(
            f"{c}: {best[f'{shape} {high} {c}'] / best[f'{shape} {low} {c}']:6.2f}x"
            for c in columns
        )
        print(f"{shape:<6} {ratios}")
    print("\ntarget: check indexed at N=1000 <= 2.00x N=1")


if __name__ == "__main__":
    main()
