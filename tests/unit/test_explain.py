"""``authz-server check`` explains a decision rule by rule: which clause of each policy failed,
what it wanted and what the request had, without ever printing the token."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from authz_server import cli, errors
from authz_server.tools import devkeys
from authz_server.tools.devkeys import SigningKey
from tests.helpers import AUDIENCE, ISSUER, write_config

# The keys live at an address nothing answers: only --jwks-file can make tokens verify.
CONFIG = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: main
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksUri: http://127.0.0.1:9/unreachable/jwks.json
    timeout: 1s
policies:
  - name: no-internal
    action: DENY
    rules:
      - to: [{{operation: {{paths: ["/api/internal*"]}}}}]
  - name: readers
    rules:
      - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
        to:
          - operation: {{methods: ["GET"], paths: ["/api/*"]}}
          - operation: {{methods: ["HEAD"]}}
  - name: tenant-writers
    rules:
      - to: [{{operation: {{methods: ["POST"]}}}}]
        when:
          - {{key: "request.auth.claims[groups]", values: ["writers"]}}
          - {{key: "request.headers[authorization]", notValues: ["Bearer blocked*"]}}
          - {{key: "request.context_extensions[tenant]", values: ["acme"]}}
  - name: watch-posts
    action: AUDIT
    rules: [{{to: [{{operation: {{methods: ["POST"]}}}}]}}]
  - name: future-lockdown
    action: DENY
    dryRun: true
    rules: [{{from: [{{source: {{notIpBlocks: ["10.0.0.0/8"]}}}}]}}]
"""


@pytest.fixture
def setup(tmp_path: Path, rsa_key: SigningKey) -> tuple[Path, Path]:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(devkeys.jwks(rsa_key)))
    return write_config(tmp_path, CONFIG), jwks


def _check(
    capsys: pytest.CaptureFixture[str], setup: tuple[Path, Path], token: str | None, *flags: str
) -> tuple[int, str, str]:
    config, jwks = setup
    argv = ["check", "--config", str(config), "--jwks-file", str(jwks), *flags]
    if token is not None:
        token_file = config.parent / "token.txt"
        token_file.write_text(token)
        argv += ["--token-file", str(token_file)]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert token is None or (token not in out + err and token.split(".")[2] not in out + err)
    return code, out, err


def _policies(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in result["policies"]}


def test_a_denied_post_names_the_failing_clause_of_every_policy(
    capsys: pytest.CaptureFixture[str],
    setup: tuple[Path, Path],
    make_token: Callable[..., str],
) -> None:
    token = make_token(groups=["readers"])

    code, out, _ = _check(
        capsys, setup, token, "--method", "POST", "--path", "/api/orders", "--json"
    )

    assert code == 1
    result = json.loads(out)
    assert (result["status"], result["reason"]) == (403, errors.NO_ALLOW_POLICY_MATCHED)
    assert result["tokens"] == [
        {
            "location": "header authorization (prefix 'Bearer')",
            "providers": ["main"],
            "result": "verified",
            "provider": "main",
            "credential": "jwt",
            "principal": f"{ISSUER}/alice",
        }
    ]
    policies = _policies(result)
    assert [p["name"] for p in result["policies"]] == [
        "no-internal",
        "readers",
        "tenant-writers",
        "watch-posts",
        "future-lockdown",
    ]
    assert policies["no-internal"]["rules"] == [
        {
            "rule": 1,
            "matched": False,
            "failed": [
                {"field": "to.operation.paths", "wanted": ["/api/internal*"], "had": "/api/orders"}
            ],
        }
    ]
    # Two operations: neither matched, each says why.
    assert policies["readers"]["rules"][0]["failed"] == [
        {"field": "to[0].operation.methods", "wanted": ["GET"], "had": "POST"},
        {"field": "to[1].operation.methods", "wanted": ["HEAD"], "had": "POST"},
    ]
    assert policies["tenant-writers"]["rules"][0]["failed"] == [
        {"field": "when[request.auth.claims[groups]]", "wanted": ["writers"], "hidden": True}
    ]
    # AUDIT and dry-run policies are in the trace too.
    assert (policies["watch-posts"]["matched"], policies["watch-posts"]["decided"]) == (True, False)
    assert result["audited"] == ["watch-posts"]
    # No client address is known: "not in 10.0.0.0/8" holds, so the dry run would deny.
    lockdown = policies["future-lockdown"]
    assert (lockdown["dry_run"], lockdown["matched"], lockdown["decided"]) == (True, True, False)
    assert result["dry_run"] == {"future-lockdown": "deny"}


