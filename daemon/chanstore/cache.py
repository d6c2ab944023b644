"""CachedDict: a dict-like, write-through cache over one backend domain.

Reads of a cached key never touch the backend; a miss asks the backend once
and caches the answer. Every write goes to the backend first and reaches the
cache only once the backend holds it. After :meth:`CachedDict.load` the cache
is *complete*: it holds the whole domain, and absent keys, ``len``,
iteration and ``in`` are answered from memory.

What a CachedDict holds is a :class:`~chanstore.cache_memory.CacheMemory`
(``CachedDict.memory``), the public seam for callers that write to the
backend themselves (the daemon's write lanes store many channels' writes in
one backend call): they read with :meth:`CachedDict.fetch` or
``memory.peek``, and tell the memory what the backend now holds (see
:mod:`chanstore.cache_memory`, whose names this module re-exports).

A stored value that cannot be decoded (a torn file) is never passed off as
absent: memory holds it as an :class:`UnreadableValue`, so the key is listed,
counted by ``len``, ``in`` the mapping, and can be deleted or overwritten,
while reading it raises that error. A null backend stores nothing, and its
memory keeps nothing either (:class:`NullMemory`): every key reads as None.

chanstore assumes it is the only writer to a domain, which is what makes a
complete cache trustworthy, unless the backend hears of the writes of others
and tells memory (:meth:`DatabaseInterface.keep_current
<chanstore.backends.base.DatabaseInterface.keep_current>`: the chanstore
backend follows the daemon's change feed).
"""

from __future__ import annotations

import contextlib
import copy as _copy
import threading
from collections.abc import ItemsView, Iterable, Iterator, Mapping, MutableMapping, ValuesView
from typing import Any

from chanstore import logs
from chanstore.backends.base import DatabaseInterface
from chanstore.backends.null import NullDatabase
from chanstore.cache_hits import HitPath
from chanstore.cache_memory import (
    ABSENT,
    UNKNOWN,
    CacheMemory,
    NullMemory,
    UnreadableValue,
)
from chanstore.errors import (
    BackendError,
    ChanstoreError,
    CorruptValue,
    InvalidKey,
    UnstorableValue,
    WriteRefused,
)
from chanstore.instrumentation import NOT_FOUND, attach, failure_kind
from chanstore.keys import check_key
from chanstore.metrics import Metrics, default_metrics

__all__ = ["ABSENT", "UNKNOWN", "CacheMemory", "CachedDict", "NullMemory", "UnreadableValue"]

_MISSING: Any = object()
_CALLER_ERRORS = {"invalid_value": UnstorableValue, "invalid_key": InvalidKey}
# A write that failed so may still land (Redis applies what it received before
# it stalled): what the backend holds is not known.
_UNKNOWN_OUTCOMES = frozenset({"timeout", "unavailable"})
#: The ``kind`` label of ``chanstore_integrity_problems_total`` for a value that cannot be read.
CORRUPT_VALUE = "corrupt_value"
#: Kinds of failure that mean a stored value exists but cannot be used: held as
#: an UnreadableValue, never passed off as absent or as a backend outage.
_UNREADABLE_KINDS = frozenset({CorruptValue.kind, "planted_link"})


