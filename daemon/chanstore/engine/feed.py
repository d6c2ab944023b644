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

import base64
import binascii
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from chanstore import logs
from chanstore.engine.containers import Containers
from chanstore.engine.settings import EngineSettings
from chanstore.errors import ChanstoreError
from chanstore.history import ChangeEvent, ChangeHistory, HistoryExpired
from chanstore.keys import check_channel_id
from chanstore.metrics import Metrics

if TYPE_CHECKING:
    from chanstore.engine.channels import Channel, ChannelTable, Slot

__all__ = [
    "Feed",
    "HistoryBudget",
    "MemoryHistory",
    "TooManyWatchers",
    "Watcher",
    "decode_cursor",
    "encode_cursor",
    "end_watchers",
]

log = logs.get_logger()

#: Bytes an event is counted as beyond its value, for the budgets.
EVENT_OVERHEAD = 200


class TooManyWatchers(ChanstoreError):
    """``max_watchers`` streams are open already."""

    kind = "too_many_watchers"


def encode_cursor(positions: dict[str, str]) -> str:
    """The cursor naming ``positions`` (container -> position): opaque, URL- and header-safe."""
    text = ",".join(f"{name}:{position}" for name, position in positions.items())
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> dict[str, str]:
    """The positions a cursor names; ValueError says why it is not a cursor."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.urlsafe_b64decode(padded.encode("ascii")).decode()
        positions = {}
        for part in text.split(","):
            name, sep, position = part.partition(":")
            if not sep or not name or not position:
                raise ValueError(part)
            positions[name] = position
    except (ValueError, binascii.Error, UnicodeError):
        raise ValueError(
            f"{cursor[:60]!r} is not a cursor of this feed (send back an event's id as it came)"
        ) from None
    return positions


def event_size(event: ChangeEvent) -> int:
    return EVENT_OVERHEAD + (len(event.value) if event.value is not None else 0) + len(event.key)


class HistoryBudget:
    """The bytes every :class:`MemoryHistory` holds, kept under ``limit``.

    Past the limit, the history written least recently gives up its oldest
    events first: a busy channel keeps its recent past, an idle one's old
    events go.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._by_last_write: OrderedDict[int, MemoryHistory] = OrderedDict()

    def added(self, history: MemoryHistory, size: int) -> None:
        self.used += size
        self._by_last_write[id(history)] = history
        self._by_last_write.move_to_end(id(history))
        while self.used > self.limit and self._by_last_write:
            oldest = next(iter(self._by_last_write.values()))
            if not oldest.drop_oldest():
                del self._by_last_write[id(oldest)]

    def released(self, history: MemoryHistory) -> None:
        """``history`` is gone (its channel left memory): its bytes are free again."""
        if self._by_last_write.pop(id(history), None) is not None:
            self.used -= history.size
            history.size = 0


class MemoryHistory:
    """The recent changes of one channel's container, kept by this daemon.

    Positions are ``<epoch>.<sequence>``; the epoch is new for every history,
    so that a cursor from a history that is gone (the channel left memory,
    the daemon restarted) is never read against another.
    """

    __slots__ = ("_budget", "_events", "_first", "_length", "epoch", "last", "size")

    def __init__(self, length: int, budget: HistoryBudget) -> None:
        self.epoch = secrets.token_hex(6)
        self.last = 0  # the sequence number of the latest change
        self.size = 0
        self._first = 1  # the sequence number of the oldest change held
        self._events: deque[ChangeEvent] = deque()
        self._length = length
        self._budget = budget

    def position(self) -> str:
        return f"{self.epoch}.{self.last}"

    def append(self, op: str, key: str, value: bytes | None, etag: str | None) -> ChangeEvent:
        self.last += 1
        event = ChangeEvent(f"{self.epoch}.{self.last}", op, key, value, etag)
        self._events.append(event)
        if len(self._events) > self._length:
            self.drop_oldest()
        size = event_size(event)
        self.size += size
        self._budget.added(self, size)
        return event

    def drop_oldest(self) -> bool:
        """Forget the oldest change held; False when none is."""
        if not self._events:
            return False
        event = self._events.popleft()
        self._first += 1
        size = event_size(event)
        self.size -= size
        self._budget.used -= size
        return True

    def since(self, position: str) -> list[ChangeEvent]:
        """The changes after ``position``; HistoryExpired unless all of them are held."""
        epoch, _sep, number = position.partition(".")
        if not number.isdigit():
            raise ValueError(f"{position[:60]!r} is not a position of this feed")
        sequence = int(number)
        if epoch != self.epoch or sequence > self.last or sequence < self._first - 1:
            raise HistoryExpired("the changes after that cursor are no longer held")
        skip = sequence - (self._first - 1)
        return list(self._events)[skip:]

    def release(self) -> None:
        self._budget.released(self)
        self._events.clear()


