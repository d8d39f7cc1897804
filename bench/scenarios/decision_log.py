"""What the decision log costs a Check in the running server.

Each variant is `authz-server serve` as its own process, stderr to a file, with the bench
configuration (one cached RS256 token, output headers, a DENY and an ALLOW policy) and
`decisionLog.enabled` false ("off") or true at sampleRate 1 ("on", the default). h2load drives
it over plaintext HTTP/2 with a framed CheckRequest (--requests per run, --clients connections,
--streams concurrent streams each), after one Check through grpcio has answered OK.

The server's CPU (user + system of every thread, from /proc/PID/stat) is read before a run and
again once every decision line of that run is in the log file (so the writer's work counts),
and divided by the requests. Rounds are interleaved: every variant once per round, the order
reversed on odd rounds, so the shared machine's noise falls on all alike. Prints, per variant,
the median and min-max of CPU us/Check and the median req/s; then, per source, the cost of
the log: the median over rounds of (on - off) within a round, which cancels the machine's
slow phases better than a difference of medians. "writer us" is the CPU of the writer thread
alone (found by its OS name) per Check: the part of the cost that is certainly the log's.

Log files live in /dev/shm when it exists (tmpfs: no disk writeback adds noise).

With --together --rps N every variant's server is driven at once, at the same fixed rate, so all
see the same machine (a shared machine's load swings a run's CPU per Check by 2x); the cost
is then the median of per-round on - off. Without it, each server is driven alone at full
speed, in turn.

--source LABEL=DIR (repeatable) runs the package found in DIR (a checkout's root), so a
baseline tree (`git archive <commit> authz_server | tar -x -C DIR`) runs side by side with
this one. Default: this checkout, labelled "this".

    .venv/bin/python -m bench.scenarios.decision_log [--requests 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz_server.ops.log import WRITER_THREAD
from authz_server.tools import devkeys
from bench.harness.inprocess import bench_config, check_request
from bench.harness.procs import cpu_seconds, free_port

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
DECISION_MARK = b'"logger": "authz_server.decision"'
THIS = Path(__file__).resolve().parents[2]
LINES_TIMEOUT = 60.0


def _cpu(stat_path: str) -> float:
    """User + system CPU seconds from a /proc stat file."""
    with open(stat_path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _writer_cpu(pid: int) -> float | None:
    """CPU seconds of the thread named WRITER_THREAD in ``pid``; None when there is none (a
    tree that logs on the request thread)."""
    tasks = Path(f"/proc/{pid}/task")
    for task in tasks.iterdir():
        try:
            if (task / "comm").read_text().strip() == WRITER_THREAD:
                return _cpu(str(task / "stat"))
        except FileNotFoundError:  # a thread that just ended
            continue
    return None


@dataclass
class Server:
    """One `authz-server serve` process of one variant."""

    label: str
    source: Path
    log_on: bool
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    grpc_port: int = 0
    http_port: int = 0
    cpu_per_check: list[float] = field(default_factory=list)
    writer_per_check: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    expected_lines: int = 0
    _counted: int = 0  # decision lines counted in the log file so far
    _offset: int = 0  # bytes of the log file read so far (whole lines only)

    @property
    def name(self) -> str:
        return f"{self.label}/log {'on' if self.log_on else 'off'}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.label}-{'on' if self.log_on else 'off'}.log"

    def start(self, config_path: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.source)}
        probe = subprocess.run(
            [sys.executable, "-c", "import authz_server; print(authz_server.__file__)"],
            env=env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            check=True,
        )
        if not Path(probe.stdout.strip()).is_relative_to(self.source):
            raise SystemExit(f"{self.label}: authz_server resolves to {probe.stdout.strip()}")
        self.grpc_port, self.http_port = free_port(), free_port()
        argv = [sys.executable, "-m", "authz_server", "serve", "--config", str(config_path)]
        argv += ["--listen", f"127.0.0.1:{self.grpc_port}"]
        argv += ["--metrics-listen", f"127.0.0.1:{self.http_port}"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_once(self, request: object) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            answer = stub.Check(request, timeout=5)
            if answer.status.code != 0:
                raise SystemExit(f"{self.name}: the bench request was not allowed: {answer}")
        self.expected_lines += self.log_on

    def decision_lines(self) -> int:
        """Decision lines in the log file so far (reads only what is new since last time)."""
        with self.log_path.open("rb") as log:
            log.seek(self._offset)
            chunk = log.read()
        whole = chunk.rfind(b"\n") + 1
        self._counted += chunk[:whole].count(DECISION_MARK)
        self._offset += whole
        return self._counted

    def wait_for_lines(self) -> None:
        deadline = time.monotonic() + LINES_TIMEOUT
        while self.decision_lines() < self.expected_lines:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"{self.name}: {self.decision_lines()} decision lines, "
                    f"expected {self.expected_lines}"
                )
            time.sleep(0.01)

    def dropped(self) -> str:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        found = re.search(r"^authz_decision_log_dropped_total (\S+)$", text, re.MULTILINE)
        return found.group(1) if found else "n/a"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


_H2LOAD_DONE = re.compile(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded")
_H2LOAD_RATE = re.compile(r"finished in [\d.]+m?s, ([\d.]+) req/s")


def start_h2load(server: Server, body: Path, requests: int, args: argparse.Namespace) -> Load:
    """Start sending ``requests`` Checks to ``server`` (at --rps per client when given)."""
    argv = ["h2load", "-n", str(requests), "-c", str(args.clients), "-m", str(args.streams)]
    argv += ["-t", "1", "-d", str(body)]
    argv += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    if args.rps:
        argv += ["--rps", str(args.rps)]
    argv += [f"http://127.0.0.1:{server.grpc_port}{CHECK_PATH}"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Load(server, requests, process)


@dataclass
class Load:
    """One h2load run against one server."""

    server: Server
    requests: int
    process: subprocess.Popen[str]

    def finish(self) -> float:
        """Wait for the run; returns req/s. Raises SystemExit unless every request succeeded."""
        out, _ = self.process.communicate(timeout=600)
        done, rate = _H2LOAD_DONE.search(out), _H2LOAD_RATE.search(out)
        if done is None or rate is None or int(done.group(2)) != self.requests:
            raise SystemExit(f"{self.server.name}: h2load did not complete every request:\n{out}")
        self.server.expected_lines += self.requests if self.server.log_on else 0
        return float(rate.group(1))


def measure(servers: list[Server], body: Path, args: argparse.Namespace) -> None:
    """One run of --requests Checks against each of ``servers`` at the same time."""
    cpu0 = [cpu_seconds([s.pid]) for s in servers]
    writer0 = [_writer_cpu(s.pid) for s in servers]
    loads = [start_h2load(s, body, args.requests, args) for s in servers]
    rates = [load.finish() for load in loads]
    for server in servers:
        server.wait_for_lines()  # the writer thread's formatting and writes count too
    for server, before, writer_before, rate in zip(servers, cpu0, writer0, rates, strict=True):
        server.cpu_per_check.append((cpu_seconds([server.pid]) - before) / args.requests)
        writer = _writer_cpu(server.pid)
        if writer is not None and writer_before is not None:
            server.writer_per_check.append((writer - writer_before) / args.requests)
        server.rates.append(rate)


def _sources(values: list[str]) -> list[tuple[str, Path]]:
    if not values:
        return [("this", THIS)]
    out = []
    for value in values:
        label, sep, directory = value.partition("=")
        if not sep or not (Path(directory) / "authz_server").is_dir():
            raise SystemExit(f"--source: expected LABEL=DIR with DIR/authz_server, got {value!r}")
        out.append((label, Path(directory).resolve()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20000, help="Checks per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10, help="h2load connections")
    parser.add_argument("--streams", type=int, default=10, help="streams per connection")
    parser.add_argument(
        "--rps", type=int, default=0, help="requests/s per h2load client (default: no limit)"
    )
    parser.add_argument(
        "--together",
        action="store_true",
        help="run every variant's server at the same time (use with --rps), so the shared "
        "machine's load falls on all alike",
    )
    parser.add_argument("--source", action="append", default=[], metavar="LABEL=DIR")
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")

    key = devkeys.generate_key("RSA", kid="bench-1")
    request = check_request(key)
    shm = Path("/dev/shm")  # noqa: S108 (mkdtemp below: a private directory)
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        workdir = Path(tmp)
        (workdir / "jwks.json").write_text(json.dumps(devkeys.jwks(key)))
        configs = {}
        for log_on in (False, True):
            path = workdir / f"config-{'on' if log_on else 'off'}.yaml"
            spec = "{decisionLog: {enabled: %s}}" % ("true" if log_on else "false")
            path.write_text(bench_config(jwks_file=str(workdir / "jwks.json"), server=spec))
            configs[log_on] = path
        payload = request.SerializeToString()
        body = workdir / "check.grpc"
        body.write_bytes(b"\x00" + len(payload).to_bytes(4, "big") + payload)

        servers = [
            Server(label, source, log_on, workdir)
            for label, source in _sources(args.source)
            for log_on in (False, True)
        ]
        try:
            for server in servers:
                server.start(configs[server.log_on])
            for server in servers:
                server.check_once(request)
                # Warm up: connections, caches, the writer thread.
                start_h2load(server, body, min(2000, args.requests), args).finish()
                server.wait_for_lines()
            # Measured at once: every server with --together, else one at a time.
            groups = [servers] if args.together else [[server] for server in servers]
            for round_ in range(args.rounds):
                for group in groups if round_ % 2 == 0 else groups[::-1]:
                    measure(group, body, args)
            report(servers, args)
        finally:
            for server in servers:
                server.stop()


def report(servers: list[Server], args: argparse.Namespace) -> None:
    rps = f" --rps {args.rps}" if args.rps else ""
    together = ", every variant at the same time" if args.together else ""
    print(
        f"\nCPU per Check in the server process ({args.rounds} interleaved rounds of "
        f"{args.requests} Checks, h2load -c{args.clients} -m{args.streams}{rps}{together})"
    )
    print(
        f"{'variant':<24} {'median us':>10} {'min-max us':>16} {'req/s':>8}  lines  dropped"
        "  writer us"
    )
    medians = {}
    for server in servers:
        us = [c * 1e6 for c in server.cpu_per_check]
        medians[server.name] = statistics.median(us)
        lines = "all" if server.decision_lines() == server.expected_lines else "MISSING"
        writer = (
            f"{statistics.median(server.writer_per_check) * 1e6:.1f}"
            if server.writer_per_check
            else "-"
        )
        print(
            f"{server.name:<24} {medians[server.name]:>10.1f} "
            f"{min(us):>7.1f}-{max(us):<8.1f} {statistics.median(server.rates):>8.0f}  "
            f"{lines if server.log_on else '-':<5}  {server.dropped():<7}  {writer}"
        )
    by_name = {server.name: server for server in servers}
    for label in dict.fromkeys(s.label for s in servers):
        on, off = by_name[f"{label}/log on"], by_name[f"{label}/log off"]
        # Paired per round (the two ran back to back), so slow phases of the machine cancel.
        paired = [(a - b) * 1e6 for a, b in zip(on.cpu_per_check, off.cpu_per_check, strict=True)]
        print(
            f"{label}: the decision log costs {statistics.median(paired):.1f} us CPU per Check "
            f"(median of per-round on-off; min-max {min(paired):.1f} to {max(paired):.1f}; "
            f"medians {medians[on.name]:.1f} vs {medians[off.name]:.1f})"
        )
        print(f"  per round: {' '.join(f'{d:.0f}' for d in paired)}")


if __name__ == "__main__":
    main()
