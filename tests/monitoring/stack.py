"""A monitored stack: the server (``--workers 2``) behind a real Envoy, a real JWKS server, and
a real Prometheus scraping the server every second with the rules of k8s/monitoring/ loaded.

``tests/monitoring/test_prometheus_e2e.py`` drives it through one scripted story, and
``tests/monitoring/preview.py`` (``make dashboard-preview``) through a longer one to draw.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from authz_server.tools.envoy_config import render_bootstrap
from tests.e2e.harness import (
    TOKEN_LEDGER,
    AuthzServerProcess,
    EchoUpstream,
    EnvoyProcess,
    JWKSServer,
    free_port,
    http_request,
    wait_until,
)
from tests.helpers import AUDIENCE, ISSUER, claims_for
from tests.introspection_idp import CLIENT_SECRET, IntrospectionServer
from tests.monitoring.prometheus import MONITORING, PrometheusProcess

PROVIDER = "corp"
NAMESPACE = "authz-system"
JOB = "authz-server"
WORKERS = 2
# A configuration every worker refuses (an unknown policy action).
REFUSED = (
    "apiVersion: authz-server/v1\nkind: AuthzConfig\npolicies:\n  - name: x\n    action: BOGUS\n"
)


# The replay cache's Redis: a Unix socket nothing listens on.
DEAD_REDIS = "unix:///nonexistent/authz-replay.sock"
# What a DPoP client addresses (the Host it sends; Envoy's scheme is http): its proofs' htu.
DPOP_HOST = "api.monitoring.test"


def config_text(
    jwks_url: str, dry_run_paths: list[str], max_stale: str = "10m", *, introspection: str = ""
) -> str:
    """The server's configuration: one provider on ``jwks_url`` (refreshed every second, so an
    outage shows at once), an ALLOW policy for signed-in callers on /api/*, and a dry-run
    DENY policy on ``dry_run_paths``. With an ``introspection`` endpoint, also an
    introspection provider reading ``x-opaque-token`` and an API keys provider reading
    ``x-api-key`` (its keys file and the client secret are the stack's). The JWT provider
    takes DPoP-bound tokens too (``optional``), and the replay cache is a Redis that is not
    there: a DPoP request gets 503 replay_cache_unavailable (the alert
    AuthzReplayCacheUnavailable), any other passes."""
    others = ""
    if introspection:
        others = f"""  - name: opaque
    issuer: https://idp.monitoring
    introspection: {{endpoint: {introspection}, clientId: c, clientSecretFile: client-secret}}
    fromHeaders: [{{name: x-opaque-token}}]
  - name: keys
    issuer: apikeys.monitoring
    apiKeys: {{file: keys.yaml}}
    fromHeaders: [{{name: x-api-key}}]
"""
    return f"""apiVersion: authz-server/v1
kind: AuthzConfig
server:
  replayCache:
    redis: {{url: "{DEAD_REDIS}", timeout: 100ms}}
providers:
  - name: {PROVIDER}
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksUri: {jwks_url}
    refreshInterval: 1s
    minRefreshInterval: 1s
    maxStale: {max_stale}
    timeout: 500ms
    dpop: {{mode: optional}}
{others}policies:
  - name: api
    rules:
      - from: [{{source: {{requestPrincipals: ["*"]}}}}]
        to: [{{operation: {{paths: ["/api/*"]}}}}]
  - name: block-admin
    action: DENY
    dryRun: true
    rules:
      - to: [{{operation: {{paths: {json.dumps(dry_run_paths)}}}}}]
"""


def digest_of(text: str) -> str:
    """The hash ``authz_config_info`` shows for a one-file configuration."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def scrape(server: AuthzServerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The server's own ``/metrics``, as {(sample name, labels): value}."""
    _, _, body = http_request(f"{server.http_url}/metrics")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def sample(server: AuthzServerProcess, name: str, **labels: str) -> float:
    return scrape(server).get((name, frozenset(labels.items())), 0.0)


@dataclass
class MonitoredStack:
    workdir: Path
    key: SigningKey
    jwks: JWKSServer
    server: AuthzServerProcess
    envoy_url: str
    prometheus: PrometheusProcess
    config: Path
    idp: IntrospectionServer
    api_key: str

    # ------------------------------------------------------------------------ traffic

    def token(self, **claims: Any) -> str:
        return self.key.sign(claims_for(time.time(), **claims))

    def status(self, path: str, token: str | None = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return http_request(f"{self.envoy_url}{path}", headers=headers)[0]

    def dpop_status(self, path: str) -> int:
        """A DPoP request: a token bound to a new client key, with its proof."""
        client = devkeys.generate_key("EC-P256")
        token = self.token(cnf={"jkt": client.thumbprint()})
        proof = devkeys.dpop_proof(
            client, method="GET", url=f"http://{DPOP_HOST}{path}", access_token=token
        )
        headers = {"Host": DPOP_HOST, "Authorization": f"DPoP {token}", "DPoP": proof}
        return http_request(f"{self.envoy_url}{path}", headers=headers)[0]

    def status_with(self, path: str, headers: dict[str, str]) -> int:
        """The status of a request carrying ``headers`` (an opaque token, an API key)."""
        return http_request(f"{self.envoy_url}{path}", headers=headers)[0]

    def config_text(self, dry_run_paths: list[str], max_stale: str = "10m") -> str:
        """This stack's configuration (``config_text`` with its JWKS and IdP)."""
        return config_text(
            self.jwks.jwks_url, dry_run_paths, max_stale, introspection=self.idp.endpoint
        )

    # ------------------------------------------------------------------ configuration

    def reload(self, text: str) -> None:
        """Write ``text`` as the configuration and SIGHUP the supervisor (it tells every
        worker); returns at once."""
        tmp = self.config.with_name(f".{self.config.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)
        self.server.signal(signal.SIGHUP)

    def reload_and_wait(self, text: str) -> str:
        """Reload a configuration the server accepts; wait until every worker runs it."""
        digest = digest_of(text)
        before = sample(self.server, "authz_config_reloads_total", result="success")
        self.reload(text)
        wait_until(
            lambda: (
                sample(self.server, "authz_config_info", hash=digest) == 1
                and sample(self.server, "authz_config_reloads_total", result="success")
                >= before + WORKERS
            ),
            timeout=20,
            what=f"every worker on configuration {digest}",
        )
        return digest

    def refuse(self, text: str) -> None:
        """Reload a configuration the server refuses; wait until every worker refused it."""
        before = sample(self.server, "authz_config_reloads_total", result="failure")
        self.reload(text)
        wait_until(
            lambda: (
                sample(self.server, "authz_config_reloads_total", result="failure")
                >= before + WORKERS
            ),
            timeout=20,
            what="every worker refusing the configuration",
        )

    # ------------------------------------------------------------------------ workers

    def worker_pids(self) -> dict[int, int]:
        """{worker index: pid} of the newest start of each worker, from the supervisor's log."""
        started = re.findall(r"worker (\d+) started \(pid (\d+)\)", self.server.log_text())
        return {int(index): int(pid) for index, pid in started}

    def kill_worker(self, index: int = 0) -> None:
        """SIGKILL one worker; wait until the supervisor restarted it and it is ready."""
        pid = self.worker_pids()[index]
        os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: (
                self.worker_pids().get(index) not in (None, pid)
                and http_request(f"{self.server.http_url}/readyz")[0] == 200
            ),
            timeout=30,
            what=f"worker {index} restarted and ready",
        )

    # ------------------------------------------------------------------------ outage

    def break_key_set(self) -> None:
        """The JWKS endpoint answers 500 from now on; wait until the server counted a failed
        refresh and its keys are stale (it keeps serving them)."""
        self.jwks.set_failure(status=500)
        wait_until(
            lambda: (
                sample(self.server, "authz_jwks_fetches_total", provider=PROVIDER, result="failure")
                > 0
                and sample(self.server, "authz_jwks_stale_seconds", provider=PROVIDER) > 0
            ),
            timeout=20,
            what="a failed key set refresh",
        )

    def heal_key_set(self) -> None:
        self.jwks.clear_failure()
        wait_until(
            lambda: sample(self.server, "authz_jwks_stale_seconds", provider=PROVIDER) == 0,
            timeout=20,
            what="a successful key set refresh",
        )


@contextmanager
def monitored_stack(workdir: Path, max_stale: str = "10m") -> Iterator[MonitoredStack]:
    """Start everything (Prometheus first: it waits for nothing); stop it all by PID."""
    key = devkeys.generate_key("RSA", kid="monitoring")
    with ExitStack() as stack:
        jwks = stack.enter_context(JWKSServer(devkeys.jwks(key)))
        idp = stack.enter_context(IntrospectionServer())
        upstream = stack.enter_context(EchoUpstream())
        api_key = secrets.token_urlsafe(32)
        TOKEN_LEDGER.saw_token(api_key)
        (workdir / "client-secret").write_text(CLIENT_SECRET)
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        (workdir / "keys.yaml").write_text(f"keys:\n  - {{sub: partner, sha256: {digest}}}\n")
        grpc_port, http_port = free_port(), free_port()
        prometheus = stack.enter_context(
            PrometheusProcess(
                [f"127.0.0.1:{http_port}"],
                job=JOB,
                target_labels={"namespace": NAMESPACE},
                rule_files=[MONITORING / "rules.yaml"],
                log_path=workdir / "prometheus.log",
            )
        )
        config = workdir / "config.yaml"
        config.write_text(
            config_text(jwks.jwks_url, ["/api/admin*"], max_stale, introspection=idp.endpoint)
        )
        server = stack.enter_context(
            AuthzServerProcess(
                config,
                grpc_port,
                http_port,
                ["--workers", str(WORKERS), "--log-format", "text"],
                log_path=workdir / "server.log",
                ready_path="/readyz",
                ready_timeout=60,
            )
        )
        listen, admin = free_port(), free_port()
        bootstrap = render_bootstrap(
            listen_port=listen,
            admin_port=admin,
            authz_address=server.grpc_address,
            upstream_port=upstream.port,
        )
        stack.enter_context(EnvoyProcess(bootstrap, admin, workdir / "envoy.log"))
        yield MonitoredStack(
            workdir=workdir,
            key=key,
            jwks=jwks,
            server=server,
            envoy_url=f"http://127.0.0.1:{listen}",
            prometheus=prometheus,
            config=config,
            idp=idp,
            api_key=api_key,
        )
