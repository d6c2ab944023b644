"""Backend names to backend classes: :func:`get_engine`.

Names are matched case-insensitively with surrounding spaces ignored, and
every alias the original SDK accepted still works. The built-in backends are
imported only when asked for. Third-party backends register either in code,
with :func:`register_engine`, or as a package, through the entry-point group
``chanstore.backends``::

    [project.entry-points."chanstore.backends"]
    mongo = "chanstore_mongo:MongoDatabase"
"""

from __future__ import annotations

import importlib
import threading
from importlib.metadata import entry_points

from chanstore.backends.base import DatabaseInterface
from chanstore.errors import UnknownEngine

__all__ = ["ENTRY_POINT_GROUP", "get_engine", "known_engines", "register_engine"]

ENTRY_POINT_GROUP = "chanstore.backends"

_BUILTIN = {
    "json": ("chanstore.backends.jsonfiles", "JSONDatabase"),
    "redis": ("chanstore.backends.redisdb", "RedisDatabase"),
    "null": ("chanstore.backends.null", "NullDatabase"),
    "chanstore": ("chanstore.backends.remote", "ChanstoreDatabase"),
}
# Every spelling the original SDK's get_engine matched, folded to lower case.
_ALIASES = {
    "json": "json", "jsondb": "json", "jsondatabase": "json",
    "redis": "redis", "redisdb": "redis", "redisdatabase": "redis",
    "redi": "redis", "ready": "redis", "the linux one": "redis",
    "null": "null", "none": "null", "false": "null", "nulldatabase": "null", "nulldb": "null",
    # A running chanstore daemon (not an original name: DESIGN.md section 8).
    "chanstore": "chanstore", "daemon": "chanstore", "remote": "chanstore",
    "chanstoredatabase": "chanstore",
}  # fmt: skip

_registered: dict[str, type[DatabaseInterface]] = {}
_lock = threading.Lock()


def _normalize(name: str) -> str:
    return str(name).strip().lower()


def register_engine(name: str, backend: type[DatabaseInterface], *aliases: str) -> None:
    """Make ``get_engine(name)`` (and each alias) return ``backend``."""
    if not (isinstance(backend, type) and issubclass(backend, DatabaseInterface)):
        raise TypeError(f"{backend!r} is not a DatabaseInterface subclass")
    with _lock:
        for alias in (name, *aliases):
            _registered[_normalize(alias)] = backend


def get_engine(name: str) -> type[DatabaseInterface]:
    """The backend class called ``name``; :class:`UnknownEngine` lists the known ones."""
    key = _normalize(name)
    builtin = _ALIASES.get(key)
    if builtin is not None:
        module, attribute = _BUILTIN[builtin]
        return getattr(importlib.import_module(module), attribute)
    with _lock:
        if key in _registered:
            return _registered[key]
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if _normalize(entry.name) == key:
            backend = entry.load()
            register_engine(entry.name, backend)
            return backend
    raise UnknownEngine(
        f"unknown implementation {name!r}; known: {', '.join(known_engines())} "
        f"(and their aliases: {', '.join(sorted(set(_ALIASES) - set(_BUILTIN)))})"
    )


def known_engines() -> list[str]:
    """The canonical names of every backend that :func:`get_engine` can return."""
    with _lock:
        names = set(_BUILTIN) | set(_registered)
    names |= {_normalize(entry.name) for entry in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)
