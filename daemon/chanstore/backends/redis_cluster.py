"""The redis backend in cluster mode: its sync client made on first use, writes sent to the
primaries that hold their slots, the primaries' health, and the follower of histories.

Layout. Everything of one domain lives in one slot: its hash
``<key_prefix>{<domain>}`` and its history ``<key_prefix>-events:{<domain>}``
carry the domain as their hash tag (see
:class:`~chanstore.backends.redisdb.RedisDatabase`), so the one write script
(:data:`~chanstore.backends.redis_writes.WRITE_SCRIPT`), called with both
keys, runs atomically on the primary of that slot, as on a single server.
Nothing holds across domains: a batch's writes go to several primaries, each
domain's script atomic by itself, never the batch.

Writes (:func:`send_writes_cluster`, :func:`send_writes_cluster_async`).
redis-py's cluster pipeline splits a batch per node, but it cannot end a
node's part with a ``WAIT`` (a keyless command, which it would send to a
random node, or to all), and after a ``MOVED`` or a connection error it
sends the failed commands again one by one, later, on other connections, so
a ``WAIT`` sent with the batch would not count them; and a script whose
connection broke after it was sent may already have run. So the writes are
grouped here by the primary that holds their slot (the cluster client's slot
table), and each group goes in one packet on a connection of that primary
(:func:`~chanstore.backends.redis_rounds.round_trip`), ending in ``WAIT``
when ``min_replicas`` asks for it: the ``WAIT`` counts exactly the replicas
that hold that group's writes. The groups of one batch go out together
(sync: one after the other; asyncio: concurrently). What comes back:

* ``MOVED``: the slot has another primary (a failover, a resharding); the
  script did not run. The slot table is read again and the write goes to the
  new primary in the next round.
* ``ASK``: the slot is being migrated and the domain's keys are already on
  the target; the write goes there, after ``ASKING``, in the next round.
* ``NOSCRIPT`` (a primary that never saw the script: a promoted replica
  whose cache was flushed, a new node): the next round sends the text.
* ``CLUSTERDOWN``, ``TRYAGAIN`` and a connection error: that group's writes
  fail with :class:`~chanstore.errors.BackendUnavailable` (the daemon
  answers 503) and the slot table is read again, so that later writes reach
  the new primary once there is one. A write whose connection broke may
  have been made; it is never sent again behind the caller's back.

A batch takes at most :data:`MAX_ROUNDS` rounds.

The follower (:class:`ClusterFollower`). One ``XREAD`` cannot span slots, even
on one node (Redis answers ``CROSSSLOT``), so the histories of a cluster are
followed per *slot*: one :class:`~chanstore.backends.redis_history.RedisFollower`
(one blocking connection, to the primary of that slot) per slot that a
followed stream hashes to, shared by every stream of that slot. A daemon that
follows the histories of N domains holds up to N such connections (16384 at
most), none while it follows nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    TryAgainError,
)

from chanstore import logs
from chanstore.backends.redis_history import Deliver, RedisFollower, parse_position
from chanstore.backends.redis_rounds import round_trip, round_trip_async
from chanstore.backends.redis_wait import ReplicaWait
from chanstore.backends.redis_writes import Write, not_overtaken
from chanstore.errors import BackendError, BackendUnavailable

__all__ = [
    "MAX_ROUNDS",
    "ClusterFollower",
    "LazyCluster",
    "SlotClient",
    "ping_primaries",
    "send_writes_cluster",
    "send_writes_cluster_async",
]

#: Rounds one batch may take: a redirection (MOVED or ASK), a reload of the script
#: (NOSCRIPT) and the retry of a document a foreign writer formatted, with room for
#: one more redirection while a failover settles.
MAX_ROUNDS = 5

#: ``reaching(node)``: the backend's context that words redis errors as its own
#: (:class:`BackendUnavailable`), naming the node when one is given.
Reaching = Callable[..., AbstractContextManager[None]]

log = logs.get_logger()
#: Followers of moved slots being closed, kept until done.
_closing: set[asyncio.Task[None]] = set()


class LazyCluster:
    """A ``redis.cluster.RedisCluster`` made on first use, under a lock.

    redis-py's sync cluster client reads the slot table from its startup
    nodes as it is made; made lazily, building a backend never blocks on the
    network (as with a standalone server, whose client connects on first
    use). Attribute access goes to the cluster client. When no startup node
    answers, using it raises ``redis.ConnectionError`` (so that it reads as
    unreachable), and the next use tries again.
    """

    def __init__(self, build: Callable[[], redis.cluster.RedisCluster], *, where: str) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._cluster: redis.cluster.RedisCluster | None = None
        self.where = where

    def get(self) -> redis.cluster.RedisCluster:
        cluster = self._cluster
        if cluster is None:
            with self._lock:
                if self._cluster is None:
                    try:
                        self._cluster = self._build()
                    except RedisClusterException as exc:
                        raise redis.ConnectionError(
                            f"no node of the cluster ({self.where}) answered: {exc}"
                        ) from exc
                cluster = self._cluster
        return cluster

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)

    def refresh(self) -> None:
        """Read the slot table again (after a failover, a MOVED), if the client was made.
        Best effort: an error is for the next use to meet."""
        cluster = self._cluster
        if cluster is not None:
            with contextlib.suppress(redis.RedisError, RedisClusterException):
                cluster.nodes_manager.initialize()

    def known_nodes(self) -> list[tuple[str, int]]:
        """Every node the slot table names (none before the first use)."""
        cluster = self._cluster
        if cluster is None:
            return []
        return [(node.host, int(node.port)) for node in cluster.get_nodes()]

    def close(self) -> None:
        cluster = self._cluster
        if cluster is not None:
            cluster.close()

    def __repr__(self) -> str:
        return f"LazyCluster({self.where!r}, made={self._cluster is not None})"


# -- writes ---------------------------------------------------------------------------


class _Group:
    """The writes of one round that go to one node, and how they are sent."""

    __slots__ = ("asking", "host", "name", "port", "writes")

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name, self.host, self.port = name, host, port
        self.writes: list[Write] = []
        self.asking: list[bool] = []


class _ClusterBatch:
    """The writes of one batch still waiting for their answers, round after round."""

    def __init__(self, writes: Sequence[Write], wait: ReplicaWait | None, where: str) -> None:
        self.pending = [write for write in writes if write.answer is None]
        self.wait = wait
        self.where = where
        self.by_text = False
        self.rounds = 0
        self.stale = False  # the slot table must be read again
        self.asks: dict[int, tuple[str, int]] = {}
        self._next: list[Write] = []

    def groups(self, locate: Callable[[Write], tuple[str, str, int]],
               reaching: Reaching) -> list[_Group]:  # fmt: skip
        """This round's writes by node; ``locate(write)`` names the primary of its slot."""
        groups: dict[str, _Group] = {}
        for write in self.pending:
            asked = self.asks.pop(id(write), None)
            try:
                if asked is not None:
                    host, port = asked
                    name = f"{host}:{port}"
                else:
                    with reaching():
                        name, host, port = locate(write)
            except Exception as exc:  # noqa: BLE001 - no primary holds the slot: its answer
                write.answer = exc
                continue
            group = groups.get(name)
            if group is None:
                group = groups[name] = _Group(name, host, port)
            group.writes.append(write)
            group.asking.append(asked is not None)
        self.pending = []
        return list(groups.values())

    def commands(self, group: _Group) -> list[tuple[Any, ...]]:
        commands: list[tuple[Any, ...]] = []
        for write, asking in zip(group.writes, group.asking, strict=True):
            if asking:
                commands.append(("ASKING",))
            commands.extend(write.commands(self.by_text))
        if self.wait is not None:
            commands.append(self.wait.command())
        return commands

    def take(self, group: _Group, replies: Sequence[Any], reaching: Reaching) -> None:
        """Take one node's replies (in the order of :meth:`commands`)."""
        replies = list(replies)
        answered: list[Write] = []
        again: list[Write] = []
        for write, asking in zip(group.writes, group.asking, strict=True):
            del replies[: int(asking)]  # ASKING's OK
            own, replies = replies[: write.sent], replies[write.sent :]
            reply = write.decisive(own)
            if isinstance(reply, MovedError):
                self.stale = True  # the slot moved: read the table, send again
                again.append(write)
            elif isinstance(reply, AskError):
                self.asks[id(write)] = (reply.host, int(reply.port))
                again.append(write)
            elif isinstance(reply, NoScriptError):
                self.by_text = True
                again.append(write)
            elif isinstance(reply, ClusterDownError | TryAgainError):
                self.stale = True
                write.answer = _worded(reply, reaching, group.name)
            elif write.take(own):
                answered.append(write)
            else:
                again.append(write)  # a document a foreign writer formatted: once more
        self._next.extend(not_overtaken(group.writes, again))
        for write in again:
            if write.answer is not None:  # overtaken, so not sent again
                self.asks.pop(id(write), None)
        if self.wait is not None:
            reply = replies.pop(0) if replies else None
            if answered and not self.wait.holds(reply):
                self.wait.refuse(answered, reply, f"{self.where} (node {group.name})")

    def node_failed(self, group: _Group, exc: BaseException) -> None:
        """The round trip to ``group``'s node failed: its writes have that answer."""
        self.stale = True
        for write in group.writes:
            write.answer = exc

    def failed(self, exc: BaseException) -> None:
        for write in self.pending:
            write.answer = exc
        self.pending = []

    def next_round(self) -> None:
        self.rounds += 1
        self.pending, self._next = self._next, []
        if self.pending and self.rounds >= MAX_ROUNDS:
            for write in self.pending:
                write.answer = BackendUnavailable(
                    f"Redis Cluster at {self.where} kept redirecting the write for "
                    f"{self.rounds} rounds (a failover or a resharding is under way); it "
                    "was not made"
                )
            self.pending = []


