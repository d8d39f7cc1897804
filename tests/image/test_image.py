"""The image, built by `make image` and run for real (`make image-test`; not in `make test`).

A real Envoy on the host asks the container through both doors, with the demo's configuration
mounted the way k8s/base mounts its ConfigMap (a `..data` link swapped atomically). The
container runs as Kubernetes runs it: read-only root filesystem, all capabilities dropped,
/tmp as the only writable place, and every shell of the image masked by /dev/null, so the
entrypoint is proven to need none. `launch` names the checks an image fails; two
one-line mutations of the Dockerfile (USER root, no ENTRYPOINT) prove those checks can fail.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_server.tools.devkeys import SigningKey, load_pem_key
from authz_server.tools.envoy_config import render_bootstrap
from tests.e2e.harness import (
    DOORS,
    EchoUpstream,
    EnvoyProcess,
    free_port,
    http_request,
    wait_until,
)
from tests.image.container import (
    CONFIG_MOUNT,
    ENGINE,
    IMAGE,
    REPO_ROOT,
    Container,
    build,
    engine,
    process_ids,
    remove_image,
    wait_ready,
)

DEMO = REPO_ROOT / "examples" / "demo"
ISSUER = "https://issuer.demo.authz-server.local"
AUDIENCE = "demo-api"
# As k8s/base/config.yaml drains, shorter: NOT_SERVING for drainDelay, then shutdownGrace.
DRAIN = {"drainDelay": "2s", "shutdownGrace": "5s"}
GRACE_SECONDS = 15  # the `stop` grace: SIGKILL after it (terminationGracePeriodSeconds)
# Inside the container, the one writable place: k8s/base mounts an emptyDir there.
CONTAINER_TMP = "/tmp"  # noqa: S108


@pytest.fixture(scope="session")
def image() -> str:
    """`make image`, as a user runs it; the tag it builds."""
    result = subprocess.run(
        ["make", "--no-print-directory", "image", f"CONTAINER_ENGINE={ENGINE}"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return IMAGE


# ------------------------------------------------------------------ a ConfigMap's directory


class ConfigMapDir:
    """A directory laid out as the kubelet mounts a ConfigMap: the files in a timestamped
    ``..<stamp>/`` directory, ``..data`` linking to it, and each name linking to
    ``..data/<name>``. ``write`` swaps ``..data`` atomically (a rename), as an update does."""

    def __init__(self, files: Mapping[str, str]) -> None:
        # Not under pytest's tmp_path (mode 0700, root's): the container's uid must read it.
        self.root = Path(tempfile.mkdtemp(prefix="authz-configmap-"))
        self.root.chmod(0o755)
        self._current: Path | None = None
        self.write(files)

    def write(self, files: Mapping[str, str]) -> None:
        """Publish ``files`` (name -> text) as the ConfigMap's new content."""
        stamp = self.root / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{uuid.uuid4().hex[:9]}"
        stamp.mkdir(mode=0o755)
        for name, text in files.items():
            (stamp / name).write_text(text)
            (stamp / name).chmod(0o644)
        link = self.root / "..data_tmp"
        link.symlink_to(stamp.name)
        link.rename(self.root / "..data")
        for name in files:
            target = self.root / name
            if not target.is_symlink():
                target.symlink_to(f"..data/{name}")
        if self._current is not None:
            shutil.rmtree(self._current)
        self._current = stamp

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def demo_config(**policy_groups: list[str]) -> dict[str, Any]:
    """examples/demo/config.yaml with k8s/base's kind of drain; ``policy_groups`` replaces the
    groups a policy's `when` asks for (by policy name)."""
    document: dict[str, Any] = yaml.safe_load((DEMO / "config.yaml").read_text())
    document.setdefault("server", {}).update(DRAIN)
    for policy in document["policies"]:
        if policy["name"] in policy_groups:
            for rule in policy["rules"]:
                for condition in rule.get("when", []):
                    condition["values"] = policy_groups[policy["name"]]
    return document


