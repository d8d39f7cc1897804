"""The load generators: wrk (HTTP/1.1 through Envoy) and h2load (gRPC over HTTP/2, or
HTTP/1.1 at a fixed rate), run for a bounded time on given CPUs, their output parsed.

Both come from Debian packages (wrk, nghttp2-client); `make bench` installs them. wrk 4.1 has
no fixed-rate mode (that is wrk2), so fixed-rate runs use ``h2load --h1 --rps``. h2load prints
no percentiles: they come from its ``--log-file`` (one line per request, microseconds).
"""

from __future__ import annotations

import math
import re
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TOOLS = {"wrk": "wrk", "h2load": "nghttp2-client", "nghttp": "nghttp2-client"}
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass(frozen=True)
class LoadResult:
    requests: int  # answered in the measured window
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    failures: int  # non-2xx answers, socket errors, failed or timed-out streams


def missing_tools() -> list[str]:
    """The Debian packages to install for the load generators that are not on PATH."""
    return sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None})


def _pinned(argv: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def _run(argv: list[str], duration_s: float) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def parse_wrk(output: str) -> LoadResult:
    """Parse ``wrk --latency`` output. Raises ValueError when a figure is missing."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
    if not (done and rate and p50 and p99):
        raise ValueError(f"unexpected wrk output:\n{output}")
    failures = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        failures += int(non_2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        failures += sum(int(n) for n in socket_errors.groups())
    return LoadResult(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2), done.group(3)) / 1000,
        rps=float(rate.group(1)),
        p50_ms=_ms(*p50.groups()),
        p99_ms=_ms(*p99.groups()),
        failures=failures,
    )


def wrk(
    url: str,
    *,
    duration_s: int,
    connections: int,
    headers: Sequence[str] = (),
    script: Path | None = None,
    script_args: Sequence[str] = (),
    cpus: str | None = None,
) -> LoadResult:
    """``wrk -t1 -c<connections> -d<duration> --latency`` on `url`, optionally with a Lua script."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    for header in headers:
        argv += ["-H", header]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    if script_args:
        argv += ["--", *script_args]
    return parse_wrk(_run(_pinned(argv, cpus), duration_s))


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of `sorted_values` (not empty)."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def parse_h2load(output: str, log_file: Path) -> LoadResult:
    """Parse h2load's summary and its per-request log. Raises ValueError on a surprise."""
    finished = re.search(r"finished in ([\d.]+)(us|ms|s|m), ([\d.]+) req/s", output)
    counts = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        output,
    )
    if not (finished and counts):
        raise ValueError(f"unexpected h2load output:\n{output}")
    latencies = []
    for line in log_file.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[1].isdigit() and 200 <= int(fields[1]) < 300:
            latencies.append(int(fields[2]) / 1000)
    if not latencies:
        raise ValueError(f"h2load logged no successful request:\n{output}")
    latencies.sort()
    done, succeeded = int(counts.group(3)), int(counts.group(4))
    return LoadResult(
        requests=succeeded,
        seconds=_ms(finished.group(1), finished.group(2)) / 1000,
        rps=float(finished.group(3)),
        p50_ms=statistics.median(latencies),
        p99_ms=percentile(latencies, 0.99),
        failures=(done - succeeded) + int(counts.group(5)) + int(counts.group(7)),
    )


def h2load(
    url: str,
    *,
    duration_s: int,
    clients: int,
    streams: int = 1,
    headers: Sequence[str] = (),
    data: Path | None = None,
    http1: bool = False,
    rps_per_client: float | None = None,
    log_file: Path,
    cpus: str | None = None,
) -> LoadResult:
    """``h2load -t1 -c<clients> -m<streams> -D<duration>`` on `url`; POSTs `data` when given.

    `http1` speaks HTTP/1.1 (``--h1``); `rps_per_client` caps each client's rate (``--rps``).
    """
    argv = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", f"-D{duration_s}"]
    argv.append(f"--log-file={log_file}")
    for header in headers:
        argv += ["-H", header]
    if data is not None:
        argv += ["-d", str(data)]
    if http1:
        argv.append("--h1")
    if rps_per_client is not None:
        argv.append(f"--rps={rps_per_client:g}")
    argv.append(url)
    log_file.unlink(missing_ok=True)  # h2load appends to an existing log
    return parse_h2load(_run(_pinned(argv, cpus), duration_s), log_file)


def grpc_status_of_one_call(url: str, data: Path, headers: Sequence[str]) -> str | None:
    """Send one real gRPC POST with ``nghttp`` and return the grpc-status it answered, or None."""
    argv = ["nghttp", "-v", "--null-out", "-d", str(data)]
    for header in headers:
        argv += ["-H", header]
    argv.append(url)
    done = subprocess.run(
        argv, capture_output=True, text=True, errors="replace", timeout=30, check=False
    )
    found = re.findall(r"^\s*\[.*?\]\s+grpc-status: (\S+)\s*$", done.stdout, re.M)
    if not found:
        found = re.findall(r"grpc-status: (\S+)", done.stdout)
    return found[-1] if found else None
