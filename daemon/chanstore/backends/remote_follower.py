"""A follower: one CachedDict's memory, told of its container's changes in their order.

The change feed (:mod:`chanstore.backends.remote_feed`) hands a follower each
change of its container; the chanstore backend tells it of its own writes.
A follower puts both in one order:

* a write's own event (its *echo*, told by its ETag) changes nothing, so that
  a value a caller changes in place and saves is never swapped for a copy
  under it;
* a change heard while the backend's own write of the key waits for its echo
  was acknowledged before that write (its event came first): it is passed
  over, and the changes after the echo are heard, in order;
* the write itself reaches memory through the follower
  (:meth:`~chanstore.cache_memory.CacheMemory.written`), so that a change
  heard after it is never undone by the owner's late note of its write;
* when changes may have been missed, memory is dropped, and a write under way
  then leaves its key unknown.
"""

from __future__ import annotations

import copy
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

from chanstore import codec, logs
from chanstore.cache_memory import ABSENT, CacheMemory
from chanstore.client.bodies import revive_document

__all__ = ["LIVE", "STALE", "WAITING", "Follower", "Writes", "decode_document"]

#: Keys a follower may hold writes or changes of, waiting for writes' echoes, before it
#: gives up ordering them and drops its memory: the feed is not delivering.
MAX_PENDING_KEYS = 10_000
#: Changes of one key held while waiting for an echo (a key rewritten that often).
MAX_HELD_CHANGES = 1_000
#: Seconds an acknowledged write's echo is waited for, once a later change of its key came:
#: past it the echo is taken for lost, and memory forgets the key (it should never happen).
ECHO_WAIT = 30.0

# A follower's state in its feed: its memory was made while waiting for the
# feed's stream and nothing was read yet; the stream's changes reach it; or it
# stopped waiting before the stream was ready, and may hold what it then missed.
WAITING, LIVE, STALE = "waiting", "live", "stale"

log = logs.get_logger(backend="chanstore")


def decode_document(document: Any, *, revive: bool) -> Any:
    """A value's stored form as a backend answers it: revived (sets, tuples, registered
    dataclasses), or kept as the :class:`~chanstore.codec.Document` it is.

    Raises ValueError for a registered type's mark whose value does not fit the type.
    """
    if revive:
        return revive_document(document)
    return codec.Document(document)


class _OwnWrite:
    """One of the backend's own writes of a key, until its echo is heard."""

    __slots__ = ("acked", "delete", "etag")

    def __init__(self, delete: bool) -> None:
        self.delete = delete
        #: When the daemon acknowledged it (and memory took it), on the monotonic clock.
        self.acked: float | None = None
        self.etag: str | None = None  # the ETag it was stored with (set writes)

    def echoed_by(self, kind: str, etag: str | None) -> bool:
        if self.delete:
            return kind == "delete"
        return kind == "set" and etag == self.etag


class _Key:
    """A key with own writes waiting for their echoes, and the changes heard meanwhile."""

    __slots__ = ("changes", "writes")

    def __init__(self) -> None:
        self.writes: deque[_OwnWrite] = deque()
        self.changes: list[tuple[str, Any, str | None]] = []  # (kind, document, etag)


class Writes:
    """The backend's writes of some keys, begun (:meth:`Follower.begin`): say how each ended."""

    __slots__ = ("follower", "generation", "owns")

    def __init__(self, follower: Follower, generation: int, owns: dict[str, _OwnWrite]) -> None:
        self.follower = follower
        self.generation = generation
        self.owns = owns

    def acked(self, key: str, value: Any, etag: str | None, *, echo: bool = True) -> None:
        """See :meth:`Follower.acked`."""
        self.follower.acked(self, key, value, etag, echo=echo)

    def withdrawn(self) -> None:
        """See :meth:`Follower.withdrawn`: every write not acknowledged failed."""
        self.follower.withdrawn(self)


