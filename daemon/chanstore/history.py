"""Change histories: the recent changes of one domain, in the order they were made.

The daemon's change feed (``GET /v1/channels/{channel}/-/events``) sends each
acknowledged write as an event and lets a client resume after a cursor. A
backend that several processes share keeps the history itself, written in
the same atomic step as the value, so that any process can serve it and
positions survive restarts: it answers :meth:`DatabaseInterface.change_history
<chanstore.backends.base.DatabaseInterface.change_history>` with a
:class:`ChangeHistory`. For any other backend the daemon keeps the history in
memory.

A *position* is an opaque ASCII string naming a point in one domain's
history (for Redis, a stream entry id); :data:`ORIGIN` is the position
before any change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from chanstore.errors import ChanstoreError

__all__ = ["ORIGIN", "ChangeEvent", "ChangeHistory", "HistoryExpired", "HistoryFollower"]

#: The position before the first change of a domain.
ORIGIN = "0-0"


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One change: ``op`` is ``"set"`` (with the stored JSON ``value`` and its ``etag``)
    or ``"delete"``; ``position`` is where it stands in its domain's history."""

    position: str
    op: str
    key: str
    value: bytes | None = None
    etag: str | None = None


class HistoryExpired(ChanstoreError):
    """The changes after a position are no longer all held (trimmed, or lost with the data)."""

    kind = "cursor_expired"


class ChangeHistory(Protocol):
    """One domain's history, as a backend that keeps it answers it.

    ``position`` and ``since`` are blocking calls (run them on a worker thread).
    """

    #: The name that :class:`HistoryFollower` follows this history by.
    name: bytes

    def position(self) -> str:
        """The position of the latest change, or :data:`ORIGIN` if none is held."""
        ...

    def since(self, position: str) -> list[ChangeEvent]:
        """Every held change after ``position``, oldest first.

        Raises :class:`HistoryExpired` unless every change after ``position``
        is still held (the change at ``position`` itself must be held, unless
        ``position`` is :data:`ORIGIN` and nothing was ever trimmed).
        """
        ...

    def follower(self) -> HistoryFollower:
        """The follower of this history's backend: one per connection pool, shared."""
        ...


class HistoryFollower(Protocol):
    """Delivers new changes of many histories, on the event loop, over one connection.

    ``follow(name, position, deliver)`` calls ``deliver(event)`` for every
    change of history ``name`` after ``position``, in order, until
    ``unfollow(name, deliver)``. Several callers may follow one history; each
    is called in order. When the connection fails, each follower is called
    with None, then the follow ends (the caller resumes from its last
    position when it wants to).
    """

    def follow(self, name: bytes, position: str,
               deliver: Callable[[ChangeEvent | None], None]) -> None: ...  # fmt: skip

    def unfollow(self, name: bytes, deliver: Callable[[ChangeEvent | None], None]) -> None: ...

    async def close(self) -> None: ...