def _worded(exc: BaseException, reaching: Reaching, node: str) -> BaseException:
    """``exc`` as the backend words it (``reaching`` turns redis errors into its own)."""
    try:
        with reaching(node):
            raise exc
    except Exception as worded:  # noqa: BLE001 - whatever it became is the answer
        return worded


def _locate_sync(cluster: redis.cluster.RedisCluster) -> Callable[[Write], tuple[str, str, int]]:
    def locate(write: Write) -> tuple[str, str, int]:
        node = cluster.get_node_from_key(write.backend.hash_name)
        return node.name, node.host, int(node.port)

    return locate


def send_writes_cluster(
    writes: Sequence[Write],
    cluster: LazyCluster,
    *,
    reaching: Reaching,
    wait: ReplicaWait | None,
    where: str,
) -> None:
    """Send ``writes`` to the primaries of their slots: one pipeline per primary per round.

    Sync: the primaries' pipelines go one after the other. See the module
    docstring for what each reply leads to.
    """
    batch = _ClusterBatch(writes, wait, where)
    while batch.pending:
        try:
            with reaching():
                client = cluster.get()
                if batch.stale:
                    batch.stale = False
                    client.nodes_manager.initialize()
        except Exception as exc:  # noqa: BLE001 - no slot table: every write fails alike
            batch.failed(exc)
            break
        for group in batch.groups(_locate_sync(client), reaching):
            node = client.get_node(node_name=group.name) or redis.cluster.ClusterNode(
                group.host, group.port
            )
            commands = batch.commands(group)
            try:
                with reaching(group.name):
                    replies = round_trip(client.get_redis_connection(node), commands)
            except Exception as exc:  # noqa: BLE001 - that node's round trip failed
                batch.node_failed(group, exc)
                continue
            batch.take(group, replies, reaching)
        batch.next_round()
    if batch.stale:
        cluster.refresh()  # so that the next writes find the new primary


