"""chanstore: per-channel key/value storage for chat-channel services.

The storage layer, usable in-process::

    from chanstore import MoobiusStorage
    storage = MoobiusStorage("svc", "channel-1", [
        {"implementation": "json", "name": "stats", "settings": {"root_dir": "data"}},
    ])
    storage.stats["HP"] = 100

and a daemon that serves it over HTTP (``chanstore serve``), with clients in
:mod:`chanstore.client`.

The names below are imported when first used, so that ``chanstore.client``
and the command line do not pay for the storage layer (structlog,
prometheus_client, redis-py) unless they use it.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("chanstore")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_HOMES = {
    "DatabaseInterface": "chanstore.backends.base",
    "get_engine": "chanstore.backends.registry",
    "known_engines": "chanstore.backends.registry",
    "register_engine": "chanstore.backends.registry",
    "JSONDatabase": "chanstore.backends.jsonfiles",
    "NullDatabase": "chanstore.backends.null",
    "RedisDatabase": "chanstore.backends.redisdb",
    "CachedDict": "chanstore.cache",
    "register_type": "chanstore.codec",
    "unregister_type": "chanstore.codec",
    "ContainerSpec": "chanstore.config",
    "DbConfig": "chanstore.config",
    "load_db_config": "chanstore.config",
    "BackendError": "chanstore.errors",
    "BackendUnavailable": "chanstore.errors",
    "ChanstoreError": "chanstore.errors",
    "ConfigError": "chanstore.errors",
    "InvalidKey": "chanstore.errors",
    "UnknownEngine": "chanstore.errors",
    "UnstorableValue": "chanstore.errors",
    "WriteRefused": "chanstore.errors",
    "Metrics": "chanstore.metrics",
    "ChannelStorage": "chanstore.storage",
    "MoobiusStorage": "chanstore.storage",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'chanstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from chanstore.backends.base import DatabaseInterface
    from chanstore.backends.jsonfiles import JSONDatabase
    from chanstore.backends.null import NullDatabase
    from chanstore.backends.redisdb import RedisDatabase
    from chanstore.backends.registry import get_engine, known_engines, register_engine
    from chanstore.cache import CachedDict
    from chanstore.codec import register_type, unregister_type
    from chanstore.config import ContainerSpec, DbConfig, load_db_config
    from chanstore.errors import (
        BackendError,
        BackendUnavailable,
        ChanstoreError,
        ConfigError,
        InvalidKey,
        UnknownEngine,
        UnstorableValue,
        WriteRefused,
    )
    from chanstore.metrics import Metrics
    from chanstore.storage import ChannelStorage, MoobiusStorage

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "CachedDict",
    "ChannelStorage",
    "ChanstoreError",
    "ConfigError",
    "ContainerSpec",
    "DatabaseInterface",
    "DbConfig",
    "InvalidKey",
    "JSONDatabase",
    "Metrics",
    "MoobiusStorage",
    "NullDatabase",
    "RedisDatabase",
    "UnknownEngine",
    "UnstorableValue",
    "WriteRefused",
    "__version__",
    "get_engine",
    "known_engines",
    "load_db_config",
    "register_engine",
    "register_type",
    "unregister_type",
]
