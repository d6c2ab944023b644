"""Storage backends: the :class:`DatabaseInterface` contract and its engines.

``get_engine("json")`` returns :class:`~chanstore.backends.jsonfiles.JSONDatabase`,
``"redis"`` :class:`~chanstore.backends.redisdb.RedisDatabase`, ``"null"``
:class:`~chanstore.backends.null.NullDatabase`.
"""

from chanstore.backends.base import DatabaseInterface
from chanstore.backends.registry import get_engine, known_engines, register_engine

__all__ = ["DatabaseInterface", "get_engine", "known_engines", "register_engine"]
