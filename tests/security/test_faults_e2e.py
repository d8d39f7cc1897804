"""Faults through a real Envoy, to both doors: the server killed under load (Envoy fails
closed, then recovers when a new server takes the port, without an Envoy restart), and a
storm of configuration rewrites while traffic flows (no failed request, the last one in
force)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from authz_server.tools.envoy_config import render_bootstrap
from tests.e2e.harness import (
    DOORS,
    AuthzServerProcess,
    EchoUpstream,
    EnvoyProcess,
    door_setup,
    free_port,
    http_request,
    wait_until,
)
from tests.e2e.test_workers import config_text, worker_pids
from tests.helpers import claims_for

pytestmark = pytest.mark.e2e


@dataclass
class Setup:
    door: str
    workdir: Path
    key: SigningKey
    ports: tuple[int, int, int]  # gRPC, side port, the door's
    server_args: list[str]
    envoy_url: str

    def server(self) -> AuthzServerProcess:
        grpc, side, _ = self.ports
        return AuthzServerProcess(
            self.workdir / "config.yaml", grpc, side, self.server_args, ready_path="/readyz"
        )

    def status(self, path: str, token: str) -> int:
        try:
            status, _, _ = http_request(
                self.envoy_url + path, headers={"Authorization": f"Bearer {token}"}, timeout=5
            )
        except OSError:
            return 0
        return int(status)


class Load:
    """GET /orders with ``token`` through Envoy, one request after another on a thread, each
    recorded as (when it started, status); at most ``limit`` requests, until stopped."""

    def __init__(self, setup: Setup, token: str, limit: int = 5000) -> None:
        self.results: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(setup, token, limit))
        self._thread.start()

    def _run(self, setup: Setup, token: str, limit: int) -> None:
        for _ in range(limit):
            if self._stop.is_set():
                return
            started = time.monotonic()
            self.results.append((started, setup.status("/orders", token)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.fixture(params=DOORS)
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    door = str(request.param)
    key = devkeys.generate_key("EC-P256", kid="faults")
    (tmp_path / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
    (tmp_path / "config.yaml").write_text(config_text(["/orders"]))
    grpc = free_port()
    door_port = grpc if door == "grpc" else free_port()
    server_args, envoy_args = door_setup(door, door_port)
    with EchoUpstream() as upstream:
        listen, admin = free_port(), free_port()
        bootstrap = render_bootstrap(
            listen_port=listen, admin_port=admin, upstream_port=upstream.port, **envoy_args
        )
        with EnvoyProcess(bootstrap, admin, tmp_path / "envoy.log"):
            yield Setup(
                door,
                tmp_path,
                key,
                (grpc, free_port(), door_port),
                server_args,
                f"http://127.0.0.1:{listen}",
            )


def test_a_killed_server_fails_closed_and_a_new_one_is_used_without_restarting_envoy(
    setup: Setup,
) -> None:
    token = setup.key.sign(claims_for(time.time()))
    first = setup.server().start()
    try:
        assert setup.status("/orders", token) == 200
        load = Load(setup, token, limit=3000)
        results = load.results
        wait_until(lambda: len(results) >= 20, timeout=10, what="load flowing")
        os.kill(first.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(
            lambda: any(t > killed + 0.2 and s != 200 for t, s in results),
            timeout=10,
            what="Envoy answering without the server",
        )
        second = setup.server().start()
        try:
            wait_until(
                lambda: setup.status("/orders", token) == 200,
                timeout=20,
                what="the same Envoy using the new server",
            )
            restarted = time.monotonic()
        finally:
            load.stop()
        # While no server ran, nothing was allowed: every request started after the kill
        # (and done before the new server was up) got Envoy's denial.
        during = [s for t, s in results if killed + 0.05 < t < restarted - 5]
        assert all(s != 200 for s in during), sorted(set(during))
        assert {s for t, s in results if killed + 0.05 < t} - {200} <= {503}
        assert second.stop() == 0
    finally:
        first.stop()


def test_a_storm_of_configuration_rewrites_fails_no_request_and_the_last_one_wins(
    setup: Setup,
) -> None:
    token = setup.key.sign(claims_for(time.time()))
    server = setup.server().start()
    try:
        load = Load(setup, token)
        path = setup.workdir / "config.yaml"
        for index in range(100):
            # Every version allows /orders; each also allows its own /v<index>.
            partial = path.with_name(".config.yaml.tmp")
            partial.write_text(config_text(["/orders", f"/v{index}"]))
            partial.replace(path)
            server.signal(signal.SIGHUP)  # reload now, not at the next poll
        wait_until(lambda: setup.status("/v99", token) == 200, timeout=20, what="the last config")
        load.stop()
        statuses = [status for _, status in load.results]
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        assert setup.status("/v98", token) == 403
        assert "Traceback" not in server.log_text()
        _, _, metrics = http_request(f"{server.http_url}/metrics")
        reloads = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.decode().splitlines()
            if line.startswith('authz_config_reloads_total{result="success"}')
        ]
        assert reloads and reloads[0] >= 2, reloads  # several reloads, under traffic
    finally:
        assert server.stop() == 0


def _draining_config(setup: Setup, seconds: float) -> None:
    # drainDelay: after SIGTERM the server says NOT_SERVING (so a load balancer stops sending)
    # and keeps answering for that long; only then does it stop taking new Checks.
    (setup.workdir / "config.yaml").write_text(
        config_text(["/orders"]).replace(
            "kind: AuthzConfig\n",
            f"kind: AuthzConfig\nserver: {{drainDelay: {seconds:g}s, shutdownGrace: {seconds:g}s}}\n",
        )
    )


def test_sigterm_under_load_keeps_answering_through_the_drain_delay_and_exits_0(
    setup: Setup,
) -> None:
    _draining_config(setup, 2)
    token = setup.key.sign(claims_for(time.time()))
    server = setup.server().start()
    load = Load(setup, token)
    results = load.results
    try:
        wait_until(lambda: len(results) >= 20, timeout=10, what="load flowing")
        server.signal(signal.SIGTERM)
        term = time.monotonic()
        wait_until(
            lambda: http_request(f"{server.http_url}/readyz")[0] == 503,
            timeout=1.5,
            what="/readyz 503 at once",
        )
        code = server.stop(timeout=20)  # waits for the exit
    finally:
        load.stop()
    assert code == 0, server.log_text()[-2000:]
    in_drain = [s for t, s in results if term <= t < term + 1.5]
    assert in_drain, "requests were sent during the drain delay"
    assert set(in_drain) == {200}, sorted(set(in_drain))
    assert {s for t, s in results if t < term} == {200}
    assert "draining" in server.log_text()


def _log_lines(server: AuthzServerProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("setup", ["grpc"], indirect=True)
def test_sigterm_under_load_drains_two_workers_fails_no_request_and_leaves_no_process(
    setup: Setup,
) -> None:
    _draining_config(setup, 1.5)
    grpc, side, _ = setup.ports
    server = AuthzServerProcess(
        setup.workdir / "config.yaml",
        grpc,
        side,
        [*setup.server_args, "--workers", "2"],
        ready_path="/readyz",
        ready_timeout=60,
    ).start()
    try:
        pids = set(worker_pids(server).values())
        assert len(pids) == 2, server.log_text()
        load = Load(setup, setup.key.sign(claims_for(time.time())))
        results = load.results
        try:
            wait_until(lambda: len(results) >= 20, timeout=10, what="load flowing")
            server.signal(signal.SIGTERM)  # to the supervisor, which passes it on
            term = time.monotonic()
            wait_until(
                lambda: http_request(f"{server.http_url}/readyz")[0] == 503,
                timeout=1.5,
                what="/readyz 503 at once",
            )
            code = server.stop(timeout=30)  # waits for the supervisor's exit
        finally:
            load.stop()
    finally:
        server.stop()
    assert code == 0, server.log_text()[-2000:]
    # In flight at SIGTERM or sent while the workers drained: every request answered 200.
    assert {s for t, s in results if t < term} == {200}
    in_drain = [s for t, s in results if term <= t < term + 0.75]
    assert in_drain, "requests were sent during the drain delay"
    assert set(in_drain) == {200}, sorted(set(in_drain))
    stopped = [
        line
        for line in _log_lines(server)
        if (line["logger"], line["message"]) == ("authz_server.server", "stopped")
    ]
    assert len(stopped) == 2, "each worker drained and stopped"
    assert "Traceback" not in server.log_text()
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