class Watcher:
    """One open stream of a channel's changes.

    The HTTP layer takes what is queued with :meth:`take` whenever its
    connection can write, and is woken by ``wake`` when there is more (or
    when the watcher ends: :attr:`ended` then says why).
    """

    def __init__(self, channel_id: str, positions: dict[str, str], limit: int) -> None:
        self.channel_id = channel_id
        #: Each watched container's position: the cursor of what was queued last.
        self.positions = positions
        #: Each container's position when the stream opened (the ``ready`` cursor).
        self.opened: dict[str, str] = {}
        self.limit = limit
        self.queued: deque[tuple[str, str, ChangeEvent]] = deque()
        self.queued_bytes = 0
        self.ended: str | None = None
        self.wake: Callable[[], None] = _nothing
        #: Undoes what opening did (unfollow, unregister, let the channel go).
        self.release: Callable[[], None] = _nothing

    @property
    def cursor(self) -> str:
        return encode_cursor(self.positions)

    @property
    def opened_at(self) -> str:
        """The cursor the stream started from: the latest change, or the one resumed after."""
        return encode_cursor(self.opened)

    def start(self, container: str, position: str, backlog: list[ChangeEvent]) -> None:
        """Begin ``container`` at ``position``, with the changes after it that are held."""
        self.opened[container] = self.positions[container] = position
        for event in backlog:
            self.push(container, event, live=False)

    def push(self, container: str, event: ChangeEvent | None, *, live: bool = True) -> None:
        """Queue ``event`` of ``container`` (None: its source failed, the watcher ends)."""
        if self.ended is not None:
            return
        if event is None:
            self.end("backend_unavailable")
            return
        self.positions[container] = event.position
        self.queued.append((self.cursor, container, event))
        self.queued_bytes += event_size(event)
        if live and self.queued_bytes > self.limit:
            self.end("slow_reader")
            return
        self.wake()

    def take(self, at_most: int = 64) -> list[tuple[str, str, ChangeEvent]]:
        """Up to ``at_most`` queued events, each with its cursor and container, oldest first."""
        taken = []
        queued = self.queued
        while queued and len(taken) < at_most:
            item = queued.popleft()
            self.queued_bytes -= event_size(item[2])
            taken.append(item)
        return taken

    def end(self, reason: str) -> None:
        """End the stream (its queued events are still sent, then the reason)."""
        if self.ended is None:
            self.ended = reason
            self.wake()


def _nothing() -> None:
    return None


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
        self._followers: dict[int, Any] = {}

    async def open(self, channel_id: str, names: list[str] | None, cursor: str | None) -> Watcher:
        """A watcher of ``channel_id``'s containers ``names`` (all when None), queued with
        every change after ``cursor`` when one is given.

        Raises TooManyWatchers, UnknownContainer, ValueError (a malformed
        channel id or cursor) or HistoryExpired, before anything is sent.
        """
        if len(self.watchers) >= self.settings.max_watchers:
            raise TooManyWatchers(f"{self.settings.max_watchers} change-feed streams are open "
                                  "already (--max-watchers); try again later")  # fmt: skip
        check_channel_id(channel_id)
        names = names or self.containers.names()
        for name in names:
            self.containers[name]  # UnknownContainer names the served ones
        wanted = decode_cursor(cursor) if cursor is not None else None
        if wanted is not None and (missing := [n for n in names if n not in wanted]):
            raise HistoryExpired(f"the cursor does not cover container {missing[0]!r}; "
                                 "re-read, then watch without a cursor")  # fmt: skip
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

        follower.follow(history.name, backlog[-1].position if backlog else start, deliver)
        return lambda: follower.unfollow(history.name, deliver)

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


def end_watchers(watchers: Iterable[Watcher], reason: str) -> None:
    for watcher in list(watchers):
        watcher.end(reason)