def demo_files(document: Mapping[str, Any]) -> dict[str, str]:
    return {
        "config.yaml": yaml.safe_dump(dict(document), sort_keys=False),
        "jwks.json": (DEMO / "jwks.json").read_text(),
    }


# ------------------------------------------------------------------------------ the checks


def shells_of(image: str) -> list[str]:
    """The files the image's /etc/shells names, symlinks resolved (e.g. /usr/bin/dash)."""
    script = (
        "import os\n"
        "names = [l.strip() for l in open('/etc/shells') if l.startswith('/')]\n"
        "print('\\n'.join(sorted({os.path.realpath(n) for n in names if os.path.exists(n)})))"
    )
    result = engine("run", "--rm", "--entrypoint", "python", image, "-c", script)
    return result.stdout.split()


def run_options(image: str, config_dir: Path) -> list[str]:
    """How the tests run the image: as k8s/base's Deployment does (read-only root filesystem,
    /tmp an emptyDir, no capabilities, no privilege escalation, the ConfigMap read-only at
    /etc/authz-server), on the host's network (servers on 127.0.0.1 only), with every shell
    of the image replaced by /dev/null."""
    options = [
        "--network", "host",
        "--read-only",
        "--tmpfs", CONTAINER_TMP,
        "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        "--volume", f"{config_dir}:{CONFIG_MOUNT}:ro",
    ]  # fmt: skip
    if ENGINE == "podman":
        options.append("--read-only-tmpfs=false")  # podman would add /run and /var/tmp
    for shell in shells_of(image):
        options += ["--volume", f"/dev/null:{shell}:ro"]
    return options


# Tries to create a file in each place; prints {place: "written" or the errno's name}.
_WRITE_PROBE = """
import errno, json, os
places = {}
for place in ("/", "/opt/venv", "/app", "/etc", "/etc/authz-server", "/tmp"):
    path = os.path.join(place, ".write-probe")
    try:
        with open(path, "w"):
            pass
        os.unlink(path)
        places[place] = "written"
    except OSError as error:
        places[place] = errno.errorcode.get(error.errno, str(error.errno))
print(json.dumps(places))
"""


@dataclass
class Launched:
    container: Container
    problems: dict[str, str]  # check name -> what was seen


def serve_args(grpc_port: int, http_port: int, authz_http_port: int | None = None) -> list[str]:
    """The entrypoint's arguments: k8s/base's (`serve --config /etc/authz-server/`) on
    127.0.0.1 ports picked at run time."""
    args = ["serve", "--config", f"{CONFIG_MOUNT}/", "--listen", f"127.0.0.1:{grpc_port}"]
    args += ["--http-listen", f"127.0.0.1:{http_port}"]
    if authz_http_port is not None:
        args += ["--http-authz-listen", f"127.0.0.1:{authz_http_port}"]
    return args


@contextlib.contextmanager
def launch(
    image: str, config_dir: Path, authz_http_port: int | None = None
) -> Iterator[tuple[Launched, int, int]]:
    """Start ``image`` as `run_options` says, wait for /readyz, run the checks; yield
    (what was found, gRPC port, HTTP port); remove the container at the end.

    The checks: ``starts`` (the engine starts it and /readyz answers 200), ``non-root`` (no
    uid or gid of its process, as the host sees it, is 0), ``read-only-root`` (writing
    anywhere but /tmp fails with EROFS, and /tmp is writable)."""
    grpc_port, http_port = free_port(), free_port()
    container = Container(
        image, serve_args(grpc_port, http_port, authz_http_port), run_options(image, config_dir)
    )
    problems: dict[str, str] = {}
    try:
        container.start()
        if not container.started:
            problems["starts"] = container.start_error
        else:
            failure = wait_ready(container, f"http://127.0.0.1:{http_port}/readyz")
            if failure:
                problems["starts"] = failure
            else:
                ids = process_ids(container.host_pid())
                if 0 in ids["Uid"] or 0 in ids["Gid"]:
                    problems["non-root"] = f"process ids {ids}"
                probe = container.exec("python", "-c", _WRITE_PROBE)
                places = json.loads(probe.stdout) if probe.returncode == 0 else {}
                expected = {p: "EROFS" for p in places} | {CONTAINER_TMP: "written"}
                if not places or places != expected:
                    problems["read-only-root"] = f"{places or probe.stderr}"
        yield Launched(container, problems), grpc_port, http_port
    finally:
        container.remove()


