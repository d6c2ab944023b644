"""A Redis domain's change history: a stream beside its hash, and one reader that follows many.

The redis backend's write script (see :mod:`chanstore.backends.redis_writes`)
appends one entry per change to the stream ``<key_prefix>-events:<domain>``
in the same atomic step as the change itself, trimmed to about the
backend's ``history_length`` entries (``MAXLEN ~``: at least that many are
kept, a little more until Redis can drop a whole node). An entry's fields:

* ``op``: ``set`` or ``delete``;
* ``key``: the key, UTF-8;
* for a set, ``value`` (the stored bytes) and ``etag`` (their SHA-1 in hex).

A position is a stream entry id (``<milliseconds>-<sequence>``); entries are
added in the order their changes were made, so id order is change order.

:class:`RedisHistory` answers :class:`~chanstore.history.ChangeHistory` for
one domain; :class:`RedisFollower` delivers new entries of every followed
stream of one Redis over a single dedicated connection (``XREAD BLOCK``).
Neither imports the backend: it hands them the clients they need.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import redis
import redis.asyncio

from chanstore import logs
from chanstore.history import HISTORY_LOST, ORIGIN, ChangeEvent, HistoryExpired

__all__ = [
    "FOLLOW_BLOCK_SECONDS",
    "FOLLOW_COUNT",
    "Position",
    "RedisFollower",
    "RedisHistory",
    "parse_position",
]

#: How long one ``XREAD`` of the follower blocks at most. A change of the
#: followed streams interrupts it (``CLIENT UNBLOCK``), so this bounds only
#: how long a quiet connection goes unchecked; its socket timeout is longer.
FOLLOW_BLOCK_SECONDS = 5.0
#: The most entries one ``XREAD`` takes per stream: a follower far behind
#: catches up in steps of this many, never in one unbounded reply.
FOLLOW_COUNT = 512

#: A stream entry id as numbers, ``(milliseconds, sequence)``: ids compare as these do.
Position = tuple[int, int]

_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_MAX_PART = 2**64 - 1

log = logs.get_logger()


def parse_position(position: str) -> Position:
    """``position`` (a stream entry id such as ``"1700000000000-0"``) as numbers.

    Raises :class:`ValueError` for anything else: a position comes from
    clients (``Last-Event-ID``, ``?since=``), so a malformed one is their mistake.
    """
    match = _ID.fullmatch(position) if isinstance(position, str) else None
    if match is not None:
        milliseconds, sequence = int(match[1]), int(match[2])
        if milliseconds <= _MAX_PART and sequence <= _MAX_PART:
            return milliseconds, sequence
    shown = repr(position)[:80]
    raise ValueError(
        f"{shown} is not a position of a Redis change history: expected a stream entry id, "
        "<milliseconds>-<sequence> (two decimal numbers below 2**64, such as "
        f"'1700000000000-0'), or {ORIGIN!r} for the start"
    )


def _entry_position(entry_id: bytes) -> Position:
    """The position of an entry id that Redis itself gave (so well formed)."""
    milliseconds, _, sequence = entry_id.partition(b"-")
    return int(milliseconds), int(sequence)


def _id_text(position: Position) -> str:
    return f"{position[0]}-{position[1]}"


def change_event(entry_id: bytes, fields: dict[bytes, bytes]) -> ChangeEvent:
    """The :class:`ChangeEvent` of one stream entry (see the module docstring for its fields)."""
    etag = fields.get(b"etag")
    return ChangeEvent(
        position=entry_id.decode("ascii"),
        op=fields.get(b"op", b"").decode("utf-8", "replace"),
        key=fields.get(b"key", b"").decode("utf-8", "replace"),
        value=fields.get(b"value"),
        etag=None if etag is None else etag.decode("ascii", "replace"),
    )


class RedisHistory:
    """One domain's :class:`~chanstore.history.ChangeHistory`: the stream ``name``.

    ``client`` is the backend's (synchronous, pooled) client; ``reaching``
    turns connection errors into the backend's
    :class:`~chanstore.errors.BackendUnavailable`; ``follower`` gives the
    shared :class:`RedisFollower` of the backend's connection settings.
    """

    def __init__(
        self,
        name: bytes,
        client: redis.Redis,
        *,
        reaching: Callable[[], AbstractContextManager[None]],
        follower: Callable[[], RedisFollower],
    ) -> None:
        self.name = name
        self._client = client
        self._reaching = reaching
        self._follower = follower

    def position(self) -> str:
        """The id of the stream's last entry, or :data:`~chanstore.history.ORIGIN` if none."""
        with self._reaching():
            last = self._client.xrevrange(self.name, "+", "-", count=1)
        return last[0][0].decode("ascii") if last else ORIGIN

    def since(self, position: str) -> list[ChangeEvent]:
        """Every entry after ``position``, oldest first, in one round trip (one ``MULTI``).

        Raises :class:`~chanstore.history.HistoryExpired` unless the entry at
        ``position`` is still in the stream (the stream is trimmed from its
        start, so everything after it is too), or ``position`` is
        :data:`~chanstore.history.ORIGIN` and the stream never lost an entry
        (it does not exist, or every entry ever added is still there).
        :class:`ValueError` for a malformed ``position``.
        """
        start = parse_position(position)
        pipe = self._client.pipeline(transaction=True)
        if start == (0, 0):
            pipe.xrange(self.name, "-", "+")
            pipe.xinfo_stream(self.name)
            with self._reaching():
                entries, info = pipe.execute(raise_on_error=False)
            if isinstance(entries, Exception):
                raise entries
            if isinstance(info, redis.ResponseError) and "no such key" in str(info).lower():
                return []  # a history that never began (or began again after a loss)
            if isinstance(info, Exception):
                raise info
            if info["entries-added"] != info["length"]:
                raise HistoryExpired(
                    f"the history {self.name.decode(errors='replace')!r} no longer holds its "
                    f"first changes ({info['entries-added'] - info['length']} were trimmed)"
                )
        else:
            text = _id_text(start)
            pipe.xrange(self.name, text, text, count=1)
            pipe.xrange(self.name, f"({text}", "+")
            with self._reaching():
                held, entries = pipe.execute()
            if not held:
                raise HistoryExpired(
                    f"the history {self.name.decode(errors='replace')!r} no longer holds "
                    f"position {position}: it was trimmed, or the data was lost"
                )
        return [change_event(entry_id, fields) for entry_id, fields in entries]

    def follower(self) -> RedisFollower:
        """The shared follower of this backend's Redis, on the running event loop."""
        return self._follower()

    def __repr__(self) -> str:
        return f"RedisHistory({self.name.decode(errors='replace')!r})"


