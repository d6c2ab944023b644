"""The change feed as Server-Sent Events (``text/event-stream``).

An :class:`EventStream` words one :class:`~chanstore.engine.Watcher`'s events
as SSE, for the connection to write as its socket takes them::

    retry: 1000
    event: ready
    id: <cursor>
    data: {}

    event: set
    id: <cursor>
    data: {"container":"stats","key":"hp","etag":"…","value":<stored JSON>}

    event: delete
    id: <cursor>
    data: {"container":"stats","key":"hp"}

    : keep-alive

    event: end
    data: {"reason":"shutdown"}

``end`` has no ``id``, so a client's ``Last-Event-ID`` stays the cursor of the
last change it got, and resuming from it misses nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from chanstore.engine import Watcher
from chanstore.history import ChangeEvent
from chanstore.metrics import Metrics

__all__ = ["EventStream"]

#: Milliseconds a browser's EventSource waits before it reconnects.
RETRY_MS = 1000
HEARTBEAT = b": keep-alive\n\n"


class EventStream:
    """What the connection writes for one watcher, and what it tells the watcher back."""

    status = 200
    content_type = b"text/event-stream"

    def __init__(self, watcher: Watcher, metrics: Metrics) -> None:
        self.watcher = watcher
        self.metrics = metrics

    def opening(self) -> bytes:
        """The first event: ``ready``, whose id is the cursor the stream starts from."""
        return b"retry: %d\nevent: ready\nid: %s\ndata: {}\n\n" % (
            RETRY_MS, self.watcher.opened_at.encode())  # fmt: skip

    def on_more(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever there is more to take (or the stream ended)."""
        self.watcher.wake = wake

    def take(self, at_most: int = 256) -> bytes:
        """The next events, worded; empty when none is queued."""
        items = self.watcher.take(at_most)
        if not items:
            return b""
        self.metrics.feed_events_sent.inc(len(items))
        return b"".join(_worded(cursor, container, event) for cursor, container, event in items)

    @property
    def ended(self) -> str | None:
        """Why the stream ends once what is queued is out, or None while it goes on."""
        return self.watcher.ended

    def closing(self) -> bytes:
        reason = self.watcher.ended or "closed"
        return b'event: end\ndata: {"reason":"%s"}\n\n' % reason.encode()

    def heartbeat(self) -> bytes:
        return HEARTBEAT

    def writable(self, yes: bool) -> None:
        """The connection can take more (or cannot, its client not reading)."""
        self.watcher.pause(not yes)

    def end(self, reason: str) -> None:
        """End the stream for ``reason`` (the daemon stops): queued events go out first."""
        self.watcher.end(reason)

    def release(self, reason: str) -> None:
        """The stream is over (``reason``: why, if the watcher did not end it itself)."""
        self.watcher.end(reason)
        self.watcher.release()
        self.metrics.watchers_ended.labels(self.watcher.ended or reason).inc()


def _worded(cursor: str, container: str, event: ChangeEvent) -> bytes:
    """The event as SSE, made once for all the watchers that send it with that cursor
    (every watcher of a channel's containers, as a rule)."""
    key = (cursor, container, id(event))
    found = _recent.get(key)
    if found is not None:
        return found[1]
    head = b'{"container":%s,"key":%s' % (_json(container), _json(event.key))
    if event.op == "delete":
        data = head + b"}"
    else:
        data = head + b',"etag":"%s","value":%s}' % (
            (event.etag or "").encode(), _one_line(event.value))  # fmt: skip
    worded = b"event: %s\nid: %s\ndata: %s\n\n" % (event.op.encode(), cursor.encode(), data)
    _recent.keep(key, event, worded)
    return worded


class _RecentlyWorded:
    """Events as recently worded, by (cursor, container, id(event)), within a byte budget.

    Each entry holds its event, so that the id is not reused while it is kept;
    the budget counts the worded bytes and the event's value, which the entry
    keeps alive, so that large values cannot make it hold more than
    :data:`WORDED_BYTES` however many events pass.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._entries: dict[tuple[str, str, int], tuple[ChangeEvent, bytes, int]] = {}

    def get(self, key: tuple[str, str, int]) -> tuple[ChangeEvent, bytes, int] | None:
        return self._entries.get(key)

    def keep(self, key: tuple[str, str, int], event: ChangeEvent, worded: bytes) -> None:
        size = 2 * len(worded)  # the worded event, and about as much of its value
        if size > self.budget // 8:
            return  # a large value is worded for each watcher: cheaper than holding it
        entries = self._entries
        while entries and self.used + size > self.budget:
            oldest = next(iter(entries))  # dicts keep insertion order
            self.used -= entries.pop(oldest)[2]
        entries[key] = (event, worded, size)
        self.used += size


#: Bytes of recently worded events kept for the other watchers of the same events.
WORDED_BYTES = 4 * 1024 * 1024
_recent = _RecentlyWorded(WORDED_BYTES)


def _one_line(value: bytes | None) -> bytes:
    """``value`` as one line of JSON: chanstore stores it so; a value written by another
    program (pretty-printed, through redis-cli) is re-encoded compactly."""
    if value is None:
        return b"null"
    if b"\n" not in value and b"\r" not in value:
        return value
    try:
        return json.dumps(json.loads(value), separators=(",", ":")).encode()
    except ValueError:
        # Not JSON at all: sent as the text it is, so the event is still told.
        return json.dumps(value.decode("utf-8", "replace")).encode()


def _json(text: str) -> bytes:
    return json.dumps(text).encode()