# ----------------------------------------------------------------- Envoy in front of it


@dataclass
class Stack:
    container: Container
    problems: dict[str, str]
    config: ConfigMapDir
    upstream: EchoUpstream
    envoy_urls: dict[str, str]  # door -> Envoy's listener
    http_url: str  # the server's /metrics, /healthz, /readyz port
    key: SigningKey

    def send(self, door: str, method: str, token: str | None) -> tuple[int, dict[str, str], bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.upstream.clear()
        body = b"" if method == "POST" else None
        return http_request(
            f"{self.envoy_urls[door]}/api/items", method=method, headers=headers, body=body
        )

    def token(self, sub: str, groups: list[str], **claims: Any) -> str:
        now = int(time.time())
        base = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now - 5, "exp": now + 600}
        return self.key.sign({**base, "sub": sub, "groups": groups, **claims})


@pytest.fixture(scope="module")
def stack(image: str) -> Iterator[Stack]:
    """One container serving both doors, an Envoy per door in front of it, the demo's config."""
    document = demo_config()
    config = ConfigMapDir(demo_files(document))
    upstream_headers = [
        h["header"] for p in document["providers"] for h in p.get("outputClaimToHeaders", [])
    ]
    authz_http_port = free_port()
    key = load_pem_key((DEMO / "demo-signing-key.pem").read_bytes(), kid="demo-1")
    try:
        with (
            EchoUpstream() as upstream,
            launch(image, config.root, authz_http_port) as (launched, grpc_port, http_port),
            contextlib.ExitStack() as envoys,
        ):
            urls: dict[str, str] = {}
            if not launched.problems:
                for door in DOORS:
                    listen, admin = free_port(), free_port()
                    door_args: dict[str, Any] = {"authz_address": f"127.0.0.1:{grpc_port}"}
                    if door == "http":
                        door_args = {
                            "authz_address": f"127.0.0.1:{authz_http_port}",
                            "door": "http",
                            "upstream_headers": upstream_headers,
                        }
                    bootstrap = render_bootstrap(
                        listen_port=listen,
                        admin_port=admin,
                        upstream_port=upstream.port,
                        **door_args,
                    )
                    envoys.enter_context(EnvoyProcess(bootstrap, admin))
                    urls[door] = f"http://127.0.0.1:{listen}"
            yield Stack(
                launched.container,
                launched.problems,
                config,
                upstream,
                urls,
                f"http://127.0.0.1:{http_port}",
                key,
            )
    finally:
        config.remove()


# ------------------------------------------------------------------------------- the tests


def test_the_image_runs_as_kubernetes_runs_it_without_a_shell(stack: Stack) -> None:
    assert stack.problems == {}
    # The shells really are masked: the entrypoint started without any.
    for shell in ("/bin/sh", "/bin/bash"):
        assert stack.container.exec(shell, "-c", "true").returncode != 0
    user = stack.container.inspect("{{.Config.User}}")
    assert user == "10001:10001"


def test_the_runtime_venv_holds_no_build_or_test_tools(stack: Stack) -> None:
    assert stack.problems == {}
    tools = ("pip", "setuptools", "wheel", "pytest", "grpc_tools", "mypy")
    script = f"import importlib.util as u; print([m for m in {tools!r} if u.find_spec(m)])"
    result = stack.container.exec("python", "-c", script)
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr


