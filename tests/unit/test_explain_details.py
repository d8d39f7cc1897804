"""A 401 says what was wrong (issue 19): `check`, `authz-server test` and the Explain API put
the caller's own token beside the configuration (iss and the issuers, with the closest one;
aud and the audiences; exp/nbf/iat against now and the skew; alg and the allowed list; a kid
no key has; a `Bearer ` prefix in a token file). Other claim values stay hidden unless asked
for, and the wire's `error_description` stays short."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from authz_server import cli
from authz_server.config import load as config
from authz_server.doors.explain_api import to_response
from authz_server.explain import closest_issuer, explain, request_attributes
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.helpers import AUDIENCE, ISSUER, claims_for, write_config

CONFIG = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: main
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksFile: jwks.json
    algorithms: [RS256, ES256]
    clockSkew: 30s
policies:
  - name: readers
    rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""


@pytest.fixture
def config_path(tmp_path: Path, rsa_key: SigningKey) -> Path:
    (tmp_path / "jwks.json").write_text(json.dumps(devkeys.jwks(rsa_key)))
    return write_config(tmp_path, CONFIG)


def check(
    capsys: pytest.CaptureFixture[str], config_path: Path, token_text: str, *flags: str
) -> tuple[int, str]:
    token_file = config_path.parent / "token.txt"
    token_file.write_text(token_text)
    code = cli.main(
        ["check", "--config", str(config_path), "--token-file", str(token_file), *flags]
    )
    out, _ = capsys.readouterr()
    return code, out


def token(rsa_key: SigningKey, **claims: Any) -> str:
    return rsa_key.sign(claims_for(time.time(), **claims))


@pytest.mark.parametrize(
    ("iss", "how"),
    [
        (f"{ISSUER}/", "a trailing slash"),
        (ISSUER.replace("https://", "http://"), "the scheme (http/https)"),
        (ISSUER.upper().replace("HTTPS://", "https://"), "letter case"),
        (ISSUER.replace("https://", "http://") + "/", "a trailing slash and the scheme"),
    ],
    ids=["slash", "scheme", "case", "slash-and-scheme"],
)
def test_an_issuer_that_differs_by_a_slip_is_shown_beside_the_closest_configured_one(
    capsys: pytest.CaptureFixture[str], config_path: Path, rsa_key: SigningKey, iss: str, how: str
) -> None:
    code, out = check(capsys, config_path, token(rsa_key, iss=iss))
    assert code == 1
    assert "rejected: invalid_issuer" in out
    assert f'the token\'s iss "{iss}" is none of the issuers read here: "{ISSUER}" (main)' in out
    assert f'closest: "{ISSUER}" (main), which differs only by {how}' in out


def test_an_unrelated_issuer_gets_no_closest_one() -> None:
    assert closest_issuer("https://other.test", [ISSUER]) is None
    assert closest_issuer(ISSUER, [ISSUER]) is None


def test_a_wrong_audience_is_shown_against_the_accepted_ones(
    capsys: pytest.CaptureFixture[str], config_path: Path, rsa_key: SigningKey
) -> None:
    code, out = check(capsys, config_path, token(rsa_key, aud=["billing-api", "x"]))
    assert (code, "rejected: invalid_audience" in out) == (1, True)
    said = f'aud ["billing-api", "x"] is none of the audiences main accepts: ["{AUDIENCE}"]'
    assert f"the token's {said}" in out


def test_an_expired_token_says_by_how_much_and_the_skew_without_its_times(
    capsys: pytest.CaptureFixture[str], config_path: Path, rsa_key: SigningKey
) -> None:
    expired = token(rsa_key, exp=int(time.time()) - 7200)
    code, out = check(capsys, config_path, expired)
    assert (code, "rejected: token_expired" in out) == (1, True)
    assert re.search(
        r"exp is 2h(0m)?[0-2]?s? before now: expired, beyond the clock skew of main \(30s\)", out
    ), out
    assert not re.search(r"20\d\d-\d\d-\d\dT", out)  # exp's value is a claim: hidden
    _, shown = check(capsys, config_path, expired, "--show-claims")
    assert re.search(r"exp is 2h.* \(20\d\d-\d\d-\d\dT[\d:]+Z, now 20\d\d-", shown)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_a_token_not_valid_yet_says_which_time_is_ahead(
    capsys: pytest.CaptureFixture[str], config_path: Path, rsa_key: SigningKey, claim: str
) -> None:
    code, out = check(capsys, config_path, token(rsa_key, **{claim: int(time.time()) + 600}))
    assert (code, "rejected: token_not_yet_valid" in out) == (1, True)
    assert re.search(
        rf"{claim} is (10m|9m\d+s) after now: not valid yet, beyond the clock skew", out
    )


def test_an_algorithm_not_allowed_is_shown_against_the_allowed_list(
    capsys: pytest.CaptureFixture[str], config_path: Path, rsa_key: SigningKey
) -> None:
    forged = rsa_key.sign(claims_for(time.time()), headers={"alg": "PS256"})
    code, out = check(capsys, config_path, forged)
    assert (code, "rejected: unsupported_algorithm" in out) == (1, True)
    assert 'the token\'s alg "PS256"; main allows ES256, RS256' in out


def test_a_kid_no_key_has_is_shown_against_the_loaded_key_ids(
    capsys: pytest.CaptureFixture[str], config_path: Path, rsa_key: SigningKey
) -> None:
    code, out = check(capsys, config_path, rsa_key.sign(claims_for(time.time()), kid="gone-1"))
    assert (code, "rejected: unknown_kid" in out) == (1, True)
    assert "the token's kid \"gone-1\" is none of the key ids main's key set has: rsa-1" in out


def test_a_bearer_prefix_inside_the_token_file_is_named(
    capsys: pytest.CaptureFixture[str], config_path: Path, rsa_key: SigningKey
) -> None:
    code, out = check(capsys, config_path, f"Bearer {token(rsa_key)}\n")
    assert (code, "rejected: malformed_token" in out) == (1, True)
    assert "the token starts with 'Bearer ': a token file" in out


def test_claim_values_other_than_iss_and_aud_stay_hidden(
    capsys: pytest.CaptureFixture[str], config_path: Path, rsa_key: SigningKey
) -> None:
    wrong = token(rsa_key, iss=f"{ISSUER}/", sub="secret-subject", aud="wrong-aud", email="e@x")
    _, out = check(capsys, config_path, wrong, "--json")
    (outcome,) = json.loads(out)["tokens"]
    assert outcome["error"] == "invalid_issuer" and outcome["details"]
    assert "secret-subject" not in out and "e@x" not in out


def test_authz_server_test_shows_the_details_under_a_failing_case(
    capsys: pytest.CaptureFixture[str], config_path: Path, rsa_key: SigningKey
) -> None:
    cases = config_path.parent / "cases.yaml"
    case = {
        "name": "a token from the IdP is accepted",
        "request": {"method": "GET", "path": "/"},
        "token": token(rsa_key, iss=f"{ISSUER}/"),
        "expect": {"status": 200},
    }
    cases.write_text(json.dumps({"groups": [{"name": "tokens", "cases": [case]}]}))
    assert cli.main(["test", "--config", str(config_path), str(cases)]) == 1
    out = capsys.readouterr().out
    assert f'closest: "{ISSUER}" (main), which differs only by a trailing slash' in out


def test_the_explain_api_carries_the_details_and_the_wire_stays_short(
    config_path: Path, rsa_key: SigningKey
) -> None:
    engine = Engine.build(config.load(config_path))
    try:
        for cache in engine.caches.values():
            assert cache.refresh()
        bad = token(rsa_key, iss=f"{ISSUER}/")
        request = request_attributes(headers={"authorization": f"Bearer {bad}"})
        response = to_response(explain(engine, request))
        (outcome,) = response.tokens
        assert outcome.error == "invalid_issuer"
        assert any("which differs only by a trailing slash" in d for d in outcome.details)
        # Over the wire, the client is told the issuer is not accepted, and nothing more: the
        # configured issuers are not for an unauthenticated caller to enumerate.
        decision = AuthorizationService(engine).check(request)
        challenge = dict(decision.response_headers)["www-authenticate"]
        assert 'error_description="issuer not accepted"' in challenge
        assert ISSUER not in challenge
    finally:
        engine.close()
