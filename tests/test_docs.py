"""The docs cannot drift: their YAML loads, and the walkthrough shows the repo's files verbatim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from authz_server import config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "walkthrough.md"]
_BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)
_FILE_HEADER = re.compile(r"^# file: (\S+)\n")
OURS = {"AuthzConfig", "RequestAuthentication", "AuthorizationPolicy"}


def yaml_blocks(path: Path) -> list[str]:
    return _BLOCK.findall(path.read_text())


def _is_server_config(block: str) -> bool:
    kinds = {d.get("kind") for d in yaml.safe_load_all(block) if isinstance(d, dict)}
    documents = [d for d in yaml.safe_load_all(block) if isinstance(d, dict)]
    custom = any((d.get("spec") or {}).get("action") == "CUSTOM" for d in documents)
    return bool(kinds) and kinds <= OURS and not custom


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_server_config_in_the_docs_is_accepted_by_the_server(
    doc: Path, tmp_path: Path
) -> None:
    blocks = [b for b in yaml_blocks(doc) if _is_server_config(_FILE_HEADER.sub("", b))]
    assert blocks, f"{doc.name} shows no configuration"
    for index, block in enumerate(blocks):
        header = _FILE_HEADER.match(block)
        if header:  # a file of the repo, loaded from where it lives (relative paths work)
            settings = config.load(ROOT / header.group(1))
        else:
            path = tmp_path / f"block{index}.yaml"
            path.write_text(block)
            settings = config.load(path)
        assert settings.providers or settings.policies


def test_every_yaml_in_the_walkthrough_is_a_file_of_the_repo_verbatim() -> None:
    blocks = yaml_blocks(ROOT / "docs" / "walkthrough.md")
    assert len(blocks) >= 4
    for block in blocks:
        header = _FILE_HEADER.match(block)
        assert header, f"walkthrough YAML without a '# file: PATH' line:\n{block[:200]}"
        path = ROOT / header.group(1)
        assert path.is_file(), f"{header.group(1)} is not in the repo"
        assert block[header.end() :].strip() == path.read_text().strip(), (
            f"the walkthrough's copy of {header.group(1)} differs from the file"
        )
