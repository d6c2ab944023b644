"""chanstore: per-channel key/value storage for chat-channel services.

The storage layer, usable in-process::

    from chanstore import MoobiusStorage
    storage = MoobiusStorage("svc", "channel-1", [
        {"implementation": "json", "name": "stats", "settings": {"root_dir": "data"}},
    ])
    storage.stats["HP"] = 100

and a daemon that serves it over HTTP (``chanstore serve``).
"""

from importlib.metadata import PackageNotFoundError, version

from chanstore.backends import DatabaseInterface, get_engine, known_engines, register_engine
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.backends.null import NullDatabase
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

try:
    __version__ = version("chanstore")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> object:
    # The redis backend imports redis-py; load it only for those who ask.
    if name == "RedisDatabase":
        from chanstore.backends.redisdb import RedisDatabase  # noqa: PLC0415

        return RedisDatabase
    raise AttributeError(f"module 'chanstore' has no attribute {name!r}")


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
