"""`make run` (and `make run DOOR=http`) keeps working: the demo's own self-test sends its
printed requests through Envoy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("door", ["grpc", "http"])
def test_demo_answers_200_401_403_as_its_printed_commands_say(door: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/demo/run.py"), "--selftest", "--door", door],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checks = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(checks) >= 8 and all(line.startswith("[ok") for line in checks), result.stdout
