"""The soak run: the processes, the load, and the timeline of changes made under it.

    JWKSServer (thread, http://127.0.0.1:<port>/jwks.json)  <-- the server fetches keys
    Load (asyncio) --HTTP/1.1--> Envoy --ext_authz (gRPC, or the HTTP door)--> authz-server
                                 Envoy --direct response 200 for an allowed request

The JWKS endpoint, Envoy and the server are the end-to-end tests' own helpers
(``tests/e2e/harness.py``); Envoy's bootstrap is the shipped one with a direct-response route
(``bench/harness/envoy_bootstrap.py``). Everything listens on 127.0.0.1, on ports picked at run
time, and every process is stopped by its PID at the end, whatever happens.

Timeline, as fractions of the run (each change waits for the one before it):

- 0.35 rotation: the IdP publishes k2 next to k1; once the server accepts a k2 token (a probe
  through Envoy), tokens signed by k1 and by k2 are both sent (both 200).
- 0.50 k1 retired: tokens signed by k1 stop; k1 leaves the key set; once the server refuses a
  k1 token, k1's tokens are sent again, to get 401.
- 0.65 reload: the configuration file is replaced (written aside, then renamed, as a
  ConfigMap update does) by one that also allows GET /invoices/* and refreshes keys on another
  schedule (so the provider's key cache is rebuilt too); the server's file watcher picks it up.
  GET /invoices is not sent from the rewrite until a probe gets 200, then sent to get 200.

A change that does not take effect within `EVENT_TIMEOUT_S` fails the run.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from bench.harness.envoy_bootstrap import bootstrap
from bench.soak import traffic
from bench.soak.load import Load, Recorder, probe
from bench.soak.samples import Sample, Sampler
from bench.soak.traffic import Idp, Mix, Phase
from tests.e2e.harness import (
    AuthzServerProcess,
    EnvoyProcess,
    JWKSServer,
    door_setup,
    free_port,
    http_request,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "bench" / "results"
EVENT_TIMEOUT_S = 20.0
ROTATE_AT, RETIRE_AT, RELOAD_AT = 0.35, 0.50, 0.65
# Each check the soak reads from Envoy's admin /stats (ext_authz outcomes).
ENVOY_STATS_PREFIX = "http.ingress_http.ext_authz."


@dataclass(frozen=True)
class SoakOptions:
    seconds: float = 300.0
    door: str = "grpc"
    rate: float = 500.0  # requests per second, all connections together
    connections: int = 16
    sample_interval: float = 1.0
    output: Path = RESULTS
    name: str = "soak"

    def __post_init__(self) -> None:
        if self.door not in ("grpc", "http"):
            raise ValueError(f"door must be grpc or http, not {self.door!r}")
        if self.seconds < 5 or self.sample_interval <= 0 or self.sample_interval > self.seconds:
            raise ValueError("seconds must be at least 5, sample_interval in (0, seconds]")


@dataclass
class Event:
    name: str
    what: str
    at_s: float  # when it was scheduled, seconds into the load
    started_s: float | None = None
    effective_s: float | None = None  # when the probe saw the change in force
    error: str | None = None

    @property
    def took_s(self) -> float | None:
        if self.started_s is None or self.effective_s is None:
            return None
        return self.effective_s - self.started_s


@dataclass
class ServerLog:
    lines: int = 0
    warnings: int = 0
    errors: int = 0
    tracebacks: int = 0


@dataclass
class SoakResult:
    options: SoakOptions
    started: str  # UTC, when the load began
    duration_s: float
    recorder: Recorder
    samples: list[Sample]
    events: list[Event]
    server_lost_at_s: float | None
    server_exit: int | None
    server_log: ServerLog
    jwks_fetches: int
    reloads: dict[str, float]  # authz_config_reloads_total by result
    envoy_stats: dict[str, int]
    workdir: Path | None = None  # the logs and configuration of the run


def config_text(jwks_url: str, *, reloaded: bool) -> str:
    """The server's configuration: before the reload, then after (GET /invoices allowed too,
    keys refreshed every 3s instead of 2s)."""
    paths = '["/orders/*", "/invoices/*"]' if reloaded else '["/orders/*"]'
    refresh = "3s" if reloaded else "2s"
    return f"""apiVersion: authz-server/v1