async def send_writes_cluster_async(
    writes: Sequence[Write],
    cluster: Callable[[], redis.asyncio.cluster.RedisCluster],
    node_client: Callable[[str, int], redis.asyncio.Redis],
    *,
    reaching: Reaching,
    wait: ReplicaWait | None,
    where: str,
) -> None:
    """:func:`send_writes_cluster` on the running event loop: the primaries' pipelines go
    concurrently, each on ``node_client(host, port)``."""
    batch = _ClusterBatch(writes, wait, where)
    if not batch.pending:
        return
    client = cluster()
    while batch.pending:
        try:
            with reaching():
                await client.initialize()
                if batch.stale:
                    batch.stale = False
                    await client.nodes_manager.initialize()
        except Exception as exc:  # noqa: BLE001 - no slot table: every write fails alike
            batch.failed(exc)
            break

        def locate(write: Write) -> tuple[str, str, int]:
            node = client.get_node_from_key(write.backend.hash_name)
            return node.name, node.host, int(node.port)

        groups = batch.groups(locate, reaching)

        async def send(group: _Group) -> None:
            commands = batch.commands(group)
            try:
                with reaching(group.name):
                    replies = await round_trip_async(node_client(group.host, group.port), commands)
            except Exception as exc:  # noqa: BLE001 - that node's round trip failed
                batch.node_failed(group, exc)
                return
            batch.take(group, replies, reaching)

        await asyncio.gather(*(send(group) for group in groups))
        batch.next_round()
    if batch.stale:
        with contextlib.suppress(redis.RedisError, RedisClusterException):
            await client.nodes_manager.initialize()


# -- reading one slot ------------------------------------------------------------------


