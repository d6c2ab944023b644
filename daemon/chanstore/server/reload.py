"""Reloading db_config: one code path for file changes, SIGHUP and POST /-/reload.

Every trigger asks :meth:`Reloader.reload`. Requests that arrive within a
short debounce window share one reload and its verdict, so a burst of file
events (an editor writes, renames and chmods) is one reload. A reload reads
and checks the file first; a file that does not check out (a bad edit, or
one caught half-written) is rejected with its reasons, the running config
stays, and the next change of the file tries again. A file that again holds
the running config after a rejection makes the state healthy again.

File changes are seen by watchdog watching the file's *folder*: editors that
save by writing a new file and renaming it over the old one, and symlink
swaps (how Kubernetes updates a mounted ConfigMap: ``..data`` is
re-pointed), replace the file a watch on the file itself would follow. Any
event in the folder is checked against the file's checksum, so a swap of any
link on the way to the file is seen as quickly as an edit. A checksum poll
every ``poll_interval`` seconds backs the watch up on file systems that send
no events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from chanstore import logs
from chanstore.config import DbConfig, load_db_config
from chanstore.engine import Changes
from chanstore.errors import ConfigError
from chanstore.metrics import Metrics
from chanstore.server import systemd

__all__ = ["DEBOUNCE_SECONDS", "Applied", "ReloadResult", "Reloader", "checksum"]

log = logs.get_logger()

#: Triggers this close together make one reload.
DEBOUNCE_SECONDS = 0.2
_QUIET_SOURCES = frozenset({"file", "poll"})


@dataclass
class Applied:
    """What applying a checked config changed, and what is worth a warning."""

    changes: Changes
    warnings: list[str] = field(default_factory=list)


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
    """Watches db_config and applies its changes through ``apply``.

    ``apply`` takes a checked config and serves it (raising ConfigError to
    reject it, e.g. for a token file that cannot be read); ``status`` words
    the systemd STATUS line after an event.
    """

    def __init__(self, path: Path, apply: Callable[[DbConfig], Awaitable[Applied]],
                 metrics: Metrics, *, poll_interval: float,
                 status: Callable[[str], str]) -> None:  # fmt: skip
        self.path = path
        self._apply_config = apply
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.status = status
        self.applied_checksum = checksum(path)
        self._seen_checksum = self.applied_checksum
        #: Whether the last reload was rejected (until the file holds a good config again).
        self.failing = False
        self._lock = asyncio.Lock()
        self._pending: asyncio.Future[ReloadResult] | None = None
        self._sources: set[str] = set()
        self._observer: Any = None
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- triggers --------------------------------------------------------------

    async def reload(self, source: str) -> ReloadResult:
        """Reload now (after the debounce window); every caller gets the verdict."""
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_future()
            self._sources = set()
            self._keep(asyncio.get_running_loop().create_task(self._reload_soon(self._pending)))
        self._sources.add(source)
        return await asyncio.shield(self._pending)

    def trigger(self, source: str) -> None:
        """Reload soon, nobody waiting for the verdict (a signal, a file event)."""
        self._keep(asyncio.get_running_loop().create_task(self.reload(source)))

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
        """Called from watchdog's thread when something happened in the folder."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.trigger, "file")

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(_forget(self._tasks))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            current = await asyncio.to_thread(checksum, self.path)
            if current is not None and current != self._seen_checksum:
                self.trigger("poll")

    # -- the reload --------------------------------------------------------------

    async def _reload_soon(self, pending: asyncio.Future[ReloadResult]) -> None:
        await asyncio.sleep(DEBOUNCE_SECONDS)
        async with self._lock:
            sources = tuple(sorted(self._sources))
            self._pending = None
            try:
                result = await self._reload(sources)
            except Exception as exc:
                log.exception("config_reload_crashed", sources=sources)
                result = ReloadResult(False, sources, [f"internal error: {exc}"])
            pending.set_result(result)

    async def _reload(self, sources: tuple[str, ...]) -> ReloadResult:
        text_checksum = await asyncio.to_thread(checksum, self.path)
        self._seen_checksum = text_checksum
        quiet = set(sources) <= _QUIET_SOURCES
        if quiet and text_checksum is not None and text_checksum == self.applied_checksum:
            if self.failing:
                self._succeeded(sources, "config_restored")  # a rejected edit was reverted
            return ReloadResult(True, sources)  # a touch, or an event for a sibling file
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}")
        try:
            config: DbConfig = await asyncio.to_thread(load_db_config, self.path)
            applied = await self._apply_config(config)
        except ConfigError as exc:
            return self._rejected(sources, exc.problems)
        self.applied_checksum = text_checksum
        for warning in applied.warnings:
            log.warning("config_warning", warning=warning)
        self._succeeded(sources, "config_reloaded", **applied.changes.as_dict())
        return ReloadResult(True, sources, changes=applied.changes, warnings=applied.warnings)

    def _succeeded(self, sources: tuple[str, ...], event: str, **fields: Any) -> None:
        self.failing = False
        self.metrics.reloads.labels("success").inc()
        self.metrics.reload_successful.set(1)
        self.metrics.reload_success_timestamp.set(time.time())
        log.info(event, path=str(self.path), sources=sources, **fields)
        systemd.notify("READY=1", f"STATUS={self.status('reloaded')}")

    def _rejected(self, sources: tuple[str, ...], problems: list[str]) -> ReloadResult:
        self.failing = True
        self.metrics.reloads.labels("failure").inc()
        self.metrics.reload_successful.set(0)
        log.error("config_reload_rejected", path=str(self.path), sources=sources,
                  problems=problems)  # fmt: skip
        systemd.notify(
            "READY=1",
            f"STATUS=reload rejected, still serving the previous config: {problems[0]}",
        )
        return ReloadResult(False, sources, problems)


class _FolderEvents(FileSystemEventHandler):
    """Forwards the events of the config folder that may change what the file holds.

    Those are events for the file itself, for a ``..``-named entry (Kubernetes'
    ``..data`` and its timestamped folders), and for the first part of the
    file's own link target (``db.json -> current/db.json``: ``current``). The
    reload's checksum then tells a real change from a touch.
    """

    def __init__(self, reloader: Reloader) -> None:
        self._reloader = reloader
        self._path = reloader.path.absolute()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        names = {_name(event.src_path), _name(getattr(event, "dest_path", "") or "")}
        if names & self._interesting() or any(name.startswith("..") for name in names):
            self._reloader.file_event()

    def _interesting(self) -> set[str]:
        names = {self._path.name}
        with contextlib.suppress(OSError):
            target = Path(os.readlink(self._path))
            if not target.is_absolute() and target.parts:
                names.add(target.parts[0])
        return names


def _name(path: str | bytes) -> str:
    return Path(os.fsdecode(path)).name if path else ""


class _QuietStop(logging.Filter):
    """Drops watchdog's error for the read that races the observer's stop.

    Stopping the watch while its thread waits on inotify makes watchdog log
    "queue_events() called when the thread is inactive" at error level: at
    shutdown, that would be an error in every few logs of a clean stop.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_QuietStop())


def _forget(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def forget(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # the verdict was logged; nobody else waits for it

    return forget
