"""`check` and `test` with API keys and opaque tokens: the trace says which provider and which
kind of credential decided, and never shows the credential."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz_server import cli
from authz_server.config import load as config
from authz_server.tools import policy_tests
from tests.introspection_idp import CLIENT_SECRET, IntrospectionServer

API_KEY = secrets.token_urlsafe(32)
IDP_ISSUER = "https://idp.example.com"

CONFIG = """apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: partners-opaque
    issuer: {idp_issuer}
    introspection:
      endpoint: {endpoint}
      clientId: authz-server
      clientSecretFile: client-secret
      timeout: 500ms
    outputClaimToHeaders: [{{header: x-client-id, claim: client_id}}]
  - name: partner-keys
    issuer: apikeys.example.com
    apiKeys: {{file: keys.yaml}}
    fromHeaders: [{{name: x-api-key}}]
    outputClaimToHeaders: [{{header: x-partner, claim: sub}}]
policies:
  - name: partners
    rules:
      - from: [{{source: {{requestPrincipals: ["apikeys.example.com/*"]}}}}]
      - from: [{{source: {{requestPrincipals: ["{idp_issuer}/*"]}}}}]
        when: [{{key: "request.auth.claims[scope]", values: ["orders.read"]}}]
"""


@pytest.fixture
def idp() -> Iterator[IntrospectionServer]:
    with IntrospectionServer() as server:
        yield server


@pytest.fixture
def config_path(tmp_path: Path, idp: IntrospectionServer) -> Path:
    (tmp_path / "client-secret").write_text(CLIENT_SECRET)
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    (tmp_path / "keys.yaml").write_text(f"keys:\n  - {{sub: partner-acme, sha256: {digest}}}\n")
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(idp_issuer=IDP_ISSUER, endpoint=idp.endpoint))
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_with_an_api_key_says_the_api_keys_provider_decided(
    tmp_path: Path, config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "key.txt"
    key_file.write_text(API_KEY + "\n")
    code, out, _ = run(capsys, "--config", str(config_path), "--api-key-file", str(key_file))
    assert code == 0
    assert (
        "token: header x-api-key (providers partner-keys): verified by partner-keys (API key): "
        "apikeys.example.com/partner-acme"
    ) in out
    key_file.write_text(secrets.token_urlsafe(32))
    code, out, _ = run(
        capsys, "--config", str(config_path), "--api-key-file", str(key_file), "--json"
    )
    assert code == 1
    [token] = json.loads(out)["tokens"]
    assert token["result"] == "rejected" and token["error"] == "unknown_api_key"
    assert (token["provider"], token["credential"]) == ("partner-keys", "apiKey")
    assert API_KEY not in out and key_file.read_text() not in out


def test_check_decides_an_opaque_token_offline_from_an_introspection_response(
    tmp_path: Path, config_path: Path, idp: IntrospectionServer, capsys: pytest.CaptureFixture[str]
) -> None:
    token = secrets.token_urlsafe(32)
    (tmp_path / "token.txt").write_text(token)
    answer = {"active": True, "iss": IDP_ISSUER, "sub": "svc", "scope": "orders.read",
              "client_id": "billing", "exp": 4_000_000_000}  # fmt: skip
    (tmp_path / "answer.json").write_text(json.dumps(answer))
    args = ["--config", str(config_path), "--token-file", str(tmp_path / "token.txt")]
    code, out, _ = run(
        capsys, *args, "--introspection-response", str(tmp_path / "answer.json"), "--json"
    )
    assert code == 0, out
    [found] = json.loads(out)["tokens"]
    assert found["location"] == "header authorization (prefix 'Bearer')"
    assert (found["provider"], found["credential"]) == ("partners-opaque", "introspection")
    assert idp.call_count() == 0 and token not in out
    # Without the response, check asks the IdP, which does not know the token.
    code, out, _ = run(capsys, *args)
    assert code == 1 and idp.call_count() == 1
    assert "rejected by partners-opaque (opaque token, introspected): token_inactive" in out


def test_check_refuses_an_introspection_response_without_a_token(
    tmp_path: Path, config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "answer.json").write_text('{"active": true}')
    code, _, err = run(
        capsys,
        "--config",
        str(config_path),
        "--introspection-response",
        str(tmp_path / "answer.json"),
    )
    assert code == 2 and "--token-file" in err


CASES = f"""
cases:
  - name: a partner key reads
    apiKey: {API_KEY}
    expect: {{decision: allow, headers: {{x-partner: partner-acme}}}}
  - name: an unknown key
    apiKey: {"u" * 43}
    expect: {{status: 401, reason: unknown_api_key}}
  - name: an introspected token with the scope
    introspection: {{sub: svc, scope: "orders.read", client_id: billing}}
    expect: {{decision: allow, headers: {{x-client-id: billing}}}}
  - name: an introspected token without it
    introspection: {{sub: svc, scope: "orders.write"}}
    expect: {{status: 403}}
  - name: a revoked token
    introspection: {{active: false}}
    expect: {{status: 401, reason: token_inactive}}
"""


def test_test_cases_give_an_api_key_or_an_introspection_answer(
    tmp_path: Path, config_path: Path, idp: IntrospectionServer
) -> None:
    (tmp_path / "cases.yaml").write_text(CASES)
    outcomes = policy_tests.run(
        config.load(config_path), policy_tests.load_cases(tmp_path / "cases.yaml")
    )
    assert [o.mismatches for o in outcomes] == [()] * 5
    assert idp.call_count() == 0  # decided offline
    assert "verified by partner-keys (API key)" in outcomes[0].trace
    assert API_KEY not in "".join(o.trace for o in outcomes)


def test_a_case_with_two_identities_or_no_provider_of_its_kind_is_refused(
    tmp_path: Path, config_path: Path
) -> None:
    (tmp_path / "two.yaml").write_text(
        "cases:\n  - {name: x, apiKey: abcdefghijklmnopqrstu, claims: {}, expect: {status: 200}}\n"
    )
    with pytest.raises(policy_tests.CasesError) as caught:
        policy_tests.load_cases(tmp_path / "two.yaml")
    assert "not claims and apiKey" in str(caught.value)
    (tmp_path / "wrong.yaml").write_text(
        "cases:\n  - {name: x, provider: partner-keys, introspection: {}, expect: {status: 200}}\n"
    )
    with pytest.raises(policy_tests.CasesError) as caught:
        policy_tests.run(config.load(config_path), policy_tests.load_cases(tmp_path / "wrong.yaml"))
    assert "partner-keys is no introspection provider" in str(caught.value)


def test_check_with_a_jwks_file_leaves_the_api_keys_and_introspection_providers_theirs(
    tmp_path: Path, config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    key_file = tmp_path / "key.txt"
    key_file.write_text(API_KEY)
    code, out, _ = run(
        capsys,
        "--config",
        str(config_path),
        "--api-key-file",
        str(key_file),
        "--jwks-file",
        str(tmp_path / "jwks.json"),
    )
    assert code == 0, out
    assert "verified by partner-keys (API key)" in out