Deliver = Callable[[ChangeEvent | None], None]


class _Follow:
    """One ``deliver`` following one stream: the last position it was given."""

    __slots__ = ("deliver", "position")

    def __init__(self, deliver: Deliver, position: Position) -> None:
        self.deliver = deliver
        self.position = position


class RedisFollower:
    """Delivers the new entries of every followed stream of one Redis, over one connection.

    One task loops ``XREAD BLOCK ... COUNT <FOLLOW_COUNT> STREAMS k1 k2 ...
    id1 id2 ...`` on a connection of its own (``connect()`` makes the client;
    no retries, so that its ``CLIENT ID`` stays the one it read). Each
    ``deliver`` keeps its own position; a stream is read from the least
    position of its followers, and an entry goes to a follower only if it
    comes after that follower's position and the read began at or before it.
    So a follower that starts earlier than the others makes the stream read
    again from there (the others skip what they had), one that starts later
    skips what it had, and every follower gets every entry after its start
    exactly once, in order, whatever the mix.

    An ``XREAD`` from an id gives what follows it *now*: entries trimmed
    before the read are passed over without a word. So after each read that
    brings entries, the follower checks, in one pipelined round trip on its
    connection for all the streams of that reply, that each stream still holds
    the position it was read from (:meth:`_lost_streams`): ``XRANGE id id``
    (the stream is trimmed from its start, so if that entry is still there,
    nothing after it was trimmed before the read), and for
    :data:`~chanstore.history.ORIGIN`, ``XINFO STREAM`` (nothing was ever
    trimmed, or every entry ever added is one that was read). Where it is
    not, the reply's entries of that stream go to no follower: each follower
    at that position gets :data:`~chanstore.history.HISTORY_LOST` and is
    unfollowed, and the others (further on, so perhaps also gone) are read
    again, checked the same way. A position trimmed just after a read that
    had everything is reported lost as well: a false alarm costs the caller
    a resume (which gives it the changes, or :class:`HistoryExpired`), never
    a change.

    A follow that the ``XREAD`` in flight does not cover (a new stream, or an
    earlier position) ends that ``XREAD`` at once: ``CLIENT UNBLOCK`` of the
    reading connection, sent over ``control()`` (the pool's asyncio client),
    and sent again until it lands or the read ends by itself. So a new
    follower starts receiving within a round trip or two, not after the block.

    When the connection fails (or :meth:`close` ends it), every ``deliver``
    is called with None and every follow is dropped; the callers follow
    again from their last positions (a new connection is made on the next
    follow). A ``deliver`` that raises is logged and unfollowed.

    Everything is bounded: one connection, at most :data:`FOLLOW_COUNT`
    entries per stream per read, and no queue: entries go to the callbacks
    as they are read (a callback must not block; it hands them on).
    """

    def __init__(
        self,
        connect: Callable[[], redis.asyncio.Redis],
        control: Callable[[], redis.asyncio.Redis],
        *,
        where: str = "",
        block_seconds: float = FOLLOW_BLOCK_SECONDS,
        count: int = FOLLOW_COUNT,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.where = where
        self._connect = connect
        self._control = control
        self._block_ms = max(1, int(block_seconds * 1000))
        self._count = count
        self._streams: dict[bytes, dict[Deliver, _Follow]] = {}
        self._task: asyncio.Task[None] | None = None
        self._client: redis.asyncio.Redis | None = None
        self._client_id: int | None = None
        # The XREAD in flight: its start position per stream, and its number.
        self._reading: dict[bytes, Position] | None = None
        self._generation = 0
        self._unblocking: dict[int, asyncio.Task[None]] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: a closed follower follows nothing again."""
        return self._closed

    def follow(self, name: bytes, position: str, deliver: Deliver) -> None:
        """Call ``deliver(event)`` for every entry of stream ``name`` after ``position``.

        On the follower's event loop. Following again with the same
        ``deliver`` starts it over from the new ``position``. Raises
        :class:`ValueError` for a malformed position and
        :class:`RuntimeError` once the follower is closed.
        """
        start = parse_position(position)
        if self._closed:
            raise RuntimeError(f"the Redis follower of {self.where} is closed")
        self._streams.setdefault(name, {})[deliver] = _Follow(deliver, start)
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._run(), name=f"chanstore-follow {self.where}")
            return
        reading = self._reading
        if reading is not None:
            read_from = reading.get(name)
            if read_from is None or start < read_from:
                self._interrupt()

    def unfollow(self, name: bytes, deliver: Deliver) -> None:
        """Stop calling ``deliver`` for ``name`` (nothing happens if it did not follow it).

        The ``XREAD`` in flight is not interrupted: what it brings of a
        stream nobody follows any more is dropped, and the next read leaves
        the stream out.
        """
        follows = self._streams.get(name)
        if follows is not None and follows.pop(deliver, None) is not None and not follows:
            del self._streams[name]

    async def close(self) -> None:
        """Stop reading and close the connection; every remaining follower gets None."""
        self._closed = True
        task, self._task = self._task, None
        for unblocking in list(self._unblocking.values()):
            unblocking.cancel()
        if task is not None and not task.done():
            task.cancel()
            # Python 3.11's asyncio.wait_for (which redis-py sends with) can swallow a
            # cancellation that lands as the send completes, and the read would then
            # block on. Closing the socket under it ends it whatever became of that.
            client = self._client
            if client is not None and client.connection is not None:
                with contextlib.suppress(Exception):
                    await client.connection.disconnect(nowait=True)
            await asyncio.wait({task})
        self._end_follows()

    # -- the reading task ------------------------------------------------------

    async def _run(self) -> None:
        client = self._client = self._connect()
        this_task = asyncio.current_task()
        try:
            self._client_id = int(await client.client_id())
            while self._streams and not self._closed:
                starts = {name: min(follow.position for follow in follows.values())
                          for name, follows in self._streams.items()}  # fmt: skip
                self._generation += 1
                self._reading = starts
                try:
                    reply = await client.xread(
                        {name: _id_text(start) for name, start in starts.items()},
                        count=self._count,
                        block=self._block_ms,
                    )
                finally:
                    self._reading = None
                if this_task is not None and this_task.cancelling():
                    raise asyncio.CancelledError  # asked to stop, and redis-py lost it (above)
                if reply:
                    lost = await self._lost_streams(client, reply, starts)
                    if this_task is not None and this_task.cancelling():
                        raise asyncio.CancelledError
                    self._dispatch(reply, starts, lost)
            self._stepping_down()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every follower hears of it, then follows again
            if not self._closed:
                log.warning("redis_follow_failed", where=self.where, error=str(exc),
                            error_type=type(exc).__name__, streams=len(self._streams))  # fmt: skip
            self._stepping_down()
            self._end_follows()
        finally:
            self._client_id = None
            if self._client is client:
                self._client = None
            # Closing must finish even when the task was cancelled: it frees the socket.
            with contextlib.suppress(Exception):
                await asyncio.shield(client.aclose())

    def _stepping_down(self) -> None:
        """This task reads no more: a follow from now on (even from a ``deliver(None)``
        callback, or while this connection closes) starts a new task."""
        if self._task is asyncio.current_task():
            self._task = None

    async def _lost_streams(self, client: redis.asyncio.Redis, reply: Iterable[Any],
                            starts: dict[bytes, Position]) -> set[bytes]:  # fmt: skip
        """The streams of ``reply`` that no longer hold the position they were read from.

        One round trip for them all, pipelined on the follower's own
        connection (the one that read: a pipeline of the client would take
        another), after the read. Sound one way only: a stream it does not
        name lost nothing between its position and the entries read.
        """
        checks: list[tuple[bytes, Position, int]] = []
        commands: list[tuple[Any, ...]] = []
        for name, entries in reply:
            read_from = starts.get(name)
            if not entries or read_from is None or not self._streams.get(name):
                continue
            if read_from == (0, 0):
                commands.append(("XINFO STREAM", name))
            else:
                text = _id_text(read_from)
                commands.append(("XRANGE", name, text, text, "COUNT", 1))
            checks.append((name, read_from, len(entries)))
        if not checks:
            return set()
        connection = client.connection
        if connection is None:
            raise redis.ConnectionError("the follower's connection is gone")
        await connection.send_packed_command(connection.pack_commands(commands))
        answers: list[Any] = []
        for command in commands:  # every answer is read, so that none is left on the wire
            try:
                answers.append(await client.parse_response(connection, command[0]))
            except redis.ResponseError as exc:
                answers.append(exc)
        lost = set()
        for (name, read_from, read), answer in zip(checks, answers, strict=True):
            if read_from != (0, 0):
                if isinstance(answer, Exception):
                    raise answer
                held = bool(answer)  # the entry itself: so is everything after it
            elif isinstance(answer, redis.ResponseError) and "no such key" in str(answer).lower():
                held = False  # gone since the read (the data was lost): cannot tell
            elif isinstance(answer, Exception):
                raise answer
            else:
                added, length = answer["entries-added"], answer["length"]
                # Nothing ever trimmed, or every entry ever added was in this read.
                held = added == length or added <= read
            if not held:
                lost.add(name)
        return lost

    def _dispatch(self, reply: Iterable[Any], starts: dict[bytes, Position],
                  lost: set[bytes]) -> None:  # fmt: skip
        """Hand each stream's entries to its followers whose positions the read covered;
        for a stream in ``lost``, tell those at the position it was read from instead."""
        for name, entries in reply:
            follows = self._streams.get(name)
            read_from = starts.get(name)
            if not follows or not entries or read_from is None:
                continue
            if name in lost:
                self._history_lost(name, read_from)
                continue
            events = [(_entry_position(entry_id), change_event(entry_id, fields))
                      for entry_id, fields in entries]  # fmt: skip
            for follow in list(follows.values()):
                if follow.position < read_from:
                    continue  # it started earlier: the next read begins at its position
                for position, event in events:
                    if follows.get(follow.deliver) is not follow:
                        break  # unfollowed, or followed again, by a callback meanwhile
                    if position <= follow.position:
                        continue
                    follow.position = position
                    try:
                        follow.deliver(event)
                    except Exception as exc:  # noqa: BLE001 - one bad callback stops only itself
                        log.error("redis_follow_deliver_failed", where=self.where,
                                  error=str(exc), error_type=type(exc).__name__)  # fmt: skip
                        self.unfollow(name, follow.deliver)
                        break

    def _history_lost(self, name: bytes, read_from: Position) -> None:
        """Stream ``name`` no longer holds ``read_from``: each follower there gets
        :data:`~chanstore.history.HISTORY_LOST` and is unfollowed (first, so that a
        callback may follow again); the ones further on are read again."""
        follows = self._streams.get(name, {})
        gone = [follow for follow in follows.values() if follow.position == read_from]
        if not gone:
            return  # each started elsewhere meanwhile: the next read checks again
        for follow in gone:
            self.unfollow(name, follow.deliver)
        log.warning("redis_follow_history_lost", where=self.where,
                    stream=name.decode(errors="replace"), position=_id_text(read_from),
                    followers=len(gone))  # fmt: skip
        for follow in gone:
            try:
                follow.deliver(HISTORY_LOST)
            except Exception as exc:  # noqa: BLE001 - the others must hear it too
                log.error("redis_follow_deliver_failed", where=self.where,
                          error=str(exc), error_type=type(exc).__name__)  # fmt: skip

    def _end_follows(self) -> None:
        """Tell every follower that its follow ended (``deliver(None)``), and forget them."""
        streams, self._streams = self._streams, {}
        for follows in streams.values():
            for follow in follows.values():
                try:
                    follow.deliver(None)
                except Exception as exc:  # noqa: BLE001 - the others must hear it too
                    log.error("redis_follow_deliver_failed", where=self.where,
                              error=str(exc), error_type=type(exc).__name__)  # fmt: skip

    # -- interrupting a blocked read -------------------------------------------

    def _interrupt(self) -> None:
        """End the ``XREAD`` in flight soon, so that the next one covers the new follows."""
        generation = self._generation
        if generation in self._unblocking:
            return
        task = self.loop.create_task(self._unblock(generation))
        self._unblocking[generation] = task
        task.add_done_callback(lambda _task: self._unblocking.pop(generation, None))

    async def _unblock(self, generation: int) -> None:
        # CLIENT UNBLOCK travels on another connection, so it may reach Redis before
        # the XREAD it means to end is blocked there: it then unblocks nothing
        # (answers 0), and is sent again until it lands or the read has ended.
        delay = 0.0002
        while self._reading is not None and self._generation == generation:
            client_id = self._client_id
            if client_id is None:
                return
            try:
                if await self._control().client_unblock(client_id):
                    return
            except Exception as exc:  # noqa: BLE001 - the read then ends by its block timeout
                log.warning("redis_follow_unblock_failed", where=self.where, error=str(exc))
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def __repr__(self) -> str:
        return f"RedisFollower({self.where!r}, streams={len(self._streams)})"
