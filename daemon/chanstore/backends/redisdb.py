"""The redis backend: one Redis hash per domain, in one logical database.

A domain's keys are the fields of the hash ``<key_prefix><domain>`` (prefix
``chanstore:`` by default). The domain is the whole rest of the name, so no
two domains can share a hash whatever characters they hold, and every domain
lives in the configured ``db``: the original derived a database index from
``hash(domain)``, which changes between Python processes and lands on
databases that do not exist.

Values are compact type-marked JSON. Loading a domain is one ``HGETALL``,
listing its keys one ``HKEYS``; ``KEYS`` is never used.

Backends with the same connection settings share one connection pool, so a
daemon with thousands of channels holds a handful of connections, not one
pool per channel.

A Redis that lost what chanstore stored (``FLUSHALL``, a restart without
persistence, a failover to a replica that never had the data) answers every
read with "absent", which looks like an empty channel. To tell the two apart,
the daemon's readiness probe keeps a *marker* key per key prefix and database
(``<key_prefix>-marker``, see :class:`_Marker`) and reports a
``data_lost`` :class:`~chanstore.errors.IntegrityProblem` when it vanishes or
changes. Reads and writes never touch it: the check costs one round trip per
probe, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff

from chanstore import codec
from chanstore.backends.base import DatabaseInterface
from chanstore.errors import BackendUnavailable, CorruptValue, IntegrityProblem
from chanstore.keys import check_key

__all__ = ["MARKER_SUFFIX", "RedisDatabase"]

_NONE = type(None)

#: The marker key's name after the key prefix: ``chanstore:-marker`` by default.
#: No domain of a MoobiusStorage (``service_...``) can be named so.
MARKER_SUFFIX = "-marker"


class RedisDatabase(DatabaseInterface):
    """Values in Redis.

    Settings: ``host``, ``port``, ``db``, ``username``, ``password`` or ``url``
    (``redis://[[user]:password@]host:port/db``, ``rediss://`` for TLS,
    ``unix://path``); ``socket_timeout`` and ``socket_connect_timeout`` in
    seconds; ``key_prefix`` for the hash names.
    """

    engine_name = "redis"
    INTEGRITY_KINDS = ("corrupt_value", "data_lost")
    #: What integrity_problems() saw; made by its first call (only a readiness probe
    #: asks, so the thousands of backends of channels in memory carry nothing of it).
    _marker: _Marker | None = None
    #: set_many_together_async uses redis-py's asyncio client, on the running loop.
    stores_on_loop = True
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
    }

    def __init__(
        self,
        domain: str = "",
        host: str = "localhost",
        port: int = 6379,
        db: int = 0,
        password: str | None = None,
        *,
        username: str | None = None,
        url: str | None = None,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 2.0,
        key_prefix: str = "chanstore:",
        **kwargs: Any,
    ) -> None:
        super().__init__(domain, **kwargs)
        self.hash_name = f"{key_prefix}{domain}".encode()
        self.key_prefix = key_prefix
        options = {
            "socket_timeout": float(socket_timeout),
            "socket_connect_timeout": float(socket_connect_timeout),
        }
        if url:
            self.where = _redacted(url)
            pool_key: tuple[Any, ...] = ("url", url, *options.values())
            self._pool_args: dict[str, Any] = {"url": url, **options}
        else:
            # The original's default password "" means "no password".
            password = password or None
            self.where = f"{host}:{port}/{db}"
            pool_key = (host, port, db, username, password, *options.values())
            self._pool_args = {"host": host, "port": port, "db": db, "username": username,
                               "password": password, **options}  # fmt: skip
        self._pool_key = pool_key
        self.client = _pools.acquire(pool_key, self._pool_args)
        self._closed = False

    # -- the four ------------------------------------------------------------

    def get_value(self, key: str) -> tuple[bool, Any]:
        with self._reaching():
            data = self.client.hget(self.hash_name, check_key(key))
        if data is None:
            raise KeyError(key)
        return True, self._decode(key, data)

    def set_value(self, key: str, value: Any) -> tuple[bool, Any]:
        data = codec.encode(value)
        with self._reaching():
            self.client.hset(self.hash_name, check_key(key), data)
        return True, key

    def delete_key(self, key: str) -> tuple[bool, Any]:
        with self._reaching():
            removed = self.client.hdel(self.hash_name, check_key(key))
        if not removed:
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
        if not items:
            return
        mapping = {check_key(key): codec.encode(value) for key, value in items.items()}
        with self._reaching():
            self.client.hset(self.hash_name, mapping=mapping)

    @property
    def together_key(self) -> tuple[Any, ...]:
        """Backends with equal keys share a connection pool: one pipeline can store for all."""
        return self._pool_key

    @classmethod
    def set_many_together(
        cls, parts: Sequence[tuple[RedisDatabase, Mapping[str, Any]]]
    ) -> list[BaseException | None]:
        """``set_many`` for several domains of one connection pool, in one round trip.

        For the daemon's write lanes, whose batches span many channels: one
        pipeline with one HSET per domain instead of one round trip each. It
        is not a transaction (each HSET is atomic for its own domain, and the
        domains are independent). Returns each part's error, or None.
        """
        pipe = parts[0][0].client.pipeline(transaction=False)
        errors, sent = _queue_hsets(pipe, parts)
        if sent:
            try:
                with parts[0][0]._reaching():
                    replies = pipe.execute(raise_on_error=False)
            except Exception as exc:  # noqa: BLE001 - the round trip failed for every part
                replies = [exc] * len(sent)
            _note_replies(errors, sent, replies)
        return errors

    @classmethod
    async def set_many_together_async(
        cls, parts: Sequence[tuple[RedisDatabase, Mapping[str, Any]]]
    ) -> list[BaseException | None]:
        """:meth:`set_many_together` on the running event loop, with redis-py's asyncio client.

        The write lanes use it to store a batch without handing it to a thread
        and back: on a busy event loop that hand-over (a thread waiting for
        the GIL) took longer than the round trip to Redis.
        """
        pipe = _pools.async_client(parts[0][0]._pool_key).pipeline(transaction=False)
        errors, sent = _queue_hsets(pipe, parts)
        if sent:
            try:
                with parts[0][0]._reaching():
                    replies = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # noqa: BLE001 - the round trip failed for every part
                replies = [exc] * len(sent)
            _note_replies(errors, sent, replies)
        return errors

    def delete_many(self, keys: Iterable[str]) -> list[str]:
        keys = [check_key(key) for key in keys]
        if not keys:
            return []
        with self._reaching():
            # One atomic round trip that also says which keys were there.
            pipe = self.client.pipeline(transaction=True)
            pipe.hmget(self.hash_name, keys)
            pipe.hdel(self.hash_name, *keys)
            present, _removed = pipe.execute()
        return [key for key, data in zip(keys, present, strict=True) if data is not None]

    # -- life cycle ------------------------------------------------------------

    def check_available(self) -> None:
        with self._reaching():
            self.client.ping()

    def integrity_problems(self) -> list[IntegrityProblem]:
        """``data_lost`` when the database lost what chanstore stored since the last call.

        The first call only notes the database's marker (writing one if there
        is none: a Redis that was empty from the start lost nothing); every
        later call compares. One round trip; the daemon's readiness probe
        calls it every few seconds, so each instance remembers its own view
        and every daemon sharing the Redis notices a loss by itself.
        """
        marker = self._marker
        if marker is None:
            name = f"{self.key_prefix}{MARKER_SUFFIX}".encode()
            marker = self._marker = _Marker(name, self.where)
        with self._reaching():
            problem = marker.check(self.client)
        return [] if problem is None else [problem]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _pools.release(self._pool_key)

    def __repr__(self) -> str:
        return f"RedisDatabase(where={self.where!r}, hash={self.hash_name.decode()!r})"

    # -- internals -------------------------------------------------------------

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """Say which Redis could not be reached, not just that a socket failed."""
        try:
            yield
        except redis.AuthenticationError as exc:
            # redis-py derives it from ConnectionError, but Redis answered: it is
            # the credentials that are wrong, not the network.
            error = BackendUnavailable(f"Redis at {self.where} refused the credentials: {exc}")
            error.kind = "permission"
            raise error from exc
        except redis.TimeoutError as exc:
            error = BackendUnavailable(f"Redis at {self.where} did not answer in time: {exc}")
            error.kind = "timeout"
            raise error from exc
        except redis.ConnectionError as exc:
            raise BackendUnavailable(f"Redis at {self.where} is unreachable: {exc}") from exc

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


class _Marker:
    """Whether one Redis database still holds what chanstore stored under one key prefix.

    The marker is a string key holding a token that no other database can
    hold (a random id, with when and by whom it was written, for a person
    who looks). Data and marker go together: ``FLUSHALL``/``FLUSHDB``, a
    restart without persistence and a failover to a replica that never had
    the data take both, while a restart that reloads the data (AOF or RDB)
    and a failover to a replica that has it bring the marker back too.

    Each check writes a marker if there is none (``SET NX``), reads the one
    there, and reads the server's ``run_id`` (only to word the message), in
    one round trip. The token seen first is adopted; a later one that
    differs means the data this process saw is gone: the marker vanished
    (this check wrote a new one) or was replaced (another daemon sharing the
    Redis noticed first and wrote a new one, or an older backup was
    restored). The new token is adopted, so one loss is told once.

    Not seen: a loss while no chanstore watched (the marker is gone with the
    data, and a new daemon adopts the empty database), deleting single keys,
    and the writes a snapshot-only Redis loses in a crash (the snapshot
    brings an old marker back with old data).
    """

    def __init__(self, name: bytes, where: str) -> None:
        self.name = name
        self.where = where
        self.seen: bytes | None = None
        self.run_id: str | None = None
        # Two readiness checks may overlap: one loss is still told once.
        self._lock = threading.Lock()

    def check(self, client: redis.Redis) -> IntegrityProblem | None:
        pipe = client.pipeline(transaction=False)
        pipe.set(self.name, _new_marker(), nx=True)
        pipe.get(self.name)
        pipe.info("server")
        with self._lock:
            armed, current, info = pipe.execute(raise_on_error=False)
            if isinstance(current, Exception):
                raise current  # WRONGTYPE, NOPERM: the marker cannot be read at all
            run_id = info.get("run_id") if isinstance(info, dict) else None
            seen, self.seen = self.seen, current
            old_run_id, self.run_id = self.run_id, run_id or self.run_id
            if seen is None or current == seen:
                return None
        gone = armed is True or current is None  # this check found no marker at all
        return IntegrityProblem("data_lost", self._message(gone, old_run_id, run_id))

    def _message(self, gone: bool, old_run_id: str | None, run_id: str | None) -> str:
        name = self.name.decode(errors="replace")
        if old_run_id and run_id and old_run_id != run_id:
            how = (f"restarted (run_id {old_run_id[:8]} -> {run_id[:8]}) without it: it does "
                   "not persist its data, a replica that never had it took over, or an older "
                   "backup was restored")  # fmt: skip
        elif gone:
            how = ("lost it while it ran (run_id unchanged): FLUSHALL, FLUSHDB, an eviction "
                   f"policy other than noeviction, or a deleted key {name!r}")  # fmt: skip
        else:
            how = (f"holds another marker in {name!r}: another daemon found the data lost "
                   "first, or the database was replaced")  # fmt: skip
        return f"Redis at {self.where} no longer holds the data chanstore stored there; it {how}"


def _new_marker() -> bytes:
    """A marker token no other database holds, readable by a person who finds it."""
    return json.dumps({
        "chanstore": "if this key is gone, so is the data chanstore stored in this database",
        "id": uuid.uuid4().hex,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": f"{socket.gethostname()} pid {os.getpid()}",
    }, separators=(",", ":")).encode()  # fmt: skip


def _queue_hsets(
    pipe: Any, parts: Sequence[tuple[RedisDatabase, Mapping[str, Any]]]
) -> tuple[list[BaseException | None], list[int]]:
    """Queue one HSET per part on ``pipe``: each part's error so far, and the parts sent.

    An unstorable value fails its own part only, and nothing of that part is sent.
    """
    errors: list[BaseException | None] = [None] * len(parts)
    sent: list[int] = []
    for index, (backend, items) in enumerate(parts):
        try:
            mapping = {check_key(key): codec.encode(value) for key, value in items.items()}
        except Exception as exc:  # noqa: BLE001 - that part's answer; the others go on
            errors[index] = exc
            continue
        if mapping:
            pipe.hset(backend.hash_name, mapping=mapping)
            sent.append(index)
    return errors, sent


def _note_replies(errors: list[BaseException | None], sent: list[int], replies: list[Any]) -> None:
    for index, reply in zip(sent, replies, strict=True):
        if isinstance(reply, Exception):
            errors[index] = reply


@dataclass
class _Shared:
    """One shared pool: its sync client, its users, and an asyncio client once asked for."""

    args: dict[str, Any]
    client: redis.Redis
    users: int = 0
    async_client: redis.asyncio.Redis | None = None
    loop: asyncio.AbstractEventLoop | None = None


class _SharedPools:
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

    def release(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            shared = self._pools[key]
            shared.users -= 1
            if shared.users:
                return
            del self._pools[key]
        shared.client.close()
        shared.client.connection_pool.disconnect()
        if shared.async_client is not None and shared.loop is not None:
            _close_on_loop(shared.async_client, shared.loop)


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


#: Closing asyncio clients, kept until done (the loop holds tasks only weakly).
_closing: set[asyncio.Future[Any]] = set()


def _close_on_loop(client: redis.asyncio.Redis, loop: asyncio.AbstractEventLoop) -> None:
    """Close an asyncio client on its own loop, from that loop or any other thread."""
    if loop.is_closed() or not loop.is_running():
        return  # its connections went with the loop
    try:
        on_loop = asyncio.get_running_loop() is loop
    except RuntimeError:
        on_loop = False
    closing: asyncio.Future[Any]
    if on_loop:
        closing = loop.create_task(client.aclose())
    else:
        closing = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(client.aclose(), loop),
                                      loop=loop)  # fmt: skip
    _closing.add(closing)
    closing.add_done_callback(_closing.discard)


def _redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    return f"{scheme}{sep}{location}" if at and credentials else url


_pools = _SharedPools()
