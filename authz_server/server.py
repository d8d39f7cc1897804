"""Process plumbing: the gRPC server (Authorization, Health, Reflection), the HTTP door when
it is open, the HTTP side port, key loading at start, and a graceful drain on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic.alias_generators import to_camel

from authz_server.config.load import Settings
from authz_server.config.specs import GrpcLimitsSpec, ServerSpec
from authz_server.doors.envoy_headers import door_unknown
from authz_server.doors.explain_api import EXPLAIN_SERVICE, ExplainServicer
from authz_server.doors.grpc import AUTHORIZATION_SERVICE, AuthorizationServicer
from authz_server.doors.http import HttpDoor
from authz_server.keys.keyset import JWKSCache
from authz_server.ops.log import DecisionLog
from authz_server.ops.metrics import CONTENT_TYPE, Metrics
from authz_server.ops.reload import ConfigReloader
from authz_server.ops.tls import CertificateReloader, TlsFiles
from authz_server.ops.tracing import Tracing  # the SDK is loaded only when tracing is on
from authz_server.policy.compile import unknown_attribute_uses
from authz_server.policy.workloads import http_door_gaps
from authz_server.service import AuthorizationService, Engine

log = logging.getLogger("authz_server.server")

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Stop (TERM, INT) and reload (HUP): taken synchronously with sigwait, see `serve`.
CONTROL_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
# The gRPC health "service" a liveness probe asks about: SERVING while the process runs.
LIVENESS_SERVICE = "liveness"


def _load_in_parallel(caches: list[JWKSCache]) -> None:
    """Load key sets side by side: start-up waits for the slowest provider, not the sum."""
    if caches:
        with futures.ThreadPoolExecutor(max_workers=min(8, len(caches))) as pool:
            list(pool.map(lambda cache: cache.refresh(), caches))


def grpc_options(limits: GrpcLimitsSpec) -> list[tuple[str, int]]:
    """The grpc server options for ``server.grpc``."""
    options = [
        ("grpc.max_receive_message_length", limits.max_receive_message_bytes),
        # Soft and hard limit alike: grpcio refuses at random between the two otherwise.
        ("grpc.max_metadata_size", limits.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", limits.max_metadata_bytes),
    ]
    if limits.max_concurrent_streams is not None:
        options.append(("grpc.max_concurrent_streams", limits.max_concurrent_streams))
    return options


# The server fields a reload cannot change: they shape listeners and thread pools made once.
RESTART_FIELDS = (
    "listen",
    "metrics_listen",
    "threads",
    "http_authz",
    "explain",
    "tls",
    "grpc",
    "tracing",
)


def restart_fields_changed(old: ServerSpec, new: ServerSpec) -> list[str]:
    """The fields of ``RESTART_FIELDS`` that differ from ``old`` in ``new``, as dotted paths
    of the configuration (``server.explain.enabled``), down to the leaf that changed."""

    def leaves(value: Any, path: str) -> dict[str, Any]:
        if isinstance(value, dict):
            return {
                k: v
                for key, item in value.items()
                for k, v in leaves(item, f"{path}.{key}").items()
            }
        return {path: value}

    before = old.model_dump(by_alias=True, include=set(RESTART_FIELDS))
    after = new.model_dump(by_alias=True, include=set(RESTART_FIELDS))
    changed: list[str] = []
    for name in RESTART_FIELDS:
        alias = to_camel(name)
        was, now = (
            leaves(before.get(alias), f"server.{alias}"),
            leaves(after.get(alias), f"server.{alias}"),
        )
        changed += [p for p in sorted(was.keys() | now.keys()) if was.get(p) != now.get(p)]
    return changed


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port). Raises ValueError naming ``what``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{what}: expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


class SidePortOwner(Protocol):
    """What the side port reports on: one server, or the supervisor of several."""

    def readiness_report(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the JSON body of /readyz)."""

    def exposition(self) -> bytes:
        """The text format for /metrics."""


class _SidePortHandler(BaseHTTPRequestHandler):
    server: SidePort
    timeout = 5  # an idle or slow client never holds a thread for long

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._reply(200, {"status": "ok"})
        elif path == "/readyz":
            ready, body = self.server.owner.readiness_report()
            self._reply(200 if ready else 503, body)
        elif path == "/metrics":
            data = self.server.owner.exposition()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._reply(404, {"error": "not_found"})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # NOTE: probes every few seconds would drown the logs.


