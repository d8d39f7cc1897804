"""Sender-constrained tokens through the whole core (``AuthorizationService``): real signed
tokens bound to a DPoP key (``cnf.jkt``) or a client certificate (``cnf["x5t#S256"]``), real
proofs, the replay cache in memory and in a real Redis, and what ``check`` explains."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from authz_server import errors
from authz_server.attributes import RequestAttributes
from authz_server.cli import main
from authz_server.config import load as config
from authz_server.doors import explain_api
from authz_server.doors import grpc as grpc_door
from authz_server.errors import ConfigError
from authz_server.explain import explain
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey, b64url_encode
from authz_server.v1 import explain_pb2
from tests.certs import CertificateAuthority, Leaf
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for, write_config
from tests.redis_server import PASSWORD, RedisServer, running_redis

HOST = "api.test"
URL = f"https://{HOST}/api/orders"
OTHER_ISSUER = "https://other-issuer.test"
POLICIES = """
policies:
  - name: callers
    rules:
      - from: [{source: {requestPrincipals: ["*"]}}]
"""


def _provider(key: SigningKey, name: str, issuer: str, extra: str) -> str:
    jwks = json.dumps(json.dumps(devkeys.jwks(key)))
    return f"""
  - name: {name}
    issuer: {issuer}
    audiences: [{AUDIENCE}]
    jwks: {jwks}
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
    {extra}"""


def _service(
    tmp_path: Path,
    clock: Callable[[], float],
    providers: str,
    server: str = "",
) -> AuthorizationService:
    text = (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
        + (f"server:\n{server}\n" if server else "")
        + f"providers:{providers}\n{POLICIES}"
    )
    engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
    for cache in engine.caches.values():
        assert cache.refresh()
    return AuthorizationService(engine)


@pytest.fixture(scope="module")
def client_key() -> SigningKey:
    """The DPoP key of the legitimate client."""
    return devkeys.generate_key("EC-P256")


@pytest.fixture(scope="module")
def thief_key() -> SigningKey:
    return devkeys.generate_key("EC-P256")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def client_cert(ca: CertificateAuthority) -> Leaf:
    return ca.issue("partner", server=False)


@pytest.fixture(scope="module")
def other_cert(ca: CertificateAuthority) -> Leaf:
    return ca.issue("someone-else", server=False)


def _x5t(leaf: Leaf) -> str:
    der = x509.load_pem_x509_certificate(leaf.cert_pem).public_bytes(serialization.Encoding.DER)
    return b64url_encode(hashlib.sha256(der).digest())


def _token(key: SigningKey, now: float, **claims: object) -> str:
    return key.sign(claims_for(now, **claims))


def _dpop_request(
    token: str, proof: str | None, *, method: str = "GET", **headers: str
) -> RequestAttributes:
    all_headers = {"authorization": f"DPoP {token}", **headers}
    if proof is not None:
        all_headers["dpop"] = proof
    return RequestAttributes(
        method=method, path="/api/orders", host=HOST, headers=all_headers, scheme="https"
    )


def _bearer_request(token: str, **headers: str) -> RequestAttributes:
    return RequestAttributes(
        method="GET",
        path="/api/orders",
        host=HOST,
        headers={"authorization": f"Bearer {token}", **headers},
        scheme="https",
    )


def _proof(key: SigningKey, token: str, now: float) -> str:
    return devkeys.dpop_proof(key, method="GET", url=URL, access_token=token, iat=now)


def _dpop_service(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, mode: str = "optional", server: str = ""
) -> AuthorizationService:
    return _service(
        tmp_path, clock, _provider(rsa_key, "fapi", ISSUER, f"dpop: {{mode: {mode}}}"), server
    )


# ------------------------------------------------------------------------------------ DPoP


def test_a_bound_token_with_its_proof_is_allowed_and_neither_header_reaches_the_upstream(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_key: SigningKey
) -> None:
    service = _dpop_service(tmp_path, clock, rsa_key)
    token = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})

    decision = service.check(_dpop_request(token, _proof(client_key, token, clock.now)))

    assert (decision.status, decision.principal) == (200, f"{ISSUER}/alice")
    assert dict(decision.headers_to_set) == {"x-user": "alice"}
    assert {"authorization", "dpop"} <= set(decision.headers_to_remove)


def test_a_forwarded_dpop_token_keeps_its_proof_for_the_upstream(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_key: SigningKey
) -> None:
    extra = "dpop: {mode: optional}\n    forwardOriginalToken: true"
    service = _service(tmp_path, clock, _provider(rsa_key, "fapi", ISSUER, extra))
    token = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})

    decision = service.check(_dpop_request(token, _proof(client_key, token, clock.now)))

    assert decision.status == 200
    assert not {"authorization", "dpop"} & set(decision.headers_to_remove)


def test_a_replayed_proof_is_401_with_a_dpop_challenge(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_key: SigningKey
) -> None:
    service = _dpop_service(tmp_path, clock, rsa_key)
    token = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})
    proof = _proof(client_key, token, clock.now)
    assert service.check(_dpop_request(token, proof)).status == 200

    clock.advance(5)
    replayed = service.check(_dpop_request(token, proof))
    fresh = service.check(_dpop_request(token, _proof(client_key, token, clock.now)))

    assert (replayed.status, replayed.reason) == (401, errors.DPOP_PROOF_REPLAYED)
    challenge = dict(replayed.response_headers)["www-authenticate"]
    assert challenge.startswith('DPoP realm="authz-server", algs="ES256 EdDSA PS256 RS256"')
    assert 'error="invalid_dpop_proof"' in challenge
    assert json.loads(replayed.body)["reason"] == errors.DPOP_PROOF_REPLAYED
    assert fresh.status == 200


def _nonce_service(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, secret: bytes = b"n" * 40
) -> AuthorizationService:
    (tmp_path / "nonce-secret").write_bytes(secret)
    extra = "dpop: {mode: required, nonce: true, nonceSecretFile: nonce-secret}"
    return _service(tmp_path, clock, _provider(rsa_key, "fapi", ISSUER, extra))


def _proof_with(key: SigningKey, token: str, now: float, nonce: str | None) -> str:
    return devkeys.dpop_proof(key, method="GET", url=URL, access_token=token, iat=now, nonce=nonce)


def test_with_nonces_a_proof_without_one_gets_401_use_dpop_nonce_and_the_nonce_to_use(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_key: SigningKey
) -> None:
    service = _nonce_service(tmp_path, clock, rsa_key)
    token = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})

    first = service.check(_dpop_request(token, _proof_with(client_key, token, clock.now, None)))

    assert (first.status, first.reason) == (401, errors.USE_DPOP_NONCE)
    headers = dict(first.response_headers)
    assert 'error="use_dpop_nonce"' in headers["www-authenticate"]
    assert headers["www-authenticate"].startswith("DPoP ")
    nonce = headers["dpop-nonce"]
    retry = service.check(_dpop_request(token, _proof_with(client_key, token, clock.now, nonce)))
    assert retry.status == 200
    # The shared prebuilt denial never carries one request's nonce.
    other = service.check(_dpop_request(token, _proof_with(client_key, token, clock.now, "x")))
    assert (other.status, other.reason) == (401, errors.USE_DPOP_NONCE)
    assert dict(other.response_headers)["dpop-nonce"] == nonce


def test_any_replica_with_the_secret_accepts_anothers_nonce_until_it_is_two_periods_old(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_key: SigningKey
) -> None:
    for name in ("one", "two", "three"):
        (tmp_path / name).mkdir()
    one = _nonce_service(tmp_path / "one", clock, rsa_key)
    two = _nonce_service(tmp_path / "two", clock, rsa_key)
    elsewhere = _nonce_service(
        tmp_path / "three", clock, rsa_key, secret=b"another secret of at least 32 bytes"
    )
    token = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})
    asked = one.check(_dpop_request(token, _proof_with(client_key, token, clock.now, None)))
    nonce = dict(asked.response_headers)["dpop-nonce"]

    at_two = two.check(_dpop_request(token, _proof_with(client_key, token, clock.now, nonce)))
    at_elsewhere = elsewhere.check(
        _dpop_request(token, _proof_with(client_key, token, clock.now, nonce))
    )
    clock.advance(601)  # two nonce periods of 300 s
    token = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})
    stale = two.check(_dpop_request(token, _proof_with(client_key, token, clock.now, nonce)))

    assert at_two.status == 200
    assert (at_elsewhere.status, at_elsewhere.reason) == (401, errors.USE_DPOP_NONCE)
    assert (stale.status, stale.reason) == (401, errors.USE_DPOP_NONCE)


@pytest.mark.parametrize(
    ("dpop", "secret", "problem"),
    [
        ("{mode: optional, nonce: true}", None, "nonceSecretFile"),
        ("{mode: optional, nonce: true, nonceSecretFile: s}", b"short", "at least 32 bytes"),
        ("{mode: optional, nonce: true, nonceSecretFile: missing}", None, "nonceSecretFile"),
    ],
)
def test_a_nonce_without_a_usable_shared_secret_is_refused_naming_the_field(
    tmp_path: Path, rsa_key: SigningKey, dpop: str, secret: bytes | None, problem: str
) -> None:
    if secret is not None:
        (tmp_path / "s").write_bytes(secret)
    text = (
        "apiVersion: authz-server/v1\nkind: AuthzConfig\n"
        + f"providers:{_provider(rsa_key, 'fapi', ISSUER, f'dpop: {dpop}')}\n{POLICIES}"
    )
    with pytest.raises(ConfigError) as caught:
        config.load(write_config(tmp_path, text))
    assert problem in str(caught.value)
    assert "dpop" in str(caught.value)


def test_a_dpop_bound_token_sent_as_bearer_is_refused(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_key: SigningKey
) -> None:
    service = _dpop_service(tmp_path, clock, rsa_key)
    token = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})

    decision = service.check(_bearer_request(token))

    assert (decision.status, decision.reason) == (401, errors.BOUND_TOKEN_WITHOUT_PROOF)
    assert 'error="invalid_token"' in dict(decision.response_headers)["www-authenticate"]


def test_an_unbound_token_with_a_dpop_proof_is_refused(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_key: SigningKey
) -> None:
    service = _dpop_service(tmp_path, clock, rsa_key)
    token = _token(rsa_key, clock.now)

    decision = service.check(_dpop_request(token, _proof(client_key, token, clock.now)))

    assert (decision.status, decision.reason) == (401, errors.INVALID_DPOP_PROOF)
    assert "cnf.jkt" in dict(decision.response_headers)["www-authenticate"]


def test_a_proof_of_another_key_is_refused(
    tmp_path: Path,
    clock: Clock,
    rsa_key: SigningKey,
    client_key: SigningKey,
    thief_key: SigningKey,
) -> None:
    service = _dpop_service(tmp_path, clock, rsa_key)
    token = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})

    decision = service.check(_dpop_request(token, _proof(thief_key, token, clock.now)))

    assert (decision.status, decision.reason) == (401, errors.INVALID_DPOP_PROOF)


def test_the_proof_is_checked_on_every_request_though_the_token_is_cached(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_key: SigningKey
) -> None:
    service = _dpop_service(tmp_path, clock, rsa_key)
    token = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})
    assert service.check(_dpop_request(token, _proof(client_key, token, clock.now))).allowed

    post_proof = devkeys.dpop_proof(
        client_key, method="POST", url=URL, access_token=token, iat=clock.now
    )
    wrong_method = service.check(_dpop_request(token, post_proof))
    stale = service.check(_dpop_request(token, _proof(client_key, token, clock.now - 120)))
    missing = service.check(_dpop_request(token, None))

    for decision in (wrong_method, stale, missing):
        assert (decision.status, decision.reason) == (401, errors.INVALID_DPOP_PROOF)


def test_optional_lets_an_unbound_bearer_token_pass_and_required_refuses_it(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_key: SigningKey
) -> None:
    token = _token(rsa_key, clock.now)
    optional = _dpop_service(tmp_path, clock, rsa_key, "optional")
    (tmp_path / "required").mkdir()
    required = _dpop_service(tmp_path / "required", clock, rsa_key, "required")

    assert optional.check(_bearer_request(token)).status == 200
    refused = required.check(_bearer_request(token))
    assert (refused.status, refused.reason) == (401, errors.BOUND_TOKEN_WITHOUT_PROOF)
    bound = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})
    assert required.check(_dpop_request(bound, _proof(client_key, bound, clock.now))).allowed


def test_the_replay_cache_survives_a_reload(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_key: SigningKey
) -> None:
    service = _dpop_service(tmp_path, clock, rsa_key)
    token = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})
    proof = _proof(client_key, token, clock.now)
    assert service.check(_dpop_request(token, proof)).allowed

    previous = service.engine
    # A changed policy: a new engine, the same replay cache.
    text = (
        tmp_path / "config.yaml"
    ).read_text() + '        to: [{operation: {methods: ["GET"]}}]\n'
    reloaded = Engine.build(
        config.load(write_config(tmp_path, text)), clock=clock, previous=previous
    )
    for cache in reloaded.caches.values():
        assert cache.refresh()
    previous.close(successor=reloaded)
    service.engine = reloaded

    decision = service.check(_dpop_request(token, proof))
    assert (decision.status, decision.reason) == (401, errors.DPOP_PROOF_REPLAYED)
    assert reloaded.replay_cache is previous.replay_cache


# ------------------------------------------------------------------------- certificates


def _grpc_request(token: str, certificate_pem: bytes | None, **headers: str) -> RequestAttributes:
    """The request as the gRPC door reads Envoy's CheckRequest (``include_peer_certificate``
    puts the client's certificate, URL-encoded PEM, in ``source.certificate``)."""
    ctx = attribute_context_pb2.AttributeContext
    source = ctx.Peer(
        certificate=quote(certificate_pem.decode(), safe="") if certificate_pem else ""
    )
    http = ctx.HttpRequest(
        method="GET",
        host=HOST,
        path="/api/orders",
        scheme="https",
        headers={"authorization": f"Bearer {token}", **headers},
    )
    check = external_auth_pb2.CheckRequest(
        attributes=ctx(source=source, request=ctx.Request(http=http))
    )
    return grpc_door.to_attributes(check)


