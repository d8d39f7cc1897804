"""Hot reload: what the watcher sees on disk, ConfigReloader, and AuthzServer.apply swapping
engines (kept, new, changed and removed key caches; in-flight Checks)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from authz_server import errors
from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.config.load import Settings
from authz_server.errors import ConfigError
from authz_server.identity import Identity
from authz_server.ops.metrics import Metrics
from authz_server.ops.reload import ConfigReloader, snapshot
from authz_server.policy.compile import PolicyResult
from authz_server.server import AuthzServer
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.e2e.harness import JWKSServer, http_request, wait_until
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for, grpc_check_code, write_config

PARTNER_ISSUER = "https://partner.test"


def config_text(paths: tuple[str, ...] = ("/orders",), extra_providers: str = "") -> str:
    return f"""apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: main
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksFile: jwks.json
{extra_providers}
policies:
  - name: users
    rules:
      - from: [{{source: {{requestPrincipals: ["*"]}}}}]
        to: [{{operation: {{paths: {json.dumps(list(paths))}}}}}]
"""


def partner_yaml(url: str, timeout: str = "5s", audience: str = AUDIENCE) -> str:
    return f"""
  - name: partner
    issuer: {PARTNER_ISSUER}
    audiences: [{audience}]
    jwksUri: {url}
    timeout: {timeout}
