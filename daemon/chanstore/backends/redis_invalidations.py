"""The redis backend's invalidation link: how a daemon hears of the writes other daemons make.

Several daemons may serve one Redis, each answering reads from memory (see
:mod:`chanstore.coherence`). The mechanism chosen is chanstore's own
invalidations, published by the write script itself, rather than Redis's
server-assisted client-side caching (``CLIENT TRACKING``):

* Every change goes through one Lua script,
  :data:`~chanstore.backends.redis_writes.WRITE_SCRIPT`. After it made a
  change (never when an expectation failed, and only when something really
  changed: a set, or the delete of a key that existed), it runs ``PUBLISH
  <key_prefix>-invalidations <payload>`` once, in the same atomic step and
  the same round trip as the write. So an invalidation is published exactly
  when a change is made, before the writer hears its answer, and it costs no
  round trip of its own.
* The payload (:func:`payload`, :func:`parse`) is the writing process's
  origin (:data:`ORIGIN`), the domain's hash name (``<key_prefix><domain>``)
  and every changed key, joined by NUL (:data:`SEPARATOR`): keys cannot hold
  NUL (:func:`chanstore.keys.check_key`), domains chanstore makes cannot
  either (their ids are percent-encoded, container names are identifiers),
  and the origin is hex. The listener knows its key prefix, so even a prefix
  with a NUL in it is read right.
* :data:`ORIGIN` is a random token per process (drawn again in a forked
  child): a daemon skips its own writes, which its caches already know of.

Why not ``CLIENT TRACKING``: it tracks keys that a connection *read*, and
chanstore reads whole hashes, so any write to a channel invalidates the whole
channel on every daemon that read it; with redis-py 8 (RESP3 by default) its
``REDIRECT`` link needs a RESP2 connection of its own anyway, and in a
cluster it is per node. It also catches writes by foreign clients
(``redis-cli HSET``), which chanstore's invalidations do not: only writes made
through chanstore's write script (by any chanstore process) are heard. The
cache's maximum age is the backstop for everything else.

:class:`RedisInvalidations` is the link of one Redis (one connection pool key)
and one key prefix, on one event loop: one dedicated connection, in RESP2,
subscribed to ``<key_prefix>-invalidations``; :func:`shared_link` hands out one
per pool key, key prefix and loop, however many domains and listeners use it.
Its guarantees, and what it costs, are in its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import secrets
import threading
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.asyncio.retry
from redis.backoff import NoBackoff

from chanstore import logs
from chanstore.coherence import InvalidationListener

__all__ = [
    "CHANNEL_SUFFIX",
    "ORIGIN",
    "SEPARATOR",
    "RedisInvalidations",
    "channel_of",
    "link_connection",
    "parse",
    "payload",
    "shared_link",
]

#: What follows the key prefix in the name of the channel invalidations go to:
#: ``chanstore:-invalidations``. Pub/sub channels are not keys: nothing is stored.
CHANNEL_SUFFIX = "-invalidations"
#: What separates the parts of an invalidation: a byte no key, domain or origin holds.
SEPARATOR = b"\0"


def _new_origin() -> str:
    return secrets.token_hex(8)


#: This process's origin: the first part of every invalidation its writes publish,
#: by which its own link knows them and skips them. Read it as
#: ``redis_invalidations.ORIGIN`` (not imported by name): a forked child draws its own.
ORIGIN: str = _new_origin()


def _reset_origin_after_fork() -> None:
    global ORIGIN  # noqa: PLW0603 - a forked child is another process: another origin
    ORIGIN = _new_origin()


os.register_at_fork(after_in_child=_reset_origin_after_fork)

#: How often the link sends ``PING`` on its connection when it is otherwise quiet...
PING_INTERVAL = 0.5
#: ...and how long it waits, with nothing at all heard, before it calls the link down.
#: So a connection that went silent (a half-open socket, a Redis frozen in a long
#: script) is noticed within PING_INTERVAL + PONG_TIMEOUT.
PONG_TIMEOUT = 1.0
#: The link connection's socket timeout, for its handshake (AUTH, SELECT) and its sends.
#: Reads have bounds of their own (the pong above).
LINK_SOCKET_TIMEOUT = 2.0
#: The most that connecting, the handshake and the SUBSCRIBE's confirmation may take.
OPEN_TIMEOUT = 5.0
#: Reconnecting: the first wait after a failure, doubled after each failure, up to the last.
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
#: The most close() waits for the link's task to end (its socket is closed under it).
CLOSE_TIMEOUT = 2.0
#: The name the link's connection gives itself (``CLIENT LIST``, ``CLIENT KILL``).
CLIENT_NAME = "chanstore-invalidations"

log = logs.get_logger()


@functools.lru_cache(maxsize=64)
def channel_of(key_prefix: str) -> bytes:
    """The channel the invalidations of key prefix ``key_prefix`` go to."""
    return f"{key_prefix}{CHANNEL_SUFFIX}".encode()


def payload(origin: str, hash_name: bytes, keys: list[str]) -> bytes:
    """The invalidation :data:`WRITE_SCRIPT <chanstore.backends.redis_writes.WRITE_SCRIPT>`
    publishes for ``keys`` of the hash ``hash_name``, as Python would write it: what a
    write sent as a transaction publishes (the script builds it itself)."""
    return SEPARATOR.join([origin.encode(), hash_name, *(key.encode() for key in keys)])


def parse(
    message: bytes, key_prefix: bytes, hash_tagged: bool = False
) -> tuple[bytes, str, list[str]] | None:
    """``(origin, domain, keys)`` of an invalidation of the hashes under ``key_prefix``.

    None for a message that is not one (someone else publishing on the
    channel): the hash name must start with ``key_prefix``, and what follows
    is the domain up to the next NUL (so a prefix holding NUL is read right).
    ``hash_tagged``: the hashes are a cluster's, ``<key_prefix>{<domain>}``
    (see :mod:`chanstore.backends.redis_cluster`), and the braces are not the
    domain's.
    """
    origin, sep, rest = message.partition(SEPARATOR)
    if not sep or not rest.startswith(key_prefix):
        return None
    domain, *keys = rest[len(key_prefix) :].split(SEPARATOR)
    if hash_tagged:
        if not (domain.startswith(b"{") and domain.endswith(b"}")):
            return None
        domain = domain[1:-1]
    try:
        return origin, domain.decode("utf-8"), [key.decode("utf-8") for key in keys if key]
    except UnicodeDecodeError:
        return None


def link_connection(args: dict[str, Any]) -> redis.asyncio.connection.AbstractConnection:
    """A new, unconnected connection for a link, from a redis backend's pool settings.

    Of its own (not from a pool), RESP2 whatever redis-py's default or the
    URL says (a plain ``SUBSCRIBE`` then delivers messages as replies, with
    no push handler), no retries (it must never reconnect behind the link's
    back, which would miss writes without the link going down), and a socket
    timeout of its own (redis-py's default is 5 s).
    """
    options = {key: value for key, value in args.items() if key != "url"}
    options["socket_timeout"] = LINK_SOCKET_TIMEOUT
    url = args.get("url")
    if url is not None:
        pool = redis.asyncio.ConnectionPool.from_url(url, **options)
    else:
        pool = redis.asyncio.ConnectionPool(**options)
    # URL options override keyword arguments in from_url: override them again.
    kwargs = dict(pool.connection_kwargs)
    kwargs.update(protocol=2, socket_timeout=LINK_SOCKET_TIMEOUT, client_name=CLIENT_NAME,
                  retry=redis.asyncio.retry.Retry(NoBackoff(), 0))  # fmt: skip
    kwargs.pop("health_check_interval", None)  # the link checks its connection itself
    return pool.connection_class(**kwargs)


class _LinkFailed(Exception):
    """The link's connection answered something it should not have, or went silent."""


class RedisInvalidations:
    """:class:`~chanstore.coherence.Invalidations` of one Redis and one key prefix, on one loop.

    One task keeps one dedicated connection (``connect()`` makes it: see
    :func:`link_connection`) subscribed to ``<key_prefix>-invalidations``.
    Every message whose origin is not this process's is parsed and each
    listener's ``invalidated(domain, keys)`` is called, in arrival order,
    which is the order Redis made the writes. A listener that raises is
    logged; the others still hear.

    What "up" means. The link says up (``link_changed(True)``) only once
    Redis confirmed the ``SUBSCRIBE``: every write Redis makes from then on
    publishes to this connection, so it will be heard, in order, as long as
    the link stays up; writes made before are not heard, which is why a
    listener drops what it held when the link comes up. The link says down
    (``link_changed(False)``) as soon as the connection fails (a reset, an
    EOF, ``CLIENT KILL``, Redis's output-buffer limit for a subscriber that
    fell behind), and when it goes silent: it sends ``PING`` every
    :data:`PING_INTERVAL` seconds and calls it down when nothing at all
    arrived for :data:`PONG_TIMEOUT` seconds after one. So a dead connection
    is noticed within ``PING_INTERVAL + PONG_TIMEOUT`` (1.5 s): writes made
    in that window are heard by nobody, and only the listener's maximum age
    covers them. Then it connects again, waiting :data:`BACKOFF_FIRST`
    seconds doubling to :data:`BACKOFF_MAX` between attempts, and says up
    again once a new ``SUBSCRIBE`` is confirmed. Listeners are told of
    changes only (up, down, up...), and each new listener of the state at once.

    Bounded: one connection; no queue (messages go to the listeners as they
    are read; a subscriber that falls far behind is cut off by Redis's
    ``client-output-buffer-limit pubsub``, which is a link down); every wait
    has a timeout. The task runs while anyone listens: the last
    :meth:`unsubscribe` stops it and closes its connection, and the next
    :meth:`subscribe` starts it again. :meth:`close` ends the link for good.
    """

    def __init__(
        self,
        connect: Callable[[], redis.asyncio.connection.AbstractConnection],
        *,
        key_prefix: str,
        name: str,
        origin: str | None = None,
        hash_tagged: bool = False,
        ping_interval: float = PING_INTERVAL,
        pong_timeout: float = PONG_TIMEOUT,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        #: What the link is to: the Redis's location, without its password.
        self.name = name
        self.key_prefix = key_prefix
        self.channel = channel_of(key_prefix)
        self._prefix = key_prefix.encode()
        self._hash_tagged = hash_tagged
        self._connect = connect
        # None: this process's origin (read at each connect: a forked child has its own).
        self._origin = origin
        self._ping_interval = ping_interval
        self._pong_timeout = pong_timeout
        self._backoff_first = backoff_first
        self._backoff_max = backoff_max
        self._listeners: dict[InvalidationListener, None] = {}
        self._task: asyncio.Task[None] | None = None
        self._connection: redis.asyncio.connection.AbstractConnection | None = None
        self._up = False
        self._closed = False
        #: How many times the link came up, for tests and logs.
        self.ups = 0

    @property
    def up(self) -> bool:
        """Whether the ``SUBSCRIBE`` is confirmed and the connection has not failed since."""
        return self._up

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def subscribe(self, listener: InvalidationListener) -> None:
        """Tell ``listener`` of invalidations and of the link's state (at once: its current
        one); start the link if it is not running. On the link's event loop."""
        if self._closed:
            raise RuntimeError(f"the invalidation link to {self.name} is closed")
        self._listeners[listener] = None
        self._tell(listener, "link_changed", self._up)
        if self._task is None:
            self._task = self.loop.create_task(self._run(), name=f"chanstore-invalidations "
                                                                 f"{self.name}")  # fmt: skip

    def unsubscribe(self, listener: InvalidationListener) -> None:
        """Stop telling ``listener``; the last one to go stops the link (and its connection)."""
        self._listeners.pop(listener, None)
        if not self._listeners:
            self._stop()

    def reconnect(self) -> None:
        """Call the link down now and connect again (to wherever ``connect()`` leads then).

        For whoever knows better than the connection that it no longer hears
        every write: after a Sentinel failover, a link still subscribed to the
        old primary would stay up and hear none of the new primary's writes.
        """
        if self._task is None:
            return
        self._set_up(False)
        connection = self._connection
        if connection is not None:
            # The read in flight then fails, and the task connects again after its backoff.
            closing = self.loop.create_task(connection.disconnect(nowait=True))
            _closing.add(closing)
            closing.add_done_callback(_closing.discard)

    async def close(self) -> None:
        """Stop the link for good: its task ends and its connection closes (within
        :data:`CLOSE_TIMEOUT`); listeners still subscribed hear that it is down."""
        self._closed = True
        task = self._stop()
        listeners, self._listeners = list(self._listeners), {}
        if task is not None:
            connection = self._connection
            if connection is not None:
                # redis-py's reads can lose a cancellation on Python 3.11 (see
                # RedisFollower.close): closing the socket ends the read whatever happened.
                with contextlib.suppress(Exception):
                    await connection.disconnect(nowait=True)
            await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
        for listener in listeners:
            self._tell(listener, "link_changed", False)

    # -- the task ----------------------------------------------------------------

    def _stop(self) -> asyncio.Task[None] | None:
        """Stop the running task (it closes its connection as it ends); the link is down."""
        task, self._task = self._task, None
        self._up = False
        if task is not None and not task.done():
            task.cancel()
        return task

    def _mine(self) -> bool:
        """Whether the running task is still the link's (not one being stopped)."""
        return self._task is not None and self._task is asyncio.current_task()

    async def _run(self) -> None:
        delay = self._backoff_first
        failures = 0
        while self._mine() and self._listeners:
            connection = None
            try:
                connection = self._connection = self._connect()
                await self._open(connection)
                if not self._mine():
                    return
                if failures:
                    log.info("redis_invalidations_up", where=self.name, attempts=failures + 1)
                delay, failures = self._backoff_first, 0
                self.ups += 1
                self._set_up(True)
                await self._listen(connection)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - down, then connect again
                if self._mine():
                    if not failures:  # once per outage, not at every attempt
                        log.warning("redis_invalidations_down", where=self.name,
                                    error=str(exc) or type(exc).__name__,
                                    error_type=type(exc).__name__)  # fmt: skip
                    failures += 1
            finally:
                if self._mine():
                    self._set_up(False)
                if self._connection is connection:
                    self._connection = None
                if connection is not None:
                    # Closing must finish even when the task was cancelled: it frees the socket.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(connection.disconnect(nowait=True))
            if not (self._mine() and self._listeners):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max)

    async def _open(self, connection: redis.asyncio.connection.AbstractConnection) -> None:
        """Connect, subscribe and wait for the confirmation, within :data:`OPEN_TIMEOUT`."""
        async with asyncio.timeout(OPEN_TIMEOUT):
            await connection.connect()
            await connection.send_command("SUBSCRIBE", self.channel)
            reply = await connection.read_response(timeout=OPEN_TIMEOUT)
        if reply is None:
            raise _LinkFailed(f"SUBSCRIBE was not confirmed in {OPEN_TIMEOUT} s")
        if not (isinstance(reply, list) and reply[:2] == [b"subscribe", self.channel]):
            raise _LinkFailed(f"SUBSCRIBE was answered {reply!r:.200}")

    async def _listen(self, connection: redis.asyncio.connection.AbstractConnection) -> None:
        """Read messages and pongs until the connection fails or goes silent (raises), or the
        link stops (returns): messages only until a ``PING`` is due, then one ``PING``, after
        which something must keep arriving until its pong."""
        own = self._own_prefix()
        loop = self.loop
        while self._mine() and self._listeners:
            await self._hear_until(connection, loop.time() + self._ping_interval, own)
            await connection.send_command("PING")
            if not await self._hear_until(connection, loop.time() + self._pong_timeout, own,
                                          pinging=True):  # fmt: skip
                raise _LinkFailed(f"nothing heard for {self._pong_timeout} s after a PING")

    async def _hear_until(self, connection: redis.asyncio.connection.AbstractConnection,
                          deadline: float, own: bytes, pinging: bool = False) -> bool:  # fmt: skip
        """Dispatch what arrives until a pong (True) or until ``deadline`` (False); while
        ``pinging``, each reply moves the deadline to :data:`PONG_TIMEOUT` after it.

        One deadline for the whole stretch, not a timer per read: a busy daemon's
        own writes come back one message each, and a timer per message cost as
        much as the rest of hearing it. A read cut off by the deadline leaves the
        connection usable (redis-py's parsers keep a reply read in part for the
        next call), so it is not closed (``disconnect_on_error=False``).
        """
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                while True:
                    reply = await connection.read_response(timeout=math.inf,
                                                           disconnect_on_error=False)  # fmt: skip
                    if pinging:
                        scope.reschedule(self.loop.time() + self._pong_timeout)
                    if self._heard(reply, own):
                        return True
        except TimeoutError:
            if not scope.expired():
                raise
            return False

    def _heard(self, reply: Any, own: bytes) -> bool:
        """Dispatch ``reply`` if it is a message; whether it is a pong."""
        if not isinstance(reply, list) or not reply:
            raise _LinkFailed(f"unexpected reply on a subscribed connection: {reply!r:.200}")
        kind = reply[0]
        if kind == b"message" and len(reply) == 3:
            self._dispatch(reply[2], own)
        return kind == b"pong"

    def _own_prefix(self) -> bytes:
        """How this process's invalidations begin: its origin and the separator. Read when
        the link connects (a forked child has an origin of its own, and links of its own)."""
        return (self._origin if self._origin is not None else ORIGIN).encode() + SEPARATOR

    def _dispatch(self, message: bytes, own: bytes) -> None:
        if message.startswith(own):
            return  # this process's own write (most messages, on a busy daemon): not parsed
        parsed = parse(message, self._prefix, self._hash_tagged)
        if parsed is None:
            log.debug("redis_invalidations_unreadable", where=self.name, message=message[:200])
            return
        origin, domain, keys = parsed
        if origin + SEPARATOR == own or not keys:
            return
        for listener in list(self._listeners):
            self._tell(listener, "invalidated", domain, keys)

    def _set_up(self, up: bool) -> None:
        if self._up == up:
            return
        self._up = up
        for listener in list(self._listeners):
            self._tell(listener, "link_changed", up)

    def _tell(self, listener: InvalidationListener, what: str, *args: Any) -> None:
        try:
            getattr(listener, what)(*args)
        except Exception as exc:  # noqa: BLE001 - one listener's failure is not the others'
            log.error("redis_invalidations_listener_failed", where=self.name, call=what,
                      error=str(exc), error_type=type(exc).__name__)  # fmt: skip

    def __repr__(self) -> str:
        state = "closed" if self._closed else "up" if self._up else "down"
        return f"RedisInvalidations({self.name!r}, {self.key_prefix!r}, {state})"


#: Connections being closed by reconnect(), kept until done (the loop holds tasks weakly).
_closing: set[asyncio.Task[Any]] = set()

_lock = threading.Lock()
#: The shared links: one per pool key, key prefix and event loop.
_links: dict[tuple[Any, ...], RedisInvalidations] = {}


def shared_link(
    pool_key: tuple[Any, ...],
    key_prefix: str,
    where: str,
    connect: Callable[[], redis.asyncio.connection.AbstractConnection],
    *,
    hash_tagged: bool = False,
) -> RedisInvalidations | None:
    """The link of Redis ``pool_key`` and ``key_prefix`` on the running event loop, made on
    first use; None when no loop is running (only the daemon, on its loop, listens).
    ``hash_tagged``: a cluster's, whose hashes are ``<key_prefix>{<domain>}``.

    Links of loops that closed are forgotten (their tasks went with their loops).
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    key = (pool_key, key_prefix, loop)
    with _lock:
        for stale in [other for other in _links if other[2].is_closed()]:
            del _links[stale]
        link = _links.get(key)
        if link is None or link.closed:
            link = _links[key] = RedisInvalidations(connect, key_prefix=key_prefix, name=where,
                                                    hash_tagged=hash_tagged)  # fmt: skip
        return link
