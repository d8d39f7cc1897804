"""``serve --workers 2``: processes sharing the ports, one side port, reloads, restarts, drain.

The real CLI runs as a subprocess with both doors open; Checks go over real gRPC connections
and real HTTP ext_authz requests to the shared ports.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from authz_server.ops.workers import CONFIG_SPLIT_GRACE
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.e2e.harness import AuthzServerProcess, free_port, http_request, wait_until
from tests.helpers import AUDIENCE, ISSUER, claims_for, grpc_check_code

pytestmark = pytest.mark.e2e

WORKERS = 2


def config_text(paths: list[str], *, providers: str = "", policies: str = "") -> str:
    return f"""apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksFile: jwks.json
{providers}
policies:
  - name: users
    rules:
      - from: [{{source: {{requestPrincipals: ["*"]}}}}]
        to: [{{operation: {{paths: {json.dumps(paths)}}}}}]
{policies}
"""


def digest(text: str) -> str:
    """The configuration hash the server reports for a one-file configuration of ``text``."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def replace_text(path: Path, text: str) -> None:
    """Write ``path`` atomically, as a ConfigMap or Secret update does."""
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(text)
    partial.replace(path)


def readiness(server: AuthzServerProcess) -> tuple[int, dict[str, Any]]:
    status, _, body = http_request(f"{server.http_url}/readyz")
    return status, json.loads(body)


def worker_pids(server: AuthzServerProcess) -> dict[int, int]:
    """{worker index: pid} of the newest start of each worker, from the supervisor's log."""
    started = re.findall(r"worker (\d+) started \(pid (\d+)\)", server.log_text())
    return {int(index): int(pid) for index, pid in started}


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def metric_sum(server: AuthzServerProcess, name: str, **labels: str) -> float:
    _, _, body = http_request(f"{server.http_url}/metrics")
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return devkeys.generate_key("RSA", kid="workers")


