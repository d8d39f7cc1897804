"""The server process as /proc shows it, sampled at a fixed interval on a thread of its own:
resident memory (VmRSS), threads (Threads in /proc/PID/status), open file descriptors
(entries of /proc/PID/fd, and how many of them are sockets) and CPU seconds used so far
(utime + stime of /proc/PID/stat)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    at_s: float  # seconds since the load started
    rss_mib: float
    threads: int
    fds: int
    sockets: int  # of the fds
    cpu_s: float

    @property
    def other_fds(self) -> int:
        """The fds that are not sockets: files, pipes, epoll and event descriptors."""
        return self.fds - self.sockets


def read_proc(pid: int) -> tuple[float, int, int, int, float]:
    """(RSS MiB, threads, open fds, sockets among them, CPU seconds) of ``pid``.

    Raises OSError once it is gone."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_mib = int(fields["VmRSS"].split()[0]) / 1024
    threads = int(fields["Threads"])
    fds = sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        fds += 1
        sockets += target.startswith("socket:")
    # The command name may hold spaces or parentheses: the fields start after the last ')'.
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(stat[11]) + int(stat[12])) / CLOCK_TICKS
    return rss_mib, threads, fds, sockets, cpu_s


class Sampler:
    """Samples ``pid`` every ``interval`` seconds from ``t0`` (a `time.monotonic` instant) on a
    thread, until `stop`. ``lost_at_s`` is set if the process disappeared meanwhile."""

    def __init__(self, pid: int, interval: float, t0: float) -> None:
        self.pid = pid
        self.interval = interval
        self.t0 = t0
        self.samples: list[Sample] = []
        self.lost_at_s: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        tick = 0
        while True:
            at = time.monotonic() - self.t0
            try:
                self.samples.append(Sample(at, *read_proc(self.pid)))
            except OSError:
                self.lost_at_s = at
                return
            tick += 1
            # On the grid t0 + k * interval, skipping ticks missed on a busy machine.
            tick = max(tick, int((time.monotonic() - self.t0) / self.interval) + 1)
            wait = self.t0 + tick * self.interval - time.monotonic()
            if self._stop.wait(max(0.0, wait)):
                return
