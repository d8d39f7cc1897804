"""Hot reload: watch the configuration path and swap in a new engine when it changes.

The path is polled (stat of the file, or of every ``*.yaml`` in the directory plus where a
ConfigMap's ``..data`` link points), so the atomic symlink swap Kubernetes does is seen, and so
are the local files the last configuration read names (``jwksFile``, a secret, a CA, the TLS
files): a configuration refused because such a file was not there yet (a Secret mounted a
moment after its ConfigMap) is tried again when the file appears or changes, so processes
that polled at different moments do not stay split between two configurations.
SIGHUP asks for a reload too. A new configuration is validated exactly as ``validate`` does;
an invalid one is refused, counted and logged, and the old one keeps serving.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from authz_server.config import load as config
from authz_server.errors import ConfigError

log = logging.getLogger("authz_server.reload")

Snapshot = tuple[object, ...]
# Reads of a configuration that keeps changing under us before judging the last one.
_SETTLE_READS = 3


def _stat(path: Path) -> object:
    try:
        st = os.stat(path)  # follows symlinks: a Secret's ..data swap is a new inode
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def snapshot(path: Path) -> Snapshot:
    """What the configuration at ``path`` looks like on disk, cheaply (no reading)."""
    stat = _stat
    if path.is_dir():
        data = path / "..data"
        entries = sorted(
            (p.name, stat(p))
            for p in path.iterdir()
            if p.suffix in (".yaml", ".yml") and not p.name.startswith(".")
        )
        target = os.path.realpath(data) if data.exists() else None
        return ("dir", target, tuple(entries))
    return ("file", os.path.realpath(path), stat(path))


class ConfigReloader:
    """Polls ``path`` every ``interval`` seconds and calls ``apply`` with new Settings."""

    def __init__(
        self,
        path: Path,
        apply: Callable[[config.Settings], None],
        *,
        on_rejected: Callable[[ConfigError], None] = lambda _exc: None,
        interval: float = 1.0,
    ) -> None:
        self.path = path
        self.apply = apply
        self.on_rejected = on_rejected
        self.interval = interval
        self.digest: str | None = None
        self._referenced: tuple[Path, ...] = ()  # the files the last configuration read names
        self._seen = self._snapshot()
        self._lock = threading.Lock()
        self._requested = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _snapshot(self) -> Snapshot:
        """The configuration and the files it names, as they look on disk (no reading)."""
        return (snapshot(self.path), tuple(_stat(p) for p in self._referenced))

    def request(self) -> None:
        """Ask for a reload (safe from a signal handler)."""
        self._requested.set()

    def reload(self, *, force: bool = False) -> bool:
        """Load the configuration and apply it if it differs. Returns False when refused."""
        with self._lock:
            try:
                settings = self._read_settled()
            except ConfigError as exc:
                log.error(
                    "configuration at %s refused (%d problem(s)); still serving %s: %s",
                    self.path,
                    len(exc.problems),
                    self.digest,
                    "; ".join(str(p) for p in exc.problems),
                )
                self.on_rejected(exc)
                return False
            except Exception as exc:  # an unreadable path must not kill the watcher
                log.error("configuration at %s could not be read: %s", self.path, exc)
                self.on_rejected(ConfigError([]))
                return False
            if settings.digest == self.digest and not force:
                return True
            for warning in settings.warnings:
                log.warning("%s", warning)
            try:
                self.apply(settings)
            except Exception:
                log.exception(
                    "configuration %s could not be applied; old one kept", settings.digest
                )
                self._seen = ()  # try again on the next poll
                self.on_rejected(ConfigError([]))
                return False
            self.digest = settings.digest
            return True

    def _read_settled(self) -> config.Settings:
        """Load the configuration, reading again (a few times at most) when it changed on disk
        while it was read, so that a file caught half-written is not what is judged.

        Returns the Settings; raises ConfigError as ``config.load`` does."""
        attempt = 1
        while True:
            # NOTE: looked at before reading, so a file that changes while it is read (or a
            # newly named one, looked at in the next round) is seen changed at the next poll.
            before = self._seen = self._snapshot()
            settled = attempt == _SETTLE_READS
            referenced: list[Path] = []
            try:
                settings = config.load(self.path, referenced=referenced)
            except ConfigError:
                # Refused: judged on files looked at before they were read (a file it names
                # for the first time is looked at in one more round), so the poll that sees
                # one of them appear or change is sure to try again.
                self._referenced = tuple(referenced)
                if settled or self._snapshot() == before:
                    raise
            else:
                self._referenced = tuple(referenced)
                after = self._snapshot()
                if settled or after[0] == before[0]:
                    self._seen = after  # the files it names: as they are now
                    return settings
            attempt += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="config-reload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            requested = self._requested.wait(self.interval)
            if self._stop.is_set():
                return
            self._requested.clear()
            try:
                if requested or self._snapshot() != self._seen:
                    self.reload()
            except Exception:  # the watcher must never die
                log.exception("configuration reload failed")

    def stop(self) -> None:
        self._stop.set()
        self._requested.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