@pytest.fixture(scope="module")
def token(key: SigningKey) -> str:
    return key.sign(claims_for(time.time()))


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory, key: SigningKey) -> Path:
    directory = tmp_path_factory.mktemp("workers")
    (directory / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
    path = directory / "config.yaml"
    path.write_text(config_text(["/orders"]))
    return path


@pytest.fixture(scope="module")
def http_door_port() -> int:
    return free_port()


def http_door_status(port: int, token: str, path: str) -> int:
    """The HTTP door's answer to an ext_authz request for ``path``, on a new connection."""
    status, _, _ = http_request(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"}
    )
    return status


@pytest.fixture(scope="module")
def server(config_path: Path, http_door_port: int) -> Iterator[AuthzServerProcess]:
    process = AuthzServerProcess(
        config_path,
        free_port(),
        free_port(),
        [
            "--workers",
            str(WORKERS),
            "--log-format",
            "text",
            "--http-authz-listen",
            f"127.0.0.1:{http_door_port}",
        ],
        ready_path="/readyz",
        ready_timeout=60,
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_every_worker_is_ready_and_health_says_so(server: AuthzServerProcess) -> None:
    status, _, body = http_request(f"{server.http_url}/readyz")
    assert status == 200
    assert json.loads(body) == {
        "ready": True,
        "workers": {str(i): "ready" for i in range(WORKERS)},
        "configs": {str(i): digest(config_text(["/orders"])) for i in range(WORKERS)},
    }
    assert sorted(worker_pids(server)) == list(range(WORKERS))

    def health_on_a_new_connection() -> int:
        with grpc.insecure_channel(server.grpc_address) as channel:
            status: int = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                .status
            )
            return status

    # Each worker looks at the others' readiness every 250 ms: poll, then every connection,
    # whichever worker it lands on, says SERVING.
    serving = health_pb2.HealthCheckResponse.SERVING
    wait_until(lambda: health_on_a_new_connection() == serving, what="health SERVING")
    wait_until(
        lambda: all(health_on_a_new_connection() == serving for _ in range(10)),
        timeout=2,
        what="every worker's health SERVING",
    )


def check_until_every_worker_worked(server: AuthzServerProcess, check: Callable[[], None]) -> int:
    """Call ``check`` (one Check on a new connection) until every worker has clearly worked;
    return how many were made. Connections land on workers by a hash of their ports, so keep
    connecting (bounded in count and time)."""
    pids = worker_pids(server)
    ticks = {pid: cpu_ticks(pid) for pid in pids.values()}
    checks = 0
    deadline = time.monotonic() + 60
    while checks < 3000 and time.monotonic() < deadline:
        for _ in range(50):
            check()
            checks += 1
        if all(cpu_ticks(pid) - ticks[pid] >= 5 for pid in pids.values()):
            break
    busy = {pid: cpu_ticks(pid) - ticks[pid] for pid in pids.values()}
    assert all(t >= 5 for t in busy.values()), f"CPU ticks per worker: {busy}"
    return checks


def test_checks_spread_over_the_workers_and_metrics_add_up(
    server: AuthzServerProcess, token: str
) -> None:
    before = metric_sum(server, "authz_checks_total")

    def check() -> None:
        assert grpc_check_code(server.grpc_address, token, "/orders") == 0

    checks = check_until_every_worker_worked(server, check)
    wait_until(
        lambda: metric_sum(server, "authz_checks_total") - before == checks,
        what=f"/metrics to count {checks} Checks summed over the workers",
    )
    assert metric_sum(server, "authz_checks_total", decision="allow") >= checks
    # Scrape-time state is published by every worker too.
    wait_until(lambda: metric_sum(server, "authz_token_cache_hits_total") > 0, what="cache hits")
    assert metric_sum(server, "authz_jwks_keys", provider=ISSUER) == 1


def test_the_http_door_is_shared_by_every_worker(
    server: AuthzServerProcess, http_door_port: int, token: str
) -> None:
    before = metric_sum(server, "authz_checks_total", door="http")

    def check() -> None:
        assert http_door_status(http_door_port, token, "/orders") == 200

    checks = check_until_every_worker_worked(server, check)
    wait_until(
        lambda: metric_sum(server, "authz_checks_total", door="http") - before == checks,
        what=f"/metrics to count {checks} HTTP-door Checks summed over the workers",
    )


def test_a_config_change_reaches_every_worker(
    server: AuthzServerProcess, config_path: Path, token: str, http_door_port: int
) -> None:
    before = metric_sum(server, "authz_config_reloads_total", result="success")
    assert grpc_check_code(server.grpc_address, token, "/admin") == 7  # PERMISSION_DENIED
    assert http_door_status(http_door_port, token, "/admin") == 403
    partial = config_path.with_name(".config.yaml.tmp")
    partial.write_text(config_text(["/orders", "/admin"]))
    partial.replace(config_path)
    wait_until(
        lambda: (
            metric_sum(server, "authz_config_reloads_total", result="success") == before + WORKERS
        ),
        timeout=20,
        what="every worker reloaded",
    )
    # Whichever worker a new connection lands on, either door decides with the new configuration.
    assert all(grpc_check_code(server.grpc_address, token, "/admin") == 0 for _ in range(40))
    assert all(http_door_status(http_door_port, token, "/admin") == 200 for _ in range(40))


# A second provider whose keys file is named before it exists (a Secret mounted after the
# ConfigMap that names it), and a DENY policy the switch drops.
LATE_PROVIDER = f"""  - issuer: https://late.test
    audiences: [{AUDIENCE}]
    jwksFile: late-jwks.json"""
DENY_ADMIN = """  - name: deny-admin
    action: DENY
    rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]"""


def every_worker_on(server: AuthzServerProcess, text: str) -> bool:
    return set(readiness(server)[1]["configs"].values()) == {digest(text)}


def test_a_config_refused_for_a_file_not_there_yet_reaches_every_worker_when_it_appears(
    server: AuthzServerProcess,
    config_path: Path,
    key: SigningKey,
    token: str,
    http_door_port: int,
) -> None:
    late = config_path.with_name("late-jwks.json")
    v1 = config_text(["/orders", "/admin/*"], policies=DENY_ADMIN)
    v2 = config_text(["/orders", "/admin/*"], providers=LATE_PROVIDER)
    replace_text(config_path, v1)
    wait_until(lambda: every_worker_on(server, v1), timeout=20, what="every worker on v1")
    assert {http_door_status(http_door_port, token, "/admin/users") for _ in range(10)} == {403}

    refused = metric_sum(server, "authz_config_reloads_total", result="failure")
    replace_text(config_path, v2)
    wait_until(
        lambda: (
            metric_sum(server, "authz_config_reloads_total", result="failure") >= refused + WORKERS
        ),
        timeout=20,
        what="every worker refusing v2 (its jwksFile is not there yet)",
    )
    replace_text(late, json.dumps(devkeys.jwks(key)))
    # Each worker tries v2 again when the file appears: none stays on v1.
    wait_until(lambda: every_worker_on(server, v2), timeout=20, what="every worker on v2")
    assert [http_door_status(http_door_port, token, "/admin/users") for _ in range(40)] == [
        200
    ] * 40
    assert readiness(server)[0] == 200


def test_workers_split_between_configurations_fail_readiness_until_they_agree(
    server: AuthzServerProcess, config_path: Path, key: SigningKey
) -> None:
    # Worker 1 is held (SIGSTOP) while worker 0 takes v3; v3's keys file then goes, so worker
    # 1, released, refuses v3 and keeps v2: a lasting split, which /readyz must show.
    late = config_path.with_name("late-jwks.json")
    v3 = config_text(["/orders", "/admin/*"], providers=LATE_PROVIDER, policies=DENY_ADMIN)
    held = worker_pids(server)[1]
    os.kill(held, signal.SIGSTOP)
    try:
        replace_text(config_path, v3)
        wait_until(
            lambda: readiness(server)[1]["configs"]["0"] == digest(v3),
            timeout=20,
            what="worker 0 on v3",
        )
        late.unlink()
        refused = metric_sum(server, "authz_config_reloads_total", result="failure")
    finally:
        os.kill(held, signal.SIGCONT)
    try:
        wait_until(
            lambda: metric_sum(server, "authz_config_reloads_total", result="failure") > refused,
            timeout=20,
            what="worker 1 refusing v3",
        )
        _, report = wait_until(
            lambda: (r := readiness(server))[0] == 503 and r,
            timeout=CONFIG_SPLIT_GRACE + 15,
            what="/readyz failing for the split",
        )
        assert report["workers"] == {str(i): "ready" for i in range(WORKERS)}  # each is ready
        assert len(set(report["configs"].values())) == 2
        assert "different configurations" in report["problem"]
        wait_until(
            lambda: "the workers have served different configurations" in server.log_text(),
            timeout=5,
            what="the split logged",
        )
    finally:
        # The file comes back (the later tests need one configuration again).
        replace_text(late, json.dumps(devkeys.jwks(key)))
    # Worker 1 takes v3, and the pod is ready again.
    wait_until(lambda: every_worker_on(server, v3), timeout=20, what="every worker on v3")
    wait_until(lambda: readiness(server)[0] == 200, timeout=10, what="ready again")
    assert "the workers serve one configuration again" in server.log_text()


def test_a_worker_that_dies_is_restarted_and_logged(server: AuthzServerProcess) -> None:
    old = worker_pids(server)[0]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: worker_pids(server)[0] != old, timeout=20, what="worker 0 restarted")
    assert re.search(rf"worker 0 \(pid {old}\) exited with code -9", server.log_text())
    wait_until(
        lambda: http_request(f"{server.http_url}/readyz")[0] == 200,
        timeout=60,
        what="ready again",
    )
    # Counted for the dashboard and the AuthzWorkerRestarting alert.
    assert metric_sum(server, "authz_worker_restarts_total") == 1


def test_sigterm_drains_every_worker_and_exits_0(server: AuthzServerProcess, token: str) -> None:
    # Last in this module: it stops the shared server.
    pids = list(worker_pids(server).values())
    assert grpc_check_code(server.grpc_address, token, "/orders") == 0
    code = server.stop(timeout=30)
    assert code == 0, server.log_text()
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert server.log_text().count("authz_server.server stopped") >= WORKERS