class CachedDict(HitPath, MutableMapping[str, Any]):
    """A mapping whose values live in ``database`` and are cached in :attr:`memory`.

    ``strict_mode=True`` raises :class:`~chanstore.errors.WriteRefused` when
    the backend refuses a write or a delete, and changes nothing. Otherwise,
    as in the original SDK, the failure is logged and counted and the change
    is kept in memory only. Either way, a read that the backend fails raises
    :class:`~chanstore.errors.BackendError`: a failure is never passed off as
    an absent key; nor is a stored value that cannot be decoded: reading it
    raises :class:`UnreadableValue` (a :class:`~chanstore.errors.CorruptValue`),
    while ``in``, ``len``, iteration and ``keys()`` count it and ``del`` or a
    new value clears it. ``items()``, ``values()`` and :meth:`copy` read every
    value, so they raise for it too. Each damaged value found is logged at
    error (``integrity_problem``) and counted in
    ``chanstore_integrity_problems_total{kind="corrupt_value"}``.

    Over the null backend (the default) nothing is stored or kept: every key
    reads as None (so ``in`` is true for any key, as ``[]`` answers for it),
    nothing is listed, and ``del`` is acknowledged like any write.

    ``name`` is the container's name in metrics and logs. Safe to share
    between threads.
    """

    # The daemon holds one per channel and container in memory: slots keep each
    # one small (no per-instance __dict__), and a logger is made only to log.
    # ``memory`` is the hit path's (chanstore.cache_hits.HitPath).
    __slots__ = ("_lock", "_metrics", "database", "name", "strict_mode")

    def __init__(
        self,
        database: DatabaseInterface | None = None,
        strict_mode: bool = False,
        *,
        name: str = "unnamed",
        metrics: Metrics | None = None,
    ) -> None:
        if database is None:
            database = NullDatabase()
        self.database = database
        self.strict_mode = strict_mode
        self.name = name
        # Held by writes through this mapping across their backend call, so
        # that its read-modify-writes (editing, setdefault, pop) are atomic.
        self._lock = threading.RLock()
        metrics = self._metrics = metrics if metrics is not None else default_metrics()
        attach(database, container=name, metrics=metrics)
        memory = NullMemory if isinstance(database, NullDatabase) else CacheMemory
        self.memory = memory(metrics.cache_counts(name), metrics.cache_entries.labels(name))
        # Before anything is read: a backend that hears of other clients' writes
        # (the daemon's change feed) keeps memory current from here on.
        database.keep_current(self.memory)

    # -- reading through the cache --------------------------------------------------

    def fetch(self, key: str, *, fresh: bool = False) -> Any:
        """The value of ``key``, or :data:`ABSENT`: from memory, else from the backend
        (from the backend whatever memory holds, when ``fresh``: for a caller that
        cannot trust memory now, such as a daemon that lost its invalidation link).

        A miss is counted and its answer cached, unless a write was noted
        while the backend was asked. Raises
        :class:`~chanstore.errors.BackendError` when the backend fails (never
        a false ABSENT), :class:`UnreadableValue` for a stored value that
        cannot be decoded, and :class:`~chanstore.errors.InvalidKey` for a key
        that memory does not answer and no backend could hold.
        """
        value = UNKNOWN if fresh else self.memory.peek(key)
        if value is UNKNOWN:
            check_key(key)
            value = self._fetch_unknown(key)
        if value.__class__ is UnreadableValue:
            raise value.fresh()
        return value

    def fetch_many(self, keys: Iterable[str], *, fresh: bool = False) -> dict[str, Any]:
        """The values of those ``keys`` that exist, as :meth:`fetch` finds them.

        The keys memory does not answer are read with one ``get_many`` call.
        As in the backend's ``get_many``, a stored value that cannot be
        decoded maps to its :class:`UnreadableValue` instead of failing the
        call: the caller tells which keys are damaged.
        """
        keys = list(keys)
        memory = self.memory
        found: dict[str, Any] = {}
        unknown: list[str] = []
        for key in keys:
            value = UNKNOWN if fresh else memory.peek(key)
            if value is UNKNOWN:
                unknown.append(check_key(key))
            elif value is not ABSENT:
                found[key] = value
        if not unknown:
            return found
        unknown = list(dict.fromkeys(unknown))
        memory._missed(len(unknown))
        since = memory.writes
        fetched = self.database.get_many(unknown)
        for key, value in fetched.items():
            if isinstance(value, CorruptValue):  # a value that exists and cannot be read
                fetched[key] = self._unreadable(key, value)
        memory._fill(fetched, since)
        found.update(fetched)
        return {key: found[key] for key in keys if key in found}

    def _fetch_unknown(self, key: str) -> Any:
        """The backend's answer for ``key``: its value, ABSENT or an UnreadableValue."""
        memory = self.memory
        memory._missed()
        since = memory.writes
        ok, value = self.database.get_value(key)
        if not ok:
            kind = failure_kind(value, default=NOT_FOUND)
            if kind == NOT_FOUND:
                return ABSENT
            if kind not in _UNREADABLE_KINDS:
                raise _backend_error(value)
            value = self._unreadable(key, value)
        memory._fill({key: value}, since)
        return value

    def _unreadable(self, key: str, failure: Any) -> UnreadableValue:
        """The marker of ``key``, whose stored value cannot be decoded; logged and counted
        when found, not again while memory holds it."""
        held = self.memory._values.get(key)
        if held.__class__ is UnreadableValue:
            return held  # type: ignore[return-value]
        kind = getattr(failure, "kind", CorruptValue.kind)
        if kind == CorruptValue.kind:
            # A planted link is the backend's to report (it knows the path and tells
            # it once, through integrity_problems); a damaged value is this cache's.
            self._metrics.integrity_problems.labels(self.name, CORRUPT_VALUE).inc()
            log = logs.get_logger(container=self.name, domain=getattr(self.database, "domain", ""))
            log.error("integrity_problem", kind=CORRUPT_VALUE, key=key, error=str(failure))
        return UnreadableValue(self.name, key, kind)

    # -- whole-domain operations --------------------------------------------------

    @property
    def loaded(self) -> bool:
        """Whether the cache holds the whole domain."""
        return self.memory.complete

    def load(self) -> None:
        """Read the whole domain into the cache.

        A value that cannot be decoded is logged and counted, with the file or
        field it came from, and held as its :class:`UnreadableValue`: the rest
        of the domain still loads, and the damaged key is not passed off as absent.
        """
        memory = self.memory
        with self._lock:
            memory._begin_whole()
            try:
                items = self.database.load_all()
            except BaseException:
                memory._end_whole(None, trust_writes=True)
                raise
            for key, value in items.items():
                if isinstance(value, CorruptValue):
                    items[key] = self._unreadable(key, value)
            memory._end_whole(items, trust_writes=True)

    def copy(self) -> dict[str, Any]:
        """Every key and value of the domain, as a plain dict (loading it first if needed).

        Shallow, like ``dict.copy``: the values are the cached objects
        (change one in place, then :meth:`save` it). Raises
        :class:`UnreadableValue` if a stored value cannot be decoded.
        ``copy.copy`` of a CachedDict is this too.
        """
        memory = self.memory
        with self._lock:
            while True:
                if not memory.complete:
                    self.load()
                with memory._lock:
                    if memory._complete:
                        copied = dict(memory._values)
                        break
                # A write noted as unsure meanwhile made memory incomplete: load again.
        for value in copied.values():
            if value.__class__ is UnreadableValue:
                raise value.fresh()
        return copied

    __copy__ = copy

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return _copy.deepcopy(self.copy(), memo)

    def save(self, key: str) -> None:
        """Persist an in-place change to the value of ``key`` (``d[key]["hp"] -= 1``)."""
        with self._lock:
            self[key] = self[key]

    @contextlib.contextmanager
    def editing(self, key: str, default: Any = _MISSING) -> Iterator[Any]:
        """Yield the value of ``key`` to change in place; save it when the block ends.

        ``default`` is stored first when ``key`` is absent. The value is saved
        only if the block finishes without an exception; otherwise (or if the
        backend refuses it) the cache goes back to the stored value. The dict stays locked
        for the block, so the read-modify-write is atomic among threads.
        """
        with self._lock:
            value = self[key] if default is _MISSING else self.setdefault(key, default)
            try:
                yield value
                self[key] = value
            except BaseException:
                # The value was changed in place but not stored: cache what is stored.
                self._reread(key)
                raise

    def forget(self) -> None:
        """Drop the cache (not the stored data): the next reads ask the backend."""
        self.memory._reset(complete=False)

    def close(self) -> None:
        """Drop the cache and close the backend."""
        self.forget()
        self.database.close()

    # -- reading -------------------------------------------------------------
    # ``d[key]``, ``get`` and ``in`` of a key memory holds are HitPath's (in C where
    # built); it comes here for the rest.

    def _get_slowly(self, key: str) -> Any:
        """``self[key]`` for a key memory does not hold a readable value of."""
        value = self.memory.peek(key)
        if value is UNKNOWN:
            if not _is_valid_key(key):
                raise KeyError(key)
            value = self._fetch_unknown(key)
        if value is ABSENT:
            raise KeyError(key)
        if value.__class__ is UnreadableValue:
            raise value.fresh()
        return value

    def _contains_slowly(self, key: Any) -> bool:
        value = self.memory.peek(key)
        if value is UNKNOWN:
            if not _is_valid_key(key):
                return False
            value = self._fetch_unknown(key)
        return value is not ABSENT

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        memory = self.memory
        if memory._complete:
            return len(memory._values)
        return len(self._keys())

    def items(self) -> ItemsView[str, Any]:
        """The items, the whole domain loaded first; iterating raises
        :class:`UnreadableValue` at a value that cannot be decoded."""
        self._ensure_loaded()
        return _Items(self)

    def values(self) -> ValuesView[Any]:
        """The values, the whole domain loaded first; iterating raises
        :class:`UnreadableValue` at a value that cannot be decoded."""
        self._ensure_loaded()
        return _Values(self)

    def _keys(self) -> list[str]:
        memory = self.memory
        if memory.complete:
            return memory.keys()
        # Keys the backend has, then any kept in memory only (non-strict failures).
        keys = dict.fromkeys(self.database.all_keys())
        keys.update(dict.fromkeys(memory.keys()))
        return list(keys)

    def _ensure_loaded(self) -> None:
        if not self.memory.complete:
            self.load()

    # -- writing -------------------------------------------------------------

    def __setitem__(self, key: str, value: Any) -> None:
        check_key(key)
        with self._lock:
            ok, message = self.database.set_value(key, value)
            if not ok:
                self._refused("set", key, message, [key])
            self.memory.stored(key, value)

    def __delitem__(self, key: str) -> None:
        memory = self.memory
        with self._lock:
            if memory._absent(key):
                raise KeyError(key)
            check_key(key)
            ok, message = self.database.delete_key(key)
            if not ok:
                if failure_kind(message, default="refused") == NOT_FOUND:
                    memory.deleted(key)
                    raise KeyError(key)
                self._refused("delete", key, message, [key])
            memory.deleted(key)

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Write every item with one bulk call to the backend."""
        items = dict(other.items() if isinstance(other, Mapping) else other, **kwargs)
        for key in items:
            check_key(key)
        if not items:
            return
        memory = self.memory
        with self._lock:
            try:
                self.database.set_many(items)
            except ChanstoreError as exc:
                done = getattr(exc, "done", [])
                for key in done:
                    memory.stored(key, items[key])
                self._refused("update", f"<{len(items)} keys>", exc, set(items) - set(done))
            for key, value in items.items():
                memory.stored(key, value)

    def __ior__(self, other: Any) -> CachedDict:
        self.update(other)
        return self

    def __or__(self, other: Any) -> dict[str, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**self.copy(), **other}

    def __ror__(self, other: Any) -> dict[str, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**other, **self.copy()}

    def setdefault(self, key: str, default: Any = None) -> Any:
        with self._lock:
            try:
                return self[key]
            except KeyError:
                self[key] = default
                return default

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        with self._lock:
            try:
                value = self[key]
            except KeyError:
                if default is _MISSING:
                    raise
                return default
            # Another client may delete it between the read and the delete (a backend
            # others write, such as the daemon): it is gone either way, as pop asks.
            with contextlib.suppress(KeyError):
                del self[key]
            return value

    def popitem(self) -> tuple[str, Any]:
        with self._lock:
            key = next(reversed(self.memory._values), _MISSING)
            if key is _MISSING:
                key = next(iter(self._keys()), _MISSING)
                if key is _MISSING:
                    raise KeyError("popitem(): CachedDict is empty")
            return key, self.pop(key)

    def clear(self) -> None:
        """Delete every key of the domain, loaded or not."""
        memory = self.memory
        with self._lock:
            memory._begin_whole()
            failure: ChanstoreError | None = None
            cleared = False
            try:
                keys = list(dict.fromkeys([*self.database.all_keys(), *memory.keys()]))
                try:
                    self.database.delete_many(keys)
                    cleared = True
                except ChanstoreError as exc:
                    failure = exc
            finally:
                # Done deleting (or failed): from here on, writes are noted as usual.
                memory._end_whole({} if cleared else None, trust_writes=False)
            if failure is not None:
                done = getattr(failure, "done", [])
                for key in done:
                    memory.deleted(key)
                self._refused("clear", f"<{len(keys)} keys>", failure, set(keys) - set(done))
                memory._reset(complete=True)  # not strict: memory says what was asked

    # -- internals -----------------------------------------------------------

    def _reread(self, key: str) -> None:
        """Replace the cached value of ``key`` with the backend's."""
        ok, value = self.database.get_value(key)
        if ok:
            self.memory.stored(key, value)
        elif failure_kind(value, default=NOT_FOUND) == NOT_FOUND:
            self.memory.deleted(key)
        else:
            self.memory.unsure(key)  # whatever is stored, the cache no longer knows it

    def _refused(self, operation: str, key: str, failure: Any, keys: Iterable[str]) -> None:
        """Raise for a refused write of ``keys``, or (non-strict) log that memory now differs.

        Strict, a failure whose outcome is unknown (a timeout) leaves those
        keys unknown to memory: the next read asks the backend.
        """
        kind = failure_kind(failure, default="refused")
        if kind in _CALLER_ERRORS:
            raise _CALLER_ERRORS[kind](str(failure))
        if self.strict_mode:
            if kind in _UNKNOWN_OUTCOMES:
                for unsure in keys:
                    self.memory.unsure(unsure)
            raise WriteRefused(
                f"{self.name}: the backend refused to {operation} {key!r}: {failure}",
                error_kind=kind,
            )
        log = logs.get_logger(container=self.name, domain=getattr(self.database, "domain", ""))
        log.error(
            "write_kept_in_memory_only", operation=operation, key=key, error=str(failure),
            error_kind=kind,
        )  # fmt: skip

    def __repr__(self) -> str:
        state = "loaded" if self.memory.complete else "partial"
        return (
            f"CachedDict(name={self.name!r}, database={self.database!r}, "
            f"cached={len(self.memory)}, {state})"
        )


