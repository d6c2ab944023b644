"""CachedDict: a dict-like, write-through cache over one backend domain.

Reads of a cached key never touch the backend; a miss asks the backend once
and caches the answer. Every write goes to the backend first and reaches the
cache only once the backend holds it. After :meth:`CachedDict.load` the cache
is *complete*: it holds the whole domain, and absent keys, ``len``,
iteration and ``in`` are answered from memory.

chanstore assumes it is the only writer to a domain, which is what makes a
complete cache trustworthy.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import ItemsView, Iterator, Mapping, MutableMapping, ValuesView
from typing import Any

from chanstore import logs
from chanstore.backends.base import DatabaseInterface
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

__all__ = ["ABSENT", "UNKNOWN", "CachedDict"]

_MISSING: Any = object()


class _Marker:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: :meth:`CachedDict.lookup`'s answer for a key the complete cache knows is absent.
ABSENT: Any = _Marker("ABSENT")
#: :meth:`CachedDict.lookup`'s answer when only the backend knows.
UNKNOWN: Any = _Marker("UNKNOWN")
_CALLER_ERRORS = {"invalid_value": UnstorableValue, "invalid_key": InvalidKey}


class CachedDict(MutableMapping[str, Any]):
    """A mapping whose values live in ``database`` and are cached in memory.

    ``strict_mode=True`` raises :class:`~chanstore.errors.WriteRefused` when
    the backend refuses a write or a delete, and changes nothing. Otherwise,
    as in the original SDK, the failure is logged and counted and the change
    is kept in memory only. Either way, a read that the backend fails raises
    :class:`~chanstore.errors.BackendError`: a failure is never passed off as
    an absent key.

    ``name`` is the container's name in metrics and logs. Safe to share
    between threads.
    """

    # The daemon holds one per channel and container in memory: slots keep each
    # one small (no per-instance __dict__), and a logger is made only to log.
    __slots__ = ("_cache", "_complete", "_entries", "_hits", "_lock", "_misses", "database",
                 "name", "strict_mode")  # fmt: skip

    def __init__(
        self,
        database: DatabaseInterface | None = None,
        strict_mode: bool = False,
        *,
        name: str = "unnamed",
        metrics: Metrics | None = None,
    ) -> None:
        if database is None:
            from chanstore.backends.null import NullDatabase  # noqa: PLC0415 - as the original

            database = NullDatabase()
        self.database = database
        self.strict_mode = strict_mode
        self.name = name
        self._cache: dict[str, Any] = {}
        self._complete = False
        self._lock = threading.RLock()
        metrics = metrics if metrics is not None else default_metrics()
        attach(database, container=name, metrics=metrics)
        self._hits = metrics.cache_requests.labels(name, "hit")
        self._misses = metrics.cache_requests.labels(name, "miss")
        self._entries = metrics.cache_entries.labels(name)

    # -- whole-domain operations --------------------------------------------------

    @property
    def loaded(self) -> bool:
        """Whether the cache holds the whole domain."""
        return self._complete

    def load(self) -> None:
        """Read the whole domain into the cache.

        A value that cannot be decoded is logged and counted, with the file or
        field it came from, and left out: the rest of the domain still loads.
        """
        with self._lock:
            items = self.database.load_all()
            readable = {k: v for k, v in items.items() if not isinstance(v, CorruptValue)}
            self._entries.inc(len(readable) - len(self._cache))
            self._cache = readable
            self._complete = True

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

    def remember(self, key: str, value: Any) -> None:
        """Cache ``value`` for ``key``, which the backend already holds.

        For callers that write to the backend themselves, in batches (the
        daemon's write lanes); everyone else writes with ``d[key] = value``.
        """
        with self._lock:
            self._store(key, value)

    def discard(self, key: str) -> None:
        """Drop ``key`` from the cache after the caller deleted it from the backend."""
        with self._lock:
            self._drop(key)

    def unsure(self, key: str) -> None:
        """Stop answering for ``key`` from memory: a write of it failed with an unknown outcome.

        A write that timed out or lost its connection may still land (Redis
        applies a command it received before it stalled), so what the backend
        holds is not known: the next read of ``key`` asks the backend.
        """
        with self._lock:
            self._drop(key)
            self._complete = False

    def lookup(self, key: str) -> Any:
        """What memory alone says of ``key``: its value, :data:`ABSENT` or :data:`UNKNOWN`.

        Never asks the backend and never waits for a lock, so an event loop
        may call it; a value or ABSENT counts as a cache hit.
        """
        value = self._cache.get(key, UNKNOWN)
        if value is UNKNOWN:
            if not self._complete:
                return UNKNOWN
            value = ABSENT
        self._hits.inc()
        return value

    def count_miss(self) -> None:
        """Count a lookup that had to ask the backend (for callers that ask it themselves)."""
        self._misses.inc()

    def forget(self) -> None:
        """Drop the cache (not the stored data): the next reads ask the backend."""
        with self._lock:
            self._entries.dec(len(self._cache))
            self._cache = {}
            self._complete = False

    def close(self) -> None:
        """Drop the cache and close the backend."""
        self.forget()
        self.database.close()

    # -- reading -------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        try:
            value = self._cache[key]
        except (KeyError, TypeError):
            pass
        else:
            self._hits.inc()
            return value
        with self._lock:
            if key in self._cache:
                self._hits.inc()
                return self._cache[key]
            if self._complete or not _is_valid_key(key):
                self._hits.inc()
                raise KeyError(key)
            self._misses.inc()
            ok, value = self.database.get_value(key)
            if ok:
                self._store(key, value)
                return value
            if failure_kind(value, default=NOT_FOUND) == NOT_FOUND:
                raise KeyError(key)
            raise _backend_error(value)

    def __contains__(self, key: object) -> bool:
        if key in self._cache:
            self._hits.inc()
            return True
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def items(self) -> ItemsView[str, Any]:
        self._ensure_loaded()
        return ItemsView(self)

    def values(self) -> ValuesView[Any]:
        self._ensure_loaded()
        return ValuesView(self)

    def _keys(self) -> list[str]:
        with self._lock:
            if self._complete:
                return list(self._cache)
            # Keys the backend has, then any kept in memory only (non-strict failures).
            keys = dict.fromkeys(self.database.all_keys())
            keys.update(dict.fromkeys(self._cache))
            return list(keys)

    def _ensure_loaded(self) -> None:
        if not self._complete:
            self.load()

    # -- writing -------------------------------------------------------------

    def __setitem__(self, key: str, value: Any) -> None:
        check_key(key)
        with self._lock:
            ok, message = self.database.set_value(key, value)
            if not ok:
                self._refused("set", key, message)
            self._store(key, value)

    def __delitem__(self, key: str) -> None:
        with self._lock:
            if self._complete and key not in self._cache:
                raise KeyError(key)
            check_key(key)
            ok, message = self.database.delete_key(key)
            if not ok:
                if failure_kind(message, default="refused") == NOT_FOUND:
                    self._drop(key)
                    raise KeyError(key)
                self._refused("delete", key, message)
            self._drop(key)

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Write every item with one bulk call to the backend."""
        items = dict(other.items() if isinstance(other, Mapping) else other, **kwargs)
        for key in items:
            check_key(key)
        if not items:
            return
        with self._lock:
            try:
                self.database.set_many(items)
            except ChanstoreError as exc:
                for key in getattr(exc, "done", []):
                    self._store(key, items[key])
                self._refused("update", f"<{len(items)} keys>", exc)
            for key, value in items.items():
                self._store(key, value)

    def __ior__(self, other: Any) -> CachedDict:
        self.update(other)
        return self

    def __or__(self, other: Any) -> dict[str, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**dict(self.items()), **other}

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
            del self[key]
            return value

    def popitem(self) -> tuple[str, Any]:
        with self._lock:
            if self._cache:
                key = next(reversed(self._cache))
            else:
                key = next(iter(self._keys()), _MISSING)
                if key is _MISSING:
                    raise KeyError("popitem(): CachedDict is empty")
            return key, self.pop(key)

    def clear(self) -> None:
        """Delete every key of the domain, loaded or not."""
        with self._lock:
            keys = list(dict.fromkeys([*self.database.all_keys(), *self._cache]))
            try:
                self.database.delete_many(keys)
            except ChanstoreError as exc:
                for key in getattr(exc, "done", []):
                    self._drop(key)
                self._refused("clear", f"<{len(keys)} keys>", exc)
            self._entries.dec(len(self._cache))
            self._cache = {}
            self._complete = True

    # -- internals -----------------------------------------------------------

    def _store(self, key: str, value: Any) -> None:
        if key not in self._cache:
            self._entries.inc()
        self._cache[key] = value

    def _drop(self, key: str) -> None:
        if self._cache.pop(key, _MISSING) is not _MISSING:
            self._entries.dec()

    def _reread(self, key: str) -> None:
        """Replace the cached value of ``key`` with the backend's."""
        ok, value = self.database.get_value(key)
        if ok:
            self._store(key, value)
            return
        self._drop(key)
        if failure_kind(value, default=NOT_FOUND) != NOT_FOUND:
            self._complete = False  # whatever is stored, the cache no longer knows it

    def _refused(self, operation: str, key: str, failure: Any) -> None:
        """Raise for a refused write, or (non-strict) log that memory now differs."""
        kind = failure_kind(failure, default="refused")
        if kind in _CALLER_ERRORS:
            raise _CALLER_ERRORS[kind](str(failure))
        if self.strict_mode:
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
        state = "loaded" if self._complete else "partial"
        return (
            f"CachedDict(name={self.name!r}, database={self.database!r}, "
            f"cached={len(self._cache)}, {state})"
        )


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
