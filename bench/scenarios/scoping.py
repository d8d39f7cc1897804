"""What does scoping cost a Check when one server guards many workloads? (issue 13)

Three configurations, all Istio YAML with one mesh-wide RequestAuthentication (inline jwks):
  none   no workloads: 20 AuthorizationPolicies (3 DENY, 17 ALLOW), every one everywhere
  one    1 declared workload, its 20 policies selected by its labels
  fifty  50 declared workloads in 5 namespaces, 20 policies each (1,000 in all), each
         selecting its own workload by labels
The request (GET, a cached RS256 token) is for workload w0 of ``one`` and w37 of ``fifty``
(of ``none``: the same policies) and is allowed by the last ALLOW policy of its workload.
Each workload can be recognised three ways, so each is measured: by a route's context
extension, by the destination principal (an mTLS sidecar's SPIFFE ID), by the host.

in process  AuthorizationService.check on RequestAttributes built from fixed fields for every
            call (a reused RequestAttributes would keep the host forms it computed once): CPU
            per call; each round runs every variant in 10 short turns, one after the other;
            the ratio fifty / one per round and its median over the rounds
server      ``one`` and ``fifty`` each in its own ``authz-server serve``; sequential Checks
            over loopback gRPC from here (context extension), the server's own CPU
            (/proc/PID/stat) per Check, the two servers in 10 turns each round; median ratio

Target (issue 13): fifty <= 1.2x one. ``python -m bench.scenarios.scoping`` prints the
section; ``--write FILE`` also puts it into FILE (bench/results/latest.md) in place of its
previous copy. ``make bench`` (bench/__main__.py) runs it after the Envoy rounds, into latest.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from bench.harness.inprocess import AUDIENCE, ISSUER
from bench.harness.procs import Proc, Stack, free_port, http_status

WORKLOADS = 50
NAMESPACES = 5
POLICIES = 20  # per workload: DENY_POLICIES DENY, the rest ALLOW
DENY_POLICIES = 3
TARGET = 1.2
SLICES = 10  # turns per variant per round
SECTION = "## Scoping (issue 13)"
SOURCES = ("context extension", "destination principal", "host")
METHODS = ("GET", "POST", "PUT", "DELETE")


def _namespace(workload: int) -> str:
    return f"ns-{workload % NAMESPACES}"


def _principal(workload: int) -> str:
    return f"spiffe://cluster.local/ns/{_namespace(workload)}/sa/w{workload}"


def _istio(kind: str, name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _policies(workload: int, *, selector: bool) -> list[dict[str, Any]]:
    """The 20 policies of ``workload``: DENYs first, then ALLOWs on their own path prefix and
    method each, for the issuer's callers in the right groups."""
    namespace = _namespace(workload)
    scope = {"selector": {"matchLabels": {"app": f"w{workload}"}}} if selector else {}
    denies = [
        {"rules": [{"to": [{"operation": {"paths": ["/internal/*"]}}]}]},
        {"rules": [{"when": [{"key": "request.auth.claims[banned]", "values": ["true"]}]}]},
        {"rules": [{"from": [{"source": {"remoteIpBlocks": ["192.0.2.0/24"]}}]}]},
    ]
    documents = [
        _istio(
            "AuthorizationPolicy",
            f"w{workload}-deny-{i}",
            namespace,
            {**scope, "action": "DENY", **rules},
        )
        for i, rules in enumerate(denies[:DENY_POLICIES])
    ]
    for i in range(POLICIES - DENY_POLICIES):
        rule = {
            "from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}],
            "to": [{"operation": {"methods": [METHODS[i % 4]], "paths": [f"/api/v{i}/*"]}}],
            "when": [{"key": "request.auth.claims[groups]", "values": ["dev", "admin"]}],
        }
        documents.append(
            _istio(
                "AuthorizationPolicy",
                f"w{workload}-allow-{i}",
                namespace,
                {**scope, "rules": [rule]},
            )
        )
    return documents


