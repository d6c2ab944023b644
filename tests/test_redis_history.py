"""The redis backend's change history: the stream beside each hash, and its follower.

Against the session's real redis-server. Follower tests run on a fresh event
loop each (``asyncio.run``) and bound every wait with a timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import redis.asyncio

from chanstore.backends.redis_history import FOLLOW_BLOCK_SECONDS, RedisFollower, parse_position
from chanstore.backends.redisdb import RedisDatabase
from chanstore.history import HISTORY_LOST, ORIGIN, ChangeEvent, HistoryExpired
from chanstore.versions import ANY, Change, etag_of, etag_of_stored

STREAM = b"chanstore:-events:svc.chan.box"
#: How long a delivery may take in these tests: far below the follower's block,
#: so that a follow the blocked read did not cover must have interrupted it.
PROMPT = 1.0


@pytest.fixture
def db(redis_settings):
    backend = RedisDatabase(domain="svc.chan.box", **redis_settings)
    yield backend
    backend.close()


@pytest.fixture
def writer(redis_settings):
    """A backend on a pool of its own (other settings): another client, as another daemon."""
    backend = RedisDatabase(domain="svc.chan.box", **{**redis_settings, "socket_timeout": 3.0})
    yield backend
    backend.close()


def changes(events: list[ChangeEvent]) -> list[tuple[str, str, bytes | None]]:
    return [(event.op, event.key, event.value) for event in events]


# -- what every write records ------------------------------------------------------------


def test_every_write_appends_one_entry_per_change_made(db, redis_server):
    history = db.change_history()
    assert history.name == STREAM
    assert history.position() == ORIGIN
    assert history.since(ORIGIN) == []  # no stream yet: a history that never began

    db.set_value("a", {"n": 1})
    db.set_many({"b": [1], "c": "x"})
    db.delete_key("a")
    assert db.delete_key("a")[0] is False  # absent: no change, no entry
    assert db.delete_many(["b", "never"]) == ["b"]
    db.apply_if(Change(sets={"d": 4}, deletes=["c"], expect={"c": ANY, "d": None}))
    with pytest.raises(Exception, match="precondition"):
        db.apply_if(Change(sets={"d": 5}, expect={"d": None}))  # failed: records nothing
    RedisDatabase.set_many_together([(db, {"e": 5})])
    RedisDatabase.apply_if_together([(db, Change(deletes=["e"], expect={"e": etag_of(5)}))])

    assert changes(history.since(ORIGIN)) == [
        ("set", "a", b'{"n":1}'),
        ("set", "b", b"[1]"),
        ("set", "c", b'"x"'),
        ("delete", "a", None),
        ("delete", "b", None),
        ("set", "d", b"4"),
        ("delete", "c", None),
        ("set", "e", b"5"),
        ("delete", "e", None),
    ]
    raw = redis_server.client().xrange(STREAM)
    assert raw[0][1] == {b"op": b"set", b"key": b"a", b"value": b'{"n":1}',
                         b"etag": etag_of({"n": 1}).encode()}  # fmt: skip
    assert raw[3][1] == {b"op": b"delete", b"key": b"a"}
    for event in history.since(ORIGIN):
        if event.op == "set":
            assert event.etag == etag_of_stored(event.value)
        else:
            assert event.etag is None and event.value is None


def test_each_domain_and_key_prefix_has_its_own_history(redis_settings, redis_server):
    one = RedisDatabase(domain="d.one", **redis_settings)
    two = RedisDatabase(domain="d.two", **redis_settings)
    other = RedisDatabase(domain="d.one", key_prefix="app2:", **redis_settings)
    one.set_value("k", 1)
    two.set_value("k", 2)
    other.set_value("k", 3)
    assert other.change_history().name == b"app2:-events:d.one"
    for backend, value in ((one, b"1"), (two, b"2"), (other, b"3")):
        assert changes(backend.change_history().since(ORIGIN)) == [("set", "k", value)]
    for backend in (one, two, other):
        backend.close()


def test_since_answers_what_follows_a_position_in_order(db):
    history = db.change_history()
    positions = []
    for n in range(20):
        db.set_value(f"k{n % 3}", n)
        positions.append(history.position())
    assert [parse_position(p) for p in positions] == sorted({parse_position(p) for p in positions})
    everything = history.since(ORIGIN)
    assert [event.position for event in everything] == positions
    for index, position in enumerate(positions):
        assert history.since(position) == everything[index + 1 :]
    assert history.since(positions[-1]) == []


def test_the_history_is_trimmed_near_history_length(db, redis_server):
    db.history_length = 20
    history = db.change_history()
    db.set_value("k", -1)
    first = history.position()
    for n in range(600):
        db.set_value("k", n)
    held = redis_server.client().xlen(STREAM)
    # MAXLEN ~: at least that many, and no more than one stream node (100 entries) beyond.
    assert 20 <= held <= 20 + 100
    with pytest.raises(HistoryExpired, match="trimmed"):
        history.since(first)
    with pytest.raises(HistoryExpired):
        history.since(ORIGIN)  # its first changes are gone
    oldest = redis_server.client().xrange(STREAM, count=1)[0][0].decode()
    assert len(history.since(oldest)) == held - 1
    assert history.since(history.position()) == []


def test_history_length_zero_still_holds_the_latest_change(db, redis_server):
    db.history_length = 0
    for n in range(300):
        db.set_value("k", n)
    history = db.change_history()
    assert history.since(history.position()) == []  # the cursor a watcher gets stays valid
    assert redis_server.client().xlen(STREAM) >= 1


def test_flushall_expires_every_position_and_a_new_history_begins(db, redis_server):
    history = db.change_history()
    db.set_value("k", 1)
    old = history.position()
    redis_server.flush()
    with pytest.raises(HistoryExpired, match="no longer holds"):
        history.since(old)
    assert history.position() == ORIGIN
    assert history.since(ORIGIN) == []
    db.set_value("k", 2)
    assert changes(history.since(ORIGIN)) == [("set", "k", b"2")]
    with pytest.raises(HistoryExpired):
        history.since(old)


def test_a_position_outlives_the_backend_object(redis_settings):
    first = RedisDatabase(domain="svc.chan.box", **redis_settings)
    first.set_many({"a": 1, "b": 2})
    position = first.change_history().position()
    first.close()  # the last backend of its pool: the pool goes too
    second = RedisDatabase(domain="svc.chan.box", **redis_settings)
    assert second.change_history().position() == position
    assert second.change_history().since(position) == []
    second.set_value("c", 3)
    assert changes(second.change_history().since(position)) == [("set", "c", b"3")]
    second.close()


def test_since_is_one_round_trip(db, redis_server):
    db.set_value("k", 1)
    history = db.change_history()
    position = history.position()
    client = redis_server.client()
    client.config_resetstat()
    history.since(position)
    history.since(ORIGIN)
    stats = {name.removeprefix("cmdstat_"): entry["calls"]
             for name, entry in client.info("commandstats").items()}  # fmt: skip
    assert stats["multi"] == 2 and stats["exec"] == 2
    assert stats["xrange"] == 3 and stats["xinfo|stream"] == 1


#: Not positions: "\u0661-\u0660" is "1-0" in Arabic-Indic digits, which are digits to ``\d``.
MALFORMED = ["", "abc", "1", "1-", "-1", "1-2-3", " 1-0", "1-0 ", "1.5-0", "+", "$",
             f"{2**64}-0", "0-18446744073709551616", "\u0661-\u0660"]  # fmt: skip


@pytest.mark.parametrize("position", MALFORMED)
def test_a_malformed_position_is_a_clear_value_error(db, position):
    with pytest.raises(ValueError, match="not a position of a Redis change history"):
        db.change_history().since(position)


# -- the follower ---------------------------------------------------------------------------


class Received:
    """A ``deliver`` callback that keeps what it was given, and can be waited on."""

    def __init__(self) -> None:
        self.events: list[ChangeEvent | None] = []
        self._changed = asyncio.Event()

    def __call__(self, event: ChangeEvent | None) -> None:
        self.events.append(event)
        self._changed.set()

    async def until(self, done: Callable[[list[ChangeEvent | None]], bool],
                    timeout: float = 10.0) -> None:  # fmt: skip
        async with asyncio.timeout(timeout):
            while not done(self.events):
                self._changed.clear()
                await self._changed.wait()

    async def count(self, n: int, timeout: float = 10.0) -> list[ChangeEvent | None]:
        await self.until(lambda events: len(events) >= n, timeout)
        return self.events


async def blocked(server, timeout: float = 5.0) -> None:
    """Until a connection of ``server`` waits in ``XREAD`` (the follower's)."""

    def waiting() -> bool:
        client = server.client()
        try:
            return any(c["cmd"] == "xread" and "b" in c["flags"] for c in client.client_list())
        finally:
            client.close()

    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(waiting):
            await asyncio.sleep(0.005)


async def write(backend, *calls):
    """Run backend writes on a thread, as another process's writes would be."""
    for method, *args in calls:
        await asyncio.to_thread(getattr(backend, method), *args)


def test_the_follower_delivers_in_order_to_callbacks_started_at_different_positions(
    db, writer, redis_server
):
    history = db.change_history()
    for n in range(3):
        writer.set_value(f"k{n}", n)
    middle = history.since(ORIGIN)[1].position

    async def main():
        follower = history.follower()
        late, early = Received(), Received()
        follower.follow(history.name, middle, late)
        await late.count(1)  # live, and past where the early one starts
        await blocked(redis_server)
        follower.follow(history.name, ORIGIN, early)  # earlier: the stream is read again
        await early.count(3, PROMPT)
        await write(writer, *[("set_value", f"k{n % 4}", n) for n in range(3, 60)],
                    ("delete_key", "k0"))  # fmt: skip
        await early.count(3 + 58)
        await late.count(1 + 58)
        await follower.close()  # the follows it still had end: each hears None
        assert early.events.pop() is None and late.events.pop() is None
        return early.events, late.events

    early, late = asyncio.run(main())
    everything = history.since(ORIGIN)
    assert early == everything  # every change, once each, in order
    assert late == everything[2:]
    assert changes(late[:2]) == [("set", "k2", b"2"), ("set", "k3", b"3")]
    assert late[-1].op == "delete" and late[-1].key == "k0"


def test_a_new_stream_is_followed_at_once_not_after_the_block(
    redis_settings, db, writer, redis_server
):
    """A follow the blocked XREAD does not cover interrupts it (CLIENT UNBLOCK)."""
    assert FOLLOW_BLOCK_SECONDS > 2 * PROMPT
    others = [RedisDatabase(domain=f"svc.chan.other{n}", **redis_settings) for n in range(5)]
    other_writers = [RedisDatabase(domain=f"svc.chan.other{n}",
                                   **{**redis_settings, "socket_timeout": 3.0})
                     for n in range(5)]  # fmt: skip

    async def main():
        follower = db.change_history().follower()
        assert others[0].change_history().follower() is follower  # one per pool
        box = Received()
        follower.follow(db.change_history().name, ORIGIN, box)
        delays = []
        for other, other_writer in zip(others, other_writers, strict=True):
            await blocked(redis_server)  # the read in flight does not cover the new stream
            history = other.change_history()
            received = Received()
            follower.follow(history.name, ORIGIN, received)
            started = time.monotonic()
            await write(other_writer, ("set_value", "k", 1))
            await received.count(1, PROMPT)
            delays.append(time.monotonic() - started)
        await write(writer, ("set_value", "k", "box"))
        await box.count(1, PROMPT)
        await follower.close()
        return delays

    delays = asyncio.run(main())
    assert max(delays) < PROMPT
    for backend in (*others, *other_writers):
        backend.close()


def test_writes_reach_a_follower_within_milliseconds(db, writer):
    history = db.change_history()

    async def main():
        follower = history.follower()
        received = Received()
        follower.follow(history.name, history.position(), received)
        delays = []
        for n in range(100):
            started = time.perf_counter()
            await write(writer, ("set_value", "k", n))  # acknowledged here
            await received.count(n + 1, PROMPT)
            delays.append(time.perf_counter() - started)
        await follower.close()
        return sorted(delays)

    delays = asyncio.run(main())
    # Loose for a loaded test machine; the benchmark measures the real figures.
    assert delays[len(delays) // 2] < 0.1


def test_unfollow_and_a_callback_that_raises_stop_only_themselves(db, writer):
    history = db.change_history()

    async def main():
        follower = history.follower()
        steady, leaving = Received(), Received()
        calls = []

        def broken(event):
            calls.append(event)
            raise RuntimeError("a bug in one watcher")

        for deliver in (steady, leaving, broken):
            follower.follow(history.name, ORIGIN, deliver)
        await write(writer, ("set_value", "a", 1))
        await leaving.count(1)
        follower.unfollow(history.name, leaving)
        follower.unfollow(history.name, leaving)  # twice is harmless
        await write(writer, ("set_value", "b", 2), ("set_value", "c", 3))
        await steady.count(3)
        await follower.close()
        assert steady.events.pop() is None
        return steady.events, leaving.events, calls

    steady, leaving, calls = asyncio.run(main())
    assert [event.key for event in steady] == ["a", "b", "c"]
    assert [event.key for event in leaving] == ["a"]
    assert [event.key for event in calls] == ["a"]  # dropped after it raised


# -- a follower never skips in silence -------------------------------------------------------

#: A burst longer than any node of a stream (100 entries at most), so that ``MAXLEN ~ 5``
#: trims within it.
BURST = {f"k{n:03d}": n for n in range(300)}


def held(redis_server, position: str) -> bool:
    client = redis_server.client()
    try:
        return bool(client.xrange(STREAM, position, position))
    finally:
        client.close()


def test_a_follower_behind_a_burst_longer_than_the_history_hears_it_lost(db, writer, redis_server):
    """A burst trimmed before the follower read it: HISTORY_LOST, once, and the follow
    ends; never the part of the burst that was left. A follower further on, at a
    position still held, is read again from there and misses nothing."""
    writer.history_length = 5
    history = db.change_history()
    writer.set_value("before", 0)
    start = history.position()

    async def main():
        follower = history.follower()
        waiting, behind, ahead = Received(), Received(), Received()
        follower.follow(history.name, start, waiting)
        await blocked(redis_server)  # the read is served after the whole script: trimmed
        await write(writer, ("set_many", BURST))
        await waiting.count(1)
        assert not held(redis_server, start)
        latest = await asyncio.to_thread(history.position)
        follower.follow(history.name, start, behind)  # behind from the start
        follower.follow(history.name, latest, ahead)
        await behind.count(1)
        await write(writer, ("set_value", "after", 1))
        await ahead.count(1)
        await write(writer, ("set_value", "after", 2))
        await ahead.count(2)
        await follower.close()
        return waiting.events, behind.events, ahead.events

    waiting, behind, ahead = asyncio.run(main())
    assert waiting == [HISTORY_LOST]  # and no None at close: its follow had ended
    assert waiting[0] is HISTORY_LOST and behind[0] is HISTORY_LOST
    assert behind == [HISTORY_LOST]
    assert ahead.pop() is None
    assert changes(ahead) == [("set", "after", b"1"), ("set", "after", b"2")]


def test_a_follower_that_keeps_up_gets_every_entry_while_the_history_is_trimmed(
    db, writer, redis_server
):
    """Bursts within the history, read in several steps, and single writes read one by
    one with ``MAXLEN ~ 5`` trimming all along: every entry, in order, nothing lost."""
    history = db.change_history()
    writer.history_length = 5000
    writer.set_value("before", 0)
    start = history.position()
    within = {f"w{n:04d}": n for n in range(1500)}  # three reads of FOLLOW_COUNT and more

    async def main():
        follower = history.follower()
        received = Received()
        follower.follow(history.name, start, received)
        await blocked(redis_server)
        await write(writer, ("set_many", within))
        await received.count(len(within))
        writer.history_length = 5
        for n in range(250):  # past two whole nodes: the stream is trimmed meanwhile
            await write(writer, ("set_value", "one", n))
            await received.count(len(within) + n + 1)
        await follower.close()
        assert received.events.pop() is None
        return received.events

    events = asyncio.run(main())
    assert HISTORY_LOST not in events
    assert not held(redis_server, start)  # it was trimmed, after it was read
    assert changes(events) == [
        *(("set", key, str(value).encode()) for key, value in within.items()),
        *(("set", "one", str(n).encode()) for n in range(250)),
    ]


def test_a_follower_from_the_origin_is_told_when_the_first_changes_are_gone(
    db, writer, redis_server
):
    """ORIGIN: all of a history never trimmed; HISTORY_LOST for one that lost its first
    entries, whether before the follow or while it waited in its first read."""
    history = db.change_history()
    writer.history_length = 5

    async def main():
        follower = history.follower()
        whole, during, before = Received(), Received(), Received()
        # A history that does not exist yet, then changes that all fit in one node.
        follower.follow(history.name, ORIGIN, whole)
        await blocked(redis_server)
        await write(writer, ("set_value", "a", 1), ("set_value", "b", 2))
        await whole.count(2)
        follower.unfollow(history.name, whole)
        await asyncio.to_thread(redis_server.flush)
        # A history that begins with a burst trimmed before the first read is served.
        follower.follow(history.name, ORIGIN, during)
        await blocked(redis_server)
        await write(writer, ("set_many", BURST))
        await during.count(1)
        # A history trimmed long before.
        follower.follow(history.name, ORIGIN, before)
        await before.count(1)
        await follower.close()
        return whole.events, during.events, before.events

    whole, during, before = asyncio.run(main())
    assert changes(whole) == [("set", "a", b"1"), ("set", "b", b"2")]
    assert during == [HISTORY_LOST]
    assert before == [HISTORY_LOST]
    with pytest.raises(HistoryExpired):
        history.since(ORIGIN)  # since() says the same


def test_a_follower_whose_history_was_flushed_hears_it_lost(db, writer, redis_server):
    """The data lost (FLUSHALL), then a new history begun: a position of the old one is
    not followed into the new one as if nothing happened."""
    history = db.change_history()
    writer.set_value("k", 1)
    old = history.position()

    async def main():
        follower = history.follower()
        received = Received()
        follower.follow(history.name, old, received)
        await blocked(redis_server)
        await asyncio.to_thread(redis_server.flush)
        await write(writer, ("set_value", "k", 2))
        await received.count(1)
        await follower.close()
        return received.events

    assert asyncio.run(main()) == [HISTORY_LOST]


def test_the_check_after_a_read_is_sound_for_the_origin(db, writer, redis_server):
    """The ORIGIN check, against replies read before the stream was trimmed (XTRIM, as an
    operator might): holding every entry ever added is enough, holding fewer is not."""
    history = db.change_history()
    writer.set_many({f"k{n}": n for n in range(10)})

    async def main():
        follower = history.follower()
        client = redis.asyncio.Redis(**redis_server.settings, single_connection_client=True)
        try:
            await client.ping()
            whole = await client.xread({STREAM: ORIGIN})
            first_three = await client.xread({STREAM: ORIGIN}, count=3)
            starts = {STREAM: (0, 0)}
            follower._streams[STREAM] = {Received(): None}  # followed: so it is checked
            untouched = await follower._lost_streams(client, first_three, starts)
            await client.xtrim(STREAM, maxlen=0)
            after_whole = await follower._lost_streams(client, whole, starts)
            after_part = await follower._lost_streams(client, first_three, starts)
            await client.delete(STREAM)
            gone = await follower._lost_streams(client, whole, starts)
            at = {STREAM: parse_position(whole[0][1][0][0].decode())}
            gone_at = await follower._lost_streams(client, whole, at)
        finally:
            follower._streams.clear()
            await client.aclose()
            await follower.close()
        return untouched, after_whole, after_part, gone, gone_at

    untouched, after_whole, after_part, gone, gone_at = asyncio.run(main())
    assert untouched == set() and after_whole == set()
    assert after_part == gone == gone_at == {STREAM}


@pytest.fixture
def other(redis_settings):
    """A backend of another domain on ``db``'s pool."""
    backend = RedisDatabase(domain="svc.chan.other", **redis_settings)
    yield backend
    backend.close()


def test_a_killed_connection_ends_every_follow_with_none(db, other, writer, redis_server):

    async def main():
        follower = db.change_history().follower()
        box, elsewhere = Received(), Received()
        follower.follow(db.change_history().name, ORIGIN, box)
        follower.follow(other.change_history().name, ORIGIN, elsewhere)
        await write(writer, ("set_value", "k", 1))
        await box.count(1)
        await blocked(redis_server)
        killer = redis_server.client()
        await asyncio.to_thread(killer.client_kill_filter, _type="normal")
        killer.close()
        await box.until(lambda events: events[-1:] == [None])
        await elsewhere.until(lambda events: events == [None])
        # The callers follow again from their last positions: nothing is lost.
        resumed = Received()
        last = box.events[-2].position
        await write(writer, ("set_value", "k", 2))
        follower.follow(db.change_history().name, last, resumed)
        await resumed.count(1)
        await follower.close()
        assert resumed.events.pop() is None
        return box.events, resumed.events

    box, resumed = asyncio.run(main())
    assert [event.value for event in box[:-1]] == [b"1"]
    assert [event.value for event in resumed] == [b"2"]


def test_close_ends_the_follows_and_the_pool_closes_its_follower(redis_settings):
    # Settings of its own: the pool's only backend, whatever other tests left open.
    backend = RedisDatabase(domain="svc.chan.box", **{**redis_settings, "socket_timeout": 2.5})
    history = backend.change_history()

    async def main():
        follower = history.follower()
        received = Received()
        follower.follow(history.name, ORIGIN, received)
        await follower.close()
        assert received.events == [None]
        with pytest.raises(RuntimeError, match="closed"):
            follower.follow(history.name, ORIGIN, received)
        with pytest.raises(ValueError, match="not a position"):
            history.follower().follow(history.name, "later", received)
        fresh = history.follower()
        assert fresh is not follower and not fresh.closed
        fresh.follow(history.name, ORIGIN, received)
        backend.close()  # the pool's last backend: its follower goes with it
        await received.until(lambda events: events == [None, None])
        assert fresh.closed

    asyncio.run(main())


def test_each_event_loop_gets_its_own_follower(db):
    history = db.change_history()

    async def follower_of_this_loop() -> RedisFollower:
        follower = history.follower()
        assert history.follower() is follower
        return follower

    first = asyncio.run(follower_of_this_loop())
    second = asyncio.run(follower_of_this_loop())
    assert first is not second
