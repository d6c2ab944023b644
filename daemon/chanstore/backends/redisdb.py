"""The redis backend: one Redis hash per domain, in one logical database.

A domain's keys are the fields of the hash ``<key_prefix><domain>`` (prefix
``chanstore:`` by default). The domain is the whole rest of the name, so no
two domains can share a hash whatever characters they hold, and every domain
lives in the configured ``db``: the original derived a database index from
``hash(domain)``, which changes between Python processes and lands on
databases that do not exist.

Values are compact type-marked JSON. Loading a domain is one ``HGETALL``,
listing its keys one ``HKEYS``; ``KEYS`` is never used.

Every write (single, bulk, conditional, several domains at once) runs one
Lua script, :data:`WRITE_SCRIPT`, once per domain: it checks the change's
expectations, and only if all hold stores the sets, removes the deletes and
appends one entry per change to the domain's history, the stream
``<key_prefix>-events:<domain>`` (see :mod:`chanstore.backends.redis_history`),
trimmed to about :attr:`~RedisDatabase.history_length` entries. So a
conditional write holds against every writer of the Redis, and the history
holds exactly the changes that were made, in their order. A value's ETag is
the SHA-1 of its stored bytes (:mod:`chanstore.versions`), which the script
computes as ``redis.sha1hex``. The hash itself is laid out as before: data
written by an earlier release loads unchanged, and its first write starts
the domain's history.

Backends with the same connection settings share one connection pool, so a
daemon with thousands of channels holds a handful of connections, not one
pool per channel; they also share one :class:`RedisFollower`, the single
connection that follows the histories the daemon's change feed watches.

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
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff

from chanstore import codec
from chanstore.backends.base import DatabaseInterface
from chanstore.backends.redis_history import FOLLOW_BLOCK_SECONDS, RedisFollower, RedisHistory
from chanstore.errors import (
    BackendError,
    BackendUnavailable,
    CorruptValue,
    IntegrityProblem,
    PreconditionFailed,
)
from chanstore.keys import check_key
from chanstore.versions import ANY, UNREADABLE, Change, Expectation, etag_of_stored

__all__ = ["EVENTS_SUFFIX", "MARKER_SUFFIX", "WRITE_SCRIPT", "RedisDatabase"]

_NONE = type(None)

#: The marker key's name after the key prefix: ``chanstore:-marker`` by default.
#: No domain of a MoobiusStorage (``service_...``) can be named so.
MARKER_SUFFIX = "-marker"
#: What follows the key prefix in a domain's history stream, before the domain:
#: ``chanstore:-events:<domain>``. No MoobiusStorage domain starts with "-", so
#: no domain's hash can be named so either.
EVENTS_SUFFIX = "-events:"

#: The one script every write runs, once per domain, atomically.
#:
#: ``KEYS``: the domain's hash, its history stream. ``ARGV``: the history's
#: ``MAXLEN ~``; how many expectations, sets and deletes follow; then each
#: expectation as a field and what it must hold (an ETag; ``*``: it exists;
#: an empty string: it is absent), each set as a field and its stored bytes,
#: and each delete as a field.
#:
#: When an expectation fails, nothing changes and the answer is ``0``
#: followed by each failed field and its current bytes (nil when absent), so
#: that the caller reports canonical ETags and recognises a foreign writer's
#: formatting of the expected document (see :class:`_Write`). Otherwise the
#: answer is ``1`` followed by the deleted fields that existed, and the
#: stream has one entry per change made: ``op set key <field> value <bytes>
#: etag <sha1>``, or ``op delete key <field>`` for a field that existed.
WRITE_SCRIPT = """
local hash, stream = KEYS[1], KEYS[2]
local maxlen = ARGV[1]
local n_expect, n_sets, n_deletes = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local at = 5
local failed = {0}
for _ = 1, n_expect do
  local field, expected = ARGV[at], ARGV[at + 1]
  at = at + 2
  local current = redis.call('HGET', hash, field)
  local holds
  if expected == '' then
    holds = not current
  elseif expected == '*' then
    holds = current ~= false
  else
    holds = current ~= false and redis.sha1hex(current) == expected
  end
  if not holds then
    failed[#failed + 1] = field
    failed[#failed + 1] = current
  end
end
if #failed > 1 then
  return failed
end
for _ = 1, n_sets do
  local field, value = ARGV[at], ARGV[at + 1]
  at = at + 2
  redis.call('HSET', hash, field, value)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
             'op', 'set', 'key', field, 'value', value, 'etag', redis.sha1hex(value))
end
local existed = {1}
for _ = 1, n_deletes do
  local field = ARGV[at]
  at = at + 1
  if redis.call('HDEL', hash, field) == 1 then
    existed[#existed + 1] = field
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'op', 'delete', 'key', field)
  end
end
return existed
"""
_WRITE_SHA = hashlib.sha1(WRITE_SCRIPT.encode(), usedforsecurity=False).hexdigest()
#: How an expectation is sent to the script: "" is "must be absent".
_ABSENT = ""
#: Rounds one batch of writes may take: a reload of the script (NOSCRIPT), then
#: one retry of the parts whose expected document a foreign writer formatted.
_MAX_ROUNDS = 3


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
    #: Every write is one script that checks its expectations first (:data:`WRITE_SCRIPT`).
    checks_conditions = True
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
        self.stream_name = f"{key_prefix}{EVENTS_SUFFIX}{domain}".encode()
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
        document otherwise, see :class:`_Write`). Returns the deleted keys
        that existed; raises :class:`~chanstore.errors.PreconditionFailed`
        with the failed keys' canonical ETags.
        """
        return self._apply(change)

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
        pipeline with one script call per domain instead of one round trip
        each. It is not a transaction (each part is atomic for its own
        domain, and the domains are independent). Returns each part's
        error, or None.
        """
        writes = [_Write(backend, Change(sets=items)) for backend, items in parts]
        _run_sync(parts[0][0], writes)
        return [write.error() for write in writes]

    @classmethod
    async def set_many_together_async(
        cls, parts: Sequence[tuple[RedisDatabase, Mapping[str, Any]]]
    ) -> list[BaseException | None]:
        """:meth:`set_many_together` on the running event loop, with redis-py's asyncio client.

        The write lanes use it to store a batch without handing it to a thread
        and back: on a busy event loop that hand-over (a thread waiting for
        the GIL) took longer than the round trip to Redis.
        """
        writes = [_Write(backend, Change(sets=items)) for backend, items in parts]
        await _run_async(parts[0][0], writes)
        return [write.error() for write in writes]

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
        writes = [_Write(backend, change) for backend, change in parts]
        _run_sync(parts[0][0], writes)
        return [write.result() for write in writes]

    @classmethod
    async def apply_if_together_async(
        cls, parts: Sequence[tuple[RedisDatabase, Change]]
    ) -> list[list[str] | BaseException]:
        """:meth:`apply_if_together` on the running event loop (see :attr:`stores_on_loop`)."""
        writes = [_Write(backend, change) for backend, change in parts]
        await _run_async(parts[0][0], writes)
        return [write.result() for write in writes]

    def delete_many(self, keys: Iterable[str]) -> list[str]:
        keys = list(keys)
        return self._apply(Change(deletes=keys)) if keys else []

    # -- history ---------------------------------------------------------------

    def change_history(self) -> RedisHistory:
        """This domain's history, the stream :attr:`stream_name` that every write appends to."""
        return RedisHistory(self.stream_name, self.client, reaching=self._reaching,
                            follower=self._follower)  # fmt: skip

    def _follower(self) -> RedisFollower:
        return _pools.follower(self._pool_key, self.where)

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

    def _apply(self, change: Change) -> list[str]:
        """Run ``change`` through the write script; the deleted keys that existed."""
        write = _Write(self, change)
        _run_sync(self, [write])
        return write.answer_or_raise()

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


class _Write:
    """One domain's :class:`~chanstore.versions.Change` on its way through :data:`WRITE_SCRIPT`.

    Built from the change (keys checked, values encoded: a part that cannot
    be sent has its error as its answer at once), it gives the script call
    to send and takes the script's reply, until it has its answer: the
    deleted keys that existed, or an error.

    A foreign writer (``redis-cli HSET`` with pretty-printed JSON) stores a
    document in bytes whose SHA-1 is not the ETag chanstore gives the same
    document (the SHA-1 of its compact form, which is what every reader
    computes). When an expected ETag fails on such bytes but the compact
    form of what is stored has that ETag, the write is sent once more
    expecting exactly those stored bytes: still one atomic check, now of the
    document the caller saw. Conflicts are reported with canonical ETags
    (:data:`~chanstore.versions.UNREADABLE` for bytes that are not JSON).
    """

    __slots__ = ("answer", "arguments", "backend", "expect", "retried", "sent_expect")

    def __init__(self, backend: RedisDatabase, change: Change) -> None:
        self.backend = backend
        self.answer: list[str] | BaseException | None = None
        self.retried = False
        self.expect: dict[str, Expectation] = {}
        self.sent_expect: dict[str, str] = {}
        self.arguments: list[Any] = []
        try:
            self.expect = {check_key(key): expected for key, expected in change.expect.items()}
            self.sent_expect = {key: _sent(expected) for key, expected in self.expect.items()}
            sets = [(check_key(key), codec.encode(value)) for key, value in change.sets.items()]
            deletes = [check_key(key) for key in change.deletes]
        except Exception as exc:  # noqa: BLE001 - this part's answer; nothing of it is sent
            self.answer = exc
            return
        if not sets and not deletes and not self.expect:
            self.answer = []  # nothing to check or change: no round trip
            return
        arguments: list[Any] = [len(sets), len(deletes)]
        for pair in sets:
            arguments.extend(pair)
        arguments.extend(deletes)
        self.arguments = arguments

    def command(self, by_text: bool) -> tuple[Any, ...]:
        """The script call: by its SHA-1, or (after a NOSCRIPT) by its text, which loads it."""
        backend = self.backend
        expectations: list[str] = []
        for key, sent in self.sent_expect.items():
            expectations.append(key)
            expectations.append(sent)
        head = ("EVAL", WRITE_SCRIPT) if by_text else ("EVALSHA", _WRITE_SHA)
        return (*head, 2, backend.hash_name, backend.stream_name,
                max(1, int(backend.history_length)), len(self.sent_expect),
                *self.arguments[:2], *expectations, *self.arguments[2:])  # fmt: skip

    def take(self, reply: Any) -> bool:
        """Take the script's reply; False when the call must be sent again."""
        if isinstance(reply, redis.exceptions.NoScriptError):
            return False  # the script did not run at all: sending it again is safe
        if isinstance(reply, BaseException):
            self.answer = reply
            return True
        if reply[0] == 1:
            self.answer = [field.decode("utf-8") for field in reply[1:]]
            return True
        failed: dict[str, str | None] = {}
        formatted: dict[str, str] = {}
        for index in range(1, len(reply), 2):
            key = reply[index].decode("utf-8")
            stored = reply[index + 1]
            current = None if stored is None else _canonical_etag(stored)
            expected = self.expect.get(key)
            if (stored is not None and current == expected and current != UNREADABLE
                    and not self.retried):  # fmt: skip
                formatted[key] = etag_of_stored(stored)
            else:
                failed[key] = current
        if failed or not formatted:
            self.answer = PreconditionFailed(failed)
            return True
        self.retried = True
        self.sent_expect.update(formatted)
        return False

    def result(self) -> list[str] | BaseException:
        """The answer, once there is one."""
        if self.answer is None:
            return BackendError("the write was not sent")
        return self.answer

    def error(self) -> BaseException | None:
        """The answer as ``set_many`` parts give it: the error, or None."""
        answer = self.result()
        return answer if isinstance(answer, BaseException) else None

    def answer_or_raise(self) -> list[str]:
        answer = self.result()
        if isinstance(answer, BaseException):
            raise answer
        return answer


def _sent(expected: Expectation) -> str:
    """An expectation as the script takes it: an ETag, ``*``, or "" for "absent"."""
    if expected is None:
        return _ABSENT
    if not isinstance(expected, str):
        raise TypeError(f"an expectation is an ETag, {ANY!r} or None, not {expected!r}")
    # "" is no ETag (and would read as "absent"): like any unknown one, it never holds.
    return expected or UNREADABLE


def _canonical_etag(stored: bytes) -> str:
    """The ETag every reader gives the document stored as ``stored``: that of its compact form."""
    try:
        return etag_of_stored(codec.encode(codec.decode(stored, revive=False)))
    except (ValueError, TypeError):
        return UNREADABLE


class _Round:
    """The writes of one batch still waiting for their answers, round after round."""

    def __init__(self, writes: Sequence[_Write]) -> None:
        self.pending = [write for write in writes if write.answer is None]
        self.by_text = False
        self.rounds = 0

    def commands(self) -> list[tuple[Any, ...]]:
        return [write.command(self.by_text) for write in self.pending]

    def take(self, replies: Sequence[Any]) -> None:
        self.rounds += 1
        # After a NOSCRIPT (a restarted Redis, SCRIPT FLUSH) the next round sends the
        # text, which loads the script for every later EVALSHA: no SCRIPT LOAD round trip.
        self.by_text = any(isinstance(r, redis.exceptions.NoScriptError) for r in replies)
        self.pending = [write for write, reply in zip(self.pending, replies, strict=True)
                        if not write.take(reply)]  # fmt: skip
        if self.pending and self.rounds >= _MAX_ROUNDS:
            for write in self.pending:
                write.answer = BackendError(
                    f"the write script did not run in {self.rounds} attempts (its cache was "
                    "flushed each time)"
                )
            self.pending = []

    def failed(self, exc: BaseException) -> None:
        """The round trip failed: every write still waiting has that error as its answer."""
        for write in self.pending:
            write.answer = exc
        self.pending = []


def _run_sync(backend: RedisDatabase, writes: Sequence[_Write]) -> None:
    """Send ``writes`` (of ``backend``'s connection pool): one script call each, one round trip.

    A batch of several goes as one non-transactional pipeline. redis-py's
    own script support is not used for it: a pipeline holding a ``Script``
    asks ``SCRIPT EXISTS`` first, a round trip more for every batch.
    """
    batch = _Round(writes)
    client = backend.client
    while batch.pending:
        commands = batch.commands()
        try:
            with backend._reaching():
                if len(commands) == 1:
                    try:
                        replies = [client.execute_command(*commands[0])]
                    except redis.ResponseError as exc:  # NOSCRIPT, WRONGTYPE: that write's answer
                        replies = [exc]
                else:
                    pipe = client.pipeline(transaction=False)
                    for command in commands:
                        pipe.execute_command(*command)
                    replies = pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - the round trip failed for every part
            batch.failed(exc)
            return
        batch.take(replies)


async def _run_async(backend: RedisDatabase, writes: Sequence[_Write]) -> None:
    """:func:`_run_sync` with the pool's asyncio client, on the running event loop."""
    batch = _Round(writes)
    if not batch.pending:
        return
    client = _pools.async_client(backend._pool_key)
    while batch.pending:
        commands = batch.commands()
        try:
            with backend._reaching():
                if len(commands) == 1:
                    try:
                        replies = [await client.execute_command(*commands[0])]
                    except redis.ResponseError as exc:  # NOSCRIPT, WRONGTYPE: that write's answer
                        replies = [exc]
                else:
                    pipe = client.pipeline(transaction=False)
                    for command in commands:
                        pipe.execute_command(*command)
                    replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - the round trip failed for every part
            batch.failed(exc)
            return
        batch.take(replies)


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


def _redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    return f"{scheme}{sep}{location}" if at and credentials else url


_pools = _SharedPools()
