"""The redis backend's writes: the Lua script every change runs; how a batch is sent and answered.

Every write of :class:`~chanstore.backends.redisdb.RedisDatabase` (single,
bulk, conditional, several domains at once) becomes one :class:`Write` per
domain: a call of :data:`WRITE_SCRIPT`, which checks the change's
expectations and makes it, history entries included, in one atomic step.
:func:`send_writes` sends a batch of them in one round trip (every command
in one packet on one pooled connection) and :func:`send_writes_async` does
the same with redis-py's asyncio client on the running event loop; with
``min_replicas``, the packet ends with ``WAIT``
(:mod:`chanstore.backends.redis_wait`). A round whose connection fails or
whose replies do not come in time is never sent again behind the caller's
back (:mod:`chanstore.backends.redis_rounds`, the one way a write reaches a
Redis server): Redis may have made it, and made again it would leave two
changes in the history, or answer a conditional write 412 to its own value.
Its writes fail (the daemon's 503), as in a cluster. Consecutive parts of one
domain (a key written again and again) are one write (:func:`joined_writes`).
A write made only of unconditional sets of large values goes as a
``MULTI``/``EXEC`` transaction of the same commands instead (see
:data:`TRANSACTION_BYTES`). Both take the replies and send again only what
Redis answered it did not make: a round after a ``NOSCRIPT`` goes by the
script's text, which loads it, and a write whose expected document a foreign
writer formatted otherwise goes once more (see :class:`Write`), in at most
three rounds. In a cluster the same
:class:`Write` objects go to their slots' primaries instead
(:mod:`chanstore.backends.redis_cluster`).

Apart from the backend because this is the exchange of a write with Redis,
whoever asks for it: it holds no connection pools and decodes no reads. The
backend hands it the client and ``reaching``, the context that words a
connection error as the backend's, as it does for
:mod:`chanstore.backends.redis_history`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import redis
import redis.asyncio

from chanstore import codec
from chanstore.backends import redis_invalidations as invalidations
from chanstore.backends.redis_invalidations import channel_of
from chanstore.backends.redis_rounds import round_trip, round_trip_async
from chanstore.backends.redis_wait import ReplicaWait
from chanstore.errors import BackendError, BackendUnavailable, PreconditionFailed
from chanstore.keys import check_key
from chanstore.versions import (
    ANY,
    UNREADABLE,
    Change,
    Expectation,
    etag_of_stored,
    stored_with_etag,
)

__all__ = [
    "TRANSACTION_BYTES",
    "WRITE_SCRIPT",
    "Write",
    "WriteTarget",
    "joined_writes",
    "not_overtaken",
    "send_writes",
    "send_writes_async",
]

#: The one script every write runs, once per domain, atomically.
#:
#: ``KEYS``: the domain's hash, its history stream. ``ARGV``: the history's
#: ``MAXLEN ~``; how many expectations, sets and deletes follow; the channel
#: of invalidations and this process's origin (see below); then each
#: expectation as a field and what it must hold (an ETag; ``*``: it exists;
#: an empty string: it is absent), each set as a field, its stored bytes and
#: their ETag, and each delete as a field. The writer hashes what it stores
#: (it answers that ETag anyway): ``redis.sha1hex`` of a large value would
#: hold up the server, which runs one script at a time, for longer than the
#: write itself.
#:
#: When an expectation fails, nothing changes and the answer is ``0``
#: followed by each failed field and its current bytes (nil when absent), so
#: that the caller reports canonical ETags and recognises a foreign writer's
#: formatting of the expected document (see :class:`Write`). Otherwise the
#: answer is ``1`` followed by the deleted fields that existed, and the
#: stream has one entry per change made: ``op set key <field> value <bytes>
#: etag <sha1>``, or ``op delete key <field>`` for a field that existed.
#:
#: When something changed (a set, or the delete of a field that existed), the
#: script also publishes one invalidation on the channel
#: ``<key_prefix>-invalidations``: the origin, the hash's name and every
#: changed field, joined by NUL, which none of them can hold (see
#: :mod:`chanstore.backends.redis_invalidations`, whose link delivers it to
#: the other daemons). Inside the script, so that it is published exactly when
#: the change is made, before the writer hears of it, in the same round trip.
WRITE_SCRIPT = """
local hash, stream = KEYS[1], KEYS[2]
local maxlen = ARGV[1]
local n_expect, n_sets, n_deletes = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local channel, origin = ARGV[5], ARGV[6]
local at = 7
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
local changed = {origin, hash}
for _ = 1, n_sets do
  local field, value, etag = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  at = at + 3
  redis.call('HSET', hash, field, value)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
             'op', 'set', 'key', field, 'value', value, 'etag', etag)
  changed[#changed + 1] = field
end
local existed = {1}
for _ = 1, n_deletes do
  local field = ARGV[at]
  at = at + 1
  if redis.call('HDEL', hash, field) == 1 then
    existed[#existed + 1] = field
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'op', 'delete', 'key', field)
    changed[#changed + 1] = field
  end
end
if #changed > 2 then
  redis.call('PUBLISH', channel, table.concat(changed, string.char(0)))
end
return existed
"""
_WRITE_SHA = hashlib.sha1(WRITE_SCRIPT.encode(), usedforsecurity=False).hexdigest()
#: A write of only unconditional sets, of this many value bytes or more, goes as a
#: ``MULTI``/``EXEC`` transaction of the script's own commands (``HSET``, an ``XADD`` per
#: set, ``PUBLISH``): as atomic, and the values reach those commands directly. Redis's Lua
#: interns every string a script is given, hashing each of its bytes: of Redis's time per
#: write that was a third at 100 KB and half at 900 KB (300 against 200 µs, 2.35 against
#: 1.2 ms), time in which Redis serves no one else. Below it the script's one reply costs
#: the client less than a transaction's five.
TRANSACTION_BYTES = 16 * 1024
#: How an expectation is sent to the script: "" is "must be absent".
_ABSENT = ""
#: Rounds one batch of writes may take: a reload of the script (NOSCRIPT), then
#: one retry of the parts whose expected document a foreign writer formatted.
_MAX_ROUNDS = 3


class WriteTarget(Protocol):
    """What a :class:`Write` needs of its backend: the domain's hash and history stream, how
    many entries the history keeps (read at each send, as the backend holds it then), and the
    key prefix, whose channel the script publishes invalidations on."""

    hash_name: bytes
    stream_name: bytes
    history_length: int
    key_prefix: str


class Write:
    """One domain's :class:`~chanstore.versions.Change` on its way through :data:`WRITE_SCRIPT`.

    Built from the change (keys checked, values encoded: a part that cannot
    be sent has its error as its answer at once), it gives the commands to
    send (the script call) and takes their replies, round after round, until
    it has its answer: the deleted keys that existed, or an error.

    Only unconditional sets of :data:`TRANSACTION_BYTES` or more go as a
    transaction instead. Redis runs a transaction's commands even after one of
    them failed: if ``HSET`` fails (a foreign writer made the hash another
    type; the script would have stopped there), the write's answer is that
    error and a second round deletes the history entries the ``XADD`` made
    anyway, so that no watcher is told of a change that was not made.

    A foreign writer (``redis-cli HSET`` with pretty-printed JSON) stores a
    document in bytes whose SHA-1 is not the ETag chanstore gives the same
    document (the SHA-1 of its compact form, which is what every reader
    computes). When an expected ETag fails on such bytes but the compact
    form of what is stored has that ETag, the write is sent once more
    expecting exactly those stored bytes: still one atomic check, now of the
    document the caller saw. Conflicts are reported with canonical ETags
    (:data:`~chanstore.versions.UNREADABLE` for bytes that are not JSON).
    """

    __slots__ = ("answer", "arguments", "backend", "expect", "fields", "phantoms", "retried",
                 "sent", "sent_expect", "sets", "unmade")  # fmt: skip

    def __init__(self, backend: WriteTarget, change: Change,
                 sets: Sequence[tuple[str, Any]] | None = None) -> None:  # fmt: skip
        """``sets``, when given, are made in place of ``change.sets``: in order, and a key
        may repeat (each of its values made and recorded in the history in turn)."""
        self.backend = backend
        self.answer: list[str] | BaseException | None = None
        #: The keys it checks or changes (see :func:`not_overtaken`).
        self.fields: frozenset[str] = frozenset()
        self.retried = False
        self.expect: dict[str, Expectation] = {}
        self.sent_expect: dict[str, str] = {}
        self.arguments: list[Any] = []
        #: The sets, when they go as a transaction; the commands sent in the last round.
        self.sets: list[tuple[str, bytes, str]] = []
        self.sent = 0
        #: History entries a failed transaction made anyway, and that failure.
        self.phantoms: list[Any] = []
        self.unmade: BaseException | None = None
        try:
            self.expect = {check_key(key): expected for key, expected in change.expect.items()}
            self.sent_expect = {key: _sent(expected) for key, expected in self.expect.items()}
            pairs = change.sets.items() if sets is None else sets
            triples = [(check_key(key), *stored_with_etag(value)) for key, value in pairs]
            deletes = [check_key(key) for key in change.deletes]
        except Exception as exc:  # noqa: BLE001 - this part's answer; nothing of it is sent
            self.answer = exc
            return
        self.fields = frozenset((*self.expect, *(triple[0] for triple in triples), *deletes))
        if not triples and not deletes and not self.expect:
            self.answer = []  # nothing to check or change: no round trip
            return
        if (not deletes and not self.expect
                and sum(len(triple[1]) for triple in triples) >= TRANSACTION_BYTES):  # fmt: skip
            self.sets = triples
            return
        arguments: list[Any] = [len(triples), len(deletes)]
        for triple in triples:
            arguments.extend(triple)
        arguments.extend(deletes)
        self.arguments = arguments

    def commands(self, by_text: bool) -> list[tuple[Any, ...]]:
        """This round's commands: the script call, the transaction, or the removal of the
        history entries a failed transaction made."""
        if self.phantoms:
            commands = [("XDEL", self.backend.stream_name, *self.phantoms)]
        elif self.sets:
            commands = self._transaction()
        else:
            commands = [self._script_call(by_text)]
        self.sent = len(commands)
        return commands

    def _transaction(self) -> list[tuple[Any, ...]]:
        """What the script does for unconditional sets, as a transaction."""
        backend = self.backend
        stream, maxlen = backend.stream_name, max(1, int(backend.history_length))
        # A key set more than once (writes joined) is sent once, with its last value, which
        # is what HSET would keep: a large value's earlier copies went to Redis for nothing.
        # Each value still goes to the history, in its own XADD.
        last = {field: stored for field, stored, _etag in self.sets}
        fields_and_values = [part for pair in last.items() for part in pair]
        changed = [field for field, _stored, _etag in self.sets]
        return [
            ("MULTI",),
            ("HSET", backend.hash_name, *fields_and_values),
            *(("XADD", stream, "MAXLEN", "~", maxlen, "*",
               "op", "set", "key", field, "value", stored, "etag", etag)
              for field, stored, etag in self.sets),
            ("PUBLISH", channel_of(backend.key_prefix),
             invalidations.payload(invalidations.ORIGIN, backend.hash_name, changed)),
            ("EXEC",),
        ]  # fmt: skip

    def decisive(self, replies: Sequence[Any]) -> Any:
        """The one reply of this round that says what happened: the script's; of a
        transaction, the first refusal (a redirection, ``EXECABORT``), else ``EXEC``'s."""
        return next((r for r in replies if isinstance(r, BaseException)), replies[-1])

    def _script_call(self, by_text: bool) -> tuple[Any, ...]:
        """The script call: by its SHA-1, or (after a NOSCRIPT) by its text, which loads it."""
        backend = self.backend
        expectations: list[str] = []
        for key, sent in self.sent_expect.items():
            expectations.append(key)
            expectations.append(sent)
        head = ("EVAL", WRITE_SCRIPT) if by_text else ("EVALSHA", _WRITE_SHA)
        return (*head, 2, backend.hash_name, backend.stream_name,
                max(1, int(backend.history_length)), len(self.sent_expect),
                *self.arguments[:2], channel_of(backend.key_prefix), invalidations.ORIGIN,
                *expectations, *self.arguments[2:])  # fmt: skip

    def take(self, replies: Sequence[Any]) -> bool:
        """Take this round's replies (as many as :meth:`commands` gave); False when the
        write must be sent again."""
        if self.phantoms:
            self.phantoms = []  # removed, or as gone as they can be: the failure stands
            self.answer = self.unmade
            return True
        if self.sets:
            return self._take_transaction(replies)
        return self._take_script_reply(replies[0])

    def _take_transaction(self, replies: Sequence[Any]) -> bool:
        executed = self.decisive(replies)
        if isinstance(executed, BaseException):  # refused whole: nothing was made
            self.answer = executed
            return True
        stored, *added = executed[:-1]  # HSET's, then each XADD's; PUBLISH's last
        if isinstance(stored, BaseException):
            self.unmade = stored
            self.phantoms = [entry for entry in added if not isinstance(entry, BaseException)]
            if self.phantoms:
                return False  # the next round deletes them, then answers the failure
            self.answer = stored
            return True
        # As with the script: the values are stored even if their history was not.
        self.answer = next((entry for entry in added if isinstance(entry, BaseException)), [])
        return True

    def _take_script_reply(self, reply: Any) -> bool:
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


def joined_writes(
    parts: Sequence[tuple[WriteTarget, Mapping[str, Any]]],
) -> tuple[list[Write], list[int]]:
    """The :class:`Write` of each run of consecutive ``set_many`` parts of one domain, and
    the index of each part's write.

    A key that many clients write at once (a health bar) reaches a backend as one part per
    write, each after the one before (the write lanes' runs). Joined, they are one script
    call that makes each value in turn and records each in the history, not one call, one
    reply and one invalidation each. Parts that cannot be joined (one holds a key or value
    that cannot be sent) are each a write of their own, so that only that one fails.
    """
    writes: list[Write] = []
    of_part: list[int] = []
    start = 0
    while start < len(parts):
        backend = parts[start][0]
        end = start + 1
        while end < len(parts) and parts[end][0] is backend:
            end += 1
        joined = None
        if end - start > 1:
            pairs = [pair for _backend, items in parts[start:end] for pair in items.items()]
            joined = Write(backend, Change(), sets=pairs)
        if joined is not None and not isinstance(joined.answer, BaseException):
            writes.append(joined)
            of_part.extend([len(writes) - 1] * (end - start))
        else:
            for index in range(start, end):
                writes.append(Write(backend, Change(sets=parts[index][1])))
                of_part.append(len(writes) - 1)
        start = end
    return writes, of_part


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
        return etag_of_stored(codec.encode_bytes(codec.decode(stored, revive=False)))
    except (ValueError, TypeError):
        return UNREADABLE


class _Round:
    """The writes of one batch still waiting for their answers, round after round."""

    def __init__(self, writes: Sequence[Write]) -> None:
        self.pending = [write for write in writes if write.answer is None]
        self.by_text = False
        self.rounds = 0

    def commands(self, wait: ReplicaWait | None = None) -> list[tuple[Any, ...]]:
        """This round's commands, write after write, and with ``wait`` its ``WAIT`` after them."""
        commands = [command for write in self.pending for command in write.commands(self.by_text)]
        if wait is not None:
            commands.append(wait.command())
        return commands

    def take(self, replies: Sequence[Any], wait: ReplicaWait | None = None,
             where: str = "") -> None:  # fmt: skip
        """Take the replies of :meth:`commands`: with ``wait``, the writes answered in
        this round are acknowledged only if its ``WAIT`` (the last reply) says so."""
        self.rounds += 1
        if wait is not None:
            replies, acknowledged = list(replies[:-1]), replies[-1]
        # After a NOSCRIPT (a restarted Redis, SCRIPT FLUSH) the next round sends the
        # text, which loads the script for every later EVALSHA: no SCRIPT LOAD round trip.
        self.by_text = any(isinstance(r, redis.exceptions.NoScriptError) for r in replies)
        answered = []
        pending = []
        at = 0
        for write in self.pending:
            (answered if write.take(replies[at : at + write.sent]) else pending).append(write)
            at += write.sent
        self.pending = not_overtaken(self.pending, pending)
        if wait is not None and answered and not wait.holds(acknowledged):
            wait.refuse(answered, acknowledged, where)
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


#: The answer of a write that did not run and that a later write of its key overtook.
OVERTAKEN = (
    "the write was not made: Redis did not run it (its script cache was emptied, or "
    "the key's slot moved) and ran a later write of the same key sent with it; "
    "sending it again now would undo that one"
)


def not_overtaken(sent: Sequence[Write], again: Sequence[Write]) -> list[Write]:
    """Of ``again``, the writes of one round trip (``sent``, in the order sent) that did not
    run and must be sent once more, those that may be: not one followed in the round by a
    write to one of its keys that was answered (made, or refused). Sent again, it would
    run after that one, out of order; it is answered :data:`OVERTAKEN` instead, as not made.

    A round holds several writes of one key when a write lane sends several runs of a
    batch at once (:attr:`~chanstore.backends.base.DatabaseInterface.keeps_part_order`).
    A write runs not at all on a ``NOSCRIPT`` (the script cache was emptied), a
    redirection in a cluster, or a check of a foreign writer's formatting; one round
    usually meets it for all of its writes, which then all go again, in order.
    """
    if not again or len(again) == len(sent):
        return list(again)
    waiting = {id(write) for write in again}
    answered_later: set[tuple[bytes, str]] = set()
    kept: list[Write] = []
    for write in reversed(sent):
        keys = {(write.backend.hash_name, field) for field in write.fields}
        if id(write) not in waiting:
            answered_later |= keys
        elif write.phantoms or answered_later.isdisjoint(keys):
            kept.append(write)  # (removing what a failed transaction added is never late)
        else:
            write.answer = BackendUnavailable(OVERTAKEN)
    kept.reverse()
    return kept


def send_writes(
    writes: Sequence[Write],
    client: redis.Redis,
    *,
    reaching: Callable[[], AbstractContextManager[None]],
    wait: ReplicaWait | None = None,
    where: str = "",
) -> None:
    """Send ``writes`` (of ``client``'s connection pool): one script call each, one round trip.

    Every command of a round goes in one packet on one pooled connection
    (:func:`round_trip`). redis-py's own script support is not used for it:
    a pipeline holding a ``Script`` asks ``SCRIPT EXISTS`` first, a round
    trip more for every batch. Each round trip runs inside ``reaching()``;
    when it fails, every write still waiting has the error as its answer,
    and nothing is sent again.

    With ``wait`` (``min_replicas``), the packet ends with ``WAIT`` on the
    same connection, still one round trip, and the writes it answers are
    acknowledged only if enough replicas hold them
    (:mod:`chanstore.backends.redis_wait`; ``where`` names the Redis in what
    it says).
    """
    batch = _Round(writes)
    while batch.pending:
        commands = batch.commands(wait)
        try:
            with reaching():
                replies = round_trip(client, commands)
        except Exception as exc:  # noqa: BLE001 - the round trip failed for every part
            batch.failed(exc)
            return
        batch.take(replies, wait, where)


async def send_writes_async(
    writes: Sequence[Write],
    async_client: Callable[[], redis.asyncio.Redis],
    *,
    reaching: Callable[[], AbstractContextManager[None]],
    wait: ReplicaWait | None = None,
    where: str = "",
) -> None:
    """:func:`send_writes` on the running event loop, with the pool's asyncio client.

    ``async_client()`` gives that client; it is asked for only when there is
    something to send.
    """
    batch = _Round(writes)
    if not batch.pending:
        return
    client = async_client()
    while batch.pending:
        commands = batch.commands(wait)
        try:
            with reaching():
                replies = await round_trip_async(client, commands)
        except Exception as exc:  # noqa: BLE001 - the round trip failed for every part
            batch.failed(exc)
            return
        batch.take(replies, wait, where)
