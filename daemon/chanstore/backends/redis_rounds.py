"""A round's commands in Redis's protocol (RESP), as the bytes that go on the wire.

Every round chanstore sends (:func:`~chanstore.backends.redis_writes.round_trip`)
is encoded here, not by the connection's ``pack_commands``: redis-py's asyncio
connection encodes in Python, one argument at a time, and that was 7% of the
daemon's CPU in a PUT of a small value to Redis (``bench/redis_commands.py``
measures both). A command whose arguments are all small is encoded in C by
hiredis, which redis-py already reads the replies with. hiredis copies every
argument, though, so a command carrying a large value (:data:`LARGE_BYTES` or
more: a value going into a hash and its history) is encoded here, with that
value passed on as it is, never copied, for the socket to take in place.

Arguments are sent as redis-py sends them: ``bytes`` as they are, ``str`` as
UTF-8, ``int`` and ``float`` as their ``repr``. The command's name is one
argument: ``("XINFO", "STREAM", name)``, never ``("XINFO STREAM", name)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import hiredis

__all__ = ["LARGE_BYTES", "packed"]

#: An argument of at least this many bytes is passed on uncopied. Below it, copying
#: it into the command's bytes costs less than writing it as a piece of its own.
LARGE_BYTES = 16 * 1024


def packed(commands: Iterable[Sequence[Any]]) -> list[bytes]:
    """``commands`` as RESP arrays of bulk strings: the pieces to write, in order.

    Consecutive small commands are joined into one piece; each large argument is
    a piece of its own, the caller's object itself.
    """
    pieces: list[bytes] = []
    small: list[bytes] = []
    for command in commands:
        if not _carries_large(command):
            small.append(hiredis.pack_command(tuple(command)))
            continue
        small.append(b"*%d\r\n" % len(command))
        for argument in command:
            data = argument if argument.__class__ is bytes else _encoded(argument)
            size = len(data)
            if size < LARGE_BYTES:
                small.append(b"$%d\r\n%b\r\n" % (size, data))
            else:
                small.append(b"$%d\r\n" % size)
                pieces.append(b"".join(small))
                pieces.append(data)
                small = [b"\r\n"]
    if small:
        pieces.append(b"".join(small))
    return pieces


def _carries_large(command: Sequence[Any]) -> bool:
    # A plain loop: any() over a generator made the whole encoding a fifth slower.
    for argument in command:  # noqa: SIM110
        if argument.__class__ is bytes and len(argument) >= LARGE_BYTES:
            return True
    return False


def _encoded(argument: Any) -> bytes:
    kind = argument.__class__
    if kind is str:
        return argument.encode("utf-8")
    if kind is int or kind is float:
        return repr(argument).encode("ascii")
    raise TypeError(f"a Redis command's argument must be bytes, str, int or float, "
                    f"not {kind.__name__}: {argument!r:.40}")  # fmt: skip
