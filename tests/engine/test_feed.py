"""The change feed on the storage side, in-process: cursors, memory histories, watchers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from chanstore.codec import Document
from chanstore.engine import Engine, TooManyWatchers
from chanstore.engine.watchers import (
    HistoryBudget,
    MemoryHistory,
    Watcher,
    decode_cursor,
    encode_cursor,
    event_size,
)
from chanstore.history import HistoryExpired
from chanstore.versions import etag_of


def run(coroutine_function: Callable[[], object]) -> object:
    return asyncio.run(asyncio.wait_for(coroutine_function(), 30))  # type: ignore[arg-type]


def test_a_cursor_round_trips_and_a_foreign_one_is_a_clear_error() -> None:
    positions = {"stats": "1733011200000-7", "prófile": "a1b2c3d4e5f6.42"}
    cursor = encode_cursor(positions)
    assert cursor.isascii() and "=" not in cursor and "/" not in cursor
    assert decode_cursor(cursor) == positions
    for bad in ("", "!!", encode_cursor({}) + "x", "c3RhdHM"):  # the last: "stats", no position
        with pytest.raises(ValueError, match="not a cursor of this feed"):
            decode_cursor(bad)


def test_a_memory_history_answers_what_it_holds_and_expires_the_rest() -> None:
    history = MemoryHistory(3, HistoryBudget(1 << 20))
    start = history.position()
    events = [history.append("set", f"k{n}", b"%d" % n, etag_of(n)) for n in range(5)]
    assert history.since(events[1].position) == events[2:]  # the last three are held
    assert history.since(events[4].position) == []
    for gone in (start, events[0].position):
        with pytest.raises(HistoryExpired):
            history.since(gone)
    with pytest.raises(HistoryExpired):  # another history's position
        MemoryHistory(3, HistoryBudget(1 << 20)).since(events[3].position)
    with pytest.raises(HistoryExpired):  # one from its future
        history.since(f"{history.epoch}.99")
    with pytest.raises(ValueError, match="not a position"):
        history.since("nonsense")


def test_the_budget_takes_the_oldest_events_of_the_least_recently_written_history() -> None:
    value = b"x" * 1000
    one_event = event_size(MemoryHistory(10, HistoryBudget(1 << 20)).append("set", "k", value, "e"))
    budget = HistoryBudget(5 * one_event)
    quiet, busy = MemoryHistory(100, budget), MemoryHistory(100, budget)
    dropped = quiet.append("set", "k", value, "e")
    quiet.append("set", "k", value, "e")
    for _ in range(4):
        busy.append("set", "k", value, "e")
    assert budget.used <= budget.limit
    with pytest.raises(HistoryExpired):
        quiet.since(f"{quiet.epoch}.0")  # the quiet one gave its oldest up first
    assert quiet.since(dropped.position) != []  # what came after it is still held
    assert len(busy.since(f"{busy.epoch}.0")) == 4
    busy.release()
    assert budget.used == quiet.size


def test_a_watcher_that_falls_too_far_behind_is_ended_not_grown() -> None:
    """Past its limit while its connection takes nothing more, a watcher is ended; while
    the connection still takes what is written, one burst may queue past the limit."""
    history = MemoryHistory(1000, HistoryBudget(1 << 30))
    burst = Watcher("c1", {"stats": "e.0"}, limit=10_000)
    for _ in range(20):
        burst.push("stats", history.append("set", "k", b"x" * 1000, "e"))
    assert burst.ended is None  # 20 KB queued in one turn of the loop, not yet written
    burst.pause(True)  # the socket is full and there is still more than the limit to send
    assert burst.ended == "slow_reader"

    stalled = Watcher("c1", {"stats": "e.0"}, limit=10_000)
    stalled.pause(True)
    for _ in range(100):
        stalled.push("stats", history.append("set", "k", b"x" * 1000, "e"))
    assert stalled.ended == "slow_reader"
    assert stalled.queued_bytes <= 10_000 + event_size(history.append("set", "k", b"x" * 1000, "e"))

    endless = Watcher("c1", {"stats": "e.0"}, limit=10_000)
    for _ in range(1000):  # never paused, but a queue without end is never kept either
        endless.push("stats", history.append("set", "k", b"x" * 1000, "e"))
    assert endless.ended == "slow_reader"


def test_a_watcher_gets_each_acknowledged_write_in_order_and_resumes_after_its_cursor(
    make_engine: Callable[..., Engine],
) -> None:
    async def main() -> None:
        engine = make_engine()
        feed, store = engine.feed, engine.store
        watcher = await feed.open("c1", ["stats"], None)
        opened = watcher.opened_at
        await store.write("c1", "stats", "hp", Document(1))
        await store.write("c1", "log", "line", Document("not watched"))
        await store.write("c1", "stats", "hp", None, delete=True)
        taken = watcher.take()
        assert [(c, e.op, e.key, e.value) for _, c, e in taken] == [
            ("stats", "set", "hp", b"1"), ("stats", "delete", "hp", None)]  # fmt: skip
        assert taken[0][2].etag == etag_of(1)
        watcher.release()
        assert feed.watchers == set()

        again = await feed.open("c1", ["stats"], opened)
        assert [e.op for _, _, e in again.take()] == ["set", "delete"]
        middle = await feed.open("c1", ["stats"], taken[0][0])
        assert [e.op for _, _, e in middle.take()] == ["delete"]
        with pytest.raises(HistoryExpired):  # the cursor covers stats only
            await feed.open("c1", ["stats", "log"], opened)
        again.release()
        middle.release()
        await engine.close()

    run(main)


def test_watchers_are_bounded_and_shutdown_ends_them(make_engine: Callable[..., Engine]) -> None:
    async def main() -> None:
        engine = make_engine(max_watchers=2)
        first = await engine.feed.open("c1", None, None)
        second = await engine.feed.open("c2", None, None)
        with pytest.raises(TooManyWatchers):
            await engine.feed.open("c3", None, None)
        second.release()
        third = await engine.feed.open("c3", None, None)
        await engine.close()
        assert first.ended == third.ended == "shutdown"

    run(main)


def test_a_container_named_twice_is_watched_once_and_opening_counts_against_the_cap(
    make_engine: Callable[..., Engine],
) -> None:
    async def main() -> None:
        engine = make_engine(max_watchers=2)
        twice = await engine.feed.open("c1", ["stats", "stats"], None)
        await engine.store.write("c1", "stats", "hp", Document(1))
        assert [e.key for _, _, e in twice.take()] == ["hp"]
        # Two opens at once with one place left: one gets it, never both.
        opened = await asyncio.gather(engine.feed.open("c2", None, None),
                                      engine.feed.open("c3", None, None),
                                      return_exceptions=True)  # fmt: skip
        assert sorted(type(result).__name__ for result in opened) == ["TooManyWatchers", "Watcher"]
        await engine.close()

    run(main)
