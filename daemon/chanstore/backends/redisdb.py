"""The redis backend: one Redis hash per domain, in one logical database.

A domain's keys are the fields of the hash ``<key_prefix><domain>`` (prefix
``chanstore:`` by default). The domain is the whole rest of the name, so no
two domains can share a hash whatever characters they hold, and every domain
lives in the configured ``db``: the original derived a database index from
``hash(domain)``, which changes between Python processes and lands on
databases that do not exist.

Values are compact type-marked JSON. Loading a domain is one ``HGETALL``,
listing its keys one ``HKEYS``; ``KEYS`` is never used, not even to list the
domains (``SCAN``, see :mod:`chanstore.backends.redis_listing`).

Every write (single, bulk, conditional, several domains at once) runs one
Lua script, :data:`~chanstore.backends.redis_writes.WRITE_SCRIPT`, once per
domain: it checks the change's expectations, and only if all hold stores the
sets, removes the deletes and appends one entry per change to the domain's
history, the stream ``<key_prefix>-events:<domain>`` (see
:mod:`chanstore.backends.redis_history`), trimmed to about
:attr:`~RedisDatabase.history_length` entries. So a conditional write holds
against every writer of the Redis, and the history holds exactly the changes
that were made, in their order. A value's ETag is the SHA-1 of its stored
bytes (:mod:`chanstore.versions`), which the script computes as
``redis.sha1hex``. The hash itself is laid out as before: data written by an
earlier release loads unchanged, and its first write starts the domain's
history. The script, and how a batch of writes is sent and answered, are in
:mod:`chanstore.backends.redis_writes`.

Backends with the same connection settings share one connection pool
(:mod:`chanstore.backends.redis_pools`), so a daemon with thousands of
channels holds a handful of connections, not one pool per channel; they also
share one :class:`RedisFollower`, the single connection that follows the
histories the daemon's change feed watches.

A Redis that lost what chanstore stored (``FLUSHALL``, a restart without
persistence, a failover to a replica that never had the data) answers every
read with "absent", which looks like an empty channel. To tell the two apart,
the daemon's readiness probe keeps a *marker* key per key prefix and database
(``<key_prefix>-marker``, see :mod:`chanstore.backends.redis_marker`) and
reports a ``data_lost`` :class:`~chanstore.errors.IntegrityProblem` when it
vanishes or changes. Reads and writes never touch it: the check costs one
round trip per probe, not one per request.

Topologies (the ``mode`` setting): one server (``standalone``, the
default), a primary managed by Redis Sentinel (``sentinel``: ``sentinels`` and
``master_name``), or a Redis Cluster (``cluster``: ``nodes``, any reachable
subset). Sentinel and cluster clients follow a failover by themselves (see
:mod:`chanstore.backends.redis_pools`); requests during one fail with
:class:`~chanstore.errors.BackendUnavailable`, never with a wrong answer.
Key layout per mode:

* standalone and sentinel: ``<key_prefix><domain>`` and
  ``<key_prefix>-events:<domain>``, exactly the names of earlier releases,
  so their data loads unchanged (a Sentinel-managed primary is one server);
* cluster: ``<key_prefix>{<domain>}`` and ``<key_prefix>-events:{<domain>}``:
  the domain is the names' hash tag, so a domain's hash and history live in
  one slot and its write script stays one atomic step on one primary (see
  :mod:`chanstore.backends.redis_cluster`). Cluster mode is new, so no data
  was ever written under other names: there is nothing to migrate. Domains
  share nothing: a batch over many domains is one atomic step per domain,
  never one for the batch.

``min_replicas`` (default 0) and ``replica_timeout`` (seconds, default 1):
a write is acknowledged only once that many replicas hold it, ``WAIT`` after
the write on its connection; otherwise it fails as not acknowledged (see
:mod:`chanstore.backends.redis_wait`).

This module keeps :class:`RedisDatabase` itself: its settings, the domain's
names, reads and their decoding, and the words for a Redis out of reach.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import redis

from chanstore import codec
from chanstore.backends.base import DatabaseInterface, check_batch_size
from chanstore.backends.redis_cluster import (
    SlotClient,
    ping_primaries,
    send_writes_cluster,
    send_writes_cluster_async,
)
from chanstore.backends.redis_history import RedisFollower, RedisHistory
from chanstore.backends.redis_invalidations import RedisInvalidations, link_connection, shared_link
from chanstore.backends.redis_listing import scan_domains, scan_hash
from chanstore.backends.redis_marker import MARKER_SUFFIX, ClusterMarkers, Marker, lowest_slots
from chanstore.backends.redis_pools import CLUSTER, SENTINEL, STANDALONE, Topology, pools
from chanstore.backends.redis_topology import MODES, address, topology_problems
from chanstore.backends.redis_wait import ReplicaWait
from chanstore.backends.redis_writes import (
    WRITE_SCRIPT,
    Write,
    joined_writes,
    send_writes,
    send_writes_async,
)
from chanstore.errors import BackendUnavailable, ConfigError, CorruptValue, IntegrityProblem
from chanstore.keys import check_key
from chanstore.versions import Change

__all__ = ["EVENTS_SUFFIX", "MARKER_SUFFIX", "MODES", "WRITE_SCRIPT", "RedisDatabase"]

_NONE = type(None)

#: What follows the key prefix in a domain's history stream, before the domain:
#: ``chanstore:-events:<domain>``. No MoobiusStorage domain starts with "-", so
#: no domain's hash can be named so either.
EVENTS_SUFFIX = "-events:"
#: The domain of the backend that list_domains builds for its client (never read or written).
_LISTER_DOMAIN = "listing"


class RedisDatabase(DatabaseInterface):
    """Values in Redis.

    Settings: ``host``, ``port``, ``db``, ``username``, ``password`` or ``url``
    (``redis://[[user]:password@]host:port/db``, ``rediss://`` for TLS,
    ``unix://path``); ``socket_timeout`` and ``socket_connect_timeout`` in
    seconds; ``key_prefix`` for the hash names. ``mode``: ``standalone``
    (the default), ``sentinel`` (with ``sentinels``, ``["host:port", ...]``,
    and ``master_name``, in place of ``host``/``port``/``url``) or
    ``cluster`` (with ``nodes``, ``["host:port", ...]``, any reachable
    subset, and ``db`` 0). ``min_replicas`` (default 0) and
    ``replica_timeout`` (seconds, default 1): acknowledge a write only once
    that many replicas hold it. Inconsistent settings are a
    :class:`~chanstore.errors.ConfigError` that says what was expected
    (:meth:`check_settings` finds them in a db_config before anything is built).
    """

    engine_name = "redis"
    INTEGRITY_KINDS = ("corrupt_value", "data_lost")
    #: What integrity_problems() saw; made by its first call (only a readiness probe
    #: asks, so the thousands of backends of channels in memory carry nothing of it).
    _marker: Marker | None = None
    #: set_many_together_async uses redis-py's asyncio client, on the running loop.
    stores_on_loop = True
    #: Every write is one script that checks its expectations first (:data:`WRITE_SCRIPT`).
    checks_conditions = True
    #: A round's writes to one domain go in one packet on one connection (in a cluster,
    #: its primary's), and Redis runs them in order.
    keeps_part_order = True
    SETTINGS = {
        "host": (str,),
        "port": (int,),
        "db": (int,),
        "username": (str, _NONE),
        "password": (str, _NONE),
        "url": (str,),
        "socket_timeout": (int, float),
        "socket_connect_timeout": (int, float),
        "key_prefix": (str,),
        "mode": (str,),
        "sentinels": (list,),
        "master_name": (str,),
        "nodes": (list,),
        "min_replicas": (int,),
        "replica_timeout": (int, float),
    }

    def __init__(
        self,
        domain: str = "",
        host: str | None = None,
        port: int | None = None,
        db: int = 0,
        password: str | None = None,
        *,
        username: str | None = None,
        url: str | None = None,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 2.0,
        key_prefix: str = "chanstore:",
        mode: str = STANDALONE,
        sentinels: list[str] | None = None,
        master_name: str | None = None,
        nodes: list[str] | None = None,
        min_replicas: int = 0,
        replica_timeout: float = 1.0,
        **kwargs: Any,
    ) -> None:
        given = {name: value for name, value in (
            ("host", host), ("port", port), ("db", db or None), ("url", url),
            ("key_prefix", key_prefix), ("mode", mode), ("sentinels", sentinels),
            ("master_name", master_name), ("nodes", nodes), ("min_replicas", min_replicas),
            ("replica_timeout", replica_timeout)) if value is not None}  # fmt: skip
        problems = topology_problems(given)
        if problems:
            raise ConfigError([f"RedisDatabase: {problem}" for problem in problems])
        if mode == CLUSTER and not domain:
            raise ValueError("in cluster mode a domain cannot be empty: it is the hash tag that "
                             "keeps its hash and its history in one slot")  # fmt: skip
        super().__init__(domain, **kwargs)
        host = "localhost" if host is None else host
        port = 6379 if port is None else port
        self.mode = mode
        self.hash_name, self.stream_name = _names(key_prefix, domain, mode)
        self.key_prefix = key_prefix
        self.wait = ReplicaWait(min_replicas, float(replica_timeout)) if min_replicas else None
        options = {
            "socket_timeout": float(socket_timeout),
            "socket_connect_timeout": float(socket_connect_timeout),
        }
        topology = Topology(mode)
        if mode == SENTINEL:
            password = password or None
            addresses = tuple(address(entry) for entry in sentinels or ())
            topology = Topology(mode, sentinels=addresses, master_name=master_name or "")
            self.where = (f"primary {master_name!r} of sentinels "
                          f"{','.join(sentinels or ())}/{db}")  # fmt: skip
            pool_key: tuple[Any, ...] = (topology, db, username, password, *options.values())
            self._pool_args: dict[str, Any] = {"db": db, "username": username,
                                               "password": password, **options}  # fmt: skip
        elif mode == CLUSTER:
            password = password or None
            topology = Topology(mode, nodes=tuple(address(entry) for entry in nodes or ()))
            self.where = f"cluster {','.join(nodes or ())}"
            pool_key = (topology, username, password, *options.values())
            self._pool_args = {"username": username, "password": password, **options}
        elif url:
            self.where = _redacted(url)
            pool_key = ("url", url, *options.values())
            self._pool_args = {"url": url, **options}
        else:
            # The original's default password "" means "no password".
            password = password or None
            self.where = f"{host}:{port}/{db}"
            pool_key = (host, port, db, username, password, *options.values())
            self._pool_args = {"host": host, "port": port, "db": db, "username": username,
                               "password": password, **options}  # fmt: skip
        self._pool_key = pool_key
        self.client = pools.acquire(pool_key, self._pool_args, topology)
        self._closed = False

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        """The base checks (names, types), then whether the settings make one topology:
        ``mode`` and the settings it needs, values in range, nothing of another mode."""
        problems, warnings = super().check_settings(settings)
        typed = {name: value for name, value in settings.items()
                 if name in cls.SETTINGS and isinstance(value, cls.SETTINGS[name])
                 and not isinstance(value, bool)}  # fmt: skip
        problems.extend(topology_problems(typed))
        return problems, warnings

    # -- the four ------------------------------------------------------------

    def get_value(self, key: str) -> tuple[bool, Any]:
        with self._reaching():
            data = self.client.hget(self.hash_name, check_key(key))
        if data is None:
            raise KeyError(key)
        return True, self._decode(key, data)

    def set_value(self, key: str, value: Any) -> tuple[bool, Any]:
        self._apply(Change(sets={key: value}))
        return True, key

    def delete_key(self, key: str) -> tuple[bool, Any]:
        if not self._apply(Change(deletes=(key,))):
            raise KeyError(key)
        return True, key

    def all_keys(self) -> list[str]:
        with self._reaching():
            fields = self.client.hkeys(self.hash_name)
        return [field.decode("utf-8") for field in fields]

    # -- bulk: one round trip each ---------------------------------------------

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        keys = [check_key(key) for key in keys]
        if not keys:
            return {}
        with self._reaching():
            values = self.client.hmget(self.hash_name, keys)
        return {key: self._decode_or_error(key, data)
                for key, data in zip(keys, values, strict=True) if data is not None}  # fmt: skip

    def load_all(self) -> dict[str, Any]:
        with self._reaching():
            items = self.client.hgetall(self.hash_name)
        return {
            key: self._decode_or_error(key, data)
            for field, data in items.items()
            for key in [field.decode("utf-8")]
        }

    def set_many(self, items: Mapping[str, Any]) -> None:
        if items:
            self._apply(Change(sets=items))

    def apply_if(self, change: Change) -> list[str]:
        """Check ``change``'s expectations and make its changes in one atomic step, or none.

        One round trip (two when a foreign writer formatted an expected
        document otherwise, see :class:`~chanstore.backends.redis_writes.Write`).
        Returns the deleted keys that existed; raises
        :class:`~chanstore.errors.PreconditionFailed` with the failed keys'
        canonical ETags.
        """
        return self._apply(change)

    @property
    def together_key(self) -> tuple[Any, ...]:
        """Backends with equal keys share a connection pool (one pipeline, or in a cluster
        one per primary, can store for all) and wait for as many replicas."""
        return (*self._pool_key, self.wait)

    @classmethod
    def set_many_together(
        cls, parts: Sequence[tuple[RedisDatabase, Mapping[str, Any]]]
    ) -> list[BaseException | None]:
        """``set_many`` for several domains of one connection pool, in one round trip.

        For the daemon's write lanes, whose batches span many channels: one
        pipeline with one script call per domain instead of one round trip
        each. It is not a transaction (each part is atomic for its own
        domain, and the domains are independent). Consecutive parts of one
        domain (a key written again and again) are made in order by one
        script call, and share its answer (see
        :func:`~chanstore.backends.redis_writes.joined_writes`). Returns each
        part's error, or None.
        """
        writes, of_part = joined_writes(parts)
        parts[0][0]._send(writes)
        return [writes[index].error() for index in of_part]

    @classmethod
    async def set_many_together_async(
        cls, parts: Sequence[tuple[RedisDatabase, Mapping[str, Any]]]
    ) -> list[BaseException | None]:
        """:meth:`set_many_together` on the running event loop, with redis-py's asyncio client.

        The write lanes use it to store a batch without handing it to a thread
        and back: on a busy event loop that hand-over (a thread waiting for
        the GIL) took longer than the round trip to Redis.
        """
        writes, of_part = joined_writes(parts)
        await parts[0][0]._send_async(writes)
        return [writes[index].error() for index in of_part]

    @classmethod
    def apply_if_together(
        cls, parts: Sequence[tuple[RedisDatabase, Change]]
    ) -> list[list[str] | BaseException]:
        """:meth:`apply_if` for several domains of one connection pool, in one round trip.

        One pipeline with one script call per part; each part is all or
        nothing by itself, and parts do not wait for each other. Each part's
        answer: its deleted keys that existed, or its error (a
        :class:`~chanstore.errors.PreconditionFailed` for a failed expectation).
        """
        writes = [Write(backend, change) for backend, change in parts]
        parts[0][0]._send(writes)
        return [write.result() for write in writes]

    @classmethod
    async def apply_if_together_async(
        cls, parts: Sequence[tuple[RedisDatabase, Change]]
    ) -> list[list[str] | BaseException]:
        """:meth:`apply_if_together` on the running event loop (see :attr:`stores_on_loop`)."""
        writes = [Write(backend, change) for backend, change in parts]
        await parts[0][0]._send_async(writes)
        return [write.result() for write in writes]

    def delete_many(self, keys: Iterable[str]) -> list[str]:
        keys = list(keys)
        return self._apply(Change(deletes=keys)) if keys else []

    # -- listing ---------------------------------------------------------------

    @classmethod
    def list_domains(cls, prefix: str = "", **settings: Any) -> Iterator[str]:
        """Every domain of the Redis ``settings`` name (their ``key_prefix`` and ``db``)
        whose name starts with ``prefix`` and whose hash exists, each once, lazily:
        ``SCAN ... TYPE hash``, on every primary of a cluster (see
        :func:`~chanstore.backends.redis_listing.scan_domains`)."""
        lister = cls(domain=_LISTER_DOMAIN, **settings)  # a client from the shared pools
        try:
            yield from scan_domains(
                lister.client, mode=lister.mode, key_prefix=lister.key_prefix, prefix=prefix,
                reaching=lister._reaching,
            )  # fmt: skip
        finally:
            lister.close()

    def scan_items(self, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """The domain's items, one ``HSCAN`` a batch, decoded as :meth:`get_many` decodes
        them (see :func:`~chanstore.backends.redis_listing.scan_hash`)."""
        return scan_hash(self.client, self.hash_name, check_batch_size(batch_size),
                         reaching=self._reaching, decode=self._decode_or_error)  # fmt: skip

    # -- history ---------------------------------------------------------------

    def change_history(self) -> RedisHistory:
        """This domain's history, the stream :attr:`stream_name` that every write appends to."""
        client = SlotClient(self.client, self.stream_name) if self.mode == CLUSTER else self.client
        return RedisHistory(self.stream_name, client, reaching=self._reaching,
                            follower=self._follower)  # fmt: skip

    def _follower(self) -> RedisFollower:
        return pools.follower(self._pool_key, self.where)

    # -- coherence ---------------------------------------------------------------

    def invalidations(self) -> RedisInvalidations | None:
        """The invalidation link of this backend's Redis and key prefix, on the running loop.

        Every write's script publishes what it changed, tagged with this
        process's origin; the link (one dedicated subscribed connection per
        connection settings, key prefix and event loop, shared by every
        domain) tells listeners of the writes of other processes (see
        :mod:`chanstore.backends.redis_invalidations`). None when no event
        loop is running: only the daemon listens, on its loop.
        """
        return shared_link(self._pool_key, self.key_prefix, self.where,
                           pools.link_connector(self._pool_key, link_connection),
                           hash_tagged=self.mode == CLUSTER)  # fmt: skip

    # -- life cycle ------------------------------------------------------------

    def check_available(self) -> None:
        """``PING`` the server, or the primary the sentinels name, or every primary of the
        cluster (reading its slot table again if one does not answer)."""
        if self.mode == CLUSTER:
            ping_primaries(self.client, self._reaching)
            return
        with self._reaching():
            self.client.ping()

    def integrity_problems(self) -> list[IntegrityProblem]:
        """``data_lost`` when the database lost what chanstore stored since the last call.

        The first call only notes the database's marker (writing one if there
        is none: a Redis that was empty from the start lost nothing); every
        later call compares. One round trip; the daemon's readiness probe
        calls it every few seconds, so each instance remembers its own view
        and every daemon sharing the Redis notices a loss by itself.

        In cluster mode each primary has a marker of its own (see
        :class:`~chanstore.backends.redis_marker.ClusterMarkers`): one round
        trip per primary.
        """
        if self.mode == CLUSTER:
            return self._cluster_integrity_problems()
        marker = self._marker
        if marker is None:
            name = f"{self.key_prefix}{MARKER_SUFFIX}".encode()
            marker = self._marker = Marker(name, self.where)
        with self._reaching():
            problem = marker.check(self.client)
        return [] if problem is None else [problem]

    #: integrity_problems() of a cluster: the markers of its primaries.
    _cluster_markers: ClusterMarkers | None = None

    def _cluster_integrity_problems(self) -> list[IntegrityProblem]:
        markers = self._cluster_markers
        if markers is None:
            markers = self._cluster_markers = ClusterMarkers(self.key_prefix, self.where)
        names = ping_primaries(self.client, self._reaching)  # a slot table, every primary up
        with self._reaching():
            cluster = self.client.get()
            lowest = lowest_slots(cluster.nodes_manager.slots_cache)
            primaries = []
            for name in names:
                node = cluster.get_node(node_name=name)
                if node is not None and name in lowest:
                    primaries.append((name, lowest[name], cluster.get_redis_connection(node)))
        problems = []
        for name, slot, client in primaries:
            with self._reaching(name):
                problems.extend(markers.check([(name, slot, client)]))
        return problems

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            pools.release(self._pool_key)

    def __repr__(self) -> str:
        return f"RedisDatabase(where={self.where!r}, hash={self.hash_name.decode()!r})"

    # -- internals -------------------------------------------------------------

    def _apply(self, change: Change) -> list[str]:
        """Run ``change`` through the write script; the deleted keys that existed."""
        write = Write(self, change)
        self._send([write])
        return write.answer_or_raise()

    def _send(self, writes: Sequence[Write]) -> None:
        """Send ``writes`` (of this backend's connection pool and :attr:`wait`): one round
        trip, or in a cluster one per primary that holds their slots."""
        if self.mode == CLUSTER:
            send_writes_cluster(writes, self.client, reaching=self._reaching, wait=self.wait,
                                where=self.where)  # fmt: skip
            return
        send_writes(writes, self.client, reaching=self._reaching, wait=self.wait,
                    where=self.where)  # fmt: skip

    async def _send_async(self, writes: Sequence[Write]) -> None:
        """:meth:`_send` on the running event loop, with the pool's asyncio clients."""
        key = self._pool_key
        if self.mode == CLUSTER:
            await send_writes_cluster_async(
                writes, lambda: pools.async_client(key),
                lambda host, port: pools.async_node_client(key, host, port),
                reaching=self._reaching, wait=self.wait, where=self.where,
            )  # fmt: skip
            return
        await send_writes_async(writes, lambda: pools.async_client(key),
                                reaching=self._reaching, wait=self.wait,
                                where=self.where)  # fmt: skip

    @contextlib.contextmanager
    def _reaching(self, node: str | None = None) -> Iterator[None]:
        """Say which Redis could not be reached (in a cluster, which node when one is
        named), not just that a socket failed; a cluster in the middle of a failover is
        unavailable too."""
        where = self.where if node is None else f"{self.where} (node {node})"
        try:
            yield
        except redis.AuthenticationError as exc:
            # redis-py derives it from ConnectionError, but Redis answered: it is
            # the credentials that are wrong, not the network.
            error = BackendUnavailable(f"Redis at {where} refused the credentials: {exc}")
            error.kind = "permission"
            raise error from exc
        except redis.TimeoutError as exc:
            error = BackendUnavailable(f"Redis at {where} did not answer in time: {exc}")
            error.kind = "timeout"
            raise error from exc
        except redis.ConnectionError as exc:
            raise BackendUnavailable(f"Redis at {where} is unreachable: {exc}") from exc
        except (redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError,
                redis.exceptions.MovedError, redis.exceptions.ClusterError,
                redis.exceptions.SlotNotCoveredError) as exc:  # fmt: skip
            raise BackendUnavailable(
                f"Redis Cluster at {where} cannot serve the request now (a failover or a "
                f"resharding is under way, or a primary is down): {exc}"
            ) from exc
        except redis.exceptions.RedisClusterException as exc:
            raise BackendUnavailable(f"Redis Cluster at {where} cannot be used: {exc}") from exc

    def _decode(self, key: str, data: bytes) -> Any:
        try:
            return codec.decode(data, revive=self.revive_values)
        except (ValueError, TypeError) as exc:
            raise CorruptValue(
                f"Redis hash {self.hash_name.decode()!r} field {key!r} is not a readable "
                f"value: {exc}"
            ) from exc

    def _decode_or_error(self, key: str, data: bytes) -> Any:
        try:
            return self._decode(key, data)
        except CorruptValue as exc:
            return exc


def _redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    return f"{scheme}{sep}{location}" if at and credentials else url


def _names(key_prefix: str, domain: str, mode: str) -> tuple[bytes, bytes]:
    """The domain's hash and history stream (see the module docstring for the layout)."""
    if mode == CLUSTER:
        return (f"{key_prefix}{{{domain}}}".encode(),
                f"{key_prefix}{EVENTS_SUFFIX}{{{domain}}}".encode())  # fmt: skip
    return f"{key_prefix}{domain}".encode(), f"{key_prefix}{EVENTS_SUFFIX}{domain}".encode()
