"""Processes the benchmark starts: pinned to CPUs, logged to files, measured, stopped by PID.

`Proc` runs one command (through ``taskset -c CPUS`` when pinned), writes its output to a log
file, reports the CPU seconds it and its child processes used (``/proc/PID/stat``, utime +
stime) and is stopped by its PID: SIGTERM, then SIGKILL after a bounded wait. `Stack` stops
every process it holds, last started first, however the benchmark ends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

T = TypeVar("T")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# NOTE: no proxy, whatever http_proxy says: every request of the bench goes to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `predicate` until it returns something truthy and return it.

    Raises TimeoutError naming `what` after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 5
) -> tuple[int, bytes]:
    """GET `url`; return (status, body). 4xx/5xx are returned, not raised."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code), error.read()


def http_status(url: str) -> int | None:
    """The status of GET `url`, or None when nothing answers."""
    try:
        return http_get(url, timeout=1)[0]
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may hold spaces or parentheses: the fields start after the last ')'.
        return stat.read().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(_stat_fields(int(entry))[1]) == pid:
                    found.append(int(entry))
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and every process descended from it that runs now."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by the processes `pids` (all their threads)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def descendants_cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by `root` and every process descended from it
    that runs now (one pass over /proc)."""
    parent: dict[int, int] = {}
    used: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = _stat_fields(int(entry))
                parent[int(entry)] = int(fields[1])
                used[int(entry)] = int(fields[11]) + int(fields[12])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        current = todo.pop()
        total += used.get(current, 0)
        todo.extend(children.get(current, ()))
    return total / CLOCK_TICKS


@dataclass(frozen=True)
class MachineCpu:
    """CPU seconds of the whole machine so far (all CPUs, /proc/stat), and of this process,
    its live descendants and the children it has reaped (the load generators once done)."""

    busy: float  # user + nice + system + irq + softirq, every process
    steal: float  # taken by the hypervisor for other guests
    ours: float

    def other_cpus(self, earlier: MachineCpu, seconds: float) -> tuple[float, float]:
        """(CPUs' worth used by processes other than ours, CPUs' worth stolen) since
        `earlier`, averaged over `seconds` of wall time."""
        other = (self.busy - earlier.busy) - (self.ours - earlier.ours)
        return max(other, 0.0) / seconds, (self.steal - earlier.steal) / seconds


def machine_cpu() -> MachineCpu:
    """The machine's CPU counters now; see `MachineCpu`."""
    with open("/proc/stat") as stat:
        # cpu user nice system idle iowait irq softirq steal guest guest_nice (guest is in user)
        ticks = [int(value) for value in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    times = os.times()
    reaped = times.children_user + times.children_system
    live = descendants_cpu_seconds(os.getpid())
    return MachineCpu(
        busy=(user + nice + system + irq + softirq) / CLOCK_TICKS,
        steal=steal / CLOCK_TICKS,
        ours=live + reaped,
    )


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches so far of every thread of `pid` that runs
    now (/proc/PID/task/*/status; a thread that has ended takes its count with it)."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
    return total


def _cpu_set(cpus: str) -> set[int]:
    """The CPUs of a taskset-style list such as "1" or "0,1"."""
    return {int(cpu) for cpu in cpus.split(",")}


class Proc:
    """One child process, pinned to `cpus` (a list such as "1" or "0,1") when given, with the
    environment `env` when given (else this process's).

    With `pin_late`, the process starts on every CPU (so several slow starts run side by side)
    and is pinned by `pin`, thread by thread, once it is ready: threads it starts later
    inherit the pinning of the thread that starts them.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        cpus: str | None,
        *,
        pin_late: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.env = dict(env) if env is not None else None
        pin_now = cpus is not None and not pin_late
        self.argv = [*(["taskset", "-c", cpus] if pin_now and cpus else []), *argv]
        self.log_path = log_path
        self.cpus = cpus
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._proc.pid

    def start(self) -> Self:
        with open(self.log_path, "wb") as log:
            # taskset execs the command, so the PID is the command's own.
            self._proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        return self

    def log_tail(self, limit: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, os.path.getsize(self.log_path) - limit))
                return log.read().decode(errors="replace")
        except OSError:
            return "<no log>"

    def alive(self) -> bool:
        """True while running; raises RuntimeError with the log tail once it has exited."""
        if self._proc is None or self._proc.poll() is None:
            return self._proc is not None
        raise RuntimeError(
            f"{self.name} (pid {self._proc.pid}) exited with {self._proc.returncode}; "
            f"log tail:\n{self.log_tail()}"
        )

    def wait_ready(self, probe: Callable[[], bool], timeout: float = 60) -> None:
        """Poll `probe` until true; raise if the process exits first or `timeout` passes."""
        wait_until(lambda: self.alive() and probe(), timeout, f"{self.name} to be ready")

    def pin(self) -> None:
        """Pin every thread of the process and of its children to `cpus`.

        Raises RuntimeError if threads keep appearing unpinned (bounded retries).
        """
        if self.cpus is None:
            return
        wanted = _cpu_set(self.cpus)
        for _ in range(20):
            moved = 0
            for pid in process_tree(self.pid):
                with contextlib.suppress(OSError):
                    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
                        with contextlib.suppress(OSError):  # the thread may have ended
                            if os.sched_getaffinity(tid) != wanted:
                                os.sched_setaffinity(tid, wanted)
                                moved += 1
            if moved == 0:
                return
        raise RuntimeError(f"{self.name}: could not pin every thread to CPUs {self.cpus}")

    def cpu_seconds(self) -> float:
        """CPU seconds of the process and of its children (worker processes) so far."""
        return cpu_seconds(process_tree(self.pid))

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM by PID, wait up to `timeout`, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class Stack:
    """Holds started processes (and other context managers, such as an endpoint this process
    serves); stops them in reverse order on exit."""

    def __init__(self) -> None:
        self._procs: list[Proc] = []
        self._contexts = contextlib.ExitStack()

    def enter(self, context: contextlib.AbstractContextManager[T]) -> T:
        """Enter `context`; it is exited once every process has stopped."""
        return self._contexts.enter_context(context)

    def start(self, proc: Proc) -> Proc:
        self._procs.append(proc)
        proc.start()
        return proc

    def pin_all(self) -> None:
        """Pin every process that was started with ``pin_late``."""
        for proc in self._procs:
            proc.pin()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            while self._procs:
                self._procs.pop().stop()
        finally:
            self._contexts.close()
