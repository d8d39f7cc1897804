"""The folder a documented `docker run` mounts as the server's configuration is one the server
accepts: each command is read from the docs and the Dockerfile as written, its `-v` mount and
`--config` (or the image's CMD) mapped back to the repository, and `authz-server validate` run on
exactly that folder. (tests/test_dockerfile.py checks the Dockerfile's shape; running the image
itself needs a container engine.)"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
# Every file a user reads a `docker run` from.
DOCUMENTS = [
    DOCKERFILE,
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "examples").rglob("README.md")),
    *sorted((ROOT / "k8s").rglob("README.md")),
]


@dataclass(frozen=True)
class DockerRun:
    where: str
    argv: tuple[str, ...]


def _logical_lines(text: str) -> list[str]:
    """Lines with `\\` continuations joined, and a Dockerfile's `#` comment marks removed."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined: list[str] = []
    pending = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return joined


def documented_runs() -> list[DockerRun]:
    """Every `docker run` (or `podman run`) command line in the docs and the Dockerfile."""
    runs = []
    for path in DOCUMENTS:
        for line in _logical_lines(path.read_text()):
            # A command line (a shell prompt allowed), not a sentence that names one.
            match = re.match(r"\s*(?:\$\s+)?((?:docker|podman) run\s.*)", line)
            if match:
                argv = tuple(shlex.split(match.group(1), comments=True))
                runs.append(DockerRun(str(path.relative_to(ROOT)), argv))
    return runs


def _image_command() -> list[str]:
    """The Dockerfile's CMD (exec form): what the image runs without arguments."""
    (cmd,) = re.findall(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), re.MULTILINE)
    return list(json.loads(cmd))


def _mounts(argv: tuple[str, ...]) -> dict[str, Path]:
    """Container path -> host path of each `-v HOST:CONTAINER[:ro]`, $PWD being the repo."""
    mounts = {}
    for flag, value in itertools.pairwise(argv):
        if flag in ("-v", "--volume"):
            host, container, *_ = value.split(":")
            mounts[container.rstrip("/")] = Path(host.replace("$PWD", str(ROOT)))
    return mounts


def _image_arguments(argv: tuple[str, ...]) -> list[str]:
    """What follows the image name (`authz-server:<tag>`): the command, or the image's CMD."""
    for index, word in enumerate(argv):
        if re.fullmatch(r"authz-server:[\w.+-]+", word):
            return list(argv[index + 1 :]) or _image_command()
    raise AssertionError(f"no authz-server image in {' '.join(argv)}")


def config_folder(run: DockerRun) -> Path:
    """The host folder the command's `--config` reads, through its mount."""
    arguments = _image_arguments(run.argv)
    config = arguments[arguments.index("--config") + 1].rstrip("/")
    for container, host in _mounts(run.argv).items():
        if config == container or config.startswith(container + "/"):
            return host / config[len(container) :].lstrip("/")
    raise AssertionError(f"{run.where}: --config {config} is not under a mount: {run.argv}")


def test_the_docs_show_a_docker_run_with_a_mounted_configuration() -> None:
    runs = documented_runs()
    assert any(run.where == "Dockerfile" for run in runs)
    assert all(_mounts(run.argv) for run in runs), runs


@pytest.mark.parametrize("run", documented_runs(), ids=lambda r: f"{r.where}:{r.argv[-1]}")
def test_the_folder_a_documented_docker_run_mounts_passes_validate(run: DockerRun) -> None:
    folder = config_folder(run)
    assert folder.is_dir(), f"{run.where} mounts {folder}, which is not a folder of the repo"
    result = subprocess.run(
        [sys.executable, "-m", "authz_server", "validate", "--config", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"{run.where}: {' '.join(run.argv)}\n{result.stderr}"
    assert result.stdout.strip() == "ok"
