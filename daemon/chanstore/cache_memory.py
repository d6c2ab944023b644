"""What a CachedDict holds in memory: :class:`CacheMemory`, the public in-memory seam.

Callers that write to the backend themselves (the daemon's write lanes store
many channels' writes in one backend call) read memory with
:meth:`CacheMemory.peek`, which never asks the backend and never waits for a
lock, and tell it what the backend now holds with :meth:`CacheMemory.stored`,
:meth:`~CacheMemory.deleted` and :meth:`~CacheMemory.unsure`.

A *follower* of the backend (see
:meth:`~chanstore.backends.base.DatabaseInterface.keep_current`) tells memory
of writes other clients made: :meth:`CacheMemory.heard` for one change,
:meth:`~CacheMemory.drop` when changes may have been missed, and
:meth:`~CacheMemory.written` when it learns of the owner's own write before
the owner notes it.

``peek`` answers a value or one of three markers: :data:`ABSENT`,
:data:`UNKNOWN` (only the backend knows), or an :class:`UnreadableValue` for
a key whose stored value exists but cannot be decoded, held so that a damaged
key is never passed off as absent. :class:`NullMemory` is the memory of the
null backend, which keeps nothing. :mod:`chanstore.cache` re-exports all of it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from chanstore.cache_hits import Memory
from chanstore.errors import CorruptValue
from chanstore.metrics import CacheCounts

__all__ = ["ABSENT", "UNKNOWN", "CacheMemory", "NullMemory", "UnreadableValue"]

_MISSING: Any = object()


class _Marker:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: The answer for a key known to be absent (:meth:`CacheMemory.peek`, :meth:`CachedDict.fetch`).
ABSENT: Any = _Marker("ABSENT")
#: :meth:`CacheMemory.peek`'s answer when only the backend knows.
UNKNOWN: Any = _Marker("UNKNOWN")


class UnreadableValue(CorruptValue):
    """A key whose stored value exists but cannot be decoded, as memory holds it.

    :meth:`CacheMemory.peek` answers it in place of the value, so a damaged
    key stays listed and deletable; whoever reads it raises :meth:`fresh`
    (a new exception each time: one held in memory is never raised itself,
    so it carries no traceback). Its message names container and key only,
    fit for an HTTP answer; the backend's detail, such as a file path, goes
    to the log when the damage is found.
    """

    def __init__(self, container: str, key: str, kind: str = CorruptValue.kind) -> None:
        where = f"key {key[:200]!r} in container {container[:200]!r}"
        if kind == "planted_link":
            fix = "is behind a link planted in the data root, which chanstore never follows"
            message = f"the stored value of {where} {fix}; the log says where: remove the link"
        else:
            fix = "delete the key or store a new value over it"
            message = f"the stored value of {where} is damaged and cannot be read; {fix}"
        super().__init__(message)
        self.container = container
        self.key = key
        self.kind = kind

    def fresh(self) -> UnreadableValue:
        """A new exception like this one, to raise."""
        return UnreadableValue(self.container, self.key, self.kind)

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # Pickled (across processes) by what it names, not by its message.
        return UnreadableValue, (self.container, self.key, self.kind)


class CacheMemory(Memory):
    """What one CachedDict holds in memory: values, and whether they are the whole domain.

    :meth:`peek` never asks the backend and never waits for a lock, so an
    event loop may call it. Whoever writes to the backend tells the memory
    once the write is settled (:meth:`stored`, :meth:`deleted`,
    :meth:`unsure`); each such call counts in :attr:`writes`, and a read of
    the backend that began before one is not cached. Changes are made under a
    lock of the memory's own, never held across a backend call.

    Hits and misses are counted in plain numbers shared by the container's
    CachedDicts (:class:`~chanstore.metrics.CacheCounts`), folded into
    ``chanstore_cache_requests_total`` when the metrics are collected.
    """

    # _values, _complete and _counts are the hit path's (chanstore.cache_hits.Memory).
    __slots__ = ("_entries", "_lock", "_noted", "_touched", "_void", "_writes")

    #: Whether the values of writes are kept (:class:`NullMemory` keeps nothing).
    keeps_writes = True

    def __init__(self, counts: CacheCounts, entries: Any) -> None:
        self._values: dict[str, Any] = {}
        self._complete = False
        self._writes = 0
        self._counts = counts
        self._entries = entries  # the container's chanstore_cache_entries child
        self._lock = threading.Lock()
        # While a load or clear is under way: the keys written meanwhile, and
        # whether the last write of each was unsure.
        self._touched: dict[str, bool] | None = None
        # Whether drop() came while a load or clear was under way: it keeps nothing it read.
        self._void = False
        # The owner's writes a follower noted first (written()), by key: the value, or
        # ABSENT. None until there is one, so that a memory nobody follows stays small.
        self._noted: dict[str, Any] | None = None

    # -- reading ---------------------------------------------------------------

    def peek(self, key: str) -> Any:
        """What memory alone says of ``key``: its value, :data:`ABSENT` or :data:`UNKNOWN`,
        or an :class:`UnreadableValue` for a stored value that cannot be decoded (the
        caller raises its :meth:`~UnreadableValue.fresh` copy, or reports it per key).

        A value or ABSENT counts as a cache hit; UNKNOWN counts nothing (the
        caller asks the backend, which :meth:`CachedDict.fetch` counts as a miss).
        """
        value = self._values.get(key, UNKNOWN)
        if value is UNKNOWN:
            if not self._complete:
                return UNKNOWN
            value = ABSENT
        self._counts.hits += 1
        return value

    def held(self, key: str) -> Any:
        """What memory holds of ``key``, as :meth:`peek` says it, without counting a hit:
        for a writer that checks what it is about to replace, not a read."""
        value = self._values.get(key, UNKNOWN)
        if value is UNKNOWN and self._complete:
            return ABSENT
        return value

    @property
    def complete(self) -> bool:
        """Whether memory holds the whole domain: a key it does not hold is absent."""
        return self._complete

    @property
    def writes(self) -> int:
        """How many writes (and drops of the whole memory) were noted so far.

        Read it before asking the backend: if it changed by the time the
        answer is back, the answer may be older than a write, and is not cached.
        """
        return self._writes

    def keys(self) -> list[str]:
        """The keys held; every key of the domain only when :attr:`complete`."""
        with self._lock:
            return list(self._values)

    def __len__(self) -> int:
        return len(self._values)

    # -- writes the caller settled ---------------------------------------------------

    def stored(self, key: str, value: Any) -> None:
        """The caller's own write of ``key`` is now held by the backend: cache ``value``."""
        with self._lock:
            self._writes += 1
            if self._noted is not None and self._noted.get(key, _MISSING) is value:
                del self._noted[key]  # a follower noted this very write first
                return
            self._put(key, value)
            if self._touched is not None:
                self._touched[key] = False

    def deleted(self, key: str) -> None:
        """The caller deleted ``key`` from the backend (or found it absent there)."""
        with self._lock:
            self._writes += 1
            if self._noted is not None and self._noted.get(key, _MISSING) is ABSENT:
                del self._noted[key]  # a follower noted this very delete first
                return
            self._pop(key)
            if self._touched is not None:
                self._touched[key] = False

    def unsure(self, key: str) -> None:
        """A write of ``key`` ended with an unknown outcome: forget ``key``, and completeness.

        A write that timed out or lost its connection may still land, so what
        the backend holds is not known: the next read of ``key`` asks it.
        """
        with self._lock:
            if self._noted is not None:
                self._noted.pop(key, None)
            self._forget(key)

    # -- writes other clients made, told by a follower of the backend ---------------

    def heard(self, key: str, value: Any) -> None:
        """Another client changed ``key``: ``value`` is its new value, or :data:`ABSENT`
        for a delete.

        A read of the backend begun before it is not cached. While a load or a
        clear is under way, ``key`` is left unknown, as :meth:`unsure` leaves it
        (what the load read of it may be older or newer). Otherwise memory
        holds the change when it holds ``key`` or the whole domain; a partial
        memory that did not hold ``key`` keeps not holding it.
        """
        with self._lock:
            if self._touched is not None:
                self._forget(key)
                return
            self._writes += 1
            if value is ABSENT:
                self._pop(key)
            elif self._complete or key in self._values:
                self._put(key, value)

    def drop(self) -> None:
        """Forget everything held, completeness too (what :meth:`CachedDict.forget
        <chanstore.cache.CachedDict.forget>` does): changes may have been missed. The
        next reads ask the backend; a load or clear under way keeps nothing it read."""
        with self._lock:
            self._writes += 1
            if self._touched is not None:
                self._void = True
            self._replace({}, False)

    def written(self, key: str, value: Any, *, certain: bool = True) -> None:
        """The owner's own write of ``key`` (``value``, or :data:`ABSENT` for a delete) is
        acknowledged, and a follower, which orders it among the changes it hears, tells
        memory before the owner does.

        Memory holds it now, and the owner's own :meth:`stored` of this very
        ``value`` (or :meth:`deleted`, for a delete) changes nothing more, so
        that a change heard in between is not undone by it. Not ``certain``
        (changes may have been missed while the write was under way), memory
        forgets ``key`` instead, as :meth:`unsure` does.
        """
        with self._lock:
            if self._noted is None:
                self._noted = {}
            self._noted[key] = value
            if not certain:
                self._forget(key)
                return
            self._writes += 1
            if value is ABSENT:
                self._pop(key)
            else:
                self._put(key, value)
            if self._touched is not None:
                self._touched[key] = False

    def _forget(self, key: str) -> None:
        """:meth:`unsure` of ``key``, the lock held."""
        self._writes += 1
        self._complete = False  # before the pop: a peek must never see ABSENT for key
        self._pop(key)
        if self._touched is not None:
            self._touched[key] = True

    def __repr__(self) -> str:
        state = "complete" if self._complete else "partial"
        return f"CacheMemory({len(self._values)} values, {state}, writes={self._writes})"

    # -- for CachedDict ---------------------------------------------------------------

    def _absent(self, key: str) -> bool:
        """Whether memory knows ``key`` is absent (without counting a hit)."""
        return self._complete and key not in self._values

    def _missed(self, count: int = 1) -> None:
        self._counts.misses += count

    def _fill(self, found: Mapping[str, Any], since: int) -> None:
        """Cache what a read of the backend begun when :attr:`writes` was ``since`` found."""
        with self._lock:
            if self._writes == since:
                for key, value in found.items():
                    self._put(key, value)

    def _begin_whole(self) -> None:
        """A load or clear starts: note the keys written until :meth:`_end_whole`."""
        with self._lock:
            self._touched = {}
            self._void = False

    def _end_whole(self, values: dict[str, Any] | None, *, trust_writes: bool) -> None:
        """Hold exactly ``values`` (what the backend held), completed by the writes meanwhile.

        With ``trust_writes`` (a load: those writes are newer than what it
        read) they are applied over ``values``; otherwise (a clear, which may
        have deleted them) their keys are left unknown. ``None``: the load or
        clear failed, and memory stays as it is.
        """
        with self._lock:
            touched, self._touched = self._touched or {}, None
            if values is None or self._void:
                self._void = False  # dropped meanwhile: what was read may be out of date
                return
            complete = True
            for key, was_unsure in touched.items():
                if trust_writes and not was_unsure and key in self._values:
                    values[key] = self._values[key]
                else:
                    values.pop(key, None)
                complete = complete and trust_writes and not was_unsure
            self._writes += 1
            self._replace(values, complete)

    def _reset(self, complete: bool) -> None:
        """Hold nothing: an empty domain if ``complete``, else an unknown one."""
        with self._lock:
            self._writes += 1
            self._replace({}, complete)

    def _replace(self, values: dict[str, Any], complete: bool) -> None:
        self._noted = None
        self._entries.inc(len(values) - len(self._values))
        if complete:
            self._values = values
            self._complete = True
        else:
            self._complete = False  # first: a peek must never see ABSENT for a key it held
            self._values = values

    def _put(self, key: str, value: Any) -> None:
        if key not in self._values:
            self._entries.inc()
        self._values[key] = value

    def _pop(self, key: str) -> None:
        if self._values.pop(key, _MISSING) is not _MISSING:
            self._entries.dec()


class NullMemory(CacheMemory):
    """The memory of a CachedDict over the null backend: it keeps nothing.

    The null backend stores nothing and reads every key as None; a memory
    that kept what was written would make a null container read back
    values it never stored. So every key reads as None from here (a hit,
    never a backend call), and the domain is complete and empty: nothing
    is listed.
    """

    __slots__ = ()
    keeps_writes = False

    def __init__(self, counts: CacheCounts, entries: Any) -> None:
        super().__init__(counts, entries)
        self._complete = True

    def peek(self, key: str) -> Any:
        self._counts.hits += 1
        return None

    def held(self, key: str) -> Any:
        return None

    def unsure(self, key: str) -> None:
        with self._lock:
            self._writes += 1

    def heard(self, key: str, value: Any) -> None:
        with self._lock:
            self._writes += 1

    def written(self, key: str, value: Any, *, certain: bool = True) -> None:
        with self._lock:
            self._writes += 1

    def _absent(self, key: str) -> bool:
        return False

    def _put(self, key: str, value: Any) -> None:
        return None

    def _replace(self, values: dict[str, Any], complete: bool) -> None:
        self._complete = True
