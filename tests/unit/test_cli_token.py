"""`authz-server token`: keys made on disk, tokens minted from them, and the server's own
`validate` and `check` judging those tokens — real keys, real files, the real CLI."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_server import cli
from authz_server.config import load as config
from authz_server.tools import devtoken
from authz_server.tools.devkeys import b64url_decode
from tests.certs import CertificateAuthority

ISSUER = "https://dev-issuer.invalid"

# POST needs the admin group; GET needs any authenticated caller.
POLICIES = """\
apiVersion: authz-server/v1
kind: AuthzConfig
policies:
  - name: admins-write
    rules:
      - to: [{operation: {methods: [POST]}}]
        when: [{key: "request.auth.claims[groups]", values: [admin]}]
  - name: members-read
    rules:
      - from: [{source: {requestPrincipals: ["*"]}}]
        to: [{operation: {methods: [GET]}}]
"""

_PRIVATE_JWK_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _payload(token: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(b64url_decode(token.split(".")[1]))
    return result


def _config_dir(tmp_path: Path, provider_document: str) -> Path:
    """A configuration directory: the printed provider document beside the policies."""
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "dev-provider.yaml").write_text(provider_document)
    (directory / "policies.yaml").write_text(POLICIES)
    return directory


def _mint(capsys: pytest.CaptureFixture[str], key: Path, *extra: str) -> str:
    code, out, err = _cli(capsys, "token", "mint", "--key", str(key), "--issuer", ISSUER, *extra)
    assert (code, err) == (0, "")
    assert out.count("\n") == 1, "mint prints the token alone, on one line"
    return out.strip()


def _check(
    capsys: pytest.CaptureFixture[str], config_dir: Path, token: str, method: str
) -> tuple[int, dict[str, Any]]:
    token_file = config_dir.parent / "token.txt"
    token_file.write_text(token + "\n")
    code, out, _ = _cli(
        capsys,
        "check",
        "--json",
        "--config",
        str(config_dir),
        "--method",
        method,
        "--path",
        "/api/orders",
        "--token-file",
        str(token_file),
    )
    return code, json.loads(out)


def test_init_writes_a_private_key_only_its_owner_reads_and_a_public_only_jwks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"

    code, out, _ = _cli(capsys, "token", "init", "--dir", str(keys), "--kid", "dev-1")

    assert code == 0
    private, jwks = keys / "private.pem", keys / "jwks.json"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    published = json.loads(jwks.read_text())["keys"]
    assert len(published) == 1
    assert published[0]["kid"] == "dev-1"
    assert published[0]["kty"] == "RSA"
    assert not _PRIVATE_JWK_MEMBERS & set(published[0])
    assert "NOT for production" in out
    assert f"jwksFile: {jwks}" in out


@pytest.mark.parametrize(("kind", "alg"), [("RSA", "RS256"), ("EC", "ES256"), ("Ed25519", "EdDSA")])
def test_a_minted_token_is_allowed_or_denied_by_check_as_the_policies_say(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, alg: str
) -> None:
    keys = tmp_path / "keys"
    code, provider_document, _ = _cli(capsys, "token", "init", "--dir", str(keys), "--kind", kind)
    assert code == 0
    config_dir = _config_dir(tmp_path, provider_document)
    assert _cli(capsys, "validate", "--config", str(config_dir))[:2] == (0, "ok\n")
    settings = config.load(config_dir)
    assert [p.jwks_file for p in settings.providers] == [keys / "jwks.json"]

    admin = _mint(capsys, keys / "private.pem", "--sub", "root", "--claim", 'groups=["admin"]')
    member = _mint(capsys, keys, "--sub", "alice", "--claim", "groups=dev")

    code, result = _check(capsys, config_dir, admin, "POST")
    assert (code, result["decision"], result["policy"]) == (0, "allow", "admins-write")
    assert result["principal"] == f"{ISSUER}/root"
    code, result = _check(capsys, config_dir, member, "POST")
    assert (code, result["status"], result["reason"]) == (1, 403, "no_allow_policy_matched")
    code, result = _check(capsys, config_dir, member, "GET")
    assert (code, result["policy"]) == (0, "members-read")
    assert json.loads(b64url_decode(admin.split(".")[0]))["alg"] == alg


def test_expired_and_foreign_tokens_are_refused_with_401(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, other = tmp_path / "keys", tmp_path / "other"
    _, provider_document, _ = _cli(capsys, "token", "init", "--dir", str(keys), "--kid", "k1")
    _cli(capsys, "token", "init", "--dir", str(other), "--kid", "k1")
    config_dir = _config_dir(tmp_path, provider_document)
    past = str(int(time.time()) - 3600)

    expired = _mint(capsys, keys, "--sub", "alice", "--claim", f"exp={past}")
    foreign = _mint(capsys, other, "--sub", "alice")  # same kid, another key
    wrong_issuer = _cli(capsys, "token", "mint", "--key", str(keys), "--issuer", "https://x")[1]

    for token, reason in (
        (expired, "token_expired"),
        (foreign, "invalid_signature"),
        (wrong_issuer.strip(), "invalid_issuer"),
    ):
        code, result = _check(capsys, config_dir, token, "GET")
        assert (code, result["status"], result["reason"]) == (1, 401, reason)


def test_claims_are_json_when_they_parse_strings_otherwise_and_null_removes_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    _cli(capsys, "token", "init", "--dir", str(keys), "--kind", "Ed25519")

    token = _mint(
        capsys,
        keys,
        "--sub",
        "alice",
        "--aud",
        "orders-api",
        "--aud",
        "billing",
        "--ttl",
        "15m",
        "--claim",
        "admin=true",
        "--claim",
        "level=42",
        "--claim",
        'quoted="42"',
        "--claim",
        "name=Alice Smith",
        "--claim",
        'realm={"roles": ["a", "b"]}',
        "--claim",
        "url=https://a.example/x=y",
        "--claim",
        "iat=null",
    )

    claims = _payload(token)
    assert claims["admin"] is True
    assert claims["level"] == 42
    assert claims["quoted"] == "42"
    assert claims["name"] == "Alice Smith"
    assert claims["realm"] == {"roles": ["a", "b"]}
    assert claims["url"] == "https://a.example/x=y"
    assert claims["aud"] == ["orders-api", "billing"]
    assert "iat" not in claims
    assert 15 * 60 - 5 <= claims["exp"] - time.time() <= 15 * 60
    one_audience = _payload(_mint(capsys, keys, "--aud", "orders-api", "--ttl", "90"))
    assert one_audience["aud"] == "orders-api"
    assert one_audience["exp"] - one_audience["iat"] == 90
    assert "sub" not in one_audience


def test_init_refuses_to_replace_a_key_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    _cli(capsys, "token", "init", "--dir", str(keys), "--kind", "EC")
    before = (keys / "private.pem").read_bytes()

    code, out, err = _cli(capsys, "token", "init", "--dir", str(keys), "--kind", "EC")
    assert (code, out) == (2, "")
    assert "already exists" in err
    assert "--force" in err
    assert (keys / "private.pem").read_bytes() == before

    assert _cli(capsys, "token", "init", "--dir", str(keys), "--kind", "EC", "--force")[0] == 0
    assert (keys / "private.pem").read_bytes() != before
    assert stat.S_IMODE((keys / "private.pem").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--claim", "groups"], "--claim 'groups': expected NAME=VALUE"),
        (["--alg", "RS256"], "--alg RS256: RS256 needs an RSA key, not Ed25519"),
        (["--key", "/nonexistent/private.pem"], "--key /nonexistent/private.pem: cannot read"),
    ],
)
def test_mint_errors_name_the_flag_at_fault(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    keys = tmp_path / "keys"
    _cli(capsys, "token", "init", "--dir", str(keys), "--kind", "Ed25519")

    code, out, err = _cli(
        capsys, "token", "mint", "--key", str(keys), "--issuer", ISSUER, "--sub", "a", *argv
    )

    assert (code, out) == (2, "")
    assert message in err


def test_mint_with_a_bad_ttl_is_a_usage_error_naming_the_duration_syntax(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["token", "mint", "--key", str(tmp_path), "--issuer", ISSUER, "--ttl", "1 day"])

    assert exited.value.code == 2
    assert "argument --ttl: expected a duration like '5s'" in capsys.readouterr().err


def test_the_help_marks_token_as_a_development_tool(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["token", "--help"])
    token_help = " ".join(capsys.readouterr().out.split())

    assert "DEVELOPMENT TOOL" in " ".join(top.split())
    assert "DEVELOPMENT TOOL" in token_help
    assert "Never point a production configuration at these keys" in token_help


def test_the_whole_story_through_the_installed_command(tmp_path: Path) -> None:
    """init > file, mint > file, check --token-file: what the docs tell a user to type."""

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "authz_server", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    keys = tmp_path / "keys"
    init = run("token", "init", "--dir", str(keys), "--kind", "EC", "--issuer", ISSUER)
    assert init.returncode == 0, init.stderr
    config_dir = _config_dir(tmp_path, init.stdout)
    minted = run(
        "token", "mint", "--key", str(keys / "private.pem"), "--issuer", ISSUER,
        "--sub", "root", "--claim", 'groups=["admin"]',
    )  # fmt: skip
    assert minted.returncode == 0, minted.stderr
    (tmp_path / "jwt.txt").write_text(minted.stdout)

    check = run(
        "check", "--json", "--config", str(config_dir), "--method", "POST", "--path", "/api/orders",
        "--token-file", str(tmp_path / "jwt.txt"),
    )  # fmt: skip

    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["principal"] == f"{ISSUER}/root"
    assert minted.stdout.strip() not in check.stdout + check.stderr  # never echoes the token


def test_the_kid_comes_from_the_jwks_beside_the_key(tmp_path: Path) -> None:
    files = devtoken.init_keys(tmp_path / "keys", kind="EC", kid="from-init")

    assert devtoken.load_signing_key(files.private_key).kid == "from-init"
    assert devtoken.load_signing_key(files.private_key, kid="override").kid == "override"
    (tmp_path / "keys" / "jwks.json").unlink()
    assert devtoken.load_signing_key(files.private_key).kid != "from-init"  # the thumbprint


def test_two_key_directories_named_apart_make_one_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alpha, beta = tmp_path / "alpha", tmp_path / "beta"
    _, alpha_document, _ = _cli(capsys, "token", "init", "--dir", str(alpha), "--kind", "EC",
                                "--name", "alpha", "--issuer", "https://alpha.invalid")  # fmt: skip
    _, beta_document, _ = _cli(capsys, "token", "init", "--dir", str(beta), "--kind", "EC",
                               "--name", "beta", "--issuer", "https://beta.invalid")  # fmt: skip
    config_dir = _config_dir(tmp_path, alpha_document)
    (config_dir / "beta-provider.yaml").write_text(beta_document)

    assert sorted(p.name for p in config.load(config_dir).providers) == ["alpha", "beta"]
    for keys, issuer, name in ((alpha, "https://alpha.invalid", "alpha"),
                               (beta, "https://beta.invalid", "beta")):  # fmt: skip
        token = _cli(capsys, "token", "mint", "--key", str(keys), "--issuer", issuer,
                     "--sub", "bob")[1].strip()  # fmt: skip
        code, result = _check(capsys, config_dir, token, "GET")
        assert (code, result["provider"], result["principal"]) == (0, name, f"{issuer}/bob")


def _bound_config(tmp_path: Path, provider_document: str, binding: dict[str, Any]) -> Path:
    """The printed provider with its sender-constraint settings (``dpop``, ``certificateBound``)
    beside the policies."""
    document = yaml.safe_load(provider_document)
    document["providers"][0].update(binding)
    return _config_dir(tmp_path, yaml.safe_dump(document))


def test_a_dpop_bound_token_passes_check_with_its_proof_and_not_as_bearer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, client = tmp_path / "keys", tmp_path / "client"
    _, provider_document, _ = _cli(capsys, "token", "init", "--dir", str(keys))
    _cli(capsys, "token", "init", "--dir", str(client), "--kind", "EC")
    config_dir = _bound_config(tmp_path, provider_document, {"dpop": {"mode": "required"}})
    token = _mint(capsys, keys, "--sub", "alice", "--dpop-key", str(client / "private.pem"))
    client_key = devtoken.load_signing_key(client)
    assert _payload(token)["cnf"] == {"jkt": client_key.thumbprint()}

    code, proof, err = _cli(
        capsys,
        "token",
        "dpop-proof",
        "--key",
        str(client),
        "--method",
        "get",
        "--url",
        "https://api.example.com/api/orders",
        "--token",
        token,
    )
    assert (code, err) == (0, "")
    (tmp_path / "proof").write_text(proof)
    (tmp_path / "token.txt").write_text(token)
    argv = ["check", "--json", "--config", str(config_dir), "--host", "api.example.com"]
    argv += ["--scheme", "https", "--path", "/api/orders"]
    argv += ["--token-file", str(tmp_path / "token.txt")]

    code, out, _ = _cli(capsys, *argv, "--dpop-proof", str(tmp_path / "proof"))
    assert (code, json.loads(out)["principal"]) == (0, f"{ISSUER}/alice")
    code, out, _ = _cli(capsys, *argv)
    assert (code, json.loads(out)["reason"]) == (1, "bound_token_without_proof")
    header = json.loads(b64url_decode(proof.split(".")[0]))
    assert header["typ"] == "dpop+jwt" and not _PRIVATE_JWK_MEMBERS & set(header["jwk"])
    claims = _payload(proof.strip())
    assert (claims["htm"], claims["htu"]) == ("GET", "https://api.example.com/api/orders")


def test_a_certificate_bound_token_passes_check_with_its_certificate_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = CertificateAuthority()
    cert, _ = ca.issue("partner", server=False).write(tmp_path, "partner")
    other, _ = ca.issue("other", server=False).write(tmp_path, "other")
    keys = tmp_path / "keys"
    _, provider_document, _ = _cli(capsys, "token", "init", "--dir", str(keys))
    config_dir = _bound_config(tmp_path, provider_document, {"certificateBound": "required"})
    token = _mint(capsys, keys, "--sub", "bob", "--cert-file", str(cert))
    (tmp_path / "token.txt").write_text(token)
    argv = ["check", "--json", "--config", str(config_dir), "--path", "/api/orders"]
    argv += ["--token-file", str(tmp_path / "token.txt")]

    code, out, _ = _cli(capsys, *argv, "--client-cert", str(cert))
    assert (code, json.loads(out)["principal"]) == (0, f"{ISSUER}/bob")
    code, out, _ = _cli(capsys, *argv, "--client-cert", str(other))
    assert (code, json.loads(out)["reason"]) == (1, "certificate_mismatch")


def test_binding_and_proof_errors_name_the_flag_at_fault(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    _cli(capsys, "token", "init", "--dir", str(keys))
    (tmp_path / "junk.pem").write_text("junk")
    mint = ["token", "mint", "--key", str(keys), "--issuer", ISSUER]
    proof = ["token", "dpop-proof", "--key", str(keys), "--method", "GET"]

    for argv, flag in (
        ([*mint, "--dpop-key", str(tmp_path / "missing.pem")], "--dpop-key"),
        ([*mint, "--cert-file", str(tmp_path / "junk.pem")], "--cert-file"),
        ([*proof, "--url", "https://api.example.com/x?page=2"], "--url"),
        ([*proof, "--url", "/relative"], "--url"),
    ):
        code, out, err = _cli(capsys, *argv)
        assert (code, out) == (2, ""), argv
        assert err.startswith(f"authz-server token {argv[1]}: {flag} "), err


def test_mint_signs_for_the_issuer_and_key_init_wrote_unless_told_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    issuer = "https://my-idp.invalid"
    # No --dir, no --key: both default to ./dev-keys.
    code, provider_document, _ = _cli(capsys, "token", "init", "--issuer", issuer)
    assert code == 0
    assert (tmp_path / "dev-keys" / "private.pem").exists()
    assert "authz-server token mint --key" in provider_document
    assert "--issuer" not in provider_document.split("mint", 1)[1]
    config_dir = _config_dir(tmp_path, provider_document)

    code, out, err = _cli(capsys, "token", "mint", "--sub", "root", "--claim", 'groups=["admin"]')
    assert (code, err) == (0, "")
    assert _payload(out.strip())["iss"] == issuer
    code, result = _check(capsys, config_dir, out.strip(), "POST")
    assert (code, result["decision"], result["principal"]) == (0, "allow", f"{issuer}/root")

    code, out, _ = _cli(capsys, "token", "mint", "--issuer", "https://else.invalid", "--sub", "x")
    assert (code, _payload(out.strip())["iss"]) == (0, "https://else.invalid")


def test_mint_without_an_issuer_beside_the_key_says_to_pass_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert _cli(capsys, "token", "init", "--dir", str(keys))[0] == 0
    (keys / devtoken.ISSUER_FILE).unlink()  # keys made before init recorded its issuer
    code, out, err = _cli(capsys, "token", "mint", "--key", str(keys), "--sub", "x")
    assert (code, out) == (2, "")
    assert "--issuer: none given and no issuer.txt beside the key" in err


def test_version_is_a_flag_too(capsys: pytest.CaptureFixture[str]) -> None:
    from authz_server import __version__

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"authz-server {__version__}\n"
    assert _cli(capsys, "version")[:2] == (0, f"authz-server {__version__}\n")


def test_check_reads_the_token_from_standard_input_with_a_dash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    keys = tmp_path / "keys"
    code, provider_document, _ = _cli(capsys, "token", "init", "--dir", str(keys))
    config_dir = _config_dir(tmp_path, provider_document)
    token = _mint(capsys, keys, "--sub", "alice")
    monkeypatch.setattr(sys, "stdin", io.StringIO(token + "\n"))
    code, out, _ = _cli(capsys, "check", "--json", "--config", str(config_dir), "--token-file", "-")
    result = json.loads(out)
    assert (code, result["decision"], result["principal"]) == (0, "allow", f"{ISSUER}/alice")
