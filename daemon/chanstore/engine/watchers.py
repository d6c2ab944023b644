"""What the change feed is made of: cursors, memory histories and watchers.

A :class:`Watcher` is one open stream of one channel's changes; it queues
the events it is given without ever making a writer wait, and ends itself
(``slow_reader``) once it falls ``limit`` bytes behind. A
:class:`MemoryHistory` holds the recent changes of one channel's container
whose backend keeps no history of its own (a json root), under one
:class:`HistoryBudget` for all of them. A cursor names a position in each
watched container's history (:func:`encode_cursor`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from chanstore.history import HISTORY_LOST, ChangeEvent, HistoryExpired

__all__ = [
    "HistoryBudget",
    "MemoryHistory",
    "Watcher",
    "decode_cursor",
    "encode_cursor",
    "end_watchers",
    "event_size",
]

#: How many times its limit a watcher may queue while its connection still takes
#: everything (one burst of writes, queued before the stream's turn to write).
BURST_FACTOR = 16
#: Bytes an event is counted as beyond its value, for the budgets.
EVENT_OVERHEAD = 200


def encode_cursor(positions: dict[str, str]) -> str:
    """The cursor naming ``positions`` (container -> position): opaque, URL- and header-safe."""
    return _cursor_of(tuple(positions.items()))


@functools.lru_cache(maxsize=4096)
def _cursor_of(items: tuple[tuple[str, str], ...]) -> str:
    # Cached: every watcher of a channel takes the same events, so they make the
    # same cursors, each once per event.
    text = ",".join(f"{name}:{position}" for name, position in items)
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
        #: Each watched container's position as of the last event taken: the cursor
        #: the client resumes from once it has what was taken.
        self.positions = positions
        #: Each container's position when the stream opened (the ``ready`` cursor).
        self.opened: dict[str, str] = {}
        self.limit = limit
        self.queued: deque[tuple[str, ChangeEvent, int]] = deque()
        self.queued_bytes = 0
        #: Whether the stream's connection cannot take more now (its client is not
        #: reading what was sent): only then does a queue past ``limit`` end it.
        self.paused = False
        self.ended: str | None = None
        self.wake: Callable[[], None] = _nothing
        #: Undoes what opening did (unfollow, unregister, let the channel go).
        self.release: Callable[[], None] = _nothing

    @property
    def cursor(self) -> str:
        """The cursor after the last event taken."""
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
        """Queue ``event`` of ``container`` (None: its source failed, the watcher ends;
        :data:`~chanstore.history.HISTORY_LOST`: the changes after its position are no
        longer all held, so it ends as ``history_lost`` and its client resumes).

        Called once per event per watcher on the writers' path, so it does no
        more than queue: the cursor is made when the event is taken.
        """
        if self.ended is not None:
            return
        if event is None:
            self.end("backend_unavailable")
            return
        if event is HISTORY_LOST:
            self.end("history_lost")
            return
        size = event_size(event)
        self.queued.append((container, event, size))
        self.queued_bytes += size
        if live and self.queued_bytes > self.limit \
                and (self.paused or self.queued_bytes > BURST_FACTOR * self.limit):  # fmt: skip
            self.end("slow_reader")
            return
        self.wake()

    def pause(self, paused: bool) -> None:
        """The stream's connection stopped (or went on) taking what is written to it."""
        self.paused = paused
        if paused and self.queued_bytes > self.limit:
            self.end("slow_reader")

    def take(self, at_most: int = 64) -> list[tuple[str, str, ChangeEvent]]:
        """Up to ``at_most`` queued events, oldest first, each with the cursor just after
        it and its container."""
        taken = []
        queued = self.queued
        positions = self.positions
        while queued and len(taken) < at_most:
            container, event, size = queued.popleft()
            self.queued_bytes -= size
            positions[container] = event.position
            taken.append((encode_cursor(positions), container, event))
        return taken

    def end(self, reason: str) -> None:
        """End the stream (its queued events are still sent, then the reason)."""
        if self.ended is None:
            self.ended = reason
            self.wake()


def _nothing() -> None:
    return None


def end_watchers(watchers: Iterable[Watcher], reason: str) -> None:
    """End each of ``watchers`` for ``reason``."""
    for watcher in list(watchers):
        watcher.end(reason)
