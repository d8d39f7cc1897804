"""`make run` (and `make run DOOR=http`) keeps working: the demo prints its commands, then its
own self-test sends them (through Envoy, and to the gRPC port) and checks the answers. The
README shows the Explain command the demo prints."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


@functools.cache
def _selftest(door: str) -> subprocess.CompletedProcess[str]:
    """One run of `run.py --selftest` per door, shared by the tests of this file."""
    return subprocess.run(
        [sys.executable, str(ROOT / "examples/demo/run.py"), "--selftest", "--door", door],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.parametrize("door", ["grpc", "http"])
def test_demo_answers_200_401_403_as_its_printed_commands_say(door: str) -> None:
    result = _selftest(door)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(checks) >= 9 and all(line.startswith("[ok") for line in checks), result.stdout


def test_the_demo_prints_an_explain_command_that_answers_why_and_the_readme_shows_it() -> None:
    result = _selftest("grpc")
    (check,) = [line for line in result.stdout.splitlines() if "printed Explain command" in line]
    # The printed command itself was run: the running demo explains alice's refused POST.
    assert check.startswith("[ok"), result.stdout
    assert "deny 403" in check
    # Printed with the port the demo's server really listens on.
    (grpc_address,) = re.findall(r"^authz-server grpc (127\.0\.0\.1:\d+)", result.stdout, re.M)
    (command,) = re.findall(
        r"^(\S*grpcurl -plaintext -d @ (\S+) authz_server\.v1\.Explain/Explain <<EOF\n.*\nEOF)$",
        result.stdout,
        re.MULTILINE,
    )
    assert command[1] == grpc_address
    # The README shows the same lines, the port left for the reader to fill in.
    shown = command[0].replace(grpc_address, "127.0.0.1:<grpc-port>")
    assert f"$ {shown}\n" in README.read_text()