def test_a_certificate_bound_token_needs_the_certificate_it_is_bound_to(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_cert: Leaf, other_cert: Leaf
) -> None:
    service = _service(
        tmp_path, clock, _provider(rsa_key, "mtls", ISSUER, "certificateBound: optional")
    )
    token = _token(rsa_key, clock.now, cnf={"x5t#S256": _x5t(client_cert)})

    right = service.check(_grpc_request(token, client_cert.cert_pem))
    other = service.check(_grpc_request(token, other_cert.cert_pem))
    none = service.check(_grpc_request(token, None))
    unbound = service.check(_grpc_request(_token(rsa_key, clock.now), None))

    assert (right.status, right.principal) == (200, f"{ISSUER}/alice")
    for decision in (other, none):
        assert (decision.status, decision.reason) == (401, errors.CERTIFICATE_MISMATCH)
        assert 'error="invalid_token"' in dict(decision.response_headers)["www-authenticate"]
    assert unbound.status == 200  # optional: an unbound token passes as a bearer token


def test_required_certificate_binding_refuses_an_unbound_token(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_cert: Leaf
) -> None:
    service = _service(
        tmp_path, clock, _provider(rsa_key, "mtls", ISSUER, "certificateBound: required")
    )

    decision = service.check(_grpc_request(_token(rsa_key, clock.now), client_cert.cert_pem))

    assert (decision.status, decision.reason) == (401, errors.CERTIFICATE_MISMATCH)


