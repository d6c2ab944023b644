"""A round of commands to Redis: encoded, sent in one packet, its replies read.

:func:`round_trip` (and :func:`round_trip_async`) is the one way a write
reaches a Redis server (see :mod:`chanstore.backends.redis_writes`): one
pooled connection, no retry, one deadline for every reply.

A round's commands are encoded here (:func:`packed`), not by the connection's
``pack_commands``: redis-py's asyncio connection encodes in Python, one
argument at a time, and that was 7% of the daemon's CPU in a PUT of a small
value to Redis (``bench/redis_rounds.py`` measures both). A value of
:data:`LARGE_BYTES` or more (going into a hash and its history) is passed on
as it is, never copied, for the socket to take in place. The whole round is
encoded in one call to the extension ``chanstore._redis_commands`` where it
was built; else in Python (:func:`packed_in_python`), the small arguments by
hiredis (which copies every argument it encodes, so not the large values),
which redis-py already reads the replies with.

Arguments are sent as redis-py sends them: ``bytes`` as they are, ``str`` as
UTF-8, ``int`` and ``float`` as their ``repr``. The command's name is one
argument: ``("XINFO", "STREAM", name)``, never ``("XINFO STREAM", name)``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis
import redis
import redis.asyncio

from chanstore.compiled import extension

__all__ = ["LARGE_BYTES", "packed", "packed_in_python", "round_trip", "round_trip_async"]

#: An argument of at least this many bytes is passed on uncopied. Below it, copying
#: it into the command's bytes costs less than writing it as a piece of its own.
LARGE_BYTES = 16 * 1024
_compiled = extension("_redis_commands")


def packed(commands: Iterable[Sequence[Any]]) -> list[bytes]:
    """``commands`` as RESP arrays of bulk strings: the pieces to write, in order.

    Consecutive small commands are joined into one piece; each large argument is
    a piece of its own, the caller's object itself. Encoded in C where the
    extension ``chanstore._redis_commands`` was built (the same bytes, in the
    same pieces), else by :func:`packed_in_python`.
    """
    if _compiled is not None:
        return _compiled.packed(commands, LARGE_BYTES)
    return packed_in_python(commands)


def packed_in_python(commands: Iterable[Sequence[Any]]) -> list[bytes]:
    """:func:`packed` without the extension."""
    pieces: list[bytes] = []
    small: list[bytes] = []
    for command in commands:
        if not _carries_large(command):
            small.append(hiredis.pack_command(tuple(command)))
            continue
        small.append(b"*%d\r\n" % len(command))
        start = 0  # of the small arguments not yet packed
        for index, argument in enumerate(command):
            if argument.__class__ is bytes and len(argument) >= LARGE_BYTES:
                if start < index:
                    small.append(_bulk_strings(command[start:index]))
                small.append(b"$%d\r\n" % len(argument))
                pieces.append(b"".join(small))
                pieces.append(argument)
                small = [b"\r\n"]
                start = index + 1
        if start < len(command):
            small.append(_bulk_strings(command[start:]))
    if small:
        pieces.append(b"".join(small))
    return pieces


def _carries_large(command: Sequence[Any]) -> bool:
    # A plain loop: any() over a generator made the whole encoding a fifth slower.
    for argument in command:  # noqa: SIM110
        if argument.__class__ is bytes and len(argument) >= LARGE_BYTES:
            return True
    return False


def _bulk_strings(arguments: Sequence[Any]) -> bytes:
    """``arguments`` as RESP bulk strings, encoded in C by hiredis: its command without the
    array's header, for they are part of a longer command. (Formatted one at a time in
    Python, a round of seven 100 KB writes took 167 µs to encode; so, 138.)"""
    encoded = hiredis.pack_command(tuple(arguments))
    return encoded[encoded.index(b"\r\n") + 2 :]


def round_trip(client: redis.Redis, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Every reply to ``commands``, sent in one packet on one of ``client``'s pooled
    connections; a reply that is an error is that command's answer.

    Not the client's pipeline: that sends the round again once its connection
    fails or its replies are late (the client's retry, which reads may use). A
    connection that fails here is closed, so that no later round reads this
    one's replies, and the error is the round's. A connection that the server
    closed while it sat in the pool is not sent on: redis-py's pool reads the
    socket before handing it out, finds it closed, and connects again.
    """
    packet = packed(commands)
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_packed_command(packet)
        return [_reply(connection) for _command in commands]
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def _reply(connection: Any) -> Any:
    try:
        return connection.read_response()
    except redis.ResponseError as exc:  # NOSCRIPT, WRONGTYPE, EXECABORT: that command's answer
        return exc


async def round_trip_async(
    client: redis.asyncio.Redis, commands: Sequence[tuple[Any, ...]]
) -> list[Any]:
    """:func:`round_trip` with the asyncio client. It also costs less than the client's
    pipeline: about a quarter less CPU for a 5-command round.

    The replies come within one socket timeout for all of them, not one each:
    each read asks redis-py for no timer of its own (``timeout=math.inf``, its
    documented "no timeout"), which cost a fifth of a round's CPU, and a round of
    many commands can no longer take many socket timeouts to fail.
    """
    packet = packed(commands)
    pool = client.connection_pool
    connection = await pool.get_connection()
    try:
        await _connect_again_if_closed(connection)
        await connection.send_packed_command(packet)
        return await _replies_async(connection, len(commands), connection.socket_timeout)
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)


async def _connect_again_if_closed(connection: Any) -> None:
    """Make ``connection`` a new one if the server closed it (a restart, ``CLIENT KILL``,
    its idle ``timeout``) or it holds bytes no round asked for.

    Nothing has been sent on it, so connecting again cannot make a write
    twice. redis-py 8.1's asyncio pool checks this too but hands such a
    connection out anyway when maintenance notifications are on, as they
    are by default over RESP3 (redis/redis-py#4252): the round would fail
    with "Connection closed by server" on a Redis that is up. The check
    reads no socket: it looks at what the event loop has already received.
    """
    if await connection.can_read():
        await connection.disconnect()
        await connection.connect()


async def _replies_async(connection: Any, count: int, timeout: float | None) -> list[Any]:
    try:
        async with asyncio.timeout(timeout):
            return [await _reply_async(connection) for _reply in range(count)]
    except TimeoutError:
        raise redis.TimeoutError(f"the replies to a round of {count} commands did not come "
                                 f"within {timeout:g}s") from None  # fmt: skip


async def _reply_async(connection: Any) -> Any:
    try:
        return await connection.read_response(timeout=math.inf)
    except redis.ResponseError as exc:
        return exc
