"""``serve --workers N``: N server processes sharing the gRPC port, under one supervisor.

Each worker is a fresh interpreter (multiprocessing's ``spawn``: nothing of the supervisor is
inherited, gRPC least of all) that runs the ordinary server with SO_REUSEPORT, its own key and
token caches, its own reloader watching the configuration, and no side port. The supervisor
holds no gRPC object. It

- serves the side port: ``/metrics`` summed over every worker (prometheus-client multi-process
  mode, in a directory it creates and removes), ``/readyz`` ready only when every worker is,
  and not while the workers have disagreed on the configuration for longer than
  ``CONFIG_SPLIT_GRACE`` (each publishes the digest of the one it serves on a second board);
- keeps a readiness board, one byte per worker in shared memory, that each worker's gRPC health
  reads, so health too says SERVING only when every worker is ready;
- forwards SIGHUP (reload) to every worker, and on SIGTERM or SIGINT drains every worker and
  exits 0 when all of them did;
- restarts a worker that dies, and logs it; a worker that keeps dying is restarted after a
  growing delay.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from authz_server.ops.tls import TlsFiles

log = logging.getLogger("authz_server.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker that dies sooner than this after its start is restarted after a growing delay.
_HEALTHY_RUN = 5.0
_MAX_RESTART_DELAY = 30.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_CONTROL_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
# How long workers may serve different configurations before /readyz fails: each polls the
# configuration every second, and a reload may wait for a new provider's keys.
CONFIG_SPLIT_GRACE = 10.0


def worker_count(value: str) -> int:
    """``--workers``: a positive number, or ``auto`` for the CPUs this process may use."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"expected a number of workers (1 or more) or 'auto', got {value!r}")


def _die_with_parent(parent: int) -> None:
    """Ask Linux for SIGTERM when the supervisor dies, even by SIGKILL: no orphan keeps the
    port. (Elsewhere, a no-op.)"""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass(frozen=True)
class _WorkerPlan:
    """What every worker is started with (sent to the spawned process)."""

    config_path: str
    listen: str
    log_level: str
    log_format: str
    supervisor_pid: int
    http_authz_listen: str | None = None
    tls: TlsFiles | None = None  # from the command line; None: the configuration's
    tracing: bool = False  # --tracing


def _digest_number(digest: str) -> int:
    """A configuration digest (16 hex digits) as the number a board slot holds (0: none)."""
    try:
        return int(digest[:16], 16)
    except ValueError:
        return 0


def _worker_main(slot: int, board: Any, configs: Any, plan: _WorkerPlan) -> None:
    """The body of one worker process (spawned: imports happen here, after the environment
    carries the metrics directory, as prometheus-client requires)."""
    from authz_server.config import load as config  # noqa: PLC0415
    from authz_server.errors import ConfigError  # noqa: PLC0415
    from authz_server.ops.log import setup_logging  # noqa: PLC0415
    from authz_server.ops.metrics import Metrics  # noqa: PLC0415
    from authz_server.server import serve  # noqa: PLC0415

    _die_with_parent(plan.supervisor_pid)
    setup_logging(plan.log_level, plan.log_format)
    try:
        settings = config.load(plan.config_path)
    except ConfigError as exc:
        log.error("worker %d: configuration refused: %s", slot, exc)
        raise SystemExit(1) from None

    def share_readiness(ready: bool) -> bool:
        board[slot] = 1 if ready else 0
        return all(board)

    def share_config(digest: str) -> None:
        configs[slot] = _digest_number(digest)

    raise SystemExit(
        serve(
            settings,
            listen=plan.listen,
            http_listen=None,
            config_path=Path(plan.config_path),
            metrics=Metrics(multiprocess_mode=True),
            reuse_port=True,
            share_readiness=share_readiness,
            http_authz_listen=plan.http_authz_listen,
            tls=plan.tls,
            share_config=share_config,
            tracing=plan.tracing,
            worker=slot,
        )
    )


@dataclass
class _Slot:
    index: int
    process: Any = None
    started: float = 0.0
    restart_delay: float = 0.0
    restart_at: float = 0.0
    exit_code: int | None = None