def config_text(workloads: int, jwks: str) -> str:
    """Istio YAML for ``workloads`` declared workloads of 20 policies each; 0: no workloads,
    20 policies applying everywhere. ``jwks``: the issuer's keys (a JWKS document)."""
    documents: list[dict[str, Any]] = []
    if workloads:
        documents.append(
            {
                "apiVersion": "authz-server/v1",
                "kind": "AuthzConfig",
                "workloads": [
                    {
                        "name": f"w{w}",
                        "namespace": _namespace(w),
                        "labels": {"app": f"w{w}"},
                        "contextExtensions": {"workload": f"w{w}"},
                        "destinationPrincipals": [_principal(w)],
                        "hosts": [f"w{w}.bench"],
                    }
                    for w in range(workloads)
                ],
            }
        )
    documents.append(
        _istio(
            "RequestAuthentication",
            "idp",
            "istio-system",
            {"jwtRules": [{"issuer": ISSUER, "audiences": [AUDIENCE], "jwks": jwks}]},
        )
    )
    for w in range(max(workloads, 1)):
        documents += _policies(w, selector=workloads > 0)
    return "\n---\n".join(json.dumps(d) for d in documents)  # JSON is YAML


LAST_ALLOW = POLICIES - DENY_POLICIES - 1


def request_fields(workload: int, source: str, token: str) -> dict[str, Any]:
    """RequestAttributes fields of the request for ``workload``, recognised by ``source``."""
    fields: dict[str, Any] = {
        "method": METHODS[LAST_ALLOW % 4],
        "host": "api.bench",
        "path": f"/api/v{LAST_ALLOW}/orders?page=2",
        "headers": {"authorization": f"Bearer {token}", "user-agent": "bench"},
        "source_ip": "10.0.0.7",
    }
    if source == "context extension":
        fields["context_extensions"] = {"workload": f"w{workload}"}
    elif source == "destination principal":
        fields["destination_principal"] = _principal(workload)
    else:
        fields["host"] = f"w{workload}.bench"
    return fields


def check_request(workload: int, token: str) -> Any:
    """The same request as Envoy sends it, the workload in a context extension."""
    fields = request_fields(workload, "context extension", token)
    ctx = attribute_context_pb2.AttributeContext
    http = ctx.HttpRequest(
        method=fields["method"], host=fields["host"], path=fields["path"], headers=fields["headers"]
    )
    return external_auth_pb2.CheckRequest(
        attributes=ctx(
            request=ctx.Request(http=http), context_extensions=fields["context_extensions"]
        )
    )


@dataclass
class Results:
    rounds: int
    per_call_us: dict[str, list[float]] = field(default_factory=dict)  # variant -> per round
    server_us: dict[str, list[float]] = field(default_factory=dict)  # config -> per round
    wall_s: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after


def _service(folder: Path, workloads: int, jwks: str) -> AuthorizationService:
    folder.mkdir()
    (folder / "config.yaml").write_text(config_text(workloads, jwks))
    engine = Engine.build(config.load(folder / "config.yaml"))
    for cache in engine.caches.values():
        if not cache.refresh():
            raise RuntimeError(f"{folder.name}: no keys: {cache.last_error}")
    return AuthorizationService(engine)


def _calls_for(fn: Callable[[], object], budget: float) -> int:
    cpu0 = time.process_time()
    for _ in range(20):
        fn()
    per_call = max((time.process_time() - cpu0) / 20, 1e-7)
    return max(100, int(budget / per_call))