def test_show_claims_reveals_the_claim_and_the_next_failing_clause_is_named(
    capsys: pytest.CaptureFixture[str],
    setup: tuple[Path, Path],
    make_token: Callable[..., str],
) -> None:
    token = make_token(groups=["writers"])
    flags = ("--method", "POST", "--path", "/api/orders", "--json", "--show-claims")

    code, out, _ = _check(capsys, setup, token, *flags, "--context-extension", "tenant=globex")

    assert code == 1
    result = json.loads(out)
    assert result["tokens"][0]["claims"]["groups"] == ["writers"]
    # The claim matched; the header clause passed (its value holds the token: redacted if
    # shown); the context extension is the first to fail.
    assert _policies(result)["tenant-writers"]["rules"][0]["failed"] == [
        {
            "field": "when[request.context_extensions[tenant]]",
            "wanted": ["acme"],
            "had": "globex",
        }
    ]

    code, out, _ = _check(capsys, setup, token, *flags, "--context-extension", "tenant=acme")
    assert code == 0
    result = json.loads(out)
    assert (result["policy"], _policies(result)["tenant-writers"]["decided"]) == (
        "tenant-writers",
        True,
    )


def test_a_clause_on_the_token_header_never_shows_the_token(
    capsys: pytest.CaptureFixture[str],
    setup: tuple[Path, Path],
    make_token: Callable[..., str],
) -> None:
    config, _ = setup
    config.write_text(CONFIG.replace('notValues: ["Bearer blocked*"]', 'values: ["Bearer nobody"]'))
    token = make_token(groups=["writers"])
    flags = ("--method", "POST", "--context-extension", "tenant=acme", "--json")

    code, out, _ = _check(capsys, setup, token, *flags)

    assert code == 1
    failed = _policies(json.loads(out))["tenant-writers"]["rules"][0]["failed"]
    assert failed == [
        {
            "field": "when[request.headers[authorization]]",
            "wanted": ["Bearer nobody"],
            "had": "(redacted: holds a token)",
        }
    ]


def test_when_the_token_decides_no_policy_is_traced(
    capsys: pytest.CaptureFixture[str],
    setup: tuple[Path, Path],
    make_token: Callable[..., str],
) -> None:
    expired = make_token(exp=1_000_000_000)

    code, out, _ = _check(capsys, setup, expired)

    assert code == 1
    assert out.splitlines()[0] == f"DENY 401 {errors.TOKEN_EXPIRED}"
    assert (
        "token: header authorization (prefix 'Bearer') (providers main): rejected: token_expired"
        in out
    )
    assert "no policy was evaluated: the credentials decided" in out

    code, out, _ = _check(capsys, setup, expired, "--json")
    result = json.loads(out)
    assert (result["policies_evaluated"], result["policies"]) == (False, [])


