"""``authz-server test`` runs policy tests: every case is decided by the configuration's real
engine and compared with what it expects; a failure says what differed and shows the trace;
``--junit-xml`` writes what CI systems read; a bad cases file names the field at fault."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from authz_server import cli
from authz_server.config import load as config
from authz_server.tools import devkeys, policy_tests
from authz_server.tools.devkeys import SigningKey
from tests.certs import CertificateAuthority
from tests.e2e.harness import JWKSServer
from tests.helpers import claims_for, write_config

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = ROOT / "examples" / "demo" / "config.yaml"
DEMO_CASES = ROOT / "examples" / "demo-tests" / "policy-tests.yaml"
README = ROOT / "README.md"


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _junit(path: Path) -> ET.Element:
    """The report as a CI system reads it (the file is the runner's own, just written)."""
    return ET.parse(path).getroot()  # noqa: S314


def test_the_demo_cases_pass_through_the_real_cli(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "authz_server", "test", "--config", str(DEMO_CONFIG)),
            *(str(DEMO_CASES), "--junit-xml", str(junit)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    groups = yaml.safe_load(DEMO_CASES.read_text())["groups"]
    count = sum(len(g["cases"]) for g in groups)
    lines = proc.stdout.splitlines()
    assert lines[-1] == f"{count} passed, 0 failed"
    assert lines[:-1] == [f"PASS  {g['name']} / {c['name']}" for g in groups for c in g["cases"]]
    # The demo covers each answer its README promises: 200, 401 and 403.
    statuses = {c["expect"].get("status") for g in groups for c in g["cases"]}
    assert {200, 401, 403} <= statuses
    root = _junit(junit)
    assert (root.tag, root.get("tests"), root.get("failures")) == ("testsuites", str(count), "0")
    assert [s.get("name") for s in root.iter("testsuite")] == [g["name"] for g in groups]
    assert root.find(".//failure") is None
    # The README shows this very run, and cases of this very file.
    assert f"{proc.stdout}```" in README.read_text()
    shown = [
        b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL) if "expect:" in b
    ]
    assert shown
    for block in shown:
        for group in yaml.safe_load(block)["groups"]:
            (demo,) = [g for g in groups if g["name"] == group["name"]]
            assert all(case in demo["cases"] for case in group["cases"])


# A cases file for the demo with one expectation right and one wrong.
WRONG = """
groups:
  - name: writing
    cases:
      - name: an admin may create an order
        request: {method: POST, path: /api/orders}
        claims: {sub: carol, groups: [admin]}
        expect: {status: 200, policy: api-write-admins, headers: {x-jwt-groups: admin}}
      - name: a developer may create an order
        request: {method: POST, path: /api/orders}
        claims: {sub: bob, groups: [dev]}
        expect: {status: 200, policy: api-write-admins, headers: {x-jwt-sub: bob}}
"""
WHEN_LINE = 'rule 1: when[request.auth.claims[groups]] wants ["admin"], request had ["dev"]'


def test_a_wrong_expectation_fails_with_what_differed_and_the_trace(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cases = write_config(tmp_path, WRONG, "cases.yaml")
    junit = tmp_path / "junit.xml"
    code, out, _ = _main(
        capsys, "test", "--config", str(DEMO_CONFIG), str(cases), "--junit-xml", str(junit)
    )
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "PASS  writing / an admin may create an order"
    assert lines[1] == "FAIL  writing / a developer may create an order"
    assert "      status: expected 200, got 403" in lines
    assert "      policy: expected api-write-admins, got none" in lines
    assert '      header x-jwt-sub: expected "bob", got not set' in lines
    trace = lines[lines.index("      trace:") + 1 : -1]
    assert trace[0] == "        DENY 403 no_allow_policy_matched"
    assert any(line.strip() == WHEN_LINE for line in trace), "\n".join(trace)
    assert lines[-1] == "1 passed, 1 failed"
    assert "eyJ" not in out  # the minted tokens are never printed

    root = _junit(junit)
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("2", "1", "0")
    (suite,) = root.findall("testsuite")
    assert (suite.get("name"), suite.get("tests"), suite.get("failures")) == ("writing", "2", "1")
    passed, failed = suite.findall("testcase")
    for case in (passed, failed):
        assert case.get("classname") == "writing"
        assert float(case.get("time", "-1")) >= 0
    assert passed.get("name") == "an admin may create an order"
    assert passed.find("failure") is None
    failure = failed.find("failure")
    assert failure is not None
    assert "status: expected 200, got 403" in (failure.get("message") or "")
    assert WHEN_LINE in (failure.text or "")


def test_a_bad_cases_file_names_every_field_at_fault(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cases = write_config(
        tmp_path,
        """
groups:
  - name: writing
    cases:
      - name: typo
        request: {method: POST, path: api/orders, sourceIp: 10.0.0.300}
        expect: {stauts: 200}
      - name: no expectation
        expect: {policy: api-write-admins}
      - name: both
        claims: {sub: a}
        token: x
        expect: {status: 200}
      - name: maybe
        expect: {decision: maybe}
""",
        "cases.yaml",
    )
    code, out, err = _main(capsys, "test", "--config", str(DEMO_CONFIG), str(cases))
    assert code == 2
    assert out == ""
    case = "groups[0] (writing).cases"
    assert err.splitlines() == [
        f"invalid cases file {cases} (6 problem(s)):",
        f"  {case}[0] (typo).request.path: must start with '/' (a path, with its query if any)",
        f"  {case}[0] (typo).request.sourceIp: '10.0.0.300' is not an IP address",
        f"  {case}[0] (typo).expect: unknown field 'stauts' (did you mean 'status'? fields: "
        "decision, headers, policy, reason, status)",
        f"  {case}[1] (no expectation).expect: give status or decision (or both)",
        f"  {case}[2] (both): give one of claims (a token is minted), token, apiKey, "
        "introspection, not claims and token",
        f"  {case}[3] (maybe).expect.decision: Input should be 'allow' or 'deny'",
    ]


def test_a_cases_file_must_fit_the_configuration(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cases = write_config(
        tmp_path,
        """
cases:
  - name: nobody's token
    provider: nobody
    claims: {sub: a}
    expect: {decision: allow}
  - name: a policy that is not there
    expect: {decision: allow, policy: api-reed}
""",
        "cases.yaml",
    )
    code, _, err = _main(capsys, "test", "--config", str(DEMO_CONFIG), str(cases))
    assert code == 2
    assert "  cases[0] (nobody's token).provider: no provider named 'nobody' (providers: demo)" in (
        err.splitlines()
    )
    assert (
        "  cases[1] (a policy that is not there).expect.policy: no policy named 'api-reed' in "
        "the configuration (did you mean 'api-read'? policies: api-read, api-write-admins)"
    ) in err.splitlines()
    write_config(tmp_path, "cases: []\n", "cases.yaml")
    code, _, err = _main(capsys, "test", "--config", str(DEMO_CONFIG), str(cases))
    assert code == 2
    assert "(top level): no cases" in err


# ----------------------------------------------------------------------------- keys


@pytest.fixture
def idp(ec_key: SigningKey) -> Iterator[JWKSServer]:
    """The provider's real key source: a JWKS endpoint that counts its fetches."""
    with JWKSServer(devkeys.jwks(ec_key)) as server:
        yield server


ISSUER = "https://idp.test"


def _settings(tmp_path: Path, idp: JWKSServer) -> config.Settings:
    path = write_config(
        tmp_path,
        f"""
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: idp
    issuer: {ISSUER}
    audiences: [orders]
    jwksUri: {idp.jwks_url}
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
  - name: partner
    issuer: https://partner.test
    jwksUri: http://127.0.0.1:9/nothing-answers-here
    fromHeaders: [{{name: x-partner-token}}]
    algorithms: [EdDSA]
policies:
  - name: staff
    rules:
      - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
        to: [{{operation: {{paths: ["/staff/*"]}}}}]
  - name: partners
    rules:
      - from: [{{source: {{requestPrincipals: ["https://partner.test/*"]}}}}]
        to: [{{operation: {{paths: ["/partner/*"]}}}}]
""",
    )
    return config.load(path)


def _cases(**document: object) -> policy_tests.CasesFile:
    return policy_tests.CasesFile.model_validate(document)


def _failures(outcomes: list[policy_tests.Outcome]) -> list[str]:
    return [f"{o.title}: {o.mismatches}\n{o.trace}" for o in outcomes if not o.passed]


def test_minted_tokens_verify_with_throwaway_keys_and_nothing_is_fetched(
    tmp_path: Path, idp: JWKSServer
) -> None:
    settings = _settings(tmp_path, idp)
    cases = _cases(
        cases=[
            {
                "name": "staff",
                "provider": "idp",
                "request": {"path": "/staff/rota", "headers": {"X-User": "root"}},
                "claims": {"sub": "alice"},
                "expect": {"status": 200, "policy": "staff", "headers": {"x-user": "alice"}},
            },
            {
                # The issuer picks the provider; EdDSA is the only algorithm it accepts, and
                # it reads the token from its own header.
                "name": "partner",
                "request": {"path": "/partner/orders"},
                "claims": {"iss": "https://partner.test", "sub": "p1"},
                "expect": {"status": 200, "policy": "partners", "headers": {"x-user": None}},
            },
            {
                "name": "a partner is not staff",
                "provider": "partner",
                "request": {"path": "/staff/rota"},
                "claims": {"sub": "p1"},
                "expect": {"status": 403, "reason": "no_allow_policy_matched"},
            },
            {
                "name": "no exp",
                "provider": "idp",
                "request": {"path": "/staff/rota"},
                "claims": {"sub": "alice", "exp": None},
                "expect": {"status": 401, "reason": "missing_claim"},
            },
            {
                "name": "anonymous",
                "request": {"path": "/staff/rota"},
                "expect": {"status": 401, "reason": "missing_credentials"},
            },
        ]
    )
    outcomes = policy_tests.run(settings, cases)
    assert _failures(outcomes) == []
    assert idp.fetch_count() == 0


def test_a_raw_token_is_verified_with_the_configured_keys(
    tmp_path: Path, idp: JWKSServer, ec_key: SigningKey
) -> None:
    settings = _settings(tmp_path, idp)
    real = ec_key.sign(claims_for(0, iss=ISSUER, aud="orders", exp=4102444800, iat=None))
    forged = devkeys.generate_key("EC-P256", kid=ec_key.kid).sign(
        claims_for(0, iss=ISSUER, aud="orders", exp=4102444800, iat=None)
    )
    cases = _cases(
        groups=[
            {
                "name": "raw",
                "cases": [
                    {
                        "name": "signed by the IdP's key",
                        "request": {"path": "/staff/rota"},
                        "token": real,
                        "expect": {"status": 200, "headers": {"x-user": "alice"}},
                    },
                    {
                        "name": "signed by another key",
                        "request": {"path": "/staff/rota"},
                        "token": forged,
                        "expect": {"status": 200},  # wrong on purpose: its output is checked
                    },
                    {
                        "name": "minted beside them",
                        "provider": "idp",
                        "request": {"path": "/staff/rota"},
                        "claims": {"sub": "bob"},
                        "expect": {"status": 200, "headers": {"x-user": "bob"}},
                    },
                ],
            }
        ]
    )
    warnings: list[str] = []
    outcomes = policy_tests.run(settings, cases, warn=warnings.append)
    assert [o.passed for o in outcomes] == [True, False, True]
    assert outcomes[1].mismatches == ("status: expected 200, got 401",)
    assert "rejected: invalid_signature" in outcomes[1].trace
    assert forged not in outcomes[1].trace
    # The IdP's keys were loaded once, for the raw tokens; the partner's (unreachable) never.
    assert idp.fetch_count() == 1
    assert warnings == []


def test_claims_without_an_issuer_to_mint_for_are_refused(tmp_path: Path, idp: JWKSServer) -> None:
    settings = _settings(tmp_path, idp)
    cases = _cases(cases=[{"name": "whose?", "claims": {"sub": "a"}, "expect": {"status": 200}}])
    with pytest.raises(policy_tests.CasesError) as caught:
        policy_tests.run(settings, cases)
    assert caught.value.problems == (
        "cases[0] (whose?).claims: 2 providers (idp, partner): name one with `provider`, or "
        "give the `iss` claim",
    )


def test_a_raw_tokens_failure_never_prints_the_token(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ec_key: SigningKey
) -> None:
    token = ec_key.sign(
        claims_for(0, iss="https://issuer.demo.authz-server.local", exp=4102444800, iat=None)
    )
    cases = write_config(
        tmp_path,
        json.dumps({"cases": [{"name": "old", "token": token, "expect": {"decision": "allow"}}]}),
        "cases.yaml",
    )
    code, out, err = _main(capsys, "test", "--config", str(DEMO_CONFIG), str(cases))
    assert code == 1
    assert "FAIL  old" in out
    assert "rejected: unknown_kid" in out
    assert token not in out + err
    assert token.split(".")[2] not in out + err


def test_sender_constrained_cases_bind_minted_tokens_and_present_proofs_and_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = CertificateAuthority()
    ca.issue("partner", server=False).write(tmp_path, "partner")
    ca.issue("other", server=False).write(tmp_path, "other")
    config_path = write_config(
        tmp_path,
        """
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: fapi
    issuer: https://fapi.test
    jwksUri: http://127.0.0.1:9/nothing-answers-here
    dpop: {mode: required, externalUrl: "https://api.example.com"}
  - name: mtls
    issuer: https://mtls.test
    jwksUri: http://127.0.0.1:9/nothing-answers-here
    fromHeaders: [{name: x-mtls-token}]
    certificateBound: required
policies:
  - name: callers
    rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
""",
    )
    cases = {
        "cases": [
            {
                "name": "dpop",
                "provider": "fapi",
                "dpop": True,
                "request": {"method": "post", "host": "envoy.internal", "path": "/o?x=1"},
                "claims": {"sub": "alice"},
                "expect": {"status": 200},
            },
            {
                "name": "a DPoP-bound token as bearer",
                "provider": "fapi",
                "claims": {"sub": "alice", "cnf": {"jkt": "not-presented"}},
                "expect": {"status": 401, "reason": "bound_token_without_proof"},
            },
            {
                "name": "its certificate",
                "provider": "mtls",
                "boundToCertificate": "partner.crt",
                "request": {"clientCertificate": "partner.crt"},
                "claims": {"sub": "bob"},
                "expect": {"status": 200},
            },
            {
                "name": "another certificate",
                "provider": "mtls",
                "boundToCertificate": "partner.crt",
                "request": {"clientCertificate": "other.crt"},
                "claims": {"sub": "bob"},
                "expect": {"status": 200},  # wrong on purpose: the trace must say why
            },
        ]
    }
    (tmp_path / "cases.yaml").write_text(yaml.safe_dump(cases))

    code, out, _ = _main(capsys, "test", "--config", str(config_path), str(tmp_path / "cases.yaml"))

    assert code == 1
    assert "PASS  dpop" in out and "PASS  a DPoP-bound token as bearer" in out
    assert "PASS  its certificate" in out and "FAIL  another certificate" in out
    assert "rejected: certificate_mismatch (token bound to another client certificate)" in out
    assert "3 passed, 1 failed" in out


def test_sender_constrained_case_fields_are_checked(tmp_path: Path) -> None:
    (tmp_path / "cases.yaml").write_text(
        yaml.safe_dump(
            {
                "cases": [
                    {"name": "raw", "token": "a.b.c", "dpop": True, "expect": {"status": 200}},
                    {
                        "name": "missing file",
                        "claims": {"sub": "x"},
                        "boundToCertificate": "nowhere.pem",
                        "expect": {"status": 200},
                    },
                ]
            }
        )
    )
    with pytest.raises(policy_tests.CasesError) as caught:
        policy_tests.load_cases(tmp_path / "cases.yaml")
    assert list(caught.value.problems) == [
        "cases[0] (raw): dpop and boundToCertificate bind a minted token: give claims"
    ]
    (tmp_path / "cases.yaml").write_text(
        yaml.safe_dump(
            {
                "cases": [
                    {
                        "name": "missing file",
                        "claims": {"sub": "x"},
                        "boundToCertificate": "nowhere.pem",
                        "expect": {"status": 200},
                    }
                ]
            }
        )
    )
    cases = policy_tests.load_cases(tmp_path / "cases.yaml")
    settings = config.load(
        write_config(
            tmp_path,
            "apiVersion: authz-server/v1\nkind: AuthzConfig\nproviders:\n"
            "  - {issuer: https://i.test, jwksUri: http://127.0.0.1:9/x,"
            " certificateBound: optional}\n"
            "policies: [{name: any, rules: [{}]}]\n",
        )
    )
    with pytest.raises(policy_tests.CasesError) as caught:
        policy_tests.run(settings, cases)
    (problem,) = caught.value.problems
    assert problem.startswith("cases[0] (missing file).boundToCertificate: ")
    assert "nowhere.pem" in problem
