"""The change feed: every acknowledged write of a channel, to whoever watches it.

A :class:`Watcher` is one open stream of one channel's changes (some or all
of its containers). Its events come from where each container's history
lives:

* A backend that keeps a history itself (Redis: a stream per domain, written
  in the same atomic step as the value; see :mod:`chanstore.history`) is
  read from: the backlog after a cursor with ``since``, then new changes
  through the backend's shared follower. Writes made through any daemon
  sharing the backend arrive alike, and cursors survive restarts.
* Any other backend (a json root, which one daemon owns) gets a
  :class:`MemoryHistory` per channel's container, recording from the moment
  the container is first watched for as long as the channel stays in memory.
  Every history's events count against one byte budget
  (``event_history_bytes``); past it the least recently written history
  loses its oldest events, and resuming from them is a ``cursor_expired``.

A cursor names a position in each watched container's history
(:func:`encode_cursor`); each event carries the cursor just after it, so
that ``Last-Event-ID`` resumes exactly there.

A watcher never slows a writer: events are queued for it without waiting,
and a watcher that falls more than ``watcher_buffer_bytes`` behind is ended
with the reason ``slow_reader`` (its client resumes from its cursor).
Watchers are bounded by ``max_watchers``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

from chanstore import logs
from chanstore.engine.channels import Channel, ChannelTable, Slot
from chanstore.engine.containers import Containers
from chanstore.engine.settings import EngineSettings
from chanstore.engine.watchers import HistoryBudget, MemoryHistory, Watcher, decode_cursor
from chanstore.errors import ChanstoreError
from chanstore.history import ChangeEvent, ChangeHistory, HistoryExpired
from chanstore.keys import check_channel_id
from chanstore.metrics import Metrics

__all__ = ["Feed", "TooManyWatchers"]

log = logs.get_logger()


class TooManyWatchers(ChanstoreError):
    """``max_watchers`` streams are open already."""

    kind = "too_many_watchers"


class Feed:
    """Every open watcher, and the memory histories of json containers."""

    def __init__(self, settings: EngineSettings, table: ChannelTable, containers: Containers,
                 metrics: Metrics) -> None:  # fmt: skip
        self.settings = settings
        self.table = table
        self.containers = containers
        self.metrics = metrics
        self.budget = HistoryBudget(settings.event_history_bytes)
        self.watchers: set[Watcher] = set()
        metrics.watchers_max.set(settings.max_watchers)
        self._followers: dict[int, Any] = {}
        self._opening = 0

    async def open(self, channel_id: str, names: list[str] | None, cursor: str | None) -> Watcher:
        """A watcher of ``channel_id``'s containers ``names`` (all when None), queued with
        every change after ``cursor`` when one is given.

        Raises TooManyWatchers, UnknownContainer, ValueError (a malformed
        channel id or cursor) or HistoryExpired, before anything is sent.
        """
        if len(self.watchers) + self._opening >= self.settings.max_watchers:
            raise TooManyWatchers(f"{self.settings.max_watchers} change-feed streams are open "
                                  "already (--max-watchers); try again later")  # fmt: skip
        check_channel_id(channel_id)
        names = list(dict.fromkeys(names or self.containers.names()))
        self._opening += 1  # counted against the cap while it opens, so that no burst
        try:  # of opens gets past it
            return await self._open(channel_id, names, cursor)
        finally:
            self._opening -= 1

    async def _open(self, channel_id: str, names: list[str], cursor: str | None) -> Watcher:
        for name in names:
            self.containers[name]  # UnknownContainer names the served ones
        wanted = decode_cursor(cursor) if cursor is not None else None
        if wanted is not None and (missing := [n for n in names if n not in wanted]):
            # What to do about it is the door's to say, as for every expired cursor.
            raise HistoryExpired(f"the cursor does not cover container {missing[0]!r}")
        watcher = Watcher(channel_id, {}, self.settings.watcher_buffer_bytes)
        undo: list[Callable[[], None]] = []
        async with self.table.using(channel_id) as channel:
            channel.busy += 1  # held until the watcher is released
            undo.append(_let_go(channel))
            try:
                for name in names:
                    slot = await self.table.slot(channel, name)
                    start = wanted[name] if wanted is not None else None
                    undo.append(await self._watch(slot, watcher, start))
            except BaseException:
                for step in reversed(undo):
                    step()
                raise
        self.watchers.add(watcher)
        self.metrics.watchers.set(len(self.watchers))
        log.info("watcher_opened", channel=channel_id, containers=names,
                 resumed=wanted is not None, backlog=len(watcher.queued),
                 watchers=len(self.watchers))  # fmt: skip

        def release() -> None:
            if watcher in self.watchers:
                self.watchers.discard(watcher)
                self.metrics.watchers.set(len(self.watchers))
                for step in reversed(undo):
                    step()
                log.info("watcher_closed", channel=channel_id, reason=watcher.ended,
                         watchers=len(self.watchers))  # fmt: skip

        watcher.release = release
        return watcher

    async def _watch(self, slot: Slot, watcher: Watcher, start: str | None) -> Callable[[], None]:
        """Queue ``slot``'s changes after ``start`` (None: from now on) for ``watcher``;
        the step that stops it."""
        history = slot.cached.database.change_history()  # type: ignore[union-attr]
        if history is None:
            return self._watch_memory(slot, watcher, start)
        return await self._watch_backend(slot, history, watcher, start)

    def _watch_memory(self, slot: Slot, watcher: Watcher, start: str | None) -> Callable[[], None]:
        name = slot.runtime.name
        if slot.history is None:
            slot.history = MemoryHistory(self.settings.event_history, self.budget)
        backlog = slot.history.since(start) if start is not None else []
        watcher.start(name, start if start is not None else slot.history.position(), backlog)
        slot.watchers.append(watcher)
        return lambda: _remove(slot.watchers, watcher)

    async def _watch_backend(self, slot: Slot, history: ChangeHistory, watcher: Watcher,
                             start: str | None) -> Callable[[], None]:  # fmt: skip
        name = slot.runtime.name
        if start is None:
            start = await slot.runtime.run(history.position)
            backlog: list[ChangeEvent] = []
        else:
            backlog = await slot.runtime.run(history.since, start)
        watcher.start(name, start, backlog)
        follower = history.follower()
        self._followers[id(follower)] = follower

        def deliver(event: ChangeEvent | None) -> None:
            watcher.push(name, event)

        # In a context of its own: the follower outlives the request that started it.
        contextvars.Context().run(follower.follow, history.name,
                                  backlog[-1].position if backlog else start, deliver)  # fmt: skip
        # Listed on the slot too, so that a reload or a data loss ends it like any other.
        slot.watchers.append(watcher)

        def stop() -> None:
            follower.unfollow(history.name, deliver)
            _remove(slot.watchers, watcher)

        return stop

    def end_all(self, reason: str) -> None:
        """End every stream (the daemon stops)."""
        for watcher in list(self.watchers):
            watcher.end(reason)

    async def close(self) -> None:
        """End every stream and stop following backends' histories."""
        self.end_all("shutdown")
        for follower in self._followers.values():
            await follower.close()
        self._followers.clear()


def _let_go(channel: Channel) -> Callable[[], None]:
    def let_go() -> None:
        channel.busy -= 1

    return let_go


def _remove(watchers: list[Watcher], watcher: Watcher) -> None:
    if watcher in watchers:
        watchers.remove(watcher)
