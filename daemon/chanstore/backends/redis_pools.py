"""The redis backends' shared connection pools, counted, and how their clients are made.

Backends with the same connection settings share one entry of :data:`pools`:
one synchronous client and its connection pool, an asyncio client for the
event loop that asked for one, and one follower of histories, so a daemon
with thousands of channels holds a handful of connections, not a pool per
channel. An entry counts its backends; releasing the last one closes its
clients and its follower (those of an event loop on that loop, from whatever
thread releases).

The clients depend on the entry's :class:`Topology` (the ``mode`` setting):

* ``standalone``: ``redis.Redis`` and ``redis.asyncio.Redis`` on one server.
  They retry once, for a pooled connection that went stale while Redis
  restarted; writes do not go through that retry
  (:func:`~chanstore.backends.redis_rounds.round_trip`).
* ``sentinel``: ``master_for(master_name)`` of ``redis.sentinel.Sentinel``
  and of ``redis.asyncio.sentinel.Sentinel``. Each new connection asks the
  sentinels where the primary is, and a connection to a primary that was
  demoted or died fails (redis-py turns ``READONLY`` into a connection
  error): the next one goes to the new primary. So a failover is followed
  without a restart; the requests during it fail.
* ``cluster``: ``redis.cluster.RedisCluster`` (made on first use, so that
  building a backend never blocks on the network: see
  :class:`~chanstore.backends.redis_cluster.LazyCluster`) and
  ``redis.asyncio.cluster.RedisCluster``, from the ``nodes`` given (the rest
  is discovered). redis-py follows ``MOVED``/``ASK`` and refreshes its slot
  table after a failover. Writes do not go through them but through the
  primaries' own clients (:meth:`SharedPools.async_node_client`, and the
  sync cluster's node clients), see :mod:`chanstore.backends.redis_cluster`.

The follower of histories is one
:class:`~chanstore.backends.redis_history.RedisFollower` per entry
(standalone: one connection; sentinel: one connection to the primary the
sentinels name when it connects), or in cluster mode a
:class:`~chanstore.backends.redis_cluster.ClusterFollower` (one connection
per followed slot, on the node that holds it).

Apart from the backend because it is process-wide state that outlives any
one backend: a backend only acquires, asks and releases by its settings' key.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.connection
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.retry
import redis.sentinel
from redis.backoff import NoBackoff

from chanstore.backends.redis_cluster import ClusterFollower, LazyCluster
from chanstore.backends.redis_history import FOLLOW_BLOCK_SECONDS, RedisFollower

__all__ = ["CLUSTER", "SENTINEL", "STANDALONE", "SharedPools", "Topology", "pools"]

STANDALONE, SENTINEL, CLUSTER = "standalone", "sentinel", "cluster"


@dataclass(frozen=True)
class Topology:
    """Where a redis backend's data is: one server, a Sentinel-managed primary, or a cluster.

    ``sentinels`` and ``nodes`` are ``(host, port)`` pairs; standalone
    servers are named by the connection arguments themselves.
    """

    mode: str = STANDALONE
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    nodes: tuple[tuple[str, int], ...] = ()


@dataclass
class _Shared:
    """One shared pool: its sync client, its users, and what each event loop asked for
    (an asyncio client, in sentinel mode its Sentinel, in cluster mode clients of the
    nodes, and a follower of histories), all on that loop."""

    args: dict[str, Any]
    topology: Topology
    client: Any
    sentinel: redis.sentinel.Sentinel | None = None
    users: int = 0
    async_client: Any = None
    async_sentinel: redis.asyncio.sentinel.Sentinel | None = None
    async_nodes: dict[str, redis.asyncio.Redis] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None
    follower: Any = None


class SharedPools:
    """Connection pools shared by every backend with the same settings, counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[tuple[Any, ...], _Shared] = {}

    def acquire(self, key: tuple[Any, ...], args: dict[str, Any],
                topology: Topology = Topology()) -> Any:  # fmt: skip
        """The sync client of pool ``key`` (made on first use), counted as one more user.

        A ``redis.Redis`` (standalone, sentinel) or a
        :class:`~chanstore.backends.redis_cluster.LazyCluster` (cluster).
        """
        with self._lock:
            shared = self._pools.get(key)
            if shared is None:
                client, sentinel = _new_sync_client(args, topology)
                shared = self._pools[key] = _Shared(args, topology, client, sentinel)
            shared.users += 1
            return shared.client

    def topology(self, key: tuple[Any, ...]) -> Topology:
        return self._pools[key].topology

    def async_client(self, key: tuple[Any, ...]) -> Any:
        """The asyncio client of pool ``key`` for the running event loop (made on first use).

        ``redis.asyncio.Redis``, or in cluster mode ``redis.asyncio.cluster.RedisCluster``.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            shared = self._pools[key]
            self._on_loop(shared, loop)
            if shared.async_client is None:
                shared.async_client, shared.async_sentinel = _new_async_client(
                    shared.args, shared.topology
                )
            return shared.async_client

    def async_sentinel(self, key: tuple[Any, ...]) -> redis.asyncio.sentinel.Sentinel:
        """Sentinel mode: the asyncio Sentinel of pool ``key`` on the running loop."""
        self.async_client(key)
        sentinel = self._pools[key].async_sentinel
        assert sentinel is not None, "only a pool in sentinel mode has sentinels"
        return sentinel

    def async_node_client(self, key: tuple[Any, ...], host: str, port: int) -> redis.asyncio.Redis:
        """Cluster mode: an asyncio client of the node at ``host:port`` on the running loop.

        Its own pool per node, with the entry's credentials and timeouts, and no
        retries: a write sent again behind the sender's back might be made twice.
        """
        loop = asyncio.get_running_loop()
        name = f"{host}:{port}"
        with self._lock:
            shared = self._pools[key]
            self._on_loop(shared, loop)
            client = shared.async_nodes.get(name)
            if client is None:
                options = _node_options(shared.args)
                client = shared.async_nodes[name] = redis.asyncio.Redis(
                    host=host, port=port, retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
                    **options,
                )  # fmt: skip
            return client

    @staticmethod
    def _on_loop(shared: _Shared, loop: asyncio.AbstractEventLoop) -> None:
        """Forget the asyncio clients of another loop (their connections went with it)."""
        if shared.loop is not loop:
            shared.async_client, shared.async_sentinel, shared.loop = None, None, loop
            shared.async_nodes = {}

    def follower(self, key: tuple[Any, ...], where: str) -> Any:
        """The follower of pool ``key``'s histories on the running event loop (made on first use).

        Standalone and sentinel: a :class:`RedisFollower`, which reads over a
        connection of its own (see :func:`_follower_client`) and interrupts its
        reads through the pool's asyncio client. Cluster: a
        :class:`~chanstore.backends.redis_cluster.ClusterFollower`. It lives as
        long as the pool: releasing the pool's last backend closes it.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            shared = self._pools[key]
            follower = shared.follower
            if follower is not None and not follower.closed and follower.loop is loop:
                return follower
            if follower is not None and not follower.closed:
                _close_on_loop(follower.close, follower.loop)
        # Made outside the lock: the callables below take it again.
        follower = self._new_follower(key, shared, where)
        with self._lock:
            shared.follower = follower
        return follower

    def _new_follower(self, key: tuple[Any, ...], shared: _Shared, where: str) -> Any:
        args, topology = shared.args, shared.topology
        if topology.mode == CLUSTER:
            return ClusterFollower(
                lambda: self.async_client(key),
                lambda host, port: _follower_client(_node_options(args), host=host, port=port),
                lambda host, port: self.async_node_client(key, host, port),
                where=where,
            )
        if topology.mode == SENTINEL:
            return RedisFollower(
                lambda: _sentinel_follower_client(args, topology, self.async_sentinel(key)),
                lambda: self.async_client(key),
                where=where,
            )
        return RedisFollower(lambda: _follower_client(args), lambda: self.async_client(key),
                             where=where)  # fmt: skip

    def link_connector(
        self, key: tuple[Any, ...], connect: Callable[[dict[str, Any]], Any]
    ) -> Callable[[], redis.asyncio.connection.AbstractConnection]:
        """How the invalidation link of pool ``key`` makes its connection.

        ``connect(args)`` makes a standalone server's (see
        :func:`chanstore.backends.redis_invalidations.link_connection`). In
        sentinel mode the connection asks the sentinels for the primary when it
        connects (a ``PUBLISH`` reaches the primary's subscribers, and after a
        failover the new primary's). In cluster mode a ``PUBLISH`` reaches the
        subscribers of every node, so the link takes any node: the next known
        one each time it connects again, so that a dead node is passed over.
        """
        shared = self._pools[key]
        args, topology = shared.args, shared.topology
        if topology.mode == SENTINEL:

            def sentinel_link() -> redis.asyncio.connection.AbstractConnection:
                # The link's connection as made for a server, asking the sentinels instead.
                template = connect({"host": "localhost", "port": 6379, **args})
                pool = redis.asyncio.sentinel.SentinelConnectionPool(
                    topology.master_name, self.async_sentinel(key), **_made_with(template)
                )
                connection = pool.connection_class(**pool.connection_kwargs)
                # The connection refers to its pool weakly: it holds it, so that it lives.
                connection.sentinel_pool = pool
                return connection

            return sentinel_link
        if topology.mode == CLUSTER:
            turn = itertools.count()

            def cluster_link() -> redis.asyncio.connection.AbstractConnection:
                candidates = list(topology.nodes)
                candidates += [n for n in _known_nodes(shared.client) if n not in candidates]
                host, port = candidates[next(turn) % len(candidates)]
                return connect({"host": host, "port": port, **_node_options(args)})

            return cluster_link
        return lambda: connect(args)

    def release(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            shared = self._pools[key]
            shared.users -= 1
            if shared.users:
                return
            del self._pools[key]
        client = shared.client
        if isinstance(client, LazyCluster):
            client.close()
        else:
            client.close()
            client.connection_pool.disconnect()
        if shared.sentinel is not None:
            shared.sentinel.close()
        if shared.follower is not None:
            _close_on_loop(shared.follower.close, shared.follower.loop)
        loop = shared.loop
        if loop is not None:
            if shared.async_client is not None:
                _close_on_loop(shared.async_client.aclose, loop)
            if shared.async_sentinel is not None:
                _close_on_loop(shared.async_sentinel.aclose, loop)
            for node_client in shared.async_nodes.values():
                _close_on_loop(node_client.aclose, loop)


def _retry(flavour: Any, retries: int) -> Any:
    retry_class = redis.asyncio.retry.Retry if flavour is redis.asyncio else redis.retry.Retry
    return retry_class(NoBackoff(), retries)


def _sentinel_options(args: dict[str, Any]) -> dict[str, Any]:
    """What the sentinels themselves are asked with: the timeouts (no credentials: the
    primary's are not the sentinels')."""
    return {name: value for name, value in args.items() if name.startswith("socket_")}


def _node_options(args: dict[str, Any]) -> dict[str, Any]:
    """A cluster node's connection options: the entry's, without a database (always 0)."""
    return {name: value for name, value in args.items() if name not in ("db", "host", "port")}


def _new_sync_client(args: dict[str, Any], topology: Topology) -> tuple[Any, Any]:
    """The sync client of ``args`` in ``topology``, and in sentinel mode its Sentinel."""
    # One quick retry covers a pooled connection that went stale while Redis
    # restarted; anything longer is an outage that callers should hear about.
    if topology.mode == SENTINEL:
        sentinel = redis.sentinel.Sentinel(list(topology.sentinels),
                                           sentinel_kwargs=_sentinel_options(args))  # fmt: skip
        client = sentinel.master_for(topology.master_name, retry=_retry(redis, 1), **args)
        return client, sentinel
    if topology.mode == CLUSTER:
        options = _node_options(args)
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in topology.nodes]
        where = ",".join(f"{host}:{port}" for host, port in topology.nodes)

        def build() -> redis.cluster.RedisCluster:
            return redis.cluster.RedisCluster(
                startup_nodes=list(nodes), retry=_retry(redis, 1), **options
            )

        return LazyCluster(build, where=where), None
    return _new_client(args), None


