"""Reloading db_config: one code path for file changes, SIGHUP and POST /-/reload.

Every trigger asks :meth:`Reloader.reload`. Requests that arrive within a
short debounce window share one reload and its verdict, so a burst of file
events (an editor writes, renames and chmods) is one reload. A reload reads
and checks the file first; a file that does not check out (a bad edit, or
one caught half-written) is rejected with its reasons, the running config
stays, and the next change of the file tries again.

File changes are seen by watchdog watching the file's *folder*: editors that
save by writing a new file and renaming it over the old one, and symlink
swaps, replace the file a watch on the file itself would follow. A checksum
poll every ``config_poll_interval`` seconds backs the watch up on file
systems that send no events.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from chanstore import logs
from chanstore.config import DbConfig, load_db_config
from chanstore.errors import ConfigError
from chanstore.server import systemd
from chanstore.server.channels import Changes

if TYPE_CHECKING:
    from chanstore.server.daemon import Daemon

__all__ = ["DEBOUNCE_SECONDS", "ReloadResult", "Reloader"]

log = logs.get_logger()

#: Triggers this close together make one reload.
DEBOUNCE_SECONDS = 0.2
_QUIET_SOURCES = frozenset({"file", "poll"})


@dataclass
class ReloadResult:
    """The verdict on one reload."""

    ok: bool
    sources: tuple[str, ...]
    problems: list[str] = field(default_factory=list)
    changes: Changes = field(default_factory=Changes)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"ok": self.ok, "sources": list(self.sources)}
        if self.ok:
            answer["changes"] = self.changes.as_dict()
            answer["warnings"] = self.warnings
        else:
            answer["error"] = "the new db_config was rejected; the running one stays"
            answer["problems"] = self.problems
        return answer


def checksum(path: Path) -> str | None:
    """The SHA-256 of the file at ``path``, or None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class Reloader:
    """Watches db_config and applies its changes to a running daemon."""

    def __init__(self, daemon: Daemon, path: Path, applied_checksum: str | None) -> None:
        self.daemon = daemon
        self.path = path
        self.applied_checksum = applied_checksum
        self._seen_checksum = applied_checksum
        self._lock = asyncio.Lock()
        self._pending: asyncio.Future[ReloadResult] | None = None
        self._sources: set[str] = set()
        self._observer: Any = None
        self._poller: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- triggers --------------------------------------------------------------

    async def reload(self, source: str) -> ReloadResult:
        """Reload now (after the debounce window); every caller gets the verdict."""
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_future()
            self._sources = set()
            asyncio.get_running_loop().create_task(self._reload_soon(self._pending))
        self._sources.add(source)
        return await asyncio.shield(self._pending)

    def start(self) -> None:
        """Start the folder watch and the checksum poll."""
        self._loop = asyncio.get_running_loop()
        folder = self.path.absolute().parent
        try:
            observer = Observer()
            observer.schedule(_FolderEvents(self), str(folder), recursive=False)
            observer.daemon = True
            observer.start()
            self._observer = observer
        except OSError as exc:  # no inotify watches left, folder gone: the poll still works
            log.warning("config_watch_unavailable", folder=str(folder), error=str(exc))
        self._poller = self._loop.create_task(self._poll())

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer = None
        if self._poller is not None:
            self._poller.cancel()

    def file_event(self) -> None:
        """Called from watchdog's thread when something happened to the file."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._spawn, "file")

    def _spawn(self, source: str) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(source))
        task.add_done_callback(_ignore_result)

    async def _poll(self) -> None:
        interval = self.daemon.settings.config_poll_interval
        while True:
            await asyncio.sleep(interval)
            current = await asyncio.to_thread(checksum, self.path)
            if current is not None and current != self._seen_checksum:
                self._spawn("poll")

    # -- the reload --------------------------------------------------------------

    async def _reload_soon(self, pending: asyncio.Future[ReloadResult]) -> None:
        await asyncio.sleep(DEBOUNCE_SECONDS)
        async with self._lock:
            sources = tuple(sorted(self._sources))
            self._pending = None
            try:
                result = await self._apply(sources)
            except Exception as exc:
                log.exception("config_reload_crashed", sources=sources)
                result = ReloadResult(False, sources, [f"internal error: {exc}"])
            pending.set_result(result)

    async def _apply(self, sources: tuple[str, ...]) -> ReloadResult:
        text_checksum = await asyncio.to_thread(checksum, self.path)
        quiet = set(sources) <= _QUIET_SOURCES
        if quiet and text_checksum is not None and text_checksum == self.applied_checksum:
            self._seen_checksum = text_checksum
            return ReloadResult(True, sources)  # a touch, or an event for a sibling file
        self._seen_checksum = text_checksum
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}")
        metrics = self.daemon.metrics
        try:
            config: DbConfig = await asyncio.to_thread(load_db_config, self.path)
        except ConfigError as exc:
            metrics.reloads.labels("failure").inc()
            metrics.reload_successful.set(0)
            log.error("config_reload_rejected", path=str(self.path), sources=sources,
                      problems=exc.problems)  # fmt: skip
            systemd.notify(
                "READY=1",
                f"STATUS=reload rejected, still serving the previous config: {exc.problems[0]}",
            )
            return ReloadResult(False, sources, exc.problems)
        changes = self.daemon.registry.apply_config(config)
        self.applied_checksum = text_checksum
        metrics.reloads.labels("success").inc()
        metrics.reload_successful.set(1)
        metrics.reload_success_timestamp.set(time.time())
        for warning in config.warnings:
            log.warning("config_warning", warning=warning)
        log.info("config_reloaded", path=str(self.path), sources=sources, **changes.as_dict())
        systemd.notify("READY=1", f"STATUS={self.daemon.status_line('reloaded')}")
        return ReloadResult(True, sources, changes=changes, warnings=list(config.warnings))


class _FolderEvents(FileSystemEventHandler):
    """Forwards the events of the config folder that concern the config file."""

    def __init__(self, reloader: Reloader) -> None:
        self._reloader = reloader
        self._name = reloader.path.name

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = (event.src_path, getattr(event, "dest_path", "") or "")
        if any(Path(str(p)).name == self._name for p in paths if p):
            self._reloader.file_event()


class _QuietStop(logging.Filter):
    """Drops watchdog's error for the read that races the observer's stop.

    Stopping the watch while its thread waits on inotify makes watchdog log
    "queue_events() called when the thread is inactive" at error level: at
    shutdown, that would be an error in every few logs of a clean stop.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_QuietStop())


def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
