"""``make bench-profile``: where the running server's CPU goes under real load, for each target
of issue 24 that ``make bench`` misses.

The same processes and loads as ``make bench`` (bench/scenarios/envoy.py): Envoy pinned to CPU
0, authz-server (default settings) and the load generator on CPU 1, a floor beside each. For
each scenario (direct gRPC with a cached token; Envoy → the HTTP door, cached token; Envoy →
the gRPC door, cached token; Envoy → the gRPC door, a new token per request):

1. a clean window (no profiler) for authz-server, then its floor (for a new token per request:
   the cached token through the same door, what that target compares): CPU per request
   (/proc/PID/stat) and context switches per request, voluntary + involuntary, summed over the
   server's threads (/proc/PID/task/*/status);
2. a window under py-spy (``record --gil --nonblocking``: the server is never paused; py-spy
   reads its memory from its own process): the Python stack of the thread holding the GIL,
   the one thread that can run Python, counted by module:function, self (the function was
   running) and cumulative (it was on the stack). Time with the GIL released (grpc's C core
   polling, system calls, waiting) is not there: perf sees it;
3. a window under ``perf record -e cpu-clock`` (the kernel's sampler, every thread, C and
   kernel code included): the share of each shared object (the interpreter, grpc's C core,
   OpenSSL, the kernel) and the top symbols.
Steps 2 and 3 run on the floor too: each function's and shared object's µs per request are
shown beside the floor's, so the difference is where the extra time goes.

Writes bench/results/profile.md (``--output`` elsewhere). About 3-4 minutes. py-spy and perf are
installed by ``make bench-profile`` (py-spy from PyPI into the venv, Debian ``linux-perf``);
without one, its part is left out with the reason.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from authz_server.config import load as config
from authz_server.tools.envoy_config import output_headers
from bench.harness import loadgen
from bench.harness.loadgen import LoadResult
from bench.harness.procs import (
    Proc,
    Stack,
    context_switches,
    http_get,
    machine_cpu,
    wait_until,
)
from bench.harness.rounds import Load, log
from bench.scenarios import envoy, reference
from bench.scenarios.envoy import HARNESS, WORK_CPU, WRK_CONNECTIONS, Bench, Server

RESULTS = Path(__file__).resolve().parents[1] / "results" / "profile.md"
CLEAN_S = 4  # each clean window
PROFILE_S = 8  # the py-spy window
PERF_S = 4  # the perf window
RATE = 250  # py-spy samples per second
TOP = 15
# The frames a thread's stack starts with say nothing: left out of the cumulative table.
THREAD_ENTRIES = frozenset(
    ("threading:Thread._bootstrap", "threading:Thread._bootstrap_inner", "threading:Thread.run")
)


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    targets: str  # the issue 24 targets this scenario stands for
    load: Load
    server: Proc
    # What it is compared with: a floor, or the cached-token server for the new-token case.
    floor_load: Load
    floor: Proc
    floor_label: str


@dataclass(frozen=True)
class Window:
    requests: int
    rps: float
    cpu_us: float  # the server's CPU per request
    switches: float  # the server's context switches per request


def clean_window(load: Load, proc: Proc, scratch: Path) -> Window:
    """Run `load` for CLEAN_S with nothing attached to `proc`; measure per request."""
    cpu0, switches0 = proc.cpu_seconds(), context_switches(proc.pid)
    result = load(scratch, CLEAN_S)
    cpu1, switches1 = proc.cpu_seconds(), context_switches(proc.pid)
    per = 1 / max(result.requests, 1)
    return Window(
        result.requests, result.rps, (cpu1 - cpu0) * 1e6 * per, (switches1 - switches0) * per
    )


def under(
    load: Load, scratch: Path, seconds: int, sampler: Callable[[], str]
) -> tuple[str, LoadResult]:
    """Run `load` for `seconds` + 2 in a thread, `sampler` (blocking, shorter) meanwhile from
    the second second; return what the sampler returned and the load's result."""
    results: list[LoadResult] = []
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            results.append(load(scratch, seconds + 2))
        except BaseException as error:  # handed to the caller below
            errors.append(error)

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    time.sleep(1)
    try:
        sampled = sampler()
    finally:
        thread.join(seconds + 90)
    if errors:
        raise errors[0]
    if not results:
        raise RuntimeError("the load did not finish")
    return sampled, results[0]