def test_forwarded_client_cert_counts_only_when_the_configuration_trusts_it(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_cert: Leaf
) -> None:
    provider = _provider(rsa_key, "mtls", ISSUER, "certificateBound: required")
    untrusting = _service(tmp_path, clock, provider)
    (tmp_path / "trusting").mkdir()
    trusting = _service(tmp_path / "trusting", clock, provider, "  trustForwardedClientCert: true")
    token = _token(rsa_key, clock.now, cnf={"x5t#S256": _x5t(client_cert)})
    der = x509.load_pem_x509_certificate(client_cert.cert_pem).public_bytes(
        serialization.Encoding.DER
    )
    xfcc = f'By=spiffe://test/envoy;Hash={hashlib.sha256(der).hexdigest()};Subject="CN=partner"'

    refused = untrusting.check(_grpc_request(token, None, **{"x-forwarded-client-cert": xfcc}))
    allowed = trusting.check(_grpc_request(token, None, **{"x-forwarded-client-cert": xfcc}))

    assert (refused.status, refused.reason) == (401, errors.CERTIFICATE_MISMATCH)
    assert allowed.status == 200


# --------------------------------------------------------------------------------- Redis


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def _redis_server_yaml(tmp_path: Path, url: str, prefix: str) -> str:
    password = tmp_path / "redis-password"
    password.write_text(PASSWORD + "\n")
    return (
        "  replayCache:\n    redis:\n"
        f"      url: {url}\n      passwordFile: {password}\n      keyPrefix: '{prefix}'"
    )