def _held(cached: CachedDict) -> dict[str, Any] | None:
    """A copy of a complete memory's values, each counted as a hit, or None (not complete,
    or a value is damaged): the caller then reads key by key, as a view does.

    A dict, not a list of items: copying one costs a few nanoseconds a key, and its
    items iterator reuses the tuple it hands out where a list holds one per item.
    """
    memory = cached.memory
    with memory._lock:
        if not memory._complete or not memory.keeps_writes:
            return None
        held = memory._values.copy()
    if UnreadableValue in set(map(type, held.values())):
        return None  # key by key, so that iterating raises at the damaged value
    memory._counts.hits += len(held)
    return held


class _Items(ItemsView):  # type: ignore[type-arg]
    """``CachedDict.items()``: a complete memory is iterated at dict speed, from a copy."""

    __slots__ = ()

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        held = _held(self._mapping)  # type: ignore[arg-type]
        return iter(held.items()) if held is not None else super().__iter__()


class _Values(ValuesView):  # type: ignore[type-arg]
    """``CachedDict.values()``: a complete memory is iterated at dict speed, from a copy."""

    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        held = _held(self._mapping)  # type: ignore[arg-type]
        return iter(held.values()) if held is not None else super().__iter__()


def _is_valid_key(key: Any) -> bool:
    try:
        check_key(key)
    except InvalidKey:
        return False
    return True


def _backend_error(failure: Any) -> BackendError:
    cause = getattr(failure, "exception", None)
    if isinstance(cause, BackendError):
        return cause
    error = BackendError(str(failure))
    error.kind = failure_kind(failure, default="backend")
    return error
