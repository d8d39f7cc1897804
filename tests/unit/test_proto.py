"""The committed gRPC code is what `make proto` makes of proto/ today: regenerated into a
temporary directory by the very command, byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "authz_server" / "v1"


def test_the_generated_code_matches_the_protos(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr

    fresh = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    committed = {
        p.relative_to(ROOT) for p in GENERATED.iterdir() if p.is_file() and "_pb2" in p.name
    }
    assert fresh == committed, "run `make proto` and commit authz_server/v1/"
    for path in sorted(fresh):
        assert (tmp_path / path).read_bytes() == (ROOT / path).read_bytes(), (
            f"{path} differs from what proto/ gives: run `make proto` and commit it"
        )
