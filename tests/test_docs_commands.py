"""The commands the docs show run as written: `authz-server` is installed in `.venv/bin/`, not on
the reader's PATH, so every command line of the README and the docs calls
`.venv/bin/authz-server`, and the README says so once, before its first command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [
    README,
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "k8s").rglob("README.md")),
    *sorted((ROOT / "examples").rglob("README.md")),
]
# Fences at a line's start, or indented inside a list item.
_FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.DOTALL | re.MULTILINE)
# `authz-server` where a shell reads a command: a line's start (after a `$ ` prompt), or after
# a pipe, `;`, `&&`, `$(`; followed by one of its subcommands.
_COMMAND = re.compile(
    r"(?:^|[\s|;&(`])(\S*)authz-server (serve|validate|check|test|token|envoy-config|version)\b"
)
VENV_COMMAND = ".venv/bin/authz-server"


def commands_in(markdown: str) -> list[tuple[str, str]]:
    """(how the command is called, the line) for each authz-server command in a code block."""
    found = []
    for fence in _FENCE.finditer(markdown):
        if fence.group(1) in ("yaml", "json"):  # configuration, not commands
            continue
        for line in fence.group(2).splitlines():
            found += [(m.group(1) + "authz-server", line) for m in _COMMAND.finditer(line)]
    return found


def command_lines(path: Path) -> list[tuple[str, str]]:
    """`commands_in` the file at ``path``."""
    return commands_in(path.read_text())


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_line_calls_the_venvs_authz_server(doc: Path) -> None:
    wrong = [line for called, line in command_lines(doc) if not called.endswith(VENV_COMMAND)]
    assert not wrong, f"{doc.name}: not {VENV_COMMAND}:\n" + "\n".join(wrong)


def test_the_docs_show_commands_to_run() -> None:
    assert len(command_lines(README)) >= 8
    assert any(command_lines(doc) for doc in DOCS if doc != README)


def test_the_readme_says_how_commands_are_run_before_its_first_command() -> None:
    text = README.read_text()
    first_command = text.index(VENV_COMMAND)
    note = text.index("**How the commands are run.**")
    assert note < first_command
    explained = text[note : text.index("\n\n", note)]
    assert "`.venv/bin/`" in explained
    assert "command not found" in explained
    assert "`. .venv/bin/activate`" in explained