def _new_async_client(args: dict[str, Any], topology: Topology) -> tuple[Any, Any]:
    """The asyncio client of ``args`` in ``topology``, and in sentinel mode its Sentinel."""
    if topology.mode == SENTINEL:
        sentinel = redis.asyncio.sentinel.Sentinel(
            list(topology.sentinels), sentinel_kwargs=_sentinel_options(args)
        )
        client = sentinel.master_for(topology.master_name, retry=_retry(redis.asyncio, 1),
                                     **args)  # fmt: skip
        return client, sentinel
    if topology.mode == CLUSTER:
        nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in topology.nodes]
        return redis.asyncio.cluster.RedisCluster(startup_nodes=nodes,
                                                  retry=_retry(redis.asyncio, 1),
                                                  **_node_options(args)), None  # fmt: skip
    return _new_client(args, redis.asyncio), None


def _new_client(args: dict[str, Any], flavour: Any = redis) -> Any:
    """A client for ``args``: ``redis.Redis``, or with ``flavour=redis.asyncio`` its twin."""
    retry = _retry(flavour, 1)
    if "url" in args:
        args = dict(args)
        return flavour.Redis.from_url(args.pop("url"), retry=retry, **args)
    return flavour.Redis(retry=retry, **args)


def _follower_socket_timeout(args: dict[str, Any]) -> float:
    return FOLLOW_BLOCK_SECONDS + max(float(args["socket_timeout"]), 1.0)