def test_redis_down_refuses_dpop_requests_only(
    tmp_path: Path,
    clock: Clock,
    rsa_key: SigningKey,
    ec_key: SigningKey,
    client_key: SigningKey,
) -> None:
    providers = _provider(rsa_key, "fapi", ISSUER, "dpop: {mode: required}") + _provider(
        ec_key, "plain", OTHER_ISSUER, ""
    )
    server = _redis_server_yaml(tmp_path, f"unix://{tmp_path}/no-redis-here.sock", "down:")
    service = _service(tmp_path, clock, providers, server)
    bound = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})
    plain = ec_key.sign(claims_for(clock.now, iss=OTHER_ISSUER))

    refused = service.check(_dpop_request(bound, _proof(client_key, bound, clock.now)))
    passed = service.check(_bearer_request(plain))

    assert (refused.status, refused.reason) == (503, errors.REPLAY_CACHE_UNAVAILABLE)
    assert "www-authenticate" not in dict(refused.response_headers)
    assert (passed.status, passed.principal) == (200, f"{OTHER_ISSUER}/alice")
    assert service.engine.replay_cache.ready() is not None


def test_a_replay_to_a_second_process_sharing_the_redis_is_refused(
    tmp_path: Path, rsa_key: SigningKey, client_key: SigningKey, redis: RedisServer
) -> None:
    clock = Clock()  # real time: the second process (`authz-server check`) uses its own
    server = _redis_server_yaml(tmp_path, redis.url, "two-processes:")
    service = _dpop_service(tmp_path, clock, rsa_key, server=server)
    token = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})
    proof = _proof(client_key, token, clock.now)
    assert service.check(_dpop_request(token, proof)).allowed
    (tmp_path / "token").write_text(token)
    (tmp_path / "seen.proof").write_text(proof)
    (tmp_path / "fresh.proof").write_text(_proof(client_key, token, clock.now))

    def check_in_another_process(proof_file: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "authz_server",
                "check",
                "--config",
                str(tmp_path / "config.yaml"),
                "--host",
                HOST,
                "--scheme",
                "https",
                "--path",
                "/api/orders",
                "--token-file",
                str(tmp_path / "token"),
                "--dpop-proof",
                str(tmp_path / proof_file),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    replayed = check_in_another_process("seen.proof")
    fresh = check_in_another_process("fresh.proof")

    assert replayed.returncode == 1, replayed.stderr
    assert json.loads(replayed.stdout)["reason"] == errors.DPOP_PROOF_REPLAYED
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    # And back: this process now refuses the proof the other one accepted.
    decision = service.check(_dpop_request(token, (tmp_path / "fresh.proof").read_text()))
    assert decision.reason == errors.DPOP_PROOF_REPLAYED


# ----------------------------------------------------------------------- check, explain


def test_check_explains_which_dpop_check_failed(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rsa_key: SigningKey,
    client_key: SigningKey,
) -> None:
    clock = Clock()
    _dpop_service(tmp_path, clock, rsa_key)  # writes config.yaml
    token = _token(rsa_key, clock.now, cnf={"jkt": client_key.thumbprint()})
    (tmp_path / "token").write_text(token)
    wrong_url = devkeys.dpop_proof(
        client_key, method="GET", url=f"https://{HOST}/api/other", access_token=token
    )
    (tmp_path / "wrong-url.proof").write_text(wrong_url)
    (tmp_path / "good.proof").write_text(_proof(client_key, token, clock.now))
    base = ["check", "--config", str(tmp_path / "config.yaml"), "--host", HOST]
    base += ["--scheme", "https", "--path", "/api/orders", "--token-file", str(tmp_path / "token")]

    assert main([*base, "--dpop-proof", str(tmp_path / "wrong-url.proof")]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"DENY 401 {errors.INVALID_DPOP_PROOF}"
    assert (
        "(providers fapi): rejected: invalid_dpop_proof "
        "(the proof's 'htu' is not the request's URI)" in out
    )
    assert token not in out and wrong_url not in out

    assert main([*base, "--dpop-proof", str(tmp_path / "good.proof"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"][0]["location"] == "header authorization (prefix 'DPoP')"
    assert result["tokens"][0]["result"] == "verified"
    assert token not in json.dumps(result)

    assert main([*base, "--json"]) == 1  # the bound token as Bearer
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"][0]["error"] == errors.BOUND_TOKEN_WITHOUT_PROOF


def test_check_explains_a_certificate_mismatch(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rsa_key: SigningKey,
    client_cert: Leaf,
    other_cert: Leaf,
) -> None:
    clock = Clock()
    (tmp_path / "mtls").mkdir()
    _service(
        tmp_path / "mtls", clock, _provider(rsa_key, "mtls", ISSUER, "certificateBound: optional")
    )
    (tmp_path / "mtls" / "token").write_text(
        _token(rsa_key, clock.now, cnf={"x5t#S256": _x5t(client_cert)})
    )
    right, _ = client_cert.write(tmp_path, "right")
    other, _ = other_cert.write(tmp_path, "other")
    mtls = ["check", "--config", str(tmp_path / "mtls" / "config.yaml")]
    mtls += ["--token-file", str(tmp_path / "mtls" / "token")]
    assert main([*mtls, "--client-cert", str(right)]) == 0
    capsys.readouterr()
    assert main([*mtls, "--client-cert", str(other)]) == 1
    out = capsys.readouterr().out
    assert "rejected: certificate_mismatch (token bound to another client certificate)" in out
    assert main([*mtls]) == 1
    assert "rejected: certificate_mismatch (token bound to a client certificate)" in (
        capsys.readouterr().out
    )


def test_check_refuses_a_client_cert_file_that_holds_no_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rsa_key: SigningKey
) -> None:
    _service(tmp_path, Clock(), _provider(rsa_key, "mtls", ISSUER, "certificateBound: optional"))
    (tmp_path / "not-a-cert.pem").write_text("hello")

    code = main(
        [
            "check",
            "--config",
            str(tmp_path / "config.yaml"),
            "--client-cert",
            str(tmp_path / "not-a-cert.pem"),
        ]
    )

    assert code == 2
    assert "--client-cert" in capsys.readouterr().err


def test_the_explain_api_reads_the_certificate_and_names_the_failed_check(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_cert: Leaf, other_cert: Leaf
) -> None:
    service = _service(
        tmp_path, clock, _provider(rsa_key, "mtls", ISSUER, "certificateBound: optional")
    )
    token = _token(rsa_key, clock.now, cnf={"x5t#S256": _x5t(client_cert)})

    def explained(certificate: Leaf) -> explain_pb2.ExplainResponse:
        ctx = attribute_context_pb2.AttributeContext
        http = ctx.HttpRequest(
            method="GET", host=HOST, path="/", headers={"authorization": f"Bearer {token}"}
        )
        check = external_auth_pb2.CheckRequest(
            attributes=ctx(
                source=ctx.Peer(certificate=quote(certificate.cert_pem.decode(), safe="")),
                request=ctx.Request(http=http),
            )
        )
        attributes = explain_api.to_attributes(explain_pb2.ExplainRequest(check_request=check))
        return explain_api.to_response(explain(service.engine, attributes))

    right, other = explained(client_cert), explained(other_cert)

    assert (right.decision, right.tokens[0].result) == ("allow", "verified")
    assert (other.status, other.tokens[0].error) == (401, errors.CERTIFICATE_MISMATCH)
    assert other.tokens[0].description == "token bound to another client certificate"


def test_the_explain_api_request_form_carries_the_scheme_proof_and_certificate(
    tmp_path: Path, clock: Clock, rsa_key: SigningKey, client_key: SigningKey, client_cert: Leaf
) -> None:
    extra = "dpop: {mode: optional}\n    certificateBound: optional"
    service = _service(tmp_path, clock, _provider(rsa_key, "both", ISSUER, extra))
    token = _token(
        rsa_key, clock.now, cnf={"jkt": client_key.thumbprint(), "x5t#S256": _x5t(client_cert)}
    )

    def explained(scheme: str, certificate: bytes) -> explain_pb2.ExplainResponse:
        fields = explain_pb2.HttpRequest(
            method="GET",
            host=HOST,
            path="/api/orders",
            headers={
                "authorization": f"DPoP {token}",
                "dpop": _proof(client_key, token, clock.now),
            },
            scheme=scheme,
            client_certificate=certificate.decode(),
        )
        attributes = explain_api.to_attributes(explain_pb2.ExplainRequest(request=fields))
        return explain_api.to_response(explain(service.engine, attributes))

    assert explained("https", client_cert.cert_pem).decision == "allow"
    # The proof names https: Envoy's http is another URL.
    refused = explained("http", client_cert.cert_pem)
    assert refused.tokens[0].description == "the proof's 'htu' is not the request's URI"
    with pytest.raises(ValueError, match="client_certificate"):
        explained("https", b"not a certificate")
