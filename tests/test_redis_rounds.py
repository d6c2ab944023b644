"""A round of commands: the bytes redis-py would send, large values never copied, and what a
real Redis makes of them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence

import pytest
import redis
import redis.asyncio
import redis.asyncio.connection
import redis.connection
from hypothesis import given, settings
from hypothesis import strategies as st

from chanstore.backends.redis_rounds import (
    LARGE_BYTES,
    packed,
    packed_in_python,
    round_trip,
    round_trip_async,
)
from chanstore.compiled import extension
from support import RedisServer

ARGUMENTS = st.one_of(
    st.binary(max_size=40),
    st.binary(max_size=40).map(memoryview),
    st.sampled_from([b"", b"x" * (LARGE_BYTES - 1), b"y" * LARGE_BYTES, b"z" * 3 * LARGE_BYTES]),
    st.text(max_size=20),
    st.sampled_from(["", "é" * (LARGE_BYTES // 2), "long" * LARGE_BYTES]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
)
COMMANDS = st.lists(
    st.tuples(st.sampled_from(["HSET", "XADD", "MULTI"]), st.lists(ARGUMENTS, max_size=6)).map(
        lambda pair: (pair[0], *pair[1])
    ),
    min_size=1,
    max_size=5,
)


Command = tuple[object, ...]
Pack = Callable[[Iterable[Sequence[object]]], list[bytes]]

#: Both encoders: the extension's, where it was built, and the Python one it stands in for.
PACKERS = [
    pytest.param(packed, id="packed"),
    pytest.param(packed_in_python, id="packed_in_python"),
]


@pytest.mark.parametrize("pack", PACKERS)
@settings(max_examples=300, deadline=None)
@given(commands=COMMANDS)
def test_the_bytes_are_those_redis_py_would_send(pack: Pack, commands: list[Command]) -> None:
    ours = b"".join(pack(commands))
    assert ours == b"".join(redis.connection.Connection().pack_commands(commands))
    assert ours == b"".join(redis.asyncio.connection.Connection().pack_commands(commands))


@settings(max_examples=300, deadline=None)
@given(commands=COMMANDS)
def test_both_encoders_give_the_same_pieces(commands: list[Command]) -> None:
    if extension("_redis_commands") is None:
        pytest.skip("the extension is not in use: packed is packed_in_python")
    assert packed(commands) == packed_in_python(commands)


@pytest.mark.parametrize("pack", PACKERS)
def test_a_large_value_is_passed_on_not_copied(pack: Pack) -> None:
    value = b"v" * (2 * LARGE_BYTES)
    small = b"s" * (LARGE_BYTES - 1)
    pieces = pack([("MULTI",), ("HSET", b"hash", "field", value), ("HSET", b"h", "f", small),
                   ("XADD", b"stream", "*", "value", value, "etag", "e"), ("EXEC",)])  # fmt: skip
    assert [piece for piece in pieces if piece is value] == [value, value]
    assert not any(piece is small for piece in pieces)  # copied with its command: one piece less
    # Between the large values, the small commands and arguments are one piece each time.
    assert len(pieces) == 5
    assert pieces[4] == b"\r\n$4\r\netag\r\n$1\r\ne\r\n*1\r\n$4\r\nEXEC\r\n"


@pytest.mark.parametrize("pack", PACKERS)
def test_no_commands_are_no_pieces(pack: Pack) -> None:
    assert pack([]) == []
    assert pack(iter([("PING",)])) == [b"*1\r\n$4\r\nPING\r\n"]


@pytest.mark.parametrize("pack", PACKERS)
@pytest.mark.parametrize("argument", [True, None, b"x".decode, bytearray(b"x"), [1]])
def test_an_argument_redis_could_not_be_sent_is_refused(pack: Pack, argument: object) -> None:
    for command in (("SET", "k", argument), ("SET", b"v" * LARGE_BYTES, argument)):
        with pytest.raises(TypeError, match="must be"):
            pack([command])


@pytest.mark.parametrize("pack", PACKERS)
def test_a_string_utf_8_cannot_hold_is_refused(pack: Pack) -> None:
    for command in (("SET", "k", "\udc00"), ("SET", b"v" * LARGE_BYTES, "\udc00")):
        with pytest.raises(UnicodeEncodeError):
            pack([command])


def test_a_refused_argument_sends_nothing(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.flushdb()
    with pytest.raises(TypeError):
        round_trip(client, [("SET", "first", "1"), ("SET", "second", None)])  # type: ignore[list-item]
    assert client.exists("first") == 0
    assert client.ping()  # the pooled connection holds no half-sent round
    client.close()


def test_values_reach_redis_as_sent(redis_server: RedisServer) -> None:
    large = bytes(range(256)) * (LARGE_BYTES // 64)
    commands = [("HSET", b"h", "small", "é\x00", "large", large, "n", -12, "f", 0.1),
                ("HMGET", b"h", "small", "large", "n", "f")]  # fmt: skip
    client = redis_server.client()
    client.flushdb()
    replies = round_trip(client, commands)
    assert replies[0] == 4
    assert replies[1] == ["é\x00".encode(), large, b"-12", b"0.1"]

    async def through_asyncio() -> list[object]:
        async_client = redis.asyncio.Redis(port=redis_server.port, password=redis_server.password)
        try:
            return await round_trip_async(async_client, [("HGET", b"h", "large"), *commands])
        finally:
            await async_client.aclose()

    again = asyncio.run(through_asyncio())
    assert again[0] == large
    assert again[1] == 0  # the same fields, the same values: nothing new
    client.close()