def _follower_client(args: dict[str, Any], **where: Any) -> redis.asyncio.Redis:
    """The follower's own connection: one, no retries, a socket timeout beyond its block.

    Not from the pool: it spends its life blocked in ``XREAD``. Without
    retries it never reconnects behind the follower's back, so the ``CLIENT
    ID`` that interrupts it stays right; a failure ends the follows instead.
    ``where`` (``host``, ``port``) overrides the server (a cluster node's).
    """
    options = {**args, **where}
    options["socket_timeout"] = _follower_socket_timeout(args)
    retry = redis.asyncio.retry.Retry(NoBackoff(), 0)
    url = options.pop("url", None)
    if url is not None:
        return redis.asyncio.Redis.from_url(url, retry=retry, single_connection_client=True,
                                            **options)  # fmt: skip
    return redis.asyncio.Redis(retry=retry, single_connection_client=True, **options)


def _sentinel_follower_client(
    args: dict[str, Any], topology: Topology, sentinel: redis.asyncio.sentinel.Sentinel
) -> redis.asyncio.Redis:
    """:func:`_follower_client` in sentinel mode: its one connection goes to the primary
    that the sentinels name when it connects (the pool's Sentinel, on its loop)."""
    options = dict(args)
    options["socket_timeout"] = _follower_socket_timeout(args)
    pool = redis.asyncio.sentinel.SentinelConnectionPool(
        topology.master_name, sentinel, retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
        **options,
    )  # fmt: skip
    client = redis.asyncio.Redis(connection_pool=pool, single_connection_client=True)
    client.auto_close_connection_pool = True  # as Redis.from_pool does: aclose() closes it
    return client


