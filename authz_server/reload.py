"""Hot reload: watch the configuration path and swap in a new engine when it changes.

The path is polled (stat of the file, or of every ``*.yaml`` in the directory plus where a
ConfigMap's ``..data`` link points), so the atomic symlink swap Kubernetes does is seen.
SIGHUP asks for a reload too. A new configuration is validated exactly as ``validate`` does;
an invalid one is refused, counted and logged, and the old one keeps serving.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from authz_server import config
from authz_server.errors import ConfigError

log = logging.getLogger("authz_server.reload")

Snapshot = tuple[object, ...]
# Reads of a configuration that keeps changing under us before judging the last one.
_SETTLE_READS = 3


def snapshot(path: Path) -> Snapshot:
    """What the configuration at ``path`` looks like on disk, cheaply (no reading)."""

    def stat(p: Path) -> object:
        try:
            st = os.stat(p)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

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
        self._seen = snapshot(path)
        self._lock = threading.Lock()
        self._requested = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
            before = self._seen = snapshot(self.path)
            settled = attempt == _SETTLE_READS
            try:
                settings = config.load(self.path)
            except ConfigError:
                if settled or snapshot(self.path) == before:
                    raise
            else:
                if settled or snapshot(self.path) == before:
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
                if requested or snapshot(self.path) != self._seen:
                    self.reload()
            except Exception:  # the watcher must never die
                log.exception("configuration reload failed")

    def stop(self) -> None:
        self._stop.set()
        self._requested.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
