"""The container engine as the image tests use it: build, run detached by name, inspect, stop.

Podman unless CONTAINER_ENGINE names another (docker takes the same arguments here). Host
settings (runtime, ulimits, CA bundle) come from the containers.conf that `make image-test`
points CONTAINERS_CONF at, never from here. Every container is started with a name unique to
this run and removed by that name; every command has a timeout.
"""

from __future__ import annotations

import os
import subprocess
import time
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.e2e.harness import TOKEN_LEDGER, http_request, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE = os.environ.get("CONTAINER_ENGINE") or "podman"
VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"authz-server:{VERSION}"
CONFIG_MOUNT = "/etc/authz-server"  # where k8s/base mounts the ConfigMap


def engine(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``<engine> args``; return the result. Raises AssertionError (with the output) when
    ``check`` and the command fails, subprocess.TimeoutExpired after ``timeout`` seconds."""
    result = subprocess.run(
        [ENGINE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{ENGINE} {' '.join(args)} exited with {result.returncode}:\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result


def build(tag: str, dockerfile: Path | None = None, timeout: float = 600) -> None:
    """Build the repository's context as ``tag`` (from ``dockerfile``, else the Dockerfile).

    The engine's layer cache makes a rebuild of unchanged steps cheap. Raises AssertionError
    when the build fails."""
    file_args = ["--file", str(dockerfile)] if dockerfile is not None else []
    engine("build", "--tag", tag, *file_args, str(REPO_ROOT), timeout=timeout)


def remove_image(tag: str) -> None:
    """Untag ``tag`` (its layers stay in the cache for the next build)."""
    engine("rmi", tag, check=False, timeout=60)


class Container:
    """One detached container, named ``authz-image-test-<random>``; ``stop``/``remove`` by name.

    ``options`` go before the image (mounts, --read-only, ...), ``args`` after it (the
    ENTRYPOINT's arguments). When it is removed, its output goes to ``TOKEN_LEDGER.examine``.
    """

    def __init__(self, image: str, args: Sequence[str] = (), options: Sequence[str] = ()) -> None:
        self.image = image
        self.args = tuple(args)
        self.options = tuple(options)
        self.name = f"authz-image-test-{uuid.uuid4().hex[:12]}"
        self.started = False
        self.start_error = ""

    def start(self) -> Self:
        """``run --detach``; when the engine cannot start it, ``start_error`` says why (and the
        container is removed) instead of raising: a check reports it."""
        result = engine(
            "run", "--detach", "--name", self.name, *self.options, self.image, *self.args,
            check=False,
        )  # fmt: skip
        self.started = result.returncode == 0
        if not self.started:
            self.start_error = (result.stdout + result.stderr).strip()[-2000:]
            self.remove()
        return self

    def inspect(self, template: str) -> str:
        """``inspect --format template`` of the container, stripped."""
        return engine("inspect", "--format", template, self.name, timeout=30).stdout.strip()

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def exit_code(self) -> int:
        return int(self.inspect("{{.State.ExitCode}}"))

    def host_pid(self) -> int:
        """The PID of the container's first process as the host sees it."""
        return int(self.inspect("{{.State.Pid}}"))

    def logs(self) -> str:
        result = engine("logs", self.name, check=False, timeout=30)
        return result.stdout + result.stderr

    def exec(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the running container (no shell: argv[0] is executed)."""
        return engine("exec", self.name, *argv, check=False, timeout=timeout)

    def stop(self, grace_seconds: int) -> float:
        """``stop --time grace_seconds`` (SIGTERM, SIGKILL after the grace); return how long it
        took in seconds."""
        started = time.monotonic()
        engine("stop", "--time", str(grace_seconds), self.name, timeout=grace_seconds + 60)
        return time.monotonic() - started

    def remove(self) -> None:
        """Remove the container by name (stopping it if needed); its output goes to the ledger."""
        output = self.logs()
        engine("rm", "--force", "--time", "0", self.name, check=False, timeout=60)
        if output:
            TOKEN_LEDGER.examine(f"the output of container {self.name}", output)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def wait_ready(container: Container, url: str, timeout: float = 60) -> str:
    """Poll ``url`` until it answers 200; return "" then, else what went wrong (the container
    exited, with its output; or the deadline passed)."""
    exited = ""

    def ready() -> bool:
        nonlocal exited
        if not container.running():
            exited = f"exited with {container.exit_code()}:\n{container.logs()[-2000:]}"
            return True
        try:
            return http_request(url, timeout=1)[0] == 200
        except OSError:
            return False

    try:
        wait_until(ready, timeout=timeout, interval=0.1, what=f"{url} to answer 200")
    except AssertionError as error:
        return f"{error}; output:\n{container.logs()[-2000:]}"
    return exited


def process_ids(pid: int) -> Mapping[str, tuple[int, ...]]:
    """The real, effective, saved and filesystem uids and gids of host process ``pid``."""
    fields: dict[str, tuple[int, ...]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("Uid", "Gid"):
            fields[name] = tuple(int(v) for v in value.split())
    return fields