def _made_with(connection: Any) -> dict[str, Any]:
    """The options that made ``connection`` (a redis.asyncio Connection), without its address."""
    return {
        "db": connection.db,
        "username": connection.username,
        "password": connection.password,
        "socket_timeout": connection.socket_timeout,
        "socket_connect_timeout": connection.socket_connect_timeout,
        "client_name": connection.client_name,
        "retry": connection.retry,
        "protocol": connection.protocol,
    }


def _known_nodes(client: Any) -> list[tuple[str, int]]:
    """The nodes a built LazyCluster knows of (none before its first use)."""
    if not isinstance(client, LazyCluster):
        return []
    return client.known_nodes()


#: Closing asyncio clients and followers, kept until done (the loop holds tasks only weakly).
_closing: set[asyncio.Future[Any]] = set()


def _close_on_loop(
    close: Callable[[], Coroutine[Any, Any, Any]], loop: asyncio.AbstractEventLoop | None
) -> None:
    """Run ``close()`` (an asyncio client's or a follower's) on its own loop, from that loop
    or any other thread."""
    if loop is None or loop.is_closed() or not loop.is_running():
        return  # its connections went with the loop
    try:
        on_loop = asyncio.get_running_loop() is loop
    except RuntimeError:
        on_loop = False
    closing: asyncio.Future[Any]
    if on_loop:
        closing = loop.create_task(close())
    else:
        closing = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close(), loop),
                                      loop=loop)  # fmt: skip
    _closing.add(closing)
    closing.add_done_callback(_closing.discard)


#: The process's shared pools, one per connection settings' key.
pools = SharedPools()