kind: AuthzConfig
server:
  tokenCache: {{maxEntries: {traffic.TOKEN_CACHE_ENTRIES}}}
providers:
  - name: idp
    issuer: {traffic.ISSUER}
    audiences: [{traffic.AUDIENCE}]
    jwksUri: {jwks_url}
    refreshInterval: {refresh}
    minRefreshInterval: 1s
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
policies:
  - name: members
    rules:
      - from: [{{source: {{requestPrincipals: ["{traffic.ISSUER}/*"]}}}}]
        to: [{{operation: {{methods: [GET], paths: {paths}}}}}]
        when: [{{key: "request.auth.claims[groups]", values: ["dev"]}}]
"""


def _replace_file(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` and rename it over ``path`` (readers never see half)."""
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(text)
    partial.replace(path)


def _metric(url: str, name: str) -> dict[str, float]:
    """{result label: value} of the samples of counter ``name`` on the side port."""
    _, _, body = http_request(f"{url}/metrics")
    values: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.partition("} ")
            values[labels.split('"')[1]] = float(value)
    return values


def _scan_log(path: Path) -> ServerLog:
    found = ServerLog()
    with path.open(errors="replace") as log:
        for line in log:
            found.lines += 1
            found.warnings += '"level": "WARNING"' in line
            found.errors += '"level": "ERROR"' in line or '"level": "CRITICAL"' in line
            found.tracebacks += "Traceback" in line
    return found


class _Timeline:
    """The changes of the run, made one after the other under the load."""

    def __init__(
        self,
        load: Load,
        idp: Idp,
        *,
        jwks: JWKSServer,
        config_path: Path,
        envoy_port: int,
        seconds: float,
    ) -> None:
        self.load, self.idp, self.jwks = load, idp, jwks
        self.config_path, self.envoy_port = config_path, envoy_port
        self.events = [
            Event("rotation", "IdP publishes k2 beside k1; k2 tokens sent once accepted",
                  ROTATE_AT * seconds),
            Event("k1 retired", "k1 tokens stop; k1 leaves the key set; then sent for 401",
                  RETIRE_AT * seconds),
            Event("reload", "config file replaced: /invoices allowed, key cache rebuilt",
                  RELOAD_AT * seconds),
        ]  # fmt: skip

    async def run(self, t0: float) -> None:
        steps: list[Callable[[], Awaitable[None]]] = [self._rotate, self._retire, self._reload]
        loop = asyncio.get_running_loop()
        for event, step in zip(self.events, steps, strict=True):
            delay = t0 + event.at_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            event.started_s = loop.time() - t0
            try:
                await step()
            except (TimeoutError, OSError) as error:
                event.error = f"{type(error).__name__}: {error}"
                return  # the later changes build on this one
            event.effective_s = loop.time() - t0

    async def _until(self, request: bytes, want: int) -> None:
        await probe(self.envoy_port, request, want, EVENT_TIMEOUT_S)

    async def _rotate(self) -> None:
        self.jwks.set_jwks(self.idp.jwks("k1", "k2"))
        await self._until(self.idp.probe("valid", "k2"), 200)
        self.load.switch(Phase("k1+k2", signing=("k1", "k2"), invoices=403))

    async def _retire(self) -> None:
        self.load.switch(Phase("k2, k1 leaving", signing=("k2",), invoices=403))
        await self.load.drain()
        self.jwks.set_jwks(self.idp.jwks("k2"))
        await self._until(self.idp.probe("valid", "k1"), 401)
        self.load.switch(Phase("k2", signing=("k2",), invoices=403, retired=True))

    async def _reload(self) -> None:
        self.load.switch(replace(self.load.phase, name="k2, reloading", invoices=None))
        await self.load.drain()
        text = config_text(self.jwks.jwks_url, reloaded=True)
        await asyncio.to_thread(_replace_file, self.config_path, text)
        await self._until(self.idp.probe("invoices", "k2"), 200)
        self.load.switch(replace(self.load.phase, name="k2, reloaded", invoices=200))