class SlotClient:
    """What :class:`~chanstore.backends.redis_history.RedisHistory` reads one stream with,
    in a cluster: commands through the cluster client, and ``MULTI`` pipelines on a
    connection of the primary that holds the stream's slot.

    redis-py's cluster transaction pipeline leaves its replies unparsed (an
    ``XINFO STREAM`` comes back as raw pairs), so the history's one-round-trip
    ``MULTI`` goes to the slot's primary as a plain pipeline. When the slot
    moved meanwhile, Redis answers ``MOVED`` (the backend's words: unavailable)
    and the slot table is read again for the next call.
    """

    def __init__(self, cluster: LazyCluster, key: bytes) -> None:
        self._cluster = cluster
        self._key = key

    def xrevrange(self, *args: Any, **kwargs: Any) -> Any:
        return self._cluster.xrevrange(*args, **kwargs)

    def pipeline(self, transaction: bool = True) -> _SlotPipeline:
        return _SlotPipeline(self._cluster, self._key, transaction)


class _SlotPipeline:
    """The commands of a pipeline, sent to the primary of one slot by ``execute``.

    Everything that touches the network (the slot table, the node's
    connection) happens in ``execute``, which the caller runs inside its
    ``reaching``; after a ``MOVED`` the slot table is read again.
    """

    def __init__(self, cluster: LazyCluster, key: bytes, transaction: bool) -> None:
        self._cluster = cluster
        self._key = key
        self._transaction = transaction
        self._calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., _SlotPipeline]:
        def queue(*args: Any, **kwargs: Any) -> _SlotPipeline:
            self._calls.append((name, args, kwargs))
            return self

        return queue

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        cluster = self._cluster.get()
        node = cluster.get_node_from_key(self._key)
        pipe = cluster.get_redis_connection(node).pipeline(transaction=self._transaction)
        for name, args, kwargs in self._calls:
            getattr(pipe, name)(*args, **kwargs)
        try:
            replies = pipe.execute(raise_on_error=raise_on_error)
        except (MovedError, ClusterDownError, redis.ConnectionError):
            self._cluster.refresh()
            raise
        if any(isinstance(reply, MovedError) for reply in replies):
            self._cluster.refresh()
        return replies


# -- health ---------------------------------------------------------------------------


def ping_primaries(cluster: LazyCluster, reaching: Reaching) -> list[str]:
    """``PING`` every primary of the slot table; the primaries' names.

    A primary that does not answer may be one that a failover replaced: the
    slot table is read again and the new primaries pinged. Raises the
    backend's :class:`BackendUnavailable` (naming the node) when one still
    does not answer, or when no node gives a slot table that covers every slot.
    """
    failure: BaseException | None = None
    for attempt in range(2):
        with reaching():
            client = cluster.get()
            if attempt:
                client.nodes_manager.initialize()
        failure = None
        names = []
        for node in client.get_primaries():
            names.append(node.name)
            try:
                with reaching(node.name):
                    client.get_redis_connection(node).ping()
            except BackendError as exc:
                failure = failure or exc
        if failure is None:
            return names
    assert failure is not None
    raise failure


# -- the follower of histories ----------------------------------------------------------


class _Slot:
    """The follower of one slot's streams, and the node it reads from."""

    __slots__ = ("follower", "host", "port")

    def __init__(self, follower: RedisFollower, host: str, port: int) -> None:
        self.follower, self.host, self.port = follower, host, port