"""


def request(token: str | None, path: str = "/orders") -> RequestAttributes:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return RequestAttributes(method="GET", host="api.test", path=path, headers=headers)


def load(directory: Path, text: str) -> Settings:
    return config.load(write_config(directory, text))


def replace_text(path: Path, text: str) -> None:
    """Write ``path`` atomically, so a watcher never reads a half-written file."""
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(text)
    partial.replace(path)


# ----------------------------------------------------------------------------- snapshot


def test_snapshot_of_a_file_changes_when_its_content_changes(tmp_path: Path) -> None:
    path = write_config(tmp_path, config_text())
    before = snapshot(path)
    assert snapshot(path) == before
    path.write_text(config_text(("/orders", "/admin")))
    assert snapshot(path) != before


def test_snapshot_sees_a_file_replaced_by_rename(tmp_path: Path) -> None:
    path = write_config(tmp_path, config_text())
    before = snapshot(path)
    write_config(tmp_path, config_text(), name="new.yaml").replace(path)  # same bytes, new inode
    assert snapshot(path) != before


def test_snapshot_of_a_directory_sees_new_and_removed_yaml_files(tmp_path: Path) -> None:
    write_config(tmp_path, config_text())
    before = snapshot(tmp_path)
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.yaml").write_text("ignored")
    assert snapshot(tmp_path) == before
    extra = write_config(tmp_path, "# more\n", name="extra.yml")
    assert snapshot(tmp_path) != before
    extra.unlink()
    assert snapshot(tmp_path) == before


def configmap_swap(directory: Path, version: str, text: str) -> None:
    """What the kubelet does: write a timestamped dir, then atomically repoint ``..data``."""
    data_dir = directory / f"..{version}"
    data_dir.mkdir()
    (data_dir / "config.yaml").write_text(text)
    (data_dir / "jwks.json").write_text((directory / "jwks.json").read_text())
    link = directory / "..data_tmp"
    link.symlink_to(data_dir.name)
    os.replace(link, directory / "..data")
    entry = directory / "config.yaml"
    if not entry.is_symlink():
        entry.symlink_to("..data/config.yaml")


@pytest.fixture
def configmap(tmp_path: Path, rsa_key: SigningKey) -> Path:
    directory = tmp_path / "mount"
    directory.mkdir()
    (directory / "jwks.json").write_text(json.dumps(devkeys.jwks(rsa_key)))
    configmap_swap(directory, "2024_01_01_00_00_00.1", config_text())
    return directory


def test_snapshot_sees_a_configmap_data_symlink_swap(configmap: Path) -> None:
    before = snapshot(configmap)
    assert "/orders" in config.load(configmap).policies[0].model_dump_json()
    # Same size and same content length: only the link target and the inode differ.
    configmap_swap(configmap, "2024_01_01_00_01_00.2", config_text(("/orderz",)))
    after = snapshot(configmap)
    assert after != before
    assert after[1] != before[1]  # where ..data points
    assert "/orderz" in (configmap / "config.yaml").read_text()


# ------------------------------------------------------------------------ ConfigReloader


class Recorder:
    def __init__(self) -> None:
        self.applied: list[Settings] = []
        self.rejected: list[ConfigError] = []

    def apply(self, settings: Settings) -> None:
        self.applied.append(settings)

    def reject(self, exc: ConfigError) -> None:
        self.rejected.append(exc)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def config_dir(tmp_path: Path, rsa_key: SigningKey) -> Path:
    (tmp_path / "jwks.json").write_text(json.dumps(devkeys.jwks(rsa_key)))
    write_config(tmp_path, config_text())
    return tmp_path


def reloader_for(path: Path, recorder: Recorder, interval: float = 0.05) -> ConfigReloader:
    return ConfigReloader(path, recorder.apply, on_rejected=recorder.reject, interval=interval)


def test_reload_applies_a_new_config_and_ignores_an_unchanged_digest(
    config_dir: Path, recorder: Recorder
) -> None:
    path = config_dir / "config.yaml"
    reloader = reloader_for(path, recorder)
    assert reloader.reload()
    assert len(recorder.applied) == 1 and reloader.digest == recorder.applied[0].digest
    assert reloader.reload()
    path.write_text(config_text())  # rewritten, same bytes: same digest
    assert reloader.reload()
    assert len(recorder.applied) == 1
    path.write_text(config_text(("/orders", "/admin")))
    assert reloader.reload()
    assert len(recorder.applied) == 2
    assert recorder.applied[1].digest != recorder.applied[0].digest
    assert reloader.digest == recorder.applied[1].digest
    assert reloader.reload(force=True) and len(recorder.applied) == 3
    assert recorder.rejected == []


@pytest.mark.parametrize(
    ("broken", "problem"),
    [
        ("providers: [{issuer: ", "not valid YAML"),
        (config_text().replace("audiences:", "audience:"), "audience"),
    ],
)
def test_reload_refuses_a_broken_config_and_keeps_the_digest(
    config_dir: Path, recorder: Recorder, broken: str, problem: str
) -> None:
    path = config_dir / "config.yaml"
    reloader = reloader_for(path, recorder)
    assert reloader.reload()
    digest = reloader.digest
    path.write_text(broken)
    assert not reloader.reload()
    assert len(recorder.applied) == 1
    assert reloader.digest == digest
    [exc] = recorder.rejected
    assert exc.problems and problem in str(exc)


def test_reload_of_a_vanished_path_is_refused_not_raised(
    config_dir: Path, recorder: Recorder
) -> None:
    path = config_dir / "config.yaml"
    reloader = reloader_for(path, recorder)
    assert reloader.reload()
    path.unlink()
    assert not reloader.reload()
    assert len(recorder.rejected) == 1 and len(recorder.applied) == 1


def test_the_watcher_thread_picks_up_changes_and_survives_a_broken_config(
    config_dir: Path, recorder: Recorder
) -> None:
    path = config_dir / "config.yaml"
    reloader = reloader_for(path, recorder)
    assert reloader.reload()
    reloader.start()
    try:
        replace_text(path, config_text(("/a", "/b")))
        wait_until(lambda: len(recorder.applied) == 2, what="the change applied")
        replace_text(path, "kind: [")
        wait_until(lambda: len(recorder.rejected) == 1, what="the broken config refused")
        replace_text(path, config_text(("/c",)))
        wait_until(lambda: len(recorder.applied) == 3, what="the fixed config applied")
    finally:
        reloader.stop()
    assert reloader._thread is not None and not reloader._thread.is_alive()
    assert len(recorder.rejected) == 1  # a refused snapshot is not retried on every poll


LATE_PROVIDER = f"""
  - name: late
    issuer: https://late.test
    audiences: [{AUDIENCE}]
    jwksFile: late/jwks.json