class Supervisor:
    """Runs ``workers`` server processes on ``listen`` and the side port on ``http_listen``."""

    def __init__(
        self,
        *,
        workers: int,
        config_path: Path,
        listen: str,
        http_listen: str,
        http_authz_listen: str | None = None,
        tls: TlsFiles | None = None,
        log_level: str = "INFO",
        log_format: str = "json",
        drain_seconds: float = 10.0,
        tracing: bool = False,
    ) -> None:
        for flag, address in (("--listen", listen), ("--http-authz-listen", http_authz_listen)):
            if address is not None and address.startswith("unix:"):
                raise ValueError(
                    f"--workers needs a TCP {flag} address: processes share a port with "
                    "SO_REUSEPORT, which unix sockets do not have"
                )
        self.workers = workers
        self.config_path = config_path
        self.listen = listen
        self.http_listen = http_listen
        self.http_authz_listen = http_authz_listen
        self.tls = tls
        self.log_level = log_level
        self.log_format = log_format
        self.drain_seconds = drain_seconds
        self.tracing = tracing
        self._context = multiprocessing.get_context("spawn")
        self.board = self._context.RawArray("B", workers)
        # The digest (as a number, 0: none yet) of the configuration each worker serves.
        self.configs = self._context.RawArray("Q", workers)
        self.split_since: float | None = None  # since when the workers' configurations differ
        self._split_reported = False
        self.slots = [_Slot(i) for i in range(workers)]
        self._stop = threading.Event()
        self._stopping = False
        self._port_holders: list[socket.socket] = []
        self.metrics_dir = ""
        self.grpc_port = 0
        self.http_port = 0
        self.http_authz_port = 0
        self.restarts = 0  # workers that exited outside a shutdown (authz_worker_restarts_total)

    # ---------------------------------------------------------------- side port owner

    def readiness_report(self) -> tuple[bool, dict[str, Any]]:
        states = {str(s.index): "ready" if self.board[s.index] else "not ready" for s in self.slots}
        configs = {
            str(s.index): f"{self.configs[s.index]:016x}" if self.configs[s.index] else "none"
            for s in self.slots
        }
        split = self.config_split_for()
        ready = not self._stopping and all(self.board) and split <= CONFIG_SPLIT_GRACE
        report: dict[str, Any] = {"ready": ready, "workers": states, "configs": configs}
        if split > CONFIG_SPLIT_GRACE:
            report["problem"] = f"the workers have served different configurations for {split:.0f}s"
        return ready, report

    def config_split_for(self, now: float | None = None) -> float:
        """For how many seconds the workers have served different configurations (0: they
        agree; a worker still starting, with none yet, does not count)."""
        if self.split_since is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self.split_since

    def _follow_configs(self) -> None:
        """Note when the workers' configurations start and stop differing; log a split that
        lasts past CONFIG_SPLIT_GRACE once, and its end."""
        now = time.monotonic()
        digests = {self.configs[s.index] for s in self.slots} - {0}
        if len(digests) <= 1:
            if self._split_reported:
                log.info("the workers serve one configuration again")
            self.split_since, self._split_reported = None, False
            return
        if self.split_since is None:
            self.split_since = now
        if not self._split_reported and self.config_split_for(now) > CONFIG_SPLIT_GRACE:
            self._split_reported = True
            log.error(
                "the workers have served different configurations for more than %.0fs (%s): "
                "/readyz fails until they agree; see each worker's 'configuration ... refused' "
                "line",
                CONFIG_SPLIT_GRACE,
                ", ".join(
                    f"worker {s.index}: {self.configs[s.index]:016x}"
                    for s in self.slots
                    if self.configs[s.index]
                ),
            )

    def exposition(self) -> bytes:
        from authz_server.ops.metrics import SupervisorCollector, aggregated_exposition  # noqa: PLC0415

        return aggregated_exposition(SupervisorCollector(lambda: self.restarts, self._worker_pids))

    def _worker_pids(self) -> list[int]:
        return [s.process.pid for s in self.slots if s.process is not None and s.process.pid]

    # ---------------------------------------------------------------------- running

    def _reserve_port(self, address: str, flag: str) -> tuple[str, int]:
        """Resolve port 0 in ``address`` to a free port that every worker can share, and hold
        it. Returns the address to give the workers and its port."""
        from authz_server.server import split_host_port  # noqa: PLC0415

        host, port = split_host_port(address, flag)
        if port == 0:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            holder = socket.socket(family, socket.SOCK_STREAM)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind((host, 0))  # bound, never listening: takes no connections
            port = holder.getsockname()[1]
            self._port_holders.append(holder)
            address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        return address, port

    def _start_worker(self, slot: _Slot) -> None:
        self.board[slot.index] = 0
        self.configs[slot.index] = 0
        slot.process = self._context.Process(
            target=_worker_main,
            name=f"authz-worker-{slot.index}",
            args=(
                slot.index,
                self.board,
                self.configs,
                _WorkerPlan(
                    str(self.config_path),
                    self.listen,
                    self.log_level,
                    self.log_format,
                    os.getpid(),
                    self.http_authz_listen,
                    self.tls,
                    self.tracing,
                ),
            ),
        )
        slot.process.start()
        # NOTE: starting multiprocessing's resource tracker unblocks SIGINT and SIGTERM in
        # this thread (it blocks them around its spawn, then unblocks them): block them
        # again, or the next thread we start could take a SIGTERM and die of it, undrained.
        signal.pthread_sigmask(signal.SIG_BLOCK, _CONTROL_SIGNALS)
        slot.started = time.monotonic()
        log.info("worker %d started (pid %d)", slot.index, slot.process.pid)

    def _reap(self, slot: _Slot) -> None:
        """A worker that exited outside a shutdown: log it and schedule its restart."""
        from prometheus_client import multiprocess  # noqa: PLC0415

        process = slot.process
        self.board[slot.index] = 0
        self.configs[slot.index] = 0
        self.restarts += 1
        multiprocess.mark_process_dead(process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        ran = time.monotonic() - slot.started
        slot.restart_delay = (
            min(_MAX_RESTART_DELAY, max(0.5, slot.restart_delay * 2)) if ran < _HEALTHY_RUN else 0.0
        )
        slot.restart_at = time.monotonic() + slot.restart_delay
        log.error(
            "worker %d (pid %d) exited with code %s after %.1fs; restarting in %.1fs",
            slot.index,
            process.pid,
            process.exitcode,
            ran,
            slot.restart_delay,
        )
        slot.process = None

    def _watch(self) -> None:
        """Restart workers that die, forward SIGHUP, until SIGTERM or SIGINT."""
        while not self._stop.is_set():
            received = signal.sigtimedwait(_CONTROL_SIGNALS, 0.2)
            if received is not None:
                if received.si_signo == signal.SIGHUP:
                    self._forward(signal.SIGHUP)
                else:
                    log.info(
                        "received %s: draining %d workers",
                        signal.Signals(received.si_signo).name,
                        self.workers,
                    )
                    return
            for slot in self.slots:
                if slot.process is not None and not slot.process.is_alive():
                    self._reap(slot)
                if slot.process is None and time.monotonic() >= slot.restart_at:
                    self._start_worker(slot)
            self._follow_configs()

    def _forward(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signum)

    def _drain(self) -> bool:
        """SIGTERM every worker and wait for them; True when every one exited 0."""
        self._stopping = True
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_seconds
        clean = True
        for slot in self.slots:
            process = slot.process
            if process is None:
                continue
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker %d did not drain in time: killed", slot.index)
                process.kill()
                process.join(5)
                clean = False
            # NOTE: -SIGTERM: it was still starting (no handler yet), so it had nothing to drain.
            elif process.exitcode not in (0, -signal.SIGTERM):
                log.error("worker %d exited with code %s", slot.index, process.exitcode)
                clean = False
        return clean

    def run(self) -> int:
        """Start the workers and the side port; return the exit code after a drain."""
        # NOTE: taken by _watch with sigtimedwait, never by handlers (see server.serve).
        # Blocked first: a thread that starts unblocked (grpc's, when server.py is imported)
        # would take a SIGTERM with its default action and kill us without a drain.
        signal.pthread_sigmask(signal.SIG_BLOCK, _CONTROL_SIGNALS)
        from authz_server.server import SidePort, split_host_port  # noqa: PLC0415

        self.metrics_dir = tempfile.mkdtemp(prefix="authz-server-metrics-")
        # NOTE: prometheus-client picks multi-process mode from the environment when it is
        # imported: the spawned workers inherit this before importing anything.
        os.environ[MULTIPROC_ENV] = self.metrics_dir
        side_port: SidePort | None = None
        try:
            self.listen, self.grpc_port = self._reserve_port(self.listen, "--listen")
            if self.http_authz_listen is not None:
                self.http_authz_listen, self.http_authz_port = self._reserve_port(
                    self.http_authz_listen, "--http-authz-listen"
                )

            for slot in self.slots:
                self._start_worker(slot)
            host, port = split_host_port(self.http_listen, "--metrics-listen")
            side_port = SidePort((host, port), self)
            self.http_port = side_port.server_address[1]
            threading.Thread(target=side_port.serve_forever, name="side-port", daemon=True).start()
            log.info(
                "supervising %d workers on gRPC %s%s, HTTP side port on %s:%d",
                self.workers,
                self.listen,
                f", HTTP ext_authz {self.http_authz_listen}" if self.http_authz_listen else "",
                host,
                self.http_port,
            )
            self._watch()
            clean = self._drain()
            log.info("stopped")
            return 0 if clean else 1
        finally:
            if side_port is not None:
                side_port.shutdown()
                side_port.server_close()
            for holder in self._port_holders:
                holder.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            os.environ.pop(MULTIPROC_ENV, None)