class Follower:
    """One CachedDict's memory, following the changes of its container.

    The feed thread calls :meth:`change`; the backend calls :meth:`begin`
    before it sends a write, then :meth:`acked` or :meth:`withdrawn`. One lock
    puts all of them in one order.
    """

    def __init__(self, memory: CacheMemory, container: str, backend: Any, *,
                 owner: bool = True) -> None:  # fmt: skip
        self.memory = memory
        self.container = container
        #: Whether the backend's writes are this memory's own (the first CachedDict's).
        self.owner = owner
        self.state = WAITING
        self._backend = weakref.ref(backend)  # for revive_values; never kept alive by this
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._generation = 0  # one more at each drop: writes begun before it are not trusted

    # -- the feed thread --------------------------------------------------------

    def change(self, kind: str, key: str, document: Any, etag: str | None) -> None:
        """Another client's change (or an echo of the backend's own write)."""
        with self._lock:
            held = self._keys.get(key)
            if held is None:
                self._hear(kind, key, document)
                return
            if len(held.changes) >= MAX_HELD_CHANGES:
                self._drop("a key changed too often while its own write was unconfirmed")
                return
            held.changes.append((kind, document, etag))
            self._settle(key, held)

    def drop(self, reason: str) -> None:
        """Changes may have been missed: memory forgets everything, and the writes under
        way are no longer ordered (their keys are forgotten when they are acknowledged)."""
        with self._lock:
            self._drop(reason)

    # -- the backend --------------------------------------------------------------

    def begin(self, keys: Iterable[str], *, delete: bool) -> Writes:
        """The backend is about to send writes (deletes) of ``keys``."""
        with self._lock:
            owns: dict[str, _OwnWrite] = {}
            for key in dict.fromkeys(keys):
                own = owns[key] = _OwnWrite(delete)
                held = self._keys.get(key)
                if held is None:
                    held = self._keys[key] = _Key()
                held.writes.append(own)
            if len(self._keys) > MAX_PENDING_KEYS:
                self._drop("too many writes wait for their echo: the feed is not delivering")
            return Writes(self, self._generation, owns)

    def acked(self, writes: Writes, key: str, value: Any, etag: str | None, *,
              echo: bool) -> None:  # fmt: skip
        """The daemon acknowledged the write of ``key``: ``value`` (ABSENT for a delete),
        stored with ``etag``; ``echo``: whether an event of it will come (a delete of an
        absent key makes none)."""
        with self._lock:
            own = writes.owns.pop(key, None)
            if own is None:
                return
            if writes.generation != self._generation:
                # Dropped since the write began: what else changed meanwhile is not known.
                self.memory.written(key, value, certain=False)
                return
            self.memory.written(key, value)
            held = self._keys[key]
            if echo and (own.delete or etag is not None):
                own.acked, own.etag = time.monotonic(), etag
            else:
                held.writes.remove(own)
            self._settle(key, held)

    def withdrawn(self, writes: Writes) -> None:
        """The writes of ``writes`` not acknowledged failed: no echo is awaited. One whose
        outcome is unknown may still land; its event, if it comes, is then heard like
        another client's."""
        with self._lock:
            for key in list(writes.owns):
                own = writes.owns.pop(key, None)
                if own is None or writes.generation != self._generation:
                    continue
                held = self._keys[key]
                held.writes.remove(own)
                self._settle(key, held)

    # -- the lock held ---------------------------------------------------------------

    def _settle(self, key: str, held: _Key) -> None:
        """Pass over the changes older than each acknowledged write up to its echo; once no
        write waits, memory hears what came after the last echo, in order."""
        writes, changes = held.writes, held.changes
        while writes and writes[0].acked is not None:
            own = writes[0]
            for index, (kind, _document, etag) in enumerate(changes):
                if own.echoed_by(kind, etag):
                    del changes[: index + 1]
                    writes.popleft()
                    break
            else:
                if not changes or time.monotonic() - own.acked < ECHO_WAIT:
                    return  # its echo has not come yet
                log.warning("echo_not_heard", container=self.container, key=key[:200],
                            waited=ECHO_WAIT)  # fmt: skip
                writes.popleft()
                self.memory.unsure(key)
        if writes:
            return
        del self._keys[key]
        for kind, document, _etag in changes:
            self._hear(kind, key, document)

    def _hear(self, kind: str, key: str, document: Any) -> None:
        if kind == "delete":
            self.memory.heard(key, ABSENT)
            return
        backend = self._backend()
        revive = True if backend is None else backend.revive_values
        try:
            value = decode_document(document if revive else copy.deepcopy(document),
                                    revive=revive)  # fmt: skip
        except ValueError as exc:
            # Stored, but not readable here: the next read asks the daemon, and says so.
            log.warning("change_not_readable", container=self.container, key=key[:200],
                        error=str(exc))  # fmt: skip
            self.memory.unsure(key)
            return
        self.memory.heard(key, value)

    def _drop(self, reason: str) -> None:
        self._generation += 1
        self._keys.clear()
        self.memory.drop()