class SidePort(ThreadingHTTPServer):
    """The HTTP side port: /healthz, /readyz, /metrics."""

    daemon_threads = True
    MAX_CONNECTIONS = 32  # probes and scrapers need a handful

    def __init__(self, address: tuple[str, int], owner: SidePortOwner) -> None:
        self.owner = owner
        self._slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)
        super().__init__(address, _SidePortHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the cap: refuse rather than pile up threads
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class AuthzServer:
    """The running server: the current engine, the gRPC server, the side port, the reloader."""

    def __init__(
        self,
        settings: Settings,
        *,
        listen: str,
        http_listen: str | None,
        config_path: Path | None = None,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
        share_readiness: Callable[[bool], bool] | None = None,
        http_authz_listen: str | None = None,
        tls: TlsFiles | None = None,
        share_config: Callable[[str], None] | None = None,
        tracing: bool = False,
        worker: int | None = None,
    ) -> None:
        """``tracing``: trace Checks even if server.tracing.enabled is false (``--tracing``);
        ``worker``: this process' number among ``--workers`` (the trace resource says it).
        ``http_listen`` None: no side port (a worker's supervisor serves it).
        ``http_authz_listen``: the HTTP door's address (default: server.httpAuthz.listen;
        neither: the door stays closed).
        ``tls``: the gRPC listener's certificate files (default: server.tls; neither:
        plaintext).
        ``share_readiness``: publishes this server's readiness and returns whether every
        server sharing the port is ready (workers), which is what health then reports.
        ``share_config``: told the digest of each configuration put in force (workers: the
        supervisor compares them)."""
        self.settings = settings
        # What the listeners and pools were made with: a reload that differs from it in a
        # restart field says so at every reload, until a restart.
        self.started_with = settings.server
        self.listen = listen
        self.http_listen = http_listen
        self.http_authz_listen = http_authz_listen or settings.server.http_authz.listen
        if tls is None and settings.server.tls is not None:
            tls = settings.server.tls.files()
        self.tls = tls
        self.certificates: CertificateReloader | None = None
        self.reuse_port = reuse_port
        self.share_readiness = share_readiness
        self.metrics = metrics or Metrics()
        engine = Engine.build(settings)
        self._watch_caches(engine)
        # One decision log (queue and writer thread) for the server's life; a reload swaps its spec.
        self.decision_log = DecisionLog(settings.server.decision_log)
        self.tracing: Tracing | None = None
        if tracing or settings.server.tracing.enabled:
            self.tracing = Tracing.from_environment(worker=worker)
            self.metrics.watch_tracing(self.tracing.counts_by_outcome)
        self.service = AuthorizationService(
            engine, metrics=self.metrics, decision_log=self.decision_log, tracing=self.tracing
        )
        self.metrics.watch_engine(lambda: self.service.engine)
        self.metrics.watch_decision_log(lambda: self.decision_log.dropped)
        self.metrics.config_loaded(settings.digest, reload=False)
        self.share_config = share_config
        if share_config is not None:
            share_config(settings.digest)
        self.reloader = (
            ConfigReloader(
                config_path, self.apply, on_rejected=lambda _e: self.metrics.config_rejected()
            )
            if config_path is not None
            else None
        )
        if self.reloader is not None:
            self.reloader.digest = settings.digest
        self.health = health.HealthServicer()
        self.grpc_server: grpc.Server | None = None
        self.explain_server: grpc.Server | None = None  # the Explain API on its own port
        self.side_port: SidePort | None = None
        self.http_door: HttpDoor | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.http_authz_port = 0
        self.explain_port = 0
        self._stopping = False
        self._stop_following = threading.Event()

    @property
    def engine(self) -> Engine:
        """The engine in force (the service holds it; a reload swaps it there)."""
        return self.service.engine

    def _watch_caches(self, engine: Engine) -> None:
        for cache in engine.caches.values():
            if self._update_health_listener not in cache.listeners:
                cache.listeners.append(self._update_health_listener)

    def _update_health_listener(self, _cache: object) -> None:
        self._update_health()

    def apply(self, settings: Settings) -> None:
        """Switch to ``settings``: new providers' keys are loaded first, then one assignment
        swaps the engine; Checks in flight finish on the old one."""
        old = self.service.engine
        engine = Engine.build(settings, previous=old)
        fresh = [c for c in engine.caches.values() if c.keyset is None]
        _load_in_parallel(fresh)
        for cache in fresh:
            cache.start()
        self._watch_caches(engine)
        ignored = restart_fields_changed(self.started_with, settings.server)
        self.decision_log.configure(settings.server.decision_log)
        self.service.engine = engine
        self.settings = settings
        old.close(successor=engine)
        kept = {id(c) for c in engine.caches.values()}
        for cache in old.caches.values():
            if id(cache) not in kept and self._update_health_listener in cache.listeners:
                cache.listeners.remove(self._update_health_listener)
        self._update_health()
        self._warn_http_door_gaps()
        self.metrics.config_loaded(settings.digest, reload=True)
        if self.share_config is not None:
            self.share_config(settings.digest)
        log.info(
            "configuration %s in force: %d provider(s), %d polic(ies)",
            settings.digest,
            len(settings.providers),
            len(settings.policies),
        )
        if ignored:
            log.warning(
                "%s changed but needs a restart: a reload cannot change it, the server keeps "
                "what it started with until it is restarted",
                ", ".join(ignored),
                extra={"fields": {"needs_restart": ignored}},
            )

    def _warn_http_door_gaps(self) -> None:
        """Through the HTTP door, a clause on an attribute it never receives fails closed:
        say so for each such clause, at every load."""
        if self.http_authz_listen is None:
            return
        unknown = door_unknown(self.settings.server.http_authz.attribute_headers)
        for line in unknown_attribute_uses(self.settings.policies, unknown):
            log.warning("%s", line)
        for line in http_door_gaps(self.settings.workloads):
            log.warning("%s", line)

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, {provider: "ready" | "no keys: <last error>"}); never ready while stopping."""
        providers = {
            name: "ready" if cache.keyset is not None else f"no keys: {cache.last_error}"
            for name, cache in self.engine.caches.items()
        }
        ready = not self._stopping and all(v == "ready" for v in providers.values())
        return ready, providers

    def readiness_report(self) -> tuple[bool, dict[str, Any]]:
        ready, providers = self.readiness()
        report: dict[str, Any] = {"ready": ready, "providers": providers}
        engine = self.engine
        if any(c.dpop_mode != "disabled" for c in engine.constraints.values()):
            # NOTE: said, not counted against readiness: without its replay cache only DPoP
            # requests fail (503), and a pod taken out of the Service would fail every request.
            report["replayCache"] = engine.replay_cache.ready() or "ready"
        return ready, report

    def exposition(self) -> bytes:
        return self.metrics.exposition()

    def _update_health(self) -> None:
        if self._stopping:
            return
        ready, _ = self.readiness()
        if self.share_readiness is not None:
            ready = self.share_readiness(ready)
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", AUTHORIZATION_SERVICE):
            self.health.set(name, status)
        # Liveness must not follow the IdP: a pod restarted for a dead IdP comes back keyless.
        self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    def start(self) -> None:
        """Load keys (a provider whose keys fail to load is reported, not fatal), then listen."""
        caches = list(self.engine.caches.values())
        _load_in_parallel(caches)
        for cache in caches:
            cache.start()
        self._update_health()

        threads = self.settings.server.threads
        if self.tls is not None:
            # Before listening: files gone since the configuration was read stop the start.
            self.certificates = CertificateReloader(self.tls)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="check"),
            options=[
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
                *grpc_options(self.settings.server.grpc),
            ],
        )
        server.add_generic_rpc_handlers((AuthorizationServicer(self.service).method_handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = [AUTHORIZATION_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME]
        explain = self.settings.server.explain
        if explain.enabled and explain.listen is None:
            ExplainServicer(lambda: self.service.engine).register(server)
            services.append(EXPLAIN_SERVICE)
        reflection.enable_server_reflection(services, server)
        if self.certificates is None:
            self.grpc_port = server.add_insecure_port(self.listen)
            doors = f"gRPC on {self.listen}"
        else:
            self.grpc_port = server.add_secure_port(self.listen, self.certificates.credentials())
            doors = (
                f"gRPC with {'mTLS' if self.certificates.files.mutual else 'TLS'} on "
                f"{self.listen} ({self.certificates.material.describe()})"
            )
        if self.grpc_port == 0 and not self.listen.startswith("unix:"):
            raise OSError(f"cannot listen on {self.listen}")
        server.start()
        self.grpc_server = server

        if explain.enabled:
            if explain.listen is not None:
                try:
                    self._start_explain_server(explain.listen)
                except BaseException:
                    server.stop(0)
                    raise
            doors += f", Explain API on {explain.listen or self.listen}"
        if self.http_authz_listen is not None:
            self.http_door = HttpDoor(
                self.service,
                self.settings.server.http_authz,
                listen=self.http_authz_listen,
                reuse_port=self.reuse_port,
                waiting_threads=max(2, threads // 2),
            )
            try:
                self.http_door.start()
            except BaseException:
                server.stop(0)  # the gRPC door is up already: do not leave it serving alone
                if self.explain_server is not None:
                    self.explain_server.stop(0)
                raise
            self.http_authz_port = self.http_door.port
            doors += f", HTTP ext_authz on {self.http_authz_listen}"
            self._warn_http_door_gaps()

        side = "no side port"
        if self.http_listen is not None:
            host, port = split_host_port(self.http_listen, "--metrics-listen")
            self.side_port = SidePort((host, port), self)
            self.http_port = self.side_port.server_address[1]
            threading.Thread(
                target=self.side_port.serve_forever, name="side-port", daemon=True
            ).start()
            side = f"HTTP on {host}:{self.http_port}"
        if self.reloader is not None:
            self.reloader.start()
        if self.share_readiness is not None:
            # Other workers' readiness changes without telling us: look again now and then.
            threading.Thread(target=self._follow_peers, name="peer-health", daemon=True).start()
        ready, providers = self.readiness()
        log.info(
            "serving %s, %s; configuration %s: %d provider(s), %d polic(ies); ready=%s %s",
            doors,
            side,
            self.settings.digest,
            len(self.settings.providers),
            len(self.settings.policies),
            ready,
            "" if ready else providers,
        )

    def _start_explain_server(self, listen: str) -> None:
        """The Explain API on its own gRPC server (with reflection), apart from Envoy's Checks,
        over TLS when the gRPC port has it."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="explain"),
            options=[("grpc.so_reuseport", 1 if self.reuse_port else 0)],
        )
        ExplainServicer(lambda: self.service.engine).register(server)
        reflection.enable_server_reflection((EXPLAIN_SERVICE, reflection.SERVICE_NAME), server)
        # The same transport as the gRPC port: with server.tls, its certificates (and client CA).
        if self.certificates is None:
            self.explain_port = server.add_insecure_port(listen)
        else:
            self.explain_port = server.add_secure_port(listen, self.certificates.credentials())
        if self.explain_port == 0 and not listen.startswith("unix:"):
            raise OSError(f"cannot listen on {listen} (server.explain.listen)")
        server.start()
        self.explain_server = server

    def _follow_peers(self, interval: float = 0.25) -> None:
        while not self._stop_following.wait(interval):
            self._update_health()
            self.metrics.publish_engine()

    def stop(self, grace: float | None = None, drain_delay: float = 0.0) -> None:
        """Report NOT_SERVING, keep answering for ``drain_delay`` while load balancers notice,
        then refuse new Checks and let in-flight ones finish within ``grace``."""
        self._stopping = True
        self._stop_following.set()
        if self.share_readiness is not None:
            self.share_readiness(False)
        self.health.enter_graceful_shutdown()
        if self.reloader is not None:
            self.reloader.stop()
        if drain_delay > 0:
            threading.Event().wait(drain_delay)
        if grace is None:
            grace = self.settings.server.shutdown_grace
        grpc_stopped = self.grpc_server.stop(grace) if self.grpc_server is not None else None
        if self.explain_server is not None:
            self.explain_server.stop(0)  # nothing to drain: no Envoy waits on an explanation
        if self.http_door is not None:
            self.http_door.stop(grace)  # side by side with gRPC's drain
        if grpc_stopped is not None:
            grpc_stopped.wait()
        # Every Check has finished: write out the decision lines still queued.
        self.decision_log.close()
        if self.tracing is not None:
            self.tracing.shutdown()  # the spans still queued, within a bounded wait
        if self.side_port is not None:
            self.side_port.shutdown()
            self.side_port.server_close()
        self.service.engine.close()