def measure_in_process(tmp: Path, token: str, jwks: str, rounds: int, budget: float) -> Results:
    services = {
        "none": _service(tmp / "none", 0, jwks),
        "one": _service(tmp / "one", 1, jwks),
        "fifty": _service(tmp / "fifty", WORKLOADS, jwks),
    }
    targets = {"none": 0, "one": 0, "fifty": 37}
    variants: dict[str, Callable[[], object]] = {}
    for name, service in services.items():
        for source in SOURCES if name != "none" else SOURCES[:1]:
            fields = request_fields(targets[name], source, token)
            decision = service.check(RequestAttributes(**fields))
            expected = f"{_namespace(targets[name])}/w{targets[name]}-allow-{LAST_ALLOW}"
            if not decision.allowed or decision.policy != expected:
                raise RuntimeError(f"{name} by {source}: {decision.status} {decision.reason}")

            def call(
                service: AuthorizationService = service, fields: dict[str, Any] = fields
            ) -> object:
                return service.check(RequestAttributes(**fields))

            variants[f"{name} {source}" if name != "none" else "none"] = call
    # Each round runs every variant in SLICES short turns, so a busy moment of the shared
    # machine falls on all of them alike rather than on one variant's whole turn.
    calls = {name: max(10, _calls_for(fn, budget) // SLICES) for name, fn in variants.items()}
    results = Results(rounds, {name: [] for name in variants})
    for number in range(rounds):
        order = list(variants) if number % 2 == 0 else list(reversed(variants))
        spent = dict.fromkeys(variants, 0.0)
        for _ in range(SLICES):
            for name in order:
                fn, n = variants[name], calls[name]
                cpu0 = time.process_time()
                for _ in range(n):
                    fn()
                spent[name] += time.process_time() - cpu0
        for name in variants:
            results.per_call_us[name].append(spent[name] / (calls[name] * SLICES) * 1e6)
    return results


def measure_servers(
    tmp: Path, token: str, results: Results, *, calls: int, cpus: str | None
) -> None:
    """The running server's CPU per Check, ``one`` and ``fifty`` in turn each round."""
    with Stack() as stack:
        servers: dict[str, tuple[Proc, int]] = {}
        for name in ("one", "fifty"):
            grpc_port, http_port = free_port(), free_port()
            argv = [sys.executable, "-m", "authz_server", "serve"]
            argv += ["--config", str(tmp / name / "config.yaml"), "--log-level", "WARNING"]
            argv += [
                "--listen",
                f"127.0.0.1:{grpc_port}",
                "--metrics-listen",
                f"127.0.0.1:{http_port}",
            ]
            proc = stack.start(Proc(f"scoping-{name}", argv, tmp / f"{name}.log", cpus))
            servers[name] = (proc, grpc_port)
            proc.wait_ready(
                lambda port=http_port: http_status(f"http://127.0.0.1:{port}/readyz") == 200
            )
        channels = {
            name: grpc.insecure_channel(f"127.0.0.1:{port}") for name, (_, port) in servers.items()
        }
        try:
            stubs = {
                name: external_auth_pb2_grpc.AuthorizationStub(ch) for name, ch in channels.items()
            }
            requests = {"one": check_request(0, token), "fifty": check_request(37, token)}
            for name, stub in stubs.items():
                answer = stub.Check(requests[name], timeout=5)
                if answer.status.code != 0:
                    raise RuntimeError(f"server {name}: the request was not allowed: {answer}")
                for _ in range(calls // 4):  # warm up: connection, caches
                    stub.Check(requests[name], timeout=5)
            results.server_us = {name: [] for name in servers}
            for number in range(results.rounds):
                order = ["one", "fifty"] if number % 2 == 0 else ["fifty", "one"]
                spent = dict.fromkeys(order, 0.0)
                for _ in range(SLICES):
                    for name in order:
                        proc, stub, request = servers[name][0], stubs[name], requests[name]
                        before = proc.cpu_seconds()
                        for _ in range(calls // SLICES):
                            stub.Check(request, timeout=5)
                        spent[name] += proc.cpu_seconds() - before
                for name in order:
                    per_call = spent[name] / (calls // SLICES * SLICES)
                    results.server_us[name].append(per_call * 1e6)
        finally:
            for channel in channels.values():
                channel.close()


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True) if y]


def _ratio_text(ratios: list[float]) -> str:
    return f"{_median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})"


def _verdict(ratios: list[float]) -> str:
    return "**met**" if _median(ratios) <= TARGET else "**missed**"


def _commit() -> str:
    done = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "?"


def render(results: Results, *, command: str, standalone: bool = False) -> list[str]:
    """The markdown section."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"`{command}` on {now}, {results.wall_s:.0f} s, commit {_commit()}, 1-min load average "
        f"{results.load[0]:.1f} before and {results.load[1]:.1f} after"
        + (" (the rest of this file comes from the last `make bench`)" if standalone else "")
        + f". Per-Check CPU with {WORKLOADS} workloads "
        f"x {POLICIES} Istio AuthorizationPolicies each (1,000 in all, each selecting its "
        f"workload by labels) against 1 workload with its {POLICIES}; the request allowed by "
        "the last ALLOW policy of its workload, with a cached RS256 token. Medians over "
        f"{results.rounds} rounds (min-max), each running every variant in {SLICES} short "
        "turns, one after the other; ratios are the medians of each round's pair.",
        "",
        "| measured | 1 workload µs | 50 workloads µs | 50 ÷ 1 | verdict (≤ 1.2x) |",
        "|---|---|---|---|---|",
    ]
    for source in SOURCES:
        one, fifty = results.per_call_us[f"one {source}"], results.per_call_us[f"fifty {source}"]
        ratios = _ratios(fifty, one)
        lines.append(
            f"| in process, recognised by {source} | {_median(one):.1f} | {_median(fifty):.1f} "
            f"| {_ratio_text(ratios)} | {_verdict(ratios)} |"
        )
    if results.server_us:
        one, fifty = results.server_us["one"], results.server_us["fifty"]
        ratios = _ratios(fifty, one)
        lines.append(
            f"| server process (`serve`, gRPC from a sequential client), context extension "
            f"| {_median(one):.0f} | {_median(fifty):.0f} | {_ratio_text(ratios)} "
            f"| {_verdict(ratios)} |"
        )
    none = results.per_call_us["none"]
    scoped = _ratios(results.per_call_us["one context extension"], none)
    lines += [
        "",
        f"- Scoping itself, in process: 1 declared workload ÷ the same {POLICIES} policies "
        f"with no workloads declared: {_ratio_text(scoped)} ({_median(none):.1f} µs without).",
        "- In process: `AuthorizationService.check` on `RequestAttributes` built from fixed "
        "fields for each call (bench/scenarios/scoping.py). Server: `authz-server serve "
        "--log-level WARNING`, its CPU from /proc/PID/stat over each round's Checks.",
        "",
    ]
    return lines


def replace_section(text: str, section: list[str]) -> str:
    """``text`` with its scoping section replaced by ``section`` (or ``section`` inserted
    before "## How it ran", or at the end)."""
    body = "\n".join(section).rstrip("\n") + "\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is not None:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        return "".join(lines[:start]) + body + "\n" + "".join(lines[end:])
    anchor = next((i for i, line in enumerate(lines) if line.startswith("## How it ran")), None)
    if anchor is None:
        return text.rstrip("\n") + "\n\n" + body
    return "".join(lines[:anchor]) + body + "\n" + "".join(lines[anchor:])


def run(
    *,
    rounds: int,
    budget: float,
    server_calls: int,
    cpus: str | None,
    command: str,
    standalone: bool = False,
) -> list[str]:
    """Measure and return the markdown section."""
    started, load_before = time.monotonic(), os.getloadavg()[0]
    key = devkeys.generate_key("RSA", kid="bench-1")
    token = key.sign(
        {"iss": ISSUER, "sub": "alice", "aud": AUDIENCE, "exp": int(time.time()) + 3600,
         "groups": ["dev"]}
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="authz-scoping-") as tmp_dir:
        tmp = Path(tmp_dir)
        results = measure_in_process(tmp, token, json.dumps(devkeys.jwks(key)), rounds, budget)
        if server_calls:
            measure_servers(tmp, token, results, calls=server_calls, cpus=cpus)
    results.wall_s = time.monotonic() - started
    results.load = (load_before, os.getloadavg()[0])
    return render(results, command=command, standalone=standalone)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget", type=float, default=0.1, help="CPU s per variant per round")
    parser.add_argument(
        "--server-calls", type=int, default=1000, help="Checks per server per round (0: skip)"
    )
    parser.add_argument("--cpus", help="pin the servers to these CPUs (taskset list)")
    parser.add_argument("--write", type=Path, help="put the section into this markdown file")
    args = parser.parse_args()
    section = run(
        rounds=args.rounds,
        budget=args.budget,
        server_calls=args.server_calls,
        cpus=args.cpus,
        command="python -m bench.scenarios.scoping",
        standalone=True,
    )
    print("\n".join(section))
    if args.write is not None:
        args.write.write_text(replace_section(args.write.read_text(), section))
        print(f"written into {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
