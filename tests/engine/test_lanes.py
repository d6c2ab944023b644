"""Write lanes, in-process: batches stored in order, the lane's thread going on by itself.

The json backend is held at each batch by a gate the test opens, so that
writes queue up behind a batch being stored exactly when the test says.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.codec import Document
from chanstore.engine import Engine
from chanstore.versions import etag_of

#: Seconds any wait of these tests takes at most.
WAIT = 10.0


class Gate:
    """Holds each batch the json backend is given until the test lets one through."""

    def __init__(self) -> None:
        self.entered: queue.Queue[list[str]] = queue.Queue()
        self._permits = threading.Semaphore(0)

    def hold(self, keys: list[str]) -> None:
        self.entered.put(keys)
        assert self._permits.acquire(timeout=WAIT), "the test never let this batch through"

    def next_batch(self) -> list[str]:
        """The keys of the next batch to reach the backend (blocking whoever calls it)."""
        try:
            return self.entered.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no batch reached the backend within {WAIT:g}s") from None

    def let_through(self, batches: int = 1) -> None:
        self._permits.release(batches)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate()
    store = JSONDatabase.set_many_together.__func__  # type: ignore[attr-defined]

    def held(cls: type[JSONDatabase], parts: Any) -> Any:
        gate.hold([key for _backend, items in parts for key in items])
        return store(cls, parts)

    monkeypatch.setattr(JSONDatabase, "set_many_together", classmethod(held))
    yield gate
    gate.let_through(100)  # nothing is left waiting if a test failed


def run(coroutine_function: Callable[[], object]) -> object:
    return asyncio.run(asyncio.wait_for(coroutine_function(), 30))  # type: ignore[arg-type]


def test_the_lanes_thread_goes_on_to_the_next_batch_without_the_loop(
    make_engine: Callable[..., Engine], gate: Gate
) -> None:
    """While the loop is busy (here: blocked), a batch queued behind one being stored is
    stored next all the same; then every write is settled, in order, once."""

    async def main() -> None:
        store = make_engine().store
        first = store.write("c1", "stats", "hp", Document(1))
        assert await asyncio.to_thread(gate.next_batch) == ["hp"]
        second = store.write("c1", "stats", "hp", Document(2))
        done: list[int] = []
        first.future.add_done_callback(lambda _: done.append(1))
        second.future.add_done_callback(lambda _: done.append(2))
        gate.let_through()
        # The loop is blocked here: only the lane's thread can bring the second batch.
        assert gate.next_batch() == ["hp"]
        assert not done  # nor has the loop settled the first yet
        gate.let_through()
        assert await first is True and await second is True
        assert done == [1, 2]
        assert store.cached_body("c1", "stats", "hp") == (b"2", etag_of(2))
        await store.containers["stats"].lanes.close()

    run(main)


def test_a_conditional_write_waits_for_the_batches_before_it_to_be_settled(
    make_engine: Callable[..., Engine], gate: Gate
) -> None:
    """Its check reads memory, which must hold what the batches before it stored: the
    lane's thread leaves it to the loop, which hands it over once they are settled."""

    async def main() -> None:
        store = make_engine().store
        warm = store.write("c1", "stats", "warm", Document(0))  # the channel, loaded
        assert await asyncio.to_thread(gate.next_batch) == ["warm"]
        gate.let_through()
        assert await warm is True
        slow = store.write("c1", "stats", "mp", Document(5))
        assert await asyncio.to_thread(gate.next_batch) == ["mp"]
        created = store.write("c1", "stats", "hp", Document(1))
        gate.let_through()
        assert await asyncio.to_thread(gate.next_batch) == ["hp"]  # taken by the thread
        checked = store.write("c1", "stats", "hp", Document(2), expect=etag_of(1))
        gate.let_through(2)
        assert await slow is True and await created is True
        assert await checked is True  # it saw hp = 1, stored by the batch before it
        assert store.cached_body("c1", "stats", "hp") == (b"2", etag_of(2))
        await store.containers["stats"].lanes.close()

    run(main)