def serve(
    settings: Settings,
    *,
    listen: str,
    http_listen: str | None,
    config_path: Path | None = None,
    **options: Any,
) -> int:
    """Run until SIGTERM or SIGINT, then drain; SIGHUP reloads. Returns the exit code.
    ``options`` go to AuthzServer (a worker's metrics, port sharing, readiness)."""
    # NOTE: signals are taken one at a time by this thread (sigwait), never by a handler. A
    # handler that sets an Event deadlocks when a second signal lands while the first holds
    # the Event's lock: a burst of SIGHUPs did, and then SIGTERM could not stop the server.
    # Every thread must have them blocked, or the kernel may hand one a SIGTERM whose default
    # action kills the process: `authz-server serve` blocks them before it imports anything
    # that starts threads (grpc does), and here again for other callers.
    signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
    server = AuthzServer(
        settings, listen=listen, http_listen=http_listen, config_path=config_path, **options
    )
    server.start()
    while True:
        signum = signal.sigwait(CONTROL_SIGNALS)
        if signum != signal.SIGHUP:
            log.info("received %s: draining", signal.Signals(signum).name)
            break
        if server.reloader is not None:
            server.reloader.request()
    server.stop(drain_delay=server.settings.server.drain_delay)
    log.info("stopped")
    return 0