async def _drive(
    options: SoakOptions,
    idp: Idp,
    *,
    jwks: JWKSServer,
    server: AuthzServerProcess,
    config_path: Path,
    envoy_port: int,
    recorder: Recorder,
) -> tuple[list[Event], Sampler]:
    loop = asyncio.get_running_loop()
    t0 = loop.time()  # asyncio's clock is time.monotonic, the sampler's too
    sampler = Sampler(server.pid, options.sample_interval, t0).start()
    load = Load(
        envoy_port,
        Mix(idp),
        recorder,
        phase=traffic.START,
        connections=options.connections,
        rate=options.rate,
        t0=t0,
    )
    timeline = _Timeline(
        load,
        idp,
        jwks=jwks,
        config_path=config_path,
        envoy_port=envoy_port,
        seconds=options.seconds,
    )
    sending = asyncio.create_task(load.run())
    try:
        changes = asyncio.create_task(timeline.run(t0))
        done, _ = await asyncio.wait({changes, sending}, timeout=options.seconds)
        if sending in done:  # a worker raised: nothing else can be trusted
            await sending
        if changes in done:
            await changes
        else:
            changes.cancel()
            await asyncio.gather(changes, return_exceptions=True)
            for event in timeline.events:
                if event.effective_s is None and event.error is None:
                    event.error = "the run ended first"
        remaining = t0 + options.seconds - loop.time()
        if remaining > 0:
            await asyncio.sleep(remaining)
    finally:
        load.stop()
        await asyncio.wait_for(sending, timeout=10)
        sampler.stop()
    return timeline.events, sampler


def run_soak(options: SoakOptions) -> SoakResult:
    """Run the soak of ``options``; return everything it measured (the verdicts are the
    report's to give). Raises RuntimeError/AssertionError when a process does not start."""
    workdir = Path(tempfile.mkdtemp(prefix="authz-soak-"))
    idp = Idp.create(time.time(), lifetime_s=options.seconds + 3600)
    recorder = Recorder(options.sample_interval)
    config_path = workdir / "config.yaml"
    grpc_port, side_port = free_port(), free_port()
    door_port = grpc_port if options.door == "grpc" else free_port()
    server_args, _ = door_setup(options.door, door_port)
    listen_port, admin_port = free_port(), free_port()
    envoy_yaml = bootstrap(
        "ext_authz" if options.door == "grpc" else "ext_authz_http",
        listen_port=listen_port,
        admin_port=admin_port,
        authz_address=f"127.0.0.1:{door_port}",
        upstream_headers=["x-user"],
    )
    with JWKSServer(idp.jwks("k1")) as jwks:
        config_path.write_text(config_text(jwks.jwks_url, reloaded=False))
        server = AuthzServerProcess(
            config_path,
            grpc_port,
            side_port,
            server_args,
            log_path=workdir / "server.log",
            ready_path="/readyz",
        )
        envoy = EnvoyProcess(envoy_yaml, admin_port, workdir / "envoy.log")
        server_exit: int | None = None
        try:
            # Side by side: each waits for its own readiness, neither needs the other's.
            with ThreadPoolExecutor(2) as pool:
                for starting in [pool.submit(server.start), pool.submit(envoy.start)]:
                    starting.result()
            started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            begun = time.monotonic()
            events, sampler = asyncio.run(
                _drive(
                    options,
                    idp,
                    jwks=jwks,
                    server=server,
                    config_path=config_path,
                    envoy_port=listen_port,
                    recorder=recorder,
                )
            )
            duration = time.monotonic() - begun
            reloads = _metric(server.http_url, "authz_config_reloads_total")
            envoy_stats = envoy.stats(ENVOY_STATS_PREFIX)
            fetches = jwks.fetch_count()
        finally:
            envoy.stop()
            server_exit = server.stop()
    return SoakResult(
        options=options,
        started=started,
        duration_s=duration,
        recorder=recorder,
        samples=sampler.samples,
        events=events,
        server_lost_at_s=sampler.lost_at_s,
        server_exit=server_exit,
        server_log=_scan_log(workdir / "server.log"),
        jwks_fetches=fetches,
        reloads=reloads,
        envoy_stats=envoy_stats,
        workdir=workdir,
    )


def discard_workdir(result: SoakResult) -> None:
    """Remove the run's working directory (logs, configuration)."""
    if result.workdir is not None:
        shutil.rmtree(result.workdir, ignore_errors=True)
        result.workdir = None