def test_the_text_form_puts_one_line_per_policy_and_the_failing_clause_beneath(
    capsys: pytest.CaptureFixture[str],
    setup: tuple[Path, Path],
    make_token: Callable[..., str],
) -> None:
    code, out, _ = _check(
        capsys, setup, make_token(), "--method", "GET", "--path", "/api/internal/keys"
    )

    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "DENY 403 policy_denied (policy no-internal)"
    start = lines.index("  DENY    no-internal: matched -> decided")
    assert lines[start + 1] == "      rule 1: matched"
    readers = lines.index("  ALLOW   readers: matched")
    assert lines[readers + 1] == "      rule 1: matched"
    writers = lines.index("  ALLOW   tenant-writers: not matched")
    assert (
        lines[writers + 1] == '      rule 1: to.operation.methods wants ["POST"], request had "GET"'
    )
    lockdown = lines.index("  DENY dry-run future-lockdown: matched")
    assert lines[lockdown + 1] == "      rule 1: matched"

    code, out, _ = _check(capsys, setup, make_token(), "--source-ip", "10.1.2.3")
    lines = out.splitlines()
    lockdown = lines.index("  DENY dry-run future-lockdown: not matched")
    assert lines[lockdown + 1] == (
        '      rule 1: from.source.notIpBlocks wants none of ["10.0.0.0/8"], request had "10.1.2.3"'
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--context-extension", "tenant"), "--context-extension 'tenant': expected KEY=VALUE"),
        (("--header", "no-colon"), "--header 'no-colon': expected 'NAME: VALUE'"),
        (("--source-ip", "10.0.0.300"), "--source-ip: source_ip '10.0.0.300' is not an IP address"),
    ],
)
def test_malformed_flags_exit_2_and_say_which(
    capsys: pytest.CaptureFixture[str],
    setup: tuple[Path, Path],
    flags: tuple[str, ...],
    message: str,
) -> None:
    code, out, err = _check(capsys, setup, None, *flags)

    assert (code, out) == (2, "")
    assert message in err


def test_a_jwks_file_that_is_not_json_exits_2(
    capsys: pytest.CaptureFixture[str], setup: tuple[Path, Path]
) -> None:
    config, jwks = setup
    jwks.write_text("{not json")

    code = cli.main(["check", "--config", str(config), "--jwks-file", str(jwks)])

    assert code == 2
    assert f"--jwks-file {jwks}: not JSON" in capsys.readouterr().err


def test_without_the_jwks_file_the_unreachable_idp_is_reported(
    capsys: pytest.CaptureFixture[str],
    setup: tuple[Path, Path],
    make_token: Callable[..., str],
) -> None:
    config, _ = setup
    token_file = config.parent / "token.txt"
    token_file.write_text(make_token())

    code = cli.main(["check", "--config", str(config), "--token-file", str(token_file)])

    out, err = capsys.readouterr()
    assert code == 1
    assert "warning: provider main:" in err
    assert out.splitlines()[0] == f"DENY 503 {errors.JWKS_UNAVAILABLE}"


def test_the_readme_shows_what_check_prints_for_the_demos_refused_post(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    section = readme.split("## Why was a request denied?", 1)[1]
    commands, shown = section.split("```sh\n", 1)[1].split("```text\n", 1)
    mint, check = _commands(commands.split("```", 1)[0])
    token_file = tmp_path / "alice.jwt"

    assert cli.main(_in(root, mint[1 : mint.index(">")])) == 0
    token_file.write_text(capsys.readouterr().out)
    argv = _in(root, check[1:])
    argv[argv.index("alice.jwt")] = str(token_file)
    assert cli.main(argv) == 1

    assert capsys.readouterr().out == shown.split("```", 1)[0]


def _commands(block: str) -> list[list[str]]:
    """The shell commands of a README block, each as its words (continuations joined)."""
    return [line.split() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _in(root: Path, words: list[str]) -> list[str]:
    """The words with repository paths made absolute and quoting removed."""
    bare = [word.strip("'") for word in words]
    return [str(root / word) if word.startswith("examples/") else word for word in bare]


def test_check_puts_the_token_where_its_provider_reads_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rsa_key: SigningKey, make_token: Any
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(devkeys.jwks(rsa_key)))
    text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksFile: jwks.json
    fromParams: [access_token]
policies: [{{name: signed-in, rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]}}]
"""
    token_file = tmp_path / "token.txt"
    token_file.write_text(make_token())
    argv = ["check", "--config", str(write_config(tmp_path, text))]

    assert cli.main([*argv, "--token-file", str(token_file), "--path", "/api?page=2"]) == 0

    out = capsys.readouterr().out
    assert "token: param access_token (providers " in out
    assert token_file.read_text() not in out
