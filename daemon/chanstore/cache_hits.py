"""The cache's hit path: the reads a CachedDict answers from what memory holds.

A cache hit is the library's hottest call. The original SDK's CachedDict is
a dict, so its ``in`` and ``get`` are dict's own C methods; a method written
in Python that only looks the key up already costs about twice that. So the
state a hit reads lives in three bases, implemented in C by the extension
``chanstore._cache_hits`` (``_cache_hits.c``, built at install time):

- :class:`Counts`: a container's cache hits and misses, as plain numbers
  (the base of :class:`~chanstore.metrics.CacheCounts`);
- :class:`Memory`: the held values, whether they are the whole domain, and
  the container's Counts (the base of :class:`~chanstore.cache_memory.CacheMemory`);
- :class:`HitPath`: ``d[key]``, ``d.get(key)`` and ``key in d`` for a key
  memory holds a readable value of, or an absent key of a complete memory
  (the base of :class:`~chanstore.cache.CachedDict`).

Each hit is counted once. Everything else (a key memory does not hold, a
damaged value, which memory holds as an exception) goes to the subclass's
slow path: ``_get_slowly(key)`` and ``_contains_slowly(key)``.

Where the extension was not built (no C compiler at install time), or when
the environment sets ``CHANSTORE_PURE_PYTHON=1``, the classes below take its
place, with the same behaviour at Python's speed. :data:`COMPILED` says which
is in use.
"""

from __future__ import annotations

from typing import Any

from chanstore.compiled import extension

__all__ = ["COMPILED", "Counts", "HitPath", "Memory"]


class Counts:
    """One container's cache hits and misses, as plain numbers."""

    __slots__ = ("hits", "misses")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0


class Memory:
    """The state of a CacheMemory that the hit path reads.

    A subclass defines the class attribute ``keeps_writes``: a memory that
    keeps nothing (the null backend's) answers no absent key itself. The C
    type reads it once, when a memory is made.
    """

    __slots__ = ("_complete", "_counts", "_values")


class HitPath:
    """CachedDict's reads of what memory holds: ``[]``, ``get`` and ``in``.

    A subclass defines the slow path: ``_get_slowly(key)`` (the value, else
    KeyError) and ``_contains_slowly(key)``.
    """

    __slots__ = ("memory",)

    memory: Any

    def __getitem__(self, key: str) -> Any:
        memory = self.memory
        try:
            value = memory._values[key]
        except KeyError:
            return self._get_slowly(key)  # type: ignore[attr-defined]
        if isinstance(value, BaseException):  # a damaged value: the slow path raises
            return self._get_slowly(key)  # type: ignore[attr-defined]
        memory._counts.hits += 1
        return value

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]``, or ``default`` for an absent key."""
        memory = self.memory
        value = memory._values.get(key, _MISSING)
        if value is _MISSING:
            if memory._complete and memory.keeps_writes:
                memory._counts.hits += 1
                return default
        elif not isinstance(value, BaseException):
            memory._counts.hits += 1
            return value
        try:
            return self._get_slowly(key)  # type: ignore[attr-defined]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        memory = self.memory
        if key in memory._values:  # a damaged value is held, and in the mapping too
            memory._counts.hits += 1
            return True
        if memory._complete and memory.keeps_writes:  # read after the values, as peek reads
            memory._counts.hits += 1
            return False
        return self._contains_slowly(key)  # type: ignore[attr-defined]


_MISSING: Any = object()

_compiled = extension("_cache_hits")

COMPILED = _compiled is not None
"""Whether the hit path in use is the C extension's."""

if _compiled is not None:  # else the classes above serve
    Counts, HitPath, Memory = _compiled.Counts, _compiled.HitPath, _compiled.Memory  # type: ignore[misc]