"""


def test_a_config_refused_for_a_named_file_is_applied_when_the_file_appears(
    config_dir: Path, recorder: Recorder, rsa_key: SigningKey
) -> None:
    # A ConfigMap and the Secret it names update at different moments: the configuration
    # refused for the file must be tried again when the file appears, not only when the
    # configuration changes again.
    path = config_dir / "config.yaml"
    late = config_dir / "late" / "jwks.json"
    reloader = reloader_for(path, recorder)
    assert reloader.reload()
    reloader.start()
    try:
        replace_text(path, config_text(extra_providers=LATE_PROVIDER))
        wait_until(lambda: len(recorder.rejected) == 1, what="the configuration refused")
        assert "late/jwks.json" in str(recorder.rejected[0])
        late.parent.mkdir()
        replace_text(late, json.dumps(devkeys.jwks(rsa_key)))
        wait_until(lambda: len(recorder.applied) == 2, what="the configuration applied")
    finally:
        reloader.stop()
    assert [p.name for p in recorder.applied[1].providers] == ["main", "late"]
    assert len(recorder.rejected) == 1  # not tried again while nothing changed


def test_the_watcher_follows_a_configmap_swap(configmap: Path, recorder: Recorder) -> None:
    reloader = reloader_for(configmap, recorder)
    assert reloader.reload()
    reloader.start()
    try:
        configmap_swap(configmap, "2024_01_01_00_02_00.3", config_text(("/swapped",)))
        wait_until(lambda: len(recorder.applied) == 2, what="the swapped config applied")
    finally:
        reloader.stop()
    assert "/swapped" in recorder.applied[1].policies[0].model_dump_json()


def test_request_triggers_a_reload_without_waiting_for_the_poll(
    config_dir: Path, recorder: Recorder
) -> None:
    path = config_dir / "config.yaml"
    reloader = reloader_for(path, recorder, interval=3600)
    assert reloader.reload()
    reloader.start()
    try:
        path.write_text(config_text(("/hup",)))
        reloader.request()
        wait_until(lambda: len(recorder.applied) == 2, what="the requested reload")
    finally:
        reloader.stop()


def test_an_exception_in_apply_does_not_kill_the_watcher(
    config_dir: Path, recorder: Recorder
) -> None:
    path = config_dir / "config.yaml"
    calls: list[Settings] = []

    def flaky(settings: Settings) -> None:
        calls.append(settings)
        if len(calls) == 2:
            raise RuntimeError("apply failed")
        recorder.apply(settings)

    reloader = ConfigReloader(path, flaky, interval=0.05)
    assert reloader.reload()
    reloader.start()
    try:
        replace_text(path, config_text(("/one",)))
        # NOTE: >=, not ==: after the failure the watcher retries on its next poll.
        wait_until(lambda: len(calls) >= 2, what="the failing apply")
        replace_text(path, config_text(("/two",)))

        def paths_applied_last() -> list[str] | None:
            rules = recorder.applied[-1].policies[0].rules or []
            operation = rules[0].to[0].operation if rules and rules[0].to else None
            return operation.paths if operation else None

        wait_until(lambda: paths_applied_last() == ["/two"], what="the next change applied")
    finally:
        reloader.stop()


# ------------------------------------------------------------------- AuthzServer.apply


@pytest.fixture
def partner_jwks(ec_key: SigningKey) -> Iterator[JWKSServer]:
    with JWKSServer(devkeys.jwks(ec_key)) as server:
        yield server


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def start_server(
    directory: Path, text: str, registry: CollectorRegistry, **kwargs: Any
) -> AuthzServer:
    server = AuthzServer(
        load(directory, text),
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        metrics=Metrics(registry),
        **kwargs,
    )
    server.start()
    return server


@pytest.fixture
def running(config_dir: Path, registry: CollectorRegistry) -> Iterator[AuthzServer]:
    server = start_server(config_dir, config_text(), registry)
    try:
        yield server
    finally:
        server.stop(grace=1)


@pytest.fixture
def token(rsa_key: SigningKey) -> str:
    return rsa_key.sign(claims_for(Clock().now))


@pytest.fixture
def partner_token(ec_key: SigningKey) -> str:
    return ec_key.sign(claims_for(Clock().now, iss=PARTNER_ISSUER))


def grpc_check(server: AuthzServer, token: str, path: str) -> int:
    return grpc_check_code(f"127.0.0.1:{server.grpc_port}", token, path)


def test_apply_swaps_decisions_and_keeps_an_unchanged_providers_cache(
    running: AuthzServer, config_dir: Path, registry: CollectorRegistry, token: str
) -> None:
    old_engine, old_cache = running.engine, running.engine.caches["main"]
    assert grpc_check(running, token, "/admin") == 7  # PERMISSION_DENIED
    new = load(config_dir, config_text(("/orders", "/admin")))
    running.apply(new)
    assert running.engine is not old_engine and running.service.engine is running.engine
    assert running.engine.caches["main"] is old_cache
    assert old_cache._thread is not None and old_cache._thread.is_alive()  # not stopped
    assert grpc_check(running, token, "/admin") == 0
    assert registry.get_sample_value("authz_config_info", {"hash": new.digest}) == 1
    assert registry.get_sample_value("authz_config_reloads_total", {"result": "success"}) == 1
    # The token cache carries over (same settings): the kept key cache purges it, once.
    assert running.engine.token_cache is old_engine.token_cache
    assert old_cache.listeners.count(running.engine.token_cache.purge) == 1
    assert old_cache.listeners.count(running._update_health_listener) == 1


def test_apply_keeps_a_cache_when_only_non_key_fields_of_a_provider_change(
    config_dir: Path, registry: CollectorRegistry, partner_jwks: JWKSServer
) -> None:
    server = start_server(
        config_dir, config_text(extra_providers=partner_yaml(partner_jwks.jwks_url)), registry
    )
    try:
        cache = server.engine.caches["partner"]
        text = config_text(extra_providers=partner_yaml(partner_jwks.jwks_url, audience="other"))
        server.apply(load(config_dir, text))
        assert server.engine.caches["partner"] is cache
        assert partner_jwks.fetch_count() == 1
    finally:
        server.stop(grace=1)


def test_apply_loads_a_new_providers_keys_before_the_swap(
    running: AuthzServer,
    config_dir: Path,
    partner_jwks: JWKSServer,
    partner_token: str,
    token: str,
) -> None:
    old_engine = running.engine
    assert running.service.check(request(partner_token)).reason == errors.INVALID_ISSUER
    partner_jwks.set_failure(hang_seconds=10)  # hold the key fetch until released
    new = load(config_dir, config_text(extra_providers=partner_yaml(partner_jwks.jwks_url)))
    applier = threading.Thread(target=running.apply, args=(new,))
    applier.start()
    try:
        wait_until(lambda: partner_jwks.fetch_count() == 1, what="the partner key fetch")
        # While the new provider's keys load, the old engine still decides everything.
        assert running.service.engine is old_engine
        assert running.service.check(request(token)).allowed
        assert running.service.check(request(partner_token)).reason == errors.INVALID_ISSUER
    finally:
        partner_jwks.clear_failure()
        applier.join(timeout=10)
    assert not applier.is_alive()
    partner = running.engine.caches["partner"]
    assert partner.keyset is not None  # loaded before the engine went live
    assert partner._thread is not None and partner._thread.is_alive()  # refresher started
    assert running.service.check(request(partner_token)).allowed
    assert running.readiness() == (True, {"main": "ready", "partner": "ready"})


def test_apply_replaces_a_changed_providers_cache_and_stops_the_old_one(
    config_dir: Path, registry: CollectorRegistry, partner_jwks: JWKSServer, partner_token: str
) -> None:
    text = config_text(extra_providers=partner_yaml(partner_jwks.jwks_url))
    server = start_server(config_dir, text, registry)
    try:
        old = server.engine.caches["partner"]
        assert old._thread is not None and old._thread.is_alive()
        changed = partner_yaml(partner_jwks.jwks_url, timeout="4s")
        server.apply(load(config_dir, config_text(extra_providers=changed)))
        new = server.engine.caches["partner"]
        assert new is not old and new.keyset is not None
        assert partner_jwks.fetch_count() == 2
        assert old._stop.is_set() and not old._thread.is_alive()
        assert server._update_health_listener not in old.listeners
        assert server.service.check(request(partner_token)).allowed
    finally:
        server.stop(grace=1)


def test_apply_stops_a_removed_providers_cache(
    config_dir: Path, registry: CollectorRegistry, partner_jwks: JWKSServer, partner_token: str
) -> None:
    text = config_text(extra_providers=partner_yaml(partner_jwks.jwks_url))
    server = start_server(config_dir, text, registry)
    try:
        old_engine, removed = server.engine, server.engine.caches["partner"]
        server.apply(load(config_dir, config_text()))
        assert set(server.engine.caches) == {"main"}
        assert removed._stop.is_set()
        assert removed._thread is not None and not removed._thread.is_alive()
        assert removed.listeners == []  # neither health nor the old token cache listen
        assert old_engine.token_cache.purge not in server.engine.caches["main"].listeners
        assert server.service.check(request(partner_token)).reason == errors.INVALID_ISSUER
        assert server.readiness() == (True, {"main": "ready"})
    finally:
        server.stop(grace=1)


def test_a_check_in_flight_finishes_on_the_engine_it_started_with(
    running: AuthzServer, config_dir: Path, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_engine = running.engine
    entered, release = threading.Event(), threading.Event()
    evaluate = old_engine.policies.evaluate

    def slow_evaluate(req: RequestAttributes, identity: Identity | None) -> PolicyResult:
        entered.set()
        release.wait(10)
        return evaluate(req, identity)

    monkeypatch.setattr(old_engine.policies, "evaluate", slow_evaluate)
    results: list[bool] = []
    checker = threading.Thread(
        target=lambda: results.append(running.service.check(request(token, "/admin")).allowed)
    )
    checker.start()
    try:
        assert entered.wait(10)
        running.apply(load(config_dir, config_text(("/orders", "/admin"))))
        assert running.service.check(request(token, "/admin")).allowed  # the new engine
    finally:
        release.set()
        checker.join(timeout=10)
    assert results == [False]  # decided by the old policy, not a mix


def test_no_check_fails_while_configs_are_applied_back_and_forth(
    running: AuthzServer, config_dir: Path, token: str
) -> None:
    configs = [
        load(config_dir, config_text(("/orders",))),
        load(config_dir, config_text(("/orders", "/admin"))),
    ]
    stop = threading.Event()
    outcomes: list[tuple[int, str]] = []

    def hammer() -> None:
        while not stop.is_set():
            decision = running.service.check(request(token))
            if not decision.allowed:
                outcomes.append((decision.status, decision.reason))
            outcomes.append((200, "ok"))

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        for i in range(20):
            running.apply(configs[i % 2])
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=10)
    assert outcomes and set(outcomes) == {(200, "ok")}


@pytest.fixture
def watching(config_dir: Path, registry: CollectorRegistry) -> Iterator[AuthzServer]:
    """A running server that polls its config.yaml every 50 ms."""
    path = config_dir / "config.yaml"
    server = AuthzServer(
        config.load(path),
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        metrics=Metrics(registry),
        config_path=path,
    )
    assert server.reloader is not None
    server.reloader.interval = 0.05
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=1)


def test_a_running_server_reloads_from_disk_and_refuses_a_broken_config(
    watching: AuthzServer, config_dir: Path, registry: CollectorRegistry, token: str
) -> None:
    path = config_dir / "config.yaml"
    server = watching
    first = server.settings.digest
    replace_text(path, "providers: [")
    wait_until(
        lambda: registry.get_sample_value("authz_config_reloads_total", {"result": "failure"}),
        what="the failure counted",
    )
    assert server.settings.digest == first
    assert registry.get_sample_value("authz_config_info", {"hash": first}) == 1
    assert not server.service.check(request(token, "/admin")).allowed
    assert server.service.check(request(token)).allowed

    replace_text(path, config_text(("/orders", "/admin")))
    wait_until(lambda: server.service.check(request(token, "/admin")).allowed, what="reload")
    assert registry.get_sample_value("authz_config_reloads_total", {"result": "success"}) == 1
    assert registry.get_sample_value("authz_config_info", {"hash": first}) is None
    assert server.reloader.digest == server.settings.digest != first


def test_a_policy_only_reload_keeps_cached_tokens_and_counters(
    tmp_path: Path, rsa_key: SigningKey
) -> None:
    import time

    from authz_server.service import AuthorizationService, Engine

    (tmp_path / "jwks.json").write_text(json.dumps(devkeys.jwks(rsa_key)))
    base = (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
        f"providers: [{{issuer: {ISSUER}, jwksFile: jwks.json}}]\n"
    )
    first = tmp_path / "a.yaml"
    first.write_text(base + "policies: [{name: everyone, rules: [{}]}]\n")
    engine = Engine.build(config.load(first))
    for cache in engine.caches.values():
        assert cache.refresh()
    service = AuthorizationService(engine)
    token = rsa_key.sign(claims_for(time.time()))
    request = RequestAttributes(path="/x", headers={"authorization": f"Bearer {token}"})
    assert service.check(request).allowed
    first.write_text(base + "policies: [{name: p, rules: [{}]}, {name: q, action: AUDIT}]\n")
    successor = Engine.build(config.load(first), previous=engine)
    engine.close(successor=successor)
    service.engine = successor
    request = RequestAttributes(path="/x", headers={"authorization": f"Bearer {token}"})
    assert service.check(request).allowed
    assert successor.token_cache is engine.token_cache
    assert (successor.token_cache.hits, successor.token_cache.misses) == (1, 1)


@pytest.mark.parametrize(
    "truncated",
    [
        "",
        "apiVersion: authz-server/v1\n",
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n",
        "apiVersion: authz-server/v1\nkind: AuthzConfig\nproviders:\n",
    ],
    ids=["zero-bytes", "first-line", "header-only", "cut-before-providers"],
)
def test_a_truncated_config_is_refused_and_never_opens_the_door(
    watching: AuthzServer, config_dir: Path, registry: CollectorRegistry, token: str, truncated: str
) -> None:
    path = config_dir / "config.yaml"
    server = watching
    first = server.settings.digest
    anonymous_delete = RequestAttributes(method="DELETE", host="api.test", path="/orders")
    assert not server.service.check(anonymous_delete).allowed
    replace_text(path, truncated)
    wait_until(
        lambda: registry.get_sample_value("authz_config_reloads_total", {"result": "failure"}),
        what="the truncated config refused",
    )
    assert server.settings.digest == first
    assert (len(server.settings.providers), len(server.settings.policies)) == (1, 1)
    decision = server.service.check(anonymous_delete)
    assert (decision.allowed, decision.status) == (False, 401)
    assert server.service.check(request(token)).allowed
    status, _, body = http_request(f"http://127.0.0.1:{server.http_port}/readyz")
    assert (status, json.loads(body)["ready"]) == (200, True)
    # Refused once, not on every poll.
    wait_until(lambda: server.reloader is not None and server.reloader._seen[0] == snapshot(path))
    assert registry.get_sample_value("authz_config_reloads_total", {"result": "failure"}) == 1


def test_an_empty_config_that_says_allow_empty_is_applied(
    watching: AuthzServer, config_dir: Path, registry: CollectorRegistry
) -> None:
    path = config_dir / "config.yaml"
    server = watching
    anonymous_delete = RequestAttributes(method="DELETE", host="api.test", path="/orders")
    assert not server.service.check(anonymous_delete).allowed
    replace_text(
        path, "apiVersion: authz-server/v1\nkind: AuthzConfig\nserver: {allowEmpty: true}\n"
    )
    # The engine is swapped a moment before the reload is counted: wait for both.
    wait_until(
        lambda: (
            server.service.check(anonymous_delete).allowed
            and registry.get_sample_value("authz_config_reloads_total", {"result": "success"}) == 1
        ),
        what="allow-all, counted",
    )


def test_turning_explain_on_by_reload_says_it_needs_a_restart_naming_the_fields(
    running: AuthzServer, config_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = config_text().replace(
        "kind: AuthzConfig\n",
        "kind: AuthzConfig\nserver: {explain: {enabled: true}, threads: 3, realm: changed}\n",
    )
    with caplog.at_level("INFO", logger="authz_server.server"):
        running.apply(load(config_dir, text))
    (warning,) = [r for r in caplog.records if "needs a restart" in r.getMessage()]
    assert warning.levelname == "WARNING"
    assert warning.getMessage().startswith(
        "server.threads, server.explain.enabled changed but needs a restart"
    )
    assert warning.fields == {"needs_restart": ["server.threads", "server.explain.enabled"]}  # type: ignore[attr-defined]
    assert running.settings.server.realm == "changed"  # applied: a reload can change it
    assert running.explain_port == 0  # not started by the reload
    # Said again at the next reload, as long as the running server differs from it.
    caplog.clear()
    with caplog.at_level("INFO", logger="authz_server.server"):
        running.apply(load(config_dir, text.replace("/orders", "/admin")))
    assert [r.levelname for r in caplog.records if "needs a restart" in r.getMessage()] == [
        "WARNING"
    ]


def test_a_reload_that_changes_no_restart_field_says_nothing_about_restarting(
    running: AuthzServer, config_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="authz_server.server"):
        running.apply(load(config_dir, config_text(("/orders", "/admin"))))
    assert not [r for r in caplog.records if "restart" in r.getMessage()]


def test_each_reload_names_a_workload_left_without_any_policy(
    config_dir: Path, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    path = config_dir / "config.yaml"
    workloads = (
        "workloads:\n"
        "  - {name: orders, namespace: shop, hosts: [orders.test]}\n"
        "  - {name: reports, namespace: shop, hosts: [reports.test]}\n"
    )
    scoped = "    appliesTo: {workloads: [orders]}\n"
    path.write_text(config_text() + scoped + workloads)
    reloader = reloader_for(path, recorder)
    with caplog.at_level("WARNING", logger="authz_server.reload"):
        assert reloader.reload()
        path.write_text(config_text(("/orders", "/admin")) + scoped + workloads)
        assert reloader.reload()
    said = [
        r.getMessage() for r in caplog.records if "has no policy in its scope" in r.getMessage()
    ]
    assert (
        said
        == [
            "workload 'reports' (namespace 'shop') has no policy in its scope: every request for "
            "it is allowed, with or without credentials"
        ]
        * 2
    )
    assert len(recorder.applied) == 2
