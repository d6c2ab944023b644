"""Listing a Redis, for export, import and migrate: its domains with ``SCAN``, and a domain's
items a batch at a time with ``HSCAN``; never ``KEYS``, never one round trip per key.

Domains (:func:`scan_domains`). A domain's hash is ``<key_prefix><domain>``,
or ``<key_prefix>{<domain>}`` in a cluster (see
:class:`~chanstore.backends.redisdb.RedisDatabase`). One ``SCAN`` cursor
walks the server (or the primary the sentinels name) with ``MATCH`` on the
key prefix and the domain prefix, both glob-escaped, ``TYPE hash`` and
``COUNT`` :data:`SCAN_COUNT`; in a cluster, every primary is walked in turn
(``SCAN`` sees only the keys of the node it is sent to). The histories are
streams and the data-loss markers strings, so ``TYPE hash`` leaves them out.
``SCAN`` may return a name twice: the names seen are kept, a set that grows
with the number of domains, not with their data. As with any ``SCAN``, a
domain made or emptied during the walk (in a cluster, one whose slot
migrates) may or may not be listed.

Items (:func:`scan_hash`). One ``HSCAN ... COUNT batch_size`` per batch.
``COUNT`` is a hint: a small hash (a listpack) comes back whole in one
reply, which is then handed out ``batch_size`` items at a time. As
``HSCAN`` promises, a field written while the hash is resized may come
twice (the later batch holds its later value).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import redis

from chanstore.backends.redis_cluster import LazyCluster, Reaching, ping_primaries
from chanstore.backends.redis_pools import CLUSTER
from chanstore.errors import BackendError

__all__ = ["SCAN_COUNT", "scan_domains", "scan_hash"]

#: The ``COUNT`` of each ``SCAN`` that lists domains: about as many names per round trip.
SCAN_COUNT = 1000


def scan_domains(
    client: Any, *, mode: str, key_prefix: str, prefix: str, reaching: Reaching
) -> Iterator[str]:
    """Every domain whose hash exists and whose name starts with ``prefix``, each once.

    ``client`` is a backend's (a ``redis.Redis``, or in cluster mode a
    :class:`~chanstore.backends.redis_cluster.LazyCluster`); ``reaching(node)``
    words its errors as the backend's.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
    start = key_prefix.encode()
    tagged = mode == CLUSTER
    if tagged:
        pattern = _glob_escaped(start) + b"{" + _glob_escaped(prefix.encode()) + b"*}"
        servers = _primary_clients(client, reaching)
    else:
        pattern = _glob_escaped(start) + _glob_escaped(prefix.encode()) + b"*"
        servers = [(None, client)]
    seen: set[bytes] = set()
    for node, server in servers:
        cursor = 0
        while True:
            with reaching(node):
                cursor, names = server.scan(cursor, match=pattern, count=SCAN_COUNT,
                                            _type="hash")  # fmt: skip
            for name in names:
                if name in seen:
                    continue
                seen.add(name)
                domain = _domain_of(name[len(start) :], tagged)
                if domain is not None and domain.startswith(prefix):
                    yield domain
            if not cursor:
                break


def scan_hash(
    client: Any,
    name: bytes,
    batch_size: int,
    *,
    reaching: Reaching,
    decode: Callable[[str, bytes], Any],
) -> Iterator[dict[str, Any]]:
    """The fields of the hash ``name``, decoded by ``decode(key, data)``, ``batch_size`` at a
    time: one ``HSCAN`` round trip a batch."""
    cursor = 0
    while True:
        with reaching():
            cursor, fields = client.hscan(name, cursor, count=batch_size)
        items = list(fields.items())
        for begin in range(0, len(items), batch_size):
            yield {key: decode(key, data) for field, data in items[begin : begin + batch_size]
                   for key in [_key_of(name, field)]}  # fmt: skip
        if not cursor:
            return


def _primary_clients(cluster: LazyCluster, reaching: Reaching) -> list[tuple[str, redis.Redis]]:
    """Every primary of the cluster, each answering (see :func:`ping_primaries`), with a
    client of its own: a keyless ``SCAN`` through the cluster client would ask one node."""
    ping_primaries(cluster, reaching)  # the slot table read again if a primary is gone
    with reaching():
        client = cluster.get()
        return [(node.name, client.get_redis_connection(node)) for node in client.get_primaries()]


def _domain_of(rest: bytes, tagged: bool) -> str | None:
    """The domain of a hash named ``<key_prefix>`` + ``rest``; None for a name chanstore
    does not make."""
    if tagged:
        if len(rest) < 2 or not (rest.startswith(b"{") and rest.endswith(b"}")):
            return None
        rest = rest[1:-1]
    try:
        return rest.decode("utf-8")
    except UnicodeDecodeError:
        return None  # not a domain: chanstore's names are UTF-8


def _key_of(name: bytes, field: bytes) -> str:
    try:
        return field.decode("utf-8")
    except UnicodeDecodeError:
        raise BackendError(
            f"Redis hash {name.decode(errors='replace')!r} has the field {field[:100]!r}, "
            "which is not UTF-8 text: not a key chanstore stored"
        ) from None


def _glob_escaped(text: bytes) -> bytes:
    """``text`` matched literally by a ``SCAN ... MATCH`` pattern (its ``*?[]\\`` escaped)."""
    for special in (b"\\", b"*", b"?", b"[", b"]"):
        text = text.replace(special, b"\\" + special)
    return text
