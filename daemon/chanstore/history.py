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
from typing import Final, Protocol

from chanstore.errors import ChanstoreError

__all__ = [
    "HISTORY_LOST",
    "ORIGIN",
    "ChangeEvent",
    "ChangeHistory",
    "HistoryExpired",
    "HistoryFollower",
]

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


#: What a :class:`HistoryFollower` delivers, once, in place of changes it can no
#: longer vouch for: the changes right after a follower's position were trimmed
#: (or lost with the data) before it read them. Not a change: its ``op`` is
#: ``"lost"`` and no history holds it; recognise it by identity
#: (``event is HISTORY_LOST``). See :class:`HistoryFollower`.
HISTORY_LOST: Final = ChangeEvent(position="", op="lost", key="")


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
    ``unfollow(name, deliver)``. ``position`` is one the history gave: a
    change's, :meth:`ChangeHistory.position`, or :data:`ORIGIN`. Several
    callers may follow one history; each is called in order. When the
    connection fails, each follower is called with None, then the follow ends
    (the caller resumes from its last position when it wants to).

    A follower never skips a change without a word. When the changes right
    after a follower's position are no longer all held by the time it reads
    them (a burst longer than the history was trimmed before it caught up,
    or the data was lost), it is not given what remains: it is called once
    with :data:`HISTORY_LOST` instead, and its follow ends. The caller ends
    the stream it feeds and resumes, if it wants to, as after None: from its
    last position, with :meth:`ChangeHistory.since`, which gives the changes
    that follow it if they are all held and raises :class:`HistoryExpired`
    (a client's 410) if not. The check may err only the safe way: a position
    trimmed just after the read that had everything is also reported lost
    (the resume then settles it); a skipped change is never delivered past.
    """

    def follow(self, name: bytes, position: str,
               deliver: Callable[[ChangeEvent | None], None]) -> None: ...  # fmt: skip

    def unfollow(self, name: bytes, deliver: Callable[[ChangeEvent | None], None]) -> None: ...

    async def close(self) -> None: ...
