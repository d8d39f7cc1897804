"""The command line as a user meets it: `serve` speaks in log lines from its first line on
(start-up errors included), `validate` and `check` speak plain text to a person."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from authz_server import cli
from tests.helpers import write_config

# Three problems in three places: a bad value, an unknown field, a missing key file; and a
# valid policy, so that the configuration is not empty whatever else is wrong with it.
BAD_CONFIG = """\
apiVersion: authz-server/v1
kind: AuthzConfig
server: {threads: 0, colour: blue}
providers:
  - issuer: https://idp.example.com
    jwksFile: missing-jwks.json
---
apiVersion: authz-server/v1
kind: AuthzConfig
policies:
  - name: reads
    rules: [{to: [{operation: {methods: [GET]}}]}]
"""

# Valid, needs no network: one policy, no provider. The Istio policy's selector is ignored
# with a warning (every policy applies to every request this server sees).
POLICY_WITH_SELECTOR = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reads, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
    - to: [{operation: {methods: [GET]}}]
"""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in its own process; a deadline so a hang fails instead of blocking."""
    return subprocess.run(
        [sys.executable, "-m", "authz_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _json_lines(stderr: str) -> list[dict[str, Any]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
    return parsed


def test_serve_with_a_bad_config_logs_each_problem_as_a_json_line_and_exits_1(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, BAD_CONFIG)

    result = _run("serve", "--config", str(path))

    assert result.returncode == 1
    assert result.stdout == ""
    records = _json_lines(result.stderr)
    problems = [r for r in records if r["message"].startswith("invalid configuration")]
    assert {(r["field"], r["level"]) for r in problems} == {
        ("server.threads", "ERROR"),
        ("server.colour", "ERROR"),
        ("providers[0].jwksFile", "ERROR"),
    }
    assert all(r["document"].startswith(str(path)) for r in problems)
    assert next(r for r in problems if r["field"] == "server.colour")["problem"] == "unknown field"
    assert records[-1]["message"].startswith("not starting: 3 problem(s)")
    assert records[-1]["problems"] == 3


def test_serve_with_text_log_format_logs_the_problems_as_text_lines(tmp_path: Path) -> None:
    path = write_config(tmp_path, BAD_CONFIG)

    result = _run("serve", "--config", str(path), "--log-format", "text")

    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 4
    assert all(" ERROR authz_server.cli " in line for line in lines)
    assert any("server.colour: unknown field" in line for line in lines)
    assert not any(line.startswith("{") for line in lines)


def test_serve_that_cannot_bind_its_port_says_which_in_a_json_line_and_exits_1(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, POLICY_WITH_SELECTOR)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = _run(
            "serve",
            "--config",
            str(path),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            f"127.0.0.1:{port}",
        )

    assert result.returncode == 1
    records = _json_lines(result.stderr)
    warning = next(r for r in records if r["level"] == "WARNING")
    assert "spec.selector is ignored" in warning["message"]
    assert records[-1]["level"] == "ERROR"
    assert "Address already in use" in records[-1]["message"]
    assert records[-1]["metrics_listen"] == f"127.0.0.1:{port}"


def test_the_deprecated_http_listen_flag_still_names_the_side_port_and_warns(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, POLICY_WITH_SELECTOR)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run(
            "serve", "--config", str(path), "--listen", "127.0.0.1:0",
            "--http-listen", f"127.0.0.1:{port}",
        )  # fmt: skip
    records = _json_lines(result.stderr)
    deprecated = "--http-listen is deprecated, use --metrics-listen"
    assert any(r["level"] == "WARNING" and deprecated in r["message"] for r in records)
    assert "Address already in use" in records[-1]["message"]
    assert records[-1]["metrics_listen"] == f"127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("flag", "address", "said"),
    [
        ("--listen", ":29202", "--listen ':29202': no host: write 0.0.0.0:29202"),
        ("--metrics-listen", "9090", "--metrics-listen '9090': expected host:port or unix:/path"),
        ("--http-authz-listen", "[x]:1", "--http-authz-listen '[x]:1': [x] is not an IPv6"),
    ],
)
def test_serve_with_a_bad_listen_address_says_what_is_wrong_with_it(
    tmp_path: Path, flag: str, address: str, said: str
) -> None:
    path = write_config(tmp_path, POLICY_WITH_SELECTOR)
    result = _run("serve", "--config", str(path), flag, address, "--log-format", "text")
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert said in last
    assert "Failed to bind" not in result.stderr


def test_validate_reports_every_problem_as_text_for_a_person(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, BAD_CONFIG)

    assert cli.main(["validate", "--config", str(path)]) == 1

    err = capsys.readouterr().err.splitlines()
    assert err[0] == "invalid configuration (3 problem(s)):"
    assert any(line.strip().endswith("server.colour: unknown field") for line in err[1:])
    assert not any(line.lstrip().startswith("{") for line in err)


def test_check_prints_the_same_warnings_as_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, POLICY_WITH_SELECTOR)

    assert cli.main(["validate", "--config", str(path)]) == 0
    validate_err = capsys.readouterr().err.splitlines()
    assert cli.main(["check", "--json", "--config", str(path), "--method", "GET"]) == 0
    captured = capsys.readouterr()

    assert len(validate_err) == 1
    assert "spec.selector is ignored" in validate_err[0]
    assert validate_err[0].startswith("warning: ")
    assert captured.err.splitlines() == validate_err
    assert json.loads(captured.out)["decision"] == "allow"


def test_check_with_an_unreadable_token_file_names_it_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, POLICY_WITH_SELECTOR)
    missing = tmp_path / "no-such-token.txt"

    assert cli.main(["check", "--config", str(path), "--token-file", str(missing)]) == 2

    captured = capsys.readouterr()
    assert f"--token-file {missing}: No such file or directory" in captured.err
    assert captured.out == ""


HTTP_DOOR_WITH_A_PORT_RULE = """\
apiVersion: authz-server/v1
kind: AuthzConfig
server: {{httpAuthz: {{listen: "{listen}"}}}}
policies:
  - name: no-debug-port
    action: DENY
    rules: [{{to: [{{operation: {{ports: ["9901"]}}}}]}}]
"""


@pytest.mark.parametrize("open_door", [True, False])
def test_validate_warns_when_the_http_door_cannot_see_what_a_rule_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], open_door: bool
) -> None:
    text = HTTP_DOOR_WITH_A_PORT_RULE.format(listen="127.0.0.1:9002")
    if not open_door:
        text = text.replace('server: {httpAuthz: {listen: "127.0.0.1:9002"}}\n', "")
    path = write_config(tmp_path, text)

    assert cli.main(["validate", "--config", str(path)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "HTTP door" in line]
    if open_door:
        assert warnings == [
            "warning: policy 'no-debug-port' rule 1: to.operation.ports reads destination.port, "
            "which the HTTP door does not receive: through that door the rule always matches "
            "(denies)"
        ]
    else:
        assert warnings == []


def test_serve_in_text_mode_keeps_a_multi_line_yaml_error_on_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "apiVersion: authz-server/v1\nkind: AuthzConfig\npolicies: [\n")
    result = _run("serve", "--config", str(path), "--log-format", "text")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines  # the problem, then "not starting"
    assert all(" ERROR authz_server.cli " in line for line in lines)
    assert "not valid YAML" in lines[0] and "\\n" in lines[0]
