"""End to end: the JWKS lifecycle through a real Envoy, with real JWKS servers on 127.0.0.1.

Key rotation, IdP outages (stale-if-error, then `maxStale`), an IdP that is down at start,
unknown-kid storms, OIDC discovery, and every verification failure reason as Envoy's client
sees it. Stacks are shared per class; time passes for real here (the server runs in its own
process), so intervals are short and every wait is `wait_until` with a deadline. Every case
runs through both doors (gRPC and HTTP ext_authz): an unknown kid through the HTTP door waits
for the refresh off its event loop, and must behave exactly as through gRPC.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from authz_server.tools.envoy_config import render_bootstrap
from tests.e2e.harness import (
    DOORS,
    AuthzServerProcess,
    EchoUpstream,
    EnvoyProcess,
    JWKSServer,
    door_setup,
    free_port,
    http_request,
    wait_until,
)
from tests.helpers import AUDIENCE, claims_for

pytestmark = pytest.mark.e2e

REALM = "e2e-jwks"
# Only a verified token gets past this policy: a 200 proves the token was accepted.
SIGNED_IN_ONLY = {
    "name": "signed-in",
    "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}],
}


def issuer_of(name: str) -> str:
    return f"https://{name}.idp.test"


@dataclass
class Stack:
    envoy_url: str
    server: AuthzServerProcess
    envoy: EnvoyProcess
    door: str

    @property
    def unavailable(self) -> tuple[int, str | None]:
        """What the client gets for a provider without keys. Through the gRPC door, the
        server's 503 with its reason. Envoy treats an HTTP ext_authz server's 5xx as a failed
        check: the client gets Envoy's status_on_error (503 in our bootstrap), with no body."""
        return (503, "jwks_unavailable") if self.door == "grpc" else (503, None)

    def get(
        self, token: str | None, path: str = "/api/orders"
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return http_request(self.envoy_url + path, headers=headers)

    def status_and_reason(self, token: str) -> tuple[int, str | None]:
        status, _, body = self.get(token)
        return status, reason_of(body)

    def readyz(self) -> tuple[int, dict[str, Any]]:
        status, _, body = http_request(f"{self.server.http_url}/readyz")
        return status, json.loads(body)


def reason_of(body: bytes) -> str | None:
    """The `reason` of a JSON denial, or None (a 200 from the upstream, or an Envoy-made 503)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc.get("reason") if isinstance(doc, dict) else None


@pytest.fixture(scope="module", params=DOORS)
def door(request: pytest.FixtureRequest) -> str:
    """The door Envoy asks the server through."""
    return str(request.param)


@contextmanager
def run_stack(
    workdir: Path,
    providers: list[dict[str, Any]],
    server: Mapping[str, Any] | None = None,
    *,
    door: str,
) -> Iterator[Stack]:
    """Our server with `providers` (and one ALLOW policy for signed-in callers) behind Envoy,
    which asks it through ``door``."""
    config = {
        "apiVersion": "authz-server/v1",
        "kind": "AuthzConfig",
        "server": {"realm": REALM, **(server or {})},
        "providers": providers,
        "policies": [SIGNED_IN_ONLY],
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with ExitStack() as stack:
        upstream = stack.enter_context(EchoUpstream())
        grpc_port = free_port()
        server_args, envoy_args = door_setup(door, grpc_port if door == "grpc" else free_port())
        authz = stack.enter_context(
            AuthzServerProcess(
                path, grpc_port, free_port(), server_args, log_path=workdir / "server.log"
            )
        )
        listen, admin = free_port(), free_port()
        bootstrap = render_bootstrap(
            listen_port=listen, admin_port=admin, upstream_port=upstream.port, **envoy_args
        )
        envoy = stack.enter_context(EnvoyProcess(bootstrap, admin, workdir / "envoy.log"))
        yield Stack(envoy_url=f"http://127.0.0.1:{listen}", server=authz, envoy=envoy, door=door)


def provider(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "issuer": issuer_of(name), "audiences": [AUDIENCE], **fields}


def fresh_token(key: SigningKey, issuer: str, **claims: Any) -> str:
    """A token never sent before (a random `jti`), so it cannot be a verified-token cache hit."""
    return key.sign(claims_for(time.time(), iss=issuer, jti=secrets.token_hex(8), **claims))


def poll_for(expected: object, probe: Callable[[], object], what: str, timeout: float = 10) -> None:
    """Call `probe` until it returns `expected`; on timeout, say what it returned last."""
    seen: list[object] = []

    def matches() -> bool:
        seen[:] = [probe()]
        return seen[0] == expected

    try:
        wait_until(matches, timeout=timeout, interval=0.1, what=what)
    except AssertionError as error:
        raise AssertionError(f"{error}; expected {expected!r}, last got {seen[0]!r}") from None


def challenge(description: str) -> str:
    return f'Bearer realm="{REALM}", error="invalid_token", error_description="{description}"'


# ---------------------------------------------------------------- rotation, storm, reasons


@dataclass
class KeysWorld:
    stack: Stack
    idps: dict[str, JWKSServer]  # by provider name
    keys: dict[str, SigningKey]  # by kid

    def loads(self, name: str) -> int:
        """How many key set loads of provider `name` the server has logged."""
        return self.stack.server.log_text().count(f"provider {name}: loaded ")


@pytest.fixture(scope="class")
def keys_world(tmp_path_factory: pytest.TempPathFactory, door: str) -> Iterator[KeysWorld]:
    keys = {
        kid: devkeys.generate_key(kind, kid=kid)
        for kid, kind in [
            ("rot-old", "EC-P256"),
            ("rot-new", "EC-P256"),
            ("age-old", "EC-P256"),
            ("age-new", "EC-P256"),
            ("storm-1", "Ed25519"),
            ("slow-1", "EC-P256"),
            ("flood-1", "EC-P256"),
            ("main-1", "RSA"),
            ("weak-1024", "RSA-1024"),
        ]
    }
    published = {
        "rotate": ["rot-old"],
        "maxage": ["age-old"],
        "storm": ["storm-1"],
        "slow": ["slow-1"],
        "flood": ["flood-1"],
        "main": ["main-1", "weak-1024"],
    }
    with ExitStack() as stack:
        idps = {
            name: stack.enter_context(JWKSServer(devkeys.jwks(*(keys[k] for k in kids))))
            for name, kids in published.items()
        }
        providers = [
            provider(
                "rotate", jwksUri=idps["rotate"].jwks_url, refreshInterval="1s",
                minRefreshInterval="1s",
            ),
            # A long refreshInterval: only an unknown kid and Cache-Control max-age may make
            # the next refresh come sooner.
            provider(
                "maxage", jwksUri=idps["maxage"].jwks_url, refreshInterval="60s",
                minRefreshInterval="1s",
            ),
            # Defaults: minRefreshInterval 30s, timeout 5s; server.unknownKidWait 1s.
            provider("storm", jwksUri=idps["storm"].jwks_url),
            provider("slow", jwksUri=idps["slow"].jwks_url),
            provider("flood", jwksUri=idps["flood"].jwks_url),
            provider("main", jwksUri=idps["main"].jwks_url),
        ]  # fmt: skip
        envoy_stack = stack.enter_context(
            run_stack(tmp_path_factory.mktemp("keys"), providers, door=door)
        )
        yield KeysWorld(envoy_stack, idps, keys)


class TestKeySets:
    def test_rotation_new_kid_is_fetched_once_and_a_removed_key_stops_validating(
        self, keys_world: KeysWorld
    ) -> None:
        world, idp, iss = keys_world, keys_world.idps["rotate"], issuer_of("rotate")
        old, new = world.keys["rot-old"], world.keys["rot-new"]
        old_token = fresh_token(old, iss)
        assert world.stack.status_and_reason(old_token) == (200, None)
        assert world.stack.status_and_reason(old_token) == (200, None)  # a cache hit now

        # Right after a background refresh (refreshInterval 1s, so the next one is >= 0.85s
        # away), the IdP publishes a new key and signs with it.
        loads = world.loads("rotate")
        wait_until(lambda: world.loads("rotate") > loads, timeout=5, what="a background refresh")
        idp.set_jwks(devkeys.jwks(old, new))
        before = idp.fetch_count()
        assert world.stack.status_and_reason(fresh_token(new, iss)) == (200, None)
        assert idp.fetch_count() == before + 1, "the new kid must cost exactly one JWKS fetch"
        assert world.stack.status_and_reason(fresh_token(new, iss)) == (200, None)
        assert world.stack.status_and_reason(old_token) == (200, None)  # verified, cached

        # The IdP retires the old key: after the next refresh the old (cached) token fails.
        fetched = idp.fetch_count()
        idp.set_jwks(devkeys.jwks(new))
        poll_for(
            (401, "unknown_kid"),
            lambda: world.stack.status_and_reason(old_token),
            "the removed key's cached token to get 401 unknown_kid",
        )
        assert idp.fetch_count() > fetched
        status, headers, body = world.stack.get(fresh_token(old, iss))
        assert (status, reason_of(body)) == (401, "unknown_kid")
        assert headers["www-authenticate"] == challenge("signing key not found")
        assert world.stack.status_and_reason(fresh_token(new, iss)) == (200, None)

    def test_max_age_of_an_on_demand_fetch_schedules_the_next_refresh(
        self, keys_world: KeysWorld
    ) -> None:
        """refreshInterval 60s; the IdP answers with `Cache-Control: max-age=1`."""
        world, idp, iss = keys_world, keys_world.idps["maxage"], issuer_of("maxage")
        old, new = world.keys["age-old"], world.keys["age-new"]
        old_token = fresh_token(old, iss)
        assert world.stack.status_and_reason(old_token) == (200, None)

        idp.set_jwks(devkeys.jwks(old, new), {"Cache-Control": "max-age=1"})
        before = idp.fetch_count()
        assert world.stack.status_and_reason(fresh_token(new, iss)) == (200, None)
        assert idp.fetch_count() == before + 1
        assert re.search(
            r"provider maxage: loaded 2 key\(s\) .*next refresh in 1s",
            world.stack.server.log_text(),
        )

        # The old key goes; the next refresh is due within ~1s (max-age), not in 60s.
        idp.set_jwks(devkeys.jwks(new), {"Cache-Control": "max-age=1"})
        poll_for(
            (401, "unknown_kid"),
            lambda: world.stack.status_and_reason(old_token),
            "the refresh max-age asked for (1s) to drop the removed key",
            timeout=5,
        )

    def test_storm_of_random_kids_is_all_401_and_costs_at_most_one_fetch(
        self, keys_world: KeysWorld
    ) -> None:
        world, idp, iss = keys_world, keys_world.idps["storm"], issuer_of("storm")
        key = world.keys["storm-1"]
        assert world.stack.status_and_reason(fresh_token(key, iss)) == (200, None)
        tokens = [
            key.sign(claims_for(time.time(), iss=iss), kid=secrets.token_hex(12))
            for _ in range(1000)
        ]
        before = idp.fetch_count()
        with ThreadPoolExecutor(max_workers=16) as pool:
            outcomes = list(pool.map(world.stack.status_and_reason, tokens, timeout=60))
        caused = idp.fetch_count() - before

        tally: dict[tuple[int, str | None], int] = {}
        for outcome in outcomes:
            tally[outcome] = tally.get(outcome, 0) + 1
        assert tally == {(401, "unknown_kid"): 1000}
        assert caused <= 1, f"1,000 random kids caused {caused} JWKS fetches"
        assert world.stack.status_and_reason(fresh_token(key, iss)) == (200, None)

    def test_unknown_kid_while_the_idp_hangs_is_still_401_within_envoys_timeout(
        self, keys_world: KeysWorld
    ) -> None:
        """Defaults everywhere: server.unknownKidWait, provider timeout, render_bootstrap's
        ext_authz timeout. The wait for the refresh must end before Envoy gives up."""
        world, idp, iss = keys_world, keys_world.idps["slow"], issuer_of("slow")
        key = world.keys["slow-1"]
        assert world.stack.status_and_reason(fresh_token(key, iss)) == (200, None)
        idp.set_failure(hang_seconds=30)
        try:
            started = time.monotonic()
            status, headers, body = world.stack.get(
                key.sign(claims_for(time.time(), iss=iss), kid="not-published-yet")
            )
            elapsed = time.monotonic() - started
            assert idp.fetch_count() >= 2  # the refresh the unknown kid asked for
            assert (status, reason_of(body)) == (401, "unknown_kid"), (
                f"got {status} {body!r} after {elapsed:.2f}s"
            )
            assert headers["www-authenticate"] == challenge("signing key not found")
            assert world.stack.status_and_reason(fresh_token(key, iss)) == (200, None)
        finally:
            idp.clear_failure()

    def test_a_hanging_idp_does_not_starve_other_providers(self, keys_world: KeysWorld) -> None:
        """Unknown kids for one provider whose IdP hangs, in a burst: another provider's valid
        tokens must keep passing meanwhile (defaults: 8 Check threads, unknownKidWait 1s)."""
        world, idp, iss = keys_world, keys_world.idps["flood"], issuer_of("flood")
        key, main_key = world.keys["flood-1"], world.keys["main-1"]
        idp.set_failure(hang_seconds=30)
        try:
            before = idp.fetch_count()
            flood = [
                key.sign(claims_for(time.time(), iss=iss), kid=secrets.token_hex(8))
                for _ in range(32)
            ]
            good = [fresh_token(main_key, issuer_of("main")) for _ in range(8)]
            with ThreadPoolExecutor(max_workers=40) as pool:
                flooding = [pool.submit(world.stack.status_and_reason, t) for t in flood]
                idp.wait_for_fetches(before + 1, timeout=5)  # the refresh they wait for hangs
                passing = list(pool.map(world.stack.status_and_reason, good, timeout=30))
                flooded = [f.result(timeout=30) for f in flooding]
        finally:
            idp.clear_failure()
        assert passing == [(200, None)] * 8, f"main's tokens during the flood: {passing}"
        assert set(flooded) <= {(401, "unknown_kid")}, flooded

    @pytest.mark.parametrize(
        ("case", "expected_reason", "description"),
        [
            ("unknown-kid", "unknown_kid", "signing key not found"),
            ("expired", "token_expired", "token expired"),
            ("nbf-in-future", "token_not_yet_valid", "token not yet valid"),
            ("wrong-aud", "invalid_audience", "audience not accepted"),
            ("rsa-1024", "unknown_kid", "signing key not found"),
            ("jwe", "malformed_token", "malformed token"),
            ("oversized", "malformed_token", "malformed token"),
            ("crit", "malformed_token", "malformed token"),
        ],
    )
    def test_each_verification_failure_is_401_with_its_reason(
        self, keys_world: KeysWorld, case: str, expected_reason: str, description: str
    ) -> None:
        world, iss, now = keys_world, issuer_of("main"), int(time.time())
        key = world.keys["main-1"]
        tokens = {
            "unknown-kid": lambda: key.sign(claims_for(now, iss=iss), kid="no-such-kid"),
            "expired": lambda: fresh_token(key, iss, iat=now - 7200, exp=now - 3600),
            "nbf-in-future": lambda: fresh_token(key, iss, nbf=now + 3600),
            "wrong-aud": lambda: fresh_token(key, iss, aud="someone-else"),
            "rsa-1024": lambda: fresh_token(world.keys["weak-1024"], iss),
            "jwe": lambda: ".".join(
                [devkeys.b64url_encode(b'{"alg":"RSA-OAEP","enc":"A256GCM","kid":"main-1"}')]
                + [devkeys.b64url_encode(secrets.token_bytes(n)) for n in (256, 12, 64, 16)]
            ),
            "oversized": lambda: fresh_token(key, iss, pad="x" * 9000),
            "crit": lambda: key.sign(
                claims_for(now, iss=iss),
                headers={"crit": ["urn:example:unknown"], "urn:example:unknown": True},
            ),
        }
        token = tokens[case]()
        if case == "oversized":
            assert 8192 < len(token) < 20_000
        status, headers, body = world.stack.get(token)
        assert status == 401, body
        assert reason_of(body) == expected_reason
        assert headers["www-authenticate"] == challenge(description)
        if case == "rsa-1024":
            log = world.stack.server.log_text()
            skipped = r"skipping main JWKS key #1 \(kid='weak-1024'\): RSA key of 1024 bits"
            assert re.search(skipped, log), log[-3000:]

    def test_a_valid_token_of_the_same_provider_passes(self, keys_world: KeysWorld) -> None:
        token = fresh_token(keys_world.keys["main-1"], issuer_of("main"))
        assert keys_world.stack.status_and_reason(token) == (200, None)


# ------------------------------------------------------------------------------- outages

MAX_STALE = 5.0
# mode -> JWKSServer.set_failure arguments
OUTAGES: dict[str, dict[str, Any]] = {
    "http-500": {"status": 500, "body": b'{"error": "oops"}'},
    "hang": {"hang_seconds": 60},  # our timeout is 1s; clear_failure releases it
    "garbage": {"body": b"<html>this is not JSON</html>"},
    "empty-keys": {"body": b'{"keys": []}'},
    "close": {"close_connection": True},
}


@dataclass
class OutageWorld:
    stack: Stack
    idps: dict[str, JWKSServer]
    keys: dict[str, SigningKey]


@pytest.fixture(scope="class")
def outage_world(tmp_path_factory: pytest.TempPathFactory, door: str) -> Iterator[OutageWorld]:
    keys = {mode: devkeys.generate_key("EC-P256", kid=f"{mode}-1") for mode in OUTAGES}
    with ExitStack() as stack:
        idps = {mode: stack.enter_context(JWKSServer(devkeys.jwks(keys[mode]))) for mode in OUTAGES}
        providers = [
            provider(
                f"out-{mode}",
                jwksUri=idps[mode].jwks_url,
                refreshInterval="1s",
                minRefreshInterval="1s",
                maxStale=f"{MAX_STALE:g}s",
                timeout="1s",
            )
            for mode in OUTAGES
        ]
        # A request for a provider without keys waits for a refresh in flight; with a hanging
        # IdP that wait must end before Envoy's 1s ext_authz timeout, hence 0.5s (the default,
        # 1s, does not: see the unknown-kid-while-the-IdP-hangs test).
        envoy_stack = stack.enter_context(
            run_stack(
                tmp_path_factory.mktemp("outage"),
                providers,
                server={"unknownKidWait": "0.5s"},
                door=door,
            )
        )
        yield OutageWorld(envoy_stack, idps, keys)


class TestOutage:
    def test_stale_keys_serve_until_max_stale_then_503_then_recovery(
        self, outage_world: OutageWorld
    ) -> None:
        """All five failure modes at once (one provider each), so the file stays quick."""
        world = outage_world

        def check(mode: str) -> tuple[int, str | None]:
            token = fresh_token(world.keys[mode], issuer_of(f"out-{mode}"))
            return world.stack.status_and_reason(token)

        for mode in OUTAGES:
            assert check(mode) == (200, None), mode

        counts = {mode: world.idps[mode].fetch_count() for mode in OUTAGES}
        for mode, failure in OUTAGES.items():
            world.idps[mode].set_failure(**failure)

        # A failed refresh is logged as serving the last good keys, and tokens keep passing.
        for mode in OUTAGES:
            world.idps[mode].wait_for_fetches(counts[mode] + 1, timeout=5)
            pattern = re.compile(
                rf"provider out-{mode}: key set load from \S+ failed \(.+\); "
                r"serving the last good keys"
            )
            wait_until(
                lambda: pattern.search(world.stack.server.log_text()),  # noqa: B023
                timeout=5,
                what=f"{mode}: a log line saying the last good keys are served",
            )
            assert check(mode) == (200, None), f"{mode}: stale keys must keep serving"

        # Past maxStale the keys are dropped: fail closed with 503 jwks_unavailable.
        for mode in OUTAGES:
            poll_for(
                world.stack.unavailable,
                lambda: check(mode),  # noqa: B023
                f"{mode}: 503 jwks_unavailable after maxStale",
                timeout=MAX_STALE + 5,
            )
        assert "maxStale" in world.stack.server.log_text()
        status, ready = world.stack.readyz()
        assert status == 503
        assert all(ready["providers"][f"out-{m}"].startswith("no keys") for m in OUTAGES), ready

        # The IdP recovers: tokens pass again, no restart.
        pid = world.stack.server.pid
        for mode in OUTAGES:
            world.idps[mode].clear_failure()
        for mode in OUTAGES:
            poll_for(
                (200, None),
                lambda: check(mode),  # noqa: B023
                f"{mode}: tokens to pass again after the IdP recovered",
            )
        assert world.stack.server.pid == pid
        wait_until(lambda: world.stack.readyz()[0] == 200, timeout=5, what="/readyz 200")


# ---------------------------------------------------------- start-up outage and discovery


@dataclass
class StartWorld:
    stack: Stack
    down_idp: JWKSServer
    disco_idp: JWKSServer
    healthy_key: SigningKey
    down_key: SigningKey
    disco_key: SigningKey


WRONG_ISSUER = "https://impostor.idp.test"


@pytest.fixture(scope="class")
def start_world(tmp_path_factory: pytest.TempPathFactory, door: str) -> Iterator[StartWorld]:
    workdir = tmp_path_factory.mktemp("start")
    healthy_key = devkeys.generate_key("EC-P256", kid="healthy-1")
    down_key = devkeys.generate_key("EC-P256", kid="down-1")
    disco_key = devkeys.generate_key("EC-P256", kid="disco-1")
    jwks_file = workdir / "healthy-jwks.json"
    jwks_file.write_text(json.dumps(devkeys.jwks(healthy_key)))
    with ExitStack() as stack:
        down_idp = stack.enter_context(JWKSServer(devkeys.jwks(down_key)))
        down_idp.set_failure(status=500, body=b'{"error": "starting"}')
        disco_idp = stack.enter_context(JWKSServer(devkeys.jwks(disco_key)))
        disco_idp.set_issuer(WRONG_ISSUER)
        lively = {"refreshInterval": "1s", "minRefreshInterval": "1s", "timeout": "1s"}
        providers = [
            provider("healthy", jwksFile=str(jwks_file)),
            provider("down", jwksUri=down_idp.jwks_url, **lively),
            {
                "name": "disco",
                "issuer": disco_idp.url,
                "audiences": [AUDIENCE],
                "discovery": True,
                **lively,
            },
        ]
        envoy_stack = stack.enter_context(run_stack(workdir, providers, door=door))
        yield StartWorld(envoy_stack, down_idp, disco_idp, healthy_key, down_key, disco_key)


class TestStartAndDiscovery:
    def test_idp_down_at_start_fails_closed_for_its_tokens_only_and_recovers(
        self, start_world: StartWorld
    ) -> None:
        world = start_world
        healthy = lambda: fresh_token(world.healthy_key, issuer_of("healthy"))  # noqa: E731
        down = lambda: fresh_token(world.down_key, issuer_of("down"))  # noqa: E731

        assert world.stack.status_and_reason(healthy()) == (200, None)
        assert world.stack.status_and_reason(down()) == world.stack.unavailable
        status, ready = world.stack.readyz()
        assert status == 503
        assert ready["ready"] is False
        assert ready["providers"]["healthy"] == "ready"
        assert ready["providers"]["down"].startswith("no keys"), ready
        assert "500" in ready["providers"]["down"], ready

        pid = world.stack.server.pid
        world.down_idp.clear_failure()
        poll_for(
            (200, None),
            lambda: world.stack.status_and_reason(down()),
            "the down provider's tokens to pass once its IdP is up",
        )
        assert world.stack.server.pid == pid
        assert world.stack.status_and_reason(healthy()) == (200, None)
        assert world.stack.readyz()[1]["providers"]["down"] == "ready"

    def test_discovery_issuer_mismatch_is_refused_and_a_matching_issuer_works(
        self, start_world: StartWorld
    ) -> None:
        world = start_world
        issuer = world.disco_idp.url
        token = lambda: fresh_token(world.disco_key, issuer)  # noqa: E731

        assert world.disco_idp.fetch_count("/.well-known/openid-configuration") >= 1
        assert world.stack.status_and_reason(token()) == world.stack.unavailable
        log = world.stack.server.log_text()
        mismatch = [line for line in log.splitlines() if WRONG_ISSUER in line]
        assert mismatch, log[-3000:]
        assert any(repr(issuer) in line for line in mismatch), mismatch
        assert "disco" in mismatch[0]
        assert world.stack.readyz()[1]["providers"]["disco"].startswith("no keys")
        assert world.disco_idp.fetch_count() == 0, "no jwks_uri may be used from a wrong document"

        world.disco_idp.set_issuer(issuer)
        poll_for(
            (200, None),
            lambda: world.stack.status_and_reason(token()),
            "discovery tokens to pass once the document names the configured issuer",
        )
        assert world.stack.readyz()[1]["providers"]["disco"] == "ready"
