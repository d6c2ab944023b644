"""The redis backends' shared connection pools, counted, and how their clients are made.

Backends with the same connection settings share one entry of :data:`pools`:
one synchronous client and its connection pool, an asyncio client for the
event loop that asked for one, and one
:class:`~chanstore.backends.redis_history.RedisFollower` of histories, so a
daemon with thousands of channels holds a handful of connections, not a pool
per channel. An entry counts its backends; releasing the last one closes its
clients and its follower (those of an event loop on that loop, from whatever
thread releases). Every client retries once, for a pooled connection that
went stale while Redis restarted; the follower's own connection never does.

Apart from the backend because it is process-wide state that outlives any
one backend: a backend only acquires, asks and releases by its settings' key.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff

from chanstore.backends.redis_history import FOLLOW_BLOCK_SECONDS, RedisFollower

__all__ = ["SharedPools", "pools"]


@dataclass
class _Shared:
    """One shared pool: its sync client, its users, and an asyncio client and a follower
    of histories once asked for (each on the event loop that asked)."""

    args: dict[str, Any]
    client: redis.Redis
    users: int = 0
    async_client: redis.asyncio.Redis | None = None
    loop: asyncio.AbstractEventLoop | None = None
    follower: RedisFollower | None = None


class SharedPools:
    """Connection pools shared by every backend with the same settings, counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[tuple[Any, ...], _Shared] = {}

    def acquire(self, key: tuple[Any, ...], args: dict[str, Any]) -> redis.Redis:
        with self._lock:
            shared = self._pools.get(key)
            if shared is None:
                shared = self._pools[key] = _Shared(args, _new_client(args))
            shared.users += 1
            return shared.client

    def async_client(self, key: tuple[Any, ...]) -> redis.asyncio.Redis:
        """The asyncio client of pool ``key`` for the running event loop (made on first use)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            shared = self._pools[key]
            if shared.async_client is None or shared.loop is not loop:
                shared.async_client, shared.loop = _new_client(shared.args, redis.asyncio), loop
            return shared.async_client

    def follower(self, key: tuple[Any, ...], where: str) -> RedisFollower:
        """The follower of pool ``key``'s histories on the running event loop (made on first use).

        It reads over a connection of its own (see :func:`_follower_client`)
        and interrupts its reads through the pool's asyncio client. It lives
        as long as the pool: releasing the pool's last backend closes it.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            shared = self._pools[key]
            follower = shared.follower
            if follower is None or follower.closed or follower.loop is not loop:
                if follower is not None and not follower.closed:
                    _close_on_loop(follower.close, follower.loop)
                args = shared.args
                follower = shared.follower = RedisFollower(
                    lambda: _follower_client(args), lambda: self.async_client(key), where=where
                )
            return follower

    def release(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            shared = self._pools[key]
            shared.users -= 1
            if shared.users:
                return
            del self._pools[key]
        shared.client.close()
        shared.client.connection_pool.disconnect()
        if shared.follower is not None:
            _close_on_loop(shared.follower.close, shared.follower.loop)
        if shared.async_client is not None and shared.loop is not None:
            _close_on_loop(shared.async_client.aclose, shared.loop)


def _new_client(args: dict[str, Any], flavour: Any = redis) -> Any:
    """A client for ``args``: ``redis.Redis``, or with ``flavour=redis.asyncio`` its twin."""
    # One quick retry covers a pooled connection that went stale while Redis
    # restarted; anything longer is an outage that callers should hear about.
    retry_class = redis.asyncio.retry.Retry if flavour is redis.asyncio else redis.retry.Retry
    retry = retry_class(NoBackoff(), 1)
    if "url" in args:
        args = dict(args)
        return flavour.Redis.from_url(args.pop("url"), retry=retry, **args)
    return flavour.Redis(retry=retry, **args)


def _follower_client(args: dict[str, Any]) -> redis.asyncio.Redis:
    """The follower's own connection: one, no retries, a socket timeout beyond its block.

    Not from the pool: it spends its life blocked in ``XREAD``. Without
    retries it never reconnects behind the follower's back, so the ``CLIENT
    ID`` that interrupts it stays right; a failure ends the follows instead.
    """
    options = dict(args)
    options["socket_timeout"] = FOLLOW_BLOCK_SECONDS + max(float(args["socket_timeout"]), 1.0)
    retry = redis.asyncio.retry.Retry(NoBackoff(), 0)
    url = options.pop("url", None)
    if url is not None:
        return redis.asyncio.Redis.from_url(url, retry=retry, single_connection_client=True,
                                            **options)  # fmt: skip
    return redis.asyncio.Redis(retry=retry, single_connection_client=True, **options)


#: Closing asyncio clients and followers, kept until done (the loop holds tasks only weakly).
_closing: set[asyncio.Future[Any]] = set()


def _close_on_loop(
    close: Callable[[], Coroutine[Any, Any, Any]], loop: asyncio.AbstractEventLoop
) -> None:
    """Run ``close()`` (an asyncio client's or a follower's) on its own loop, from that loop
    or any other thread."""
    if loop.is_closed() or not loop.is_running():
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