class ClusterFollower:
    """Follows the histories of a cluster: one :class:`RedisFollower` per followed slot.

    ``cluster()`` is the pool's asyncio cluster client, whose slot table
    says which primary holds a stream's slot; ``connect(host, port)`` makes
    a follower's own connection to a node, and ``control(host, port)`` the
    node's pooled client, for ``CLIENT UNBLOCK``. The same contract as
    :class:`RedisFollower` (``follow``, ``unfollow``, ``close``): every
    ``deliver`` gets every entry after its position, in order, or None when
    its follow ended (the slot's connection failed: its node died, or the
    slot moved); it follows again when it wants to, and by then the slot
    table has been read again, so the follow goes to the slot's new primary.

    Follows made before the slot table is known (the first ones), or while
    it is read again after a failure, wait for it (a round trip or two).
    """

    def __init__(
        self,
        cluster: Callable[[], redis.asyncio.cluster.RedisCluster],
        connect: Callable[[str, int], redis.asyncio.Redis],
        control: Callable[[str, int], redis.asyncio.Redis],
        *,
        where: str = "",
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.where = where
        self._cluster = cluster
        self._connect = connect
        self._control = control
        self._slots: dict[int, _Slot] = {}
        self._wrapped: dict[tuple[bytes, Deliver], Deliver] = {}
        self._queued: list[tuple[bytes, str, Deliver]] = []
        self._known = False  # the slot table was read (and nothing failed since)
        self._reading: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def follow(self, name: bytes, position: str, deliver: Deliver) -> None:
        """Call ``deliver(event)`` for every entry of stream ``name`` after ``position``
        (see :meth:`RedisFollower.follow`)."""
        parse_position(position)
        if self._closed:
            raise RuntimeError(f"the Redis follower of {self.where} is closed")
        if self._known and self._reading is None:
            self._route(name, position, deliver)
            return
        self._queued = [q for q in self._queued if q[0] != name or q[2] is not deliver]
        self._queued.append((name, position, deliver))
        if self._reading is None:
            self._reading = self.loop.create_task(self._read_slots(),
                                                  name=f"chanstore-slots {self.where}")  # fmt: skip

    def unfollow(self, name: bytes, deliver: Deliver) -> None:
        self._queued = [q for q in self._queued if q[0] != name or q[2] is not deliver]
        wrapped = self._wrapped.pop((name, deliver), None)
        slot = self._slots.get(key_slot(name))
        if wrapped is not None and slot is not None:
            slot.follower.unfollow(name, wrapped)

    async def close(self) -> None:
        """Stop reading; every remaining follower gets None."""
        self._closed = True
        reading, self._reading = self._reading, None
        if reading is not None and not reading.done():
            reading.cancel()
            await asyncio.wait({reading})
        slots, self._slots = self._slots, {}
        for slot in slots.values():
            await slot.follower.close()
        self._end_queued()
        self._wrapped.clear()

    async def _read_slots(self) -> None:
        """Read the slot table (again), then route the follows that waited for it."""
        try:
            client = self._cluster()
            if self._known:
                await client.nodes_manager.initialize()
            else:
                await client.initialize()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the waiting follows end; they follow again
            log.warning("redis_follow_failed", where=self.where, error=str(exc),
                        error_type=type(exc).__name__, streams=len(self._queued))  # fmt: skip
            self._reading = None
            self._end_queued()
            return
        self._known = True
        self._reading = None
        queued, self._queued = self._queued, []
        for name, position, deliver in queued:
            self._route(name, position, deliver)

    def _route(self, name: bytes, position: str, deliver: Deliver) -> None:
        """Follow ``name`` on the follower of its slot, made or remade for the slot's
        current primary."""
        number = key_slot(name)
        try:
            node = self._cluster().get_node_from_key(name)
        except Exception as exc:  # noqa: BLE001 - no primary holds the slot (yet)
            log.warning("redis_follow_failed", where=self.where, error=str(exc),
                        error_type=type(exc).__name__, streams=1)  # fmt: skip
            self._known = False
            self._deliver_end(deliver)
            return
        host, port = node.host, int(node.port)
        slot = self._slots.get(number)
        if slot is not None and (slot.host, slot.port) != (host, port):
            # The slot moved: the old node's follows end (they follow again, here).
            closing = self.loop.create_task(slot.follower.close())
            _closing.add(closing)  # the loop holds tasks only weakly
            closing.add_done_callback(_closing.discard)
            slot = None
        if slot is None or slot.follower.closed:
            follower = RedisFollower(
                lambda: self._connect(host, port),
                lambda: self._control(host, port),
                where=f"{self.where} (node {host}:{port}, slot {number})",
            )
            slot = self._slots[number] = _Slot(follower, host, port)
        key = (name, deliver)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = self._wrap(name, deliver)
        slot.follower.follow(name, position, wrapped)

    def _wrap(self, name: bytes, deliver: Deliver) -> Deliver:
        def wrapped(event: Any) -> None:
            if event is None:
                # The slot's connection failed: read the slot table before the next follow.
                self._known = False
                self._wrapped.pop((name, deliver), None)
            deliver(event)

        return wrapped

    def _end_queued(self) -> None:
        queued, self._queued = self._queued, []
        for _name, _position, deliver in queued:
            self._deliver_end(deliver)

    def _deliver_end(self, deliver: Deliver) -> None:
        try:
            deliver(None)
        except Exception as exc:  # noqa: BLE001 - the others must hear it too
            log.error("redis_follow_deliver_failed", where=self.where, error=str(exc),
                      error_type=type(exc).__name__)  # fmt: skip

    def __repr__(self) -> str:
        return f"ClusterFollower({self.where!r}, slots={len(self._slots)})"