# --------------------------------------------------------------------------------- py-spy


def py_spy_binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def py_spy(binary: str, pid: int, out: Path, seconds: int) -> str:
    """py-spy record of `pid` for `seconds`, collapsed stacks into `out`; returns its output
    (py-spy's own summary line). Raises RuntimeError when py-spy fails."""
    argv = [binary, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(RATE)]
    argv += ["--gil", "--nonblocking", "--format", "raw", "--output", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy exited with {done.returncode}: {done.stderr[-1500:]}")
    return done.stdout + done.stderr


_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_SITE = re.compile(r".*/(?:site|dist)-packages/")
_STDLIB = re.compile(r".*/lib/python3\.\d+/")


def module_of(file: str) -> str:
    """A dotted module name for a source file as py-spy shows it."""
    name = _SITE.sub("", file)
    name = _STDLIB.sub("", name)
    repo = str(Path(__file__).resolve().parents[2]) + "/"
    name = name.removeprefix(repo)
    name = re.sub(r"\.(py|pyx|pxi)$", "", name).replace("/", ".")
    return name.removesuffix(".__init__")


def frame_name(frame: str) -> str:
    """``module:function`` of one py-spy frame, ``function (file:line)``."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{module_of(match['file'])}:{match['function']}"


@dataclass(frozen=True)
class Profile:
    samples: int
    self_counts: dict[str, int]
    cumulative: dict[str, int]


def collapse(lines: Iterable[str]) -> Profile:
    """Count module:function self and cumulative samples in py-spy's raw (collapsed) output:
    one stack per line, frames joined by ';', then the count."""
    self_counts: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(frame) for frame in stack.split(";")]
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            cumulative[name] += count
    return Profile(total, dict(self_counts), dict(cumulative))


@dataclass(frozen=True)
class Spied:
    """A py-spy window: the profile, and the requests answered while it sampled."""

    profile: Profile
    requests: float
    errors: int

    def us(self, count: int) -> float:
        """`count` samples as microseconds of GIL time per request."""
        return count / RATE * 1e6 / max(self.requests, 1)


def profile_table(ours: Spied, floor: Spied | None, floor_label: str) -> list[str]:
    """The top functions by self samples and by cumulative samples: percent of all samples,
    and microseconds of GIL time per request beside the same function in `floor`."""
    profile = ours.profile
    if not profile.samples:
        return ["(no samples: the server was never seen running Python)"]

    def pct(count: int) -> str:
        return f"{100 * count / profile.samples:.1f}%"

    def beside(counts: dict[str, int] | None, name: str) -> str:
        if floor is None or counts is None:
            return "-"
        return f"{floor.us(counts.get(name, 0)):.1f}"

    self_floor = floor.profile.self_counts if floor else None
    cumulative_floor = floor.profile.cumulative if floor else None
    lines = [
        f"| self | cumulative | self µs/req | {floor_label}: self µs/req | "
        "module:function (top by self) |",
        "|---|---|---|---|---|",
    ]
    by_self = sorted(profile.self_counts.items(), key=lambda item: -item[1])[:TOP]
    for name, count in by_self:
        lines.append(
            f"| {pct(count)} | {pct(profile.cumulative[name])} | {ours.us(count):.1f} "
            f"| {beside(self_floor, name)} | `{name}` |"
        )
    lines += [
        "",
        f"| cumulative | self | cumulative µs/req | {floor_label}: cumulative µs/req | "
        "module:function (top by cumulative) |",
        "|---|---|---|---|---|",
    ]
    by_cumulative = sorted(
        ((name, count) for name, count in profile.cumulative.items() if name not in THREAD_ENTRIES),
        key=lambda item: -item[1],
    )[:TOP]
    for name, count in by_cumulative:
        lines.append(
            f"| {pct(count)} | {pct(profile.self_counts.get(name, 0))} | {ours.us(count):.1f} "
            f"| {beside(cumulative_floor, name)} | `{name}` |"
        )
    return lines


# ----------------------------------------------------------------------------------- perf


def perf_record(pid: int, out: Path, seconds: int) -> str:
    """``perf record -e cpu-clock`` of every thread of `pid` for `seconds` into `out`."""
    argv = ["perf", "record", "-e", "cpu-clock", "-F", "999", "-p", str(pid), "-o", str(out)]
    argv += ["--", "sleep", str(seconds)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"perf record exited with {done.returncode}: {done.stderr[-1500:]}")
    return done.stderr


def perf_report(data: Path, sort: str) -> list[tuple[float, str]]:
    """(percent, key) rows of ``perf report --sort SORT`` on `data`, largest first."""
    argv = ["perf", "report", "-i", str(data), "--sort", sort, "--stdio", "--no-children"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    rows = []
    for line in done.stdout.splitlines():
        match = re.match(r"^\s+([\d.]+)%\s+(.*\S)\s*$", line)
        if match:
            rows.append((float(match[1]), re.sub(r"\s{2,}", " ", match[2])))
    return rows


def perf_tables(
    ours: tuple[Path, float], floor: tuple[Path, float] | None, floor_label: str
) -> list[str]:
    """Each shared object's share of the samples and CPU µs per request (the share times the
    CPU per request of that window), beside `floor`'s; then the top symbols."""
    data, cpu_us = ours
    shares = {name: share for share, name in perf_report(data, "dso")}
    floor_shares = {name: share for share, name in perf_report(floor[0], "dso")} if floor else {}
    floor_us = floor[1] if floor else 0.0
    names = [name for name, share in shares.items() if share >= 0.5]
    names += [n for n, share in floor_shares.items() if share >= 0.5 and n not in shares]
    lines = [
        f"| shared object | share | CPU µs/req | {floor_label}: share "
        f"| {floor_label}: CPU µs/req |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        share, other = shares.get(name, 0.0), floor_shares.get(name, 0.0)
        theirs = f"{other:.1f}% | {other * floor_us / 100:.1f}" if floor else "- | -"
        lines.append(f"| `{name}` | {share:.1f}% | {share * cpu_us / 100:.1f} | {theirs} |")
    lines += ["", "| share | shared object, symbol (top) |", "|---|---|"]
    lines += [f"| {share:.1f}% | `{name}` |" for share, name in perf_report(data, "dso,sym")[:TOP]]
    return lines


# ------------------------------------------------------------------------------ scenarios


def build(bench: Bench) -> list[Case]:
    """Start the processes (as ``make bench`` does) and return the scenarios to profile."""
    istio = reference.istio_config(bench.jwks_a, bench.jwks_b)
    floor_proc = bench.floor()
    http_floor_proc, port_file = bench.http_floor()
    ours = bench.authz_server("ours", istio, cpus=WORK_CPU, http_door=True)
    fresh = bench.authz_server("ours-new-tokens", istio + envoy.SMALL_CACHE, cpus=WORK_CPU)
    log(f"minting {envoy.NEW_TOKENS:,} tokens while the servers start")
    tokens = [bench.key_a.sign(reference.claims(i + 1)) for i in range(envoy.NEW_TOKENS)]
    tokens_file = bench.file("tokens.txt", "\n".join(tokens) + "\n")
    floor = bench.floor_server(floor_proc)
    port = wait_until(
        lambda: port_file.exists() and port_file.read_text().strip(), 30, "the HTTP floor's port"
    )
    http_floor = Server(http_floor_proc, "", "", f"127.0.0.1:{port}")
    output = output_headers([p.spec for p in config.load(bench.tmp / "ours.yaml").providers])
    envoys = {
        "floor": bench.envoy("envoy-floor", "ext_authz", floor.grpc_address),
        "ours": bench.envoy("envoy-ours", "ext_authz", ours.grpc_address),
        "new_tokens": bench.envoy("envoy-ours-new-tokens", "ext_authz", fresh.grpc_address),
        "http_floor": bench.envoy("envoy-http-floor", "ext_authz_http", http_floor.http_door),
        "ours_http": bench.envoy("envoy-ours-http", "ext_authz_http", ours.http_door, output),
    }
    for server in (ours, fresh):
        server.proc.wait_ready(envoy.ready(f"{server.http}/readyz"))
    for proxy in envoys.values():
        proxy.proc.wait_ready(envoy.ready(f"{proxy.admin}/ready"))
    bench.stack.pin_all()
    bearer = {"Authorization": f"Bearer {bench.token}"}
    for name, proxy in envoys.items():
        status, body = http_get(proxy.url + reference.PATH, bearer)
        if status != 200:
            raise RuntimeError(f"Envoy {name}: the bench request answered {status}: {body[:300]!r}")
    frame = bench.file("check.bin", reference.grpc_frame(reference.check_request(bench.token)))
    for name, server in (("floor", floor), ("ours", ours)):
        if not envoy.grpc_allows(server.grpc_address, reference.check_request(bench.token)):
            raise RuntimeError(f"direct gRPC to {name}: the bench request was not allowed")
    log("every process is ready, pinned and answers")

    auth = [f"Authorization: Bearer {bench.token}"]

    def new_tokens(_: Path, seconds: int) -> LoadResult:
        result = loadgen.wrk(
            envoys["new_tokens"].url + reference.PATH,
            duration_s=seconds,
            connections=WRK_CONNECTIONS,
            script=HARNESS / "new_token.lua",
            script_args=[str(tokens_file), str(bench.new_token_offset)],
            cpus=WORK_CPU,
        )
        # Requests in flight at the end were sent but not counted: skip past them too.
        bench.new_token_offset += result.requests + WRK_CONNECTIONS
        return result

    direct_floor = envoy.grpc_load(floor.grpc_address, frame, WORK_CPU)
    via_floor = envoy.wrk_load(envoys["floor"].url, auth)
    return [
        Case("direct", "direct gRPC, cached token", "P1",
             envoy.grpc_load(ours.grpc_address, frame, WORK_CPU), ours.proc,
             direct_floor, floor.proc, "direct gRPC → floor"),
        Case("http-door", "Envoy → HTTP door, cached token", "H2, in-proxy parity",
             envoy.wrk_load(envoys["ours_http"].url, auth), ours.proc,
             envoy.wrk_load(envoys["http_floor"].url, auth), http_floor.proc,
             "Envoy → HTTP floor"),
        Case("grpc-door", "Envoy → gRPC door, cached token", "P2",
             envoy.wrk_load(envoys["ours"].url, auth), ours.proc,
             via_floor, floor.proc, "Envoy → gRPC floor"),
        Case("new-token", "Envoy → gRPC door, a new token per request", "New token",
             new_tokens, fresh.proc, envoy.wrk_load(envoys["ours"].url, auth), ours.proc,
             "cached token"),
    ]  # fmt: skip


def spy_window(load: Load, proc: Proc, binary: str, out: Path, scratch: Path) -> Spied:
    """py-spy on `proc` for PROFILE_S while `load` runs."""
    summary, result = under(
        load, scratch, PROFILE_S, lambda: py_spy(binary, proc.pid, out, PROFILE_S)
    )
    found = re.search(r"Samples: (\d+) Errors: (\d+)", summary)
    profile = collapse(out.read_text().splitlines())
    return Spied(profile, result.rps * PROFILE_S, int(found[2]) if found else 0)


def perf_window(load: Load, proc: Proc, out: Path, scratch: Path) -> tuple[Path, float]:
    """perf on `proc` for PERF_S while `load` runs; the data and the CPU µs per request."""
    cpu0 = proc.cpu_seconds()
    _, result = under(load, scratch, PERF_S, lambda: perf_record(proc.pid, out, PERF_S))
    return out, (proc.cpu_seconds() - cpu0) * 1e6 / max(result.requests, 1)


def profile_case(case: Case, tmp: Path, spy: str | None, perf: bool) -> list[str]:
    """Measure and profile one scenario and what it is compared with; return its section."""
    scratch = tmp / "h2load.log"
    case.load(scratch, 1)  # warm up
    ours = clean_window(case.load, case.server, scratch)
    floor = clean_window(case.floor_load, case.floor, scratch)
    log(
        f"{case.key}: {ours.cpu_us:.0f} µs and {ours.switches:.1f} context switches per request"
        f" ({case.floor_label}: {floor.cpu_us:.0f} µs, {floor.switches:.1f})"
    )
    lines = [
        f"## {case.title} (targets: {case.targets})",
        "",
        "| clean window (no profiler) | req/s | server CPU µs/req | context switches/req |",
        "|---|---|---|---|",
        f"| authz-server | {ours.rps:,.0f} | {ours.cpu_us:.0f} | {ours.switches:.1f} |",
        f"| {case.floor_label} | {floor.rps:,.0f} | {floor.cpu_us:.0f} | {floor.switches:.1f} |",
        "",
    ]
    if spy is None:
        lines += ["py-spy: not installed (`make bench-profile` installs it).", ""]
    else:
        spied = spy_window(case.load, case.server, spy, tmp / f"{case.key}.pyspy.txt", scratch)
        base = spy_window(
            case.floor_load, case.floor, spy, tmp / f"{case.key}.floor.pyspy.txt", scratch
        )
        log(f"{case.key}: py-spy {spied.profile.samples} samples, {spied.errors} errors")

        def held(window: Spied) -> str:
            share = window.profile.samples / (RATE * PROFILE_S)
            return (
                f"{100 * share:.0f}% of the time, {window.us(window.profile.samples):.0f} µs "
                f"per request ({window.profile.samples:,} samples, {window.errors} errors)"
            )

        lines += [
            f"py-spy, {PROFILE_S} s at {RATE} Hz, the thread holding the GIL: authz-server held "
            f"it {held(spied)}; {case.floor_label}: {held(base)}. Self: the function itself "
            "was running (C code it calls with the GIL held included); cumulative: it was on "
            "the stack (thread entry frames left out). µs/req: GIL time per request (samples "
            "lost to sampling errors are missing from it).",
            "",
            *profile_table(spied, base, case.floor_label),
            "",
        ]
    if not perf:
        lines += ["perf: not installed (`make bench-profile` installs Debian linux-perf).", ""]
    else:
        ours_perf = perf_window(case.load, case.server, tmp / f"{case.key}.perf.data", scratch)
        floor_perf = perf_window(
            case.floor_load, case.floor, tmp / f"{case.key}.floor.perf.data", scratch
        )
        lines += [
            f"perf, {PERF_S} s, cpu-clock at 999 Hz, every thread (C and kernel code included; "
            "Python code runs in `libpython`'s `_PyEval_EvalFrameDefault`; "
            "`finish_task_switch` is the kernel switching threads, where samples taken while "
            "interrupts were off land). CPU µs/req: the share times the process's CPU per "
            f"request in that window ({ours_perf[1]:.0f} µs; {case.floor_label}: "
            f"{floor_perf[1]:.0f} µs): perf's sampling adds CPU of its own, in the kernel "
            "share mostly, so compare with the other column, measured alike.",
            "",
            *perf_tables(ours_perf, floor_perf, case.floor_label),
            "",
        ]
    return lines


def render(
    sections: Sequence[str], wall_s: float, load: tuple[float, float], other: tuple[float, float]
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    header = [
        "# Where authz-server's CPU goes under load (`make bench-profile`)",
        "",
        f"`make bench-profile` on {now}, commit {commit or '?'}, {wall_s / 60:.1f} min; "
        f"{os.cpu_count()} CPUs, 1-min load average {load[0]:.2f} before and {load[1]:.2f} "
        f"after; meanwhile processes this run did not start used {other[0]:.2f} CPUs on "
        f"average and the hypervisor took {other[1]:.2f} as steal (/proc/stat). The "
        "processes and loads of `make bench` (bench/scenarios/profile.py): Envoy "
        f"`--concurrency 1` on CPU {envoy.ENVOY_CPU}, authz-server (default settings) and the "
        f"load generator on CPU {WORK_CPU}. Per scenario: a clean window of {CLEAN_S} s for "
        "the server and one for its floor (for a new token per request: the cached token "
        "through the same door) (CPU and context switches per request: voluntary + "
        "involuntary, summed over the server's threads from /proc/PID/task/*/status); then "
        f"py-spy ({PROFILE_S} s, `--gil --nonblocking`: the thread holding the GIL; the "
        "server is not paused, py-spy reads its memory from its own process, whose CPU is not "
        f"the server's) and perf ({PERF_S} s, every thread, C and kernel included) while the "
        "same load runs, on the server and then on what it is compared with.",
        "",
    ]
    return "\n".join([*header, *sections])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    spy, perf = py_spy_binary(), shutil.which("perf") is not None
    started, load_before, machine0 = time.monotonic(), os.getloadavg()[0], machine_cpu()
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="authz-profile-") as tmp_dir, Stack() as stack:
        tmp = Path(tmp_dir)
        for case in build(Bench(stack, tmp)):
            sections += profile_case(case, tmp, spy, perf)
    wall_s = time.monotonic() - started
    other = machine_cpu().other_cpus(machine0, wall_s)
    text = render(sections, wall_s, (load_before, os.getloadavg()[0]), other)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    log(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