@pytest.mark.parametrize("door", DOORS)
def test_the_demo_answers_200_401_403_through_envoy(stack: Stack, door: str) -> None:
    assert stack.problems == {}
    alice = stack.token("alice", ["dev"])
    status, _, _ = stack.send(door, "GET", alice)
    assert status == 200
    seen = stack.upstream.last_request().headers
    assert (seen["x-jwt-sub"], seen["x-jwt-groups"]) == ("alice", "dev")
    assert "authorization" not in seen

    status, headers, body = stack.send(door, "GET", None)
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="authz-demo"'
    assert json.loads(body)["reason"] == "missing_credentials"

    expired = stack.token("alice", ["dev"], exp=int(time.time()) - 60)
    assert stack.send(door, "GET", expired)[0] == 401

    status, _, body = stack.send(door, "POST", alice)
    assert status == 403
    assert stack.upstream.requests == []

    assert stack.send(door, "POST", stack.token("root", ["admin"]))[0] == 200
    assert stack.upstream.last_request().headers["x-jwt-sub"] == "root"


def _reloads(stack: Stack, result: str) -> float:
    _, _, body = http_request(f"{stack.http_url}/metrics")
    for line in body.decode().splitlines():
        if line.startswith(f'authz_config_reloads_total{{result="{result}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_configmap_update_is_hot_reloaded_inside_the_container(stack: Stack) -> None:
    assert stack.problems == {}
    alice = stack.token("alice", ["dev"])
    assert stack.send("grpc", "POST", alice)[0] == 403
    before = _reloads(stack, "success")
    try:
        # The update kubectl apply makes: `dev` may now write too.
        stack.config.write(demo_files(demo_config(**{"api-write-admins": ["admin", "dev"]})))
        wait_until(
            lambda: stack.send("grpc", "POST", alice)[0] == 200,
            timeout=20,
            what="alice's POST to be allowed after the ConfigMap update",
        )
        assert _reloads(stack, "success") == before + 1
        assert stack.container.running()
    finally:
        stack.config.write(demo_files(demo_config()))
        wait_until(
            lambda: stack.send("grpc", "POST", alice)[0] == 403,
            timeout=20,
            what="the original ConfigMap to be reloaded",
        )


def test_sigterm_drains_then_exits_0_within_the_grace_period(image: str) -> None:
    config = ConfigMapDir(demo_files(demo_config()))
    try:
        with launch(image, config.root) as (launched, _, http_port):
            assert launched.problems == {}
            readyz = f"http://127.0.0.1:{http_port}/readyz"
            took: list[float] = []
            stopping = threading.Thread(
                target=lambda: took.append(launched.container.stop(GRACE_SECONDS))
            )
            stopping.start()
            try:

                def draining() -> bool:
                    try:
                        return http_request(readyz, timeout=1)[0] == 503
                    except OSError:
                        return False

                wait_until(draining, timeout=10, what="/readyz to answer 503 after SIGTERM")
            finally:
                stopping.join(GRACE_SECONDS + 60)
            assert launched.container.exit_code() == 0, launched.container.logs()[-2000:]
            assert took and took[0] < GRACE_SECONDS
    finally:
        config.remove()


# ------------------------------------------------------------- the documented `docker run`

_PROBE_INSIDE = """
import urllib.request, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
ready = urllib.request.urlopen("http://127.0.0.1:9090/readyz", timeout=2).status
with grpc.insecure_channel("127.0.0.1:9001") as channel:
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
print(ready, health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
"""


def documented_docker_runs() -> list[list[str]]:
    """Every `docker run` command in the Dockerfile's comments and the Markdown docs, as the
    shell at the repository root would split it ("$PWD" is the repository)."""
    sources = [REPO_ROOT / "Dockerfile", REPO_ROOT / "README.md", *REPO_ROOT.glob("docs/*.md")]
    sources += REPO_ROOT.glob("examples/*/README.md")
    commands: list[list[str]] = []
    for source in sources:
        lines = [line.lstrip("#").strip() for line in source.read_text().splitlines()]
        for number, line in enumerate(lines):
            if not line.startswith("docker run "):
                continue
            text, end = line, number
            while text.endswith("\\") and end + 1 < len(lines):
                end += 1
                text = text.removesuffix("\\") + lines[end]
            commands.append(shlex.split(text.replace("$PWD", str(REPO_ROOT))))
    return commands


def test_the_documented_docker_run_lines_work_as_written(image: str) -> None:
    commands = documented_docker_runs()
    assert commands, "no `docker run` line in the Dockerfile or the docs"
    for argv in commands:
        assert IMAGE in argv, f"{shlex.join(argv)}: not the image `make image` builds"
        at = argv.index(IMAGE)
        options, args = argv[2:at], argv[at + 1 :]
        if args:  # a one-shot command (validate), as written: it must exit 0
            result = engine("run", *options, IMAGE, *args, check=False, timeout=120)
            assert result.returncode == 0, f"{shlex.join(argv)}:\n{result.stdout}{result.stderr}"
            continue
        _serve_as_documented(argv, options, args)


def _serve_as_documented(argv: list[str], options: list[str], args: list[str]) -> None:
    """Run the documented server line ``argv`` (split into ``options`` and ``args`` around the
    image) in a network namespace of its own, so its ports stay off the host's interfaces;
    probe it from inside, where 9001 and 9090 are its own. Without --rm: the test removes it
    by name, and its output survives a failed start."""
    command = shlex.join(argv)
    options = [o for o in options if o != "--rm"]
    with Container(IMAGE, args, ["--network", "none", *options]) as container:
        assert container.started, f"{command}: {container.start_error}"

        def answers() -> str:
            if not container.running():
                raise AssertionError(f"{command} exited:\n{container.logs()}")
            result = container.exec("python", "-c", _PROBE_INSIDE)
            return result.stdout.strip() if result.returncode == 0 else ""

        assert wait_until(answers, timeout=60, interval=0.5, what=command) == "200 SERVING"


# --------------------------------------------------------- the checks can fail: mutations


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("USER 10001:10001", "USER root", {"non-root"}),
        ('ENTRYPOINT ["python", "-m", "authz_server"]\n', "", {"starts"}),
    ],
    ids=["user-root", "no-entrypoint"],
)
def test_a_mutated_dockerfile_fails_its_check(
    image: str, old: str, new: str, expected: set[str]
) -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert text.count(old) == 1, f"mutation anchor {old!r} is not unique in the Dockerfile"
    workdir = Path(tempfile.mkdtemp(prefix="authz-dockerfile-"))
    tag = f"localhost/authz-server-mutant:{uuid.uuid4().hex[:12]}"
    config = ConfigMapDir(demo_files(demo_config()))
    try:
        (workdir / "Dockerfile").write_text(text.replace(old, new))
        build(tag, workdir / "Dockerfile")  # every step before the change is cached
        with launch(tag, config.root) as (launched, _, _):
            assert set(launched.problems) == expected, launched.problems
    finally:
        remove_image(tag)
        config.remove()
        shutil.rmtree(workdir)


def test_the_checks_pass_for_the_real_dockerfile_built_the_same_way(image: str) -> None:
    """The mutation tests' control: the unchanged Dockerfile, built from a temporary copy."""
    workdir = Path(tempfile.mkdtemp(prefix="authz-dockerfile-"))
    tag = f"localhost/authz-server-control:{uuid.uuid4().hex[:12]}"
    config = ConfigMapDir(demo_files(demo_config()))
    try:
        shutil.copy(REPO_ROOT / "Dockerfile", workdir / "Dockerfile")
        build(tag, workdir / "Dockerfile")
        with launch(tag, config.root) as (launched, _, _):
            assert launched.problems == {}
    finally:
        remove_image(tag)
        config.remove()
        shutil.rmtree(workdir)
