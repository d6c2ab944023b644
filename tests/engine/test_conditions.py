"""Conditional writes on the storage side, in-process: checked in the lanes, all or nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from chanstore.codec import Document
from chanstore.engine import Engine
from chanstore.errors import PreconditionFailed
from chanstore.versions import ANY, etag_of


def run(coroutine_function: Callable[[], object]) -> object:
    return asyncio.run(asyncio.wait_for(coroutine_function(), 30))  # type: ignore[arg-type]


def stored(root: Path, key: str) -> object:
    (path,) = (root / "data").rglob(f"{key}.json")
    return json.loads(path.read_text())


def test_a_write_meets_each_kind_of_expectation_or_changes_nothing(
    make_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    async def main() -> None:
        engine = make_engine()
        store = engine.store
        created = store.write("c1", "stats", "hp", Document(1), expect=None)
        assert await created is True  # create-only, and it was absent
        with pytest.raises(PreconditionFailed) as failed:
            await store.write("c1", "stats", "hp", Document(2), expect=None)
        assert failed.value.conflicts == {"hp": created.etag}
        with pytest.raises(PreconditionFailed):
            await store.write("c1", "stats", "hp", Document(2), expect="0" * 40)
        with pytest.raises(PreconditionFailed) as failed:
            await store.write("c1", "stats", "mp", Document(2), expect=ANY)
        assert failed.value.conflicts == {"mp": None}
        assert stored(tmp_path, "hp") == 1 and not list(tmp_path.rglob("mp.json"))
        assert store.cached_body("c1", "stats", "hp")[0] == b"1"

        second = store.write("c1", "stats", "hp", Document(2), expect=etag_of(1))
        assert await second is True and second.etag == etag_of(2)
        assert await store.write("c1", "stats", "hp", Document(3), expect=ANY) is True
        with pytest.raises(PreconditionFailed):
            await store.write("c1", "stats", "hp", None, delete=True, expect=etag_of(2))
        assert stored(tmp_path, "hp") == 3
        assert await store.write("c1", "stats", "hp", None, delete=True, expect=etag_of(3))
        assert not list(tmp_path.rglob("hp.json"))
        await engine.close()

    run(main)


def test_a_bulk_write_with_expectations_stores_every_value_or_none(
    make_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    async def main() -> None:
        engine = make_engine()
        store = engine.store
        await store.write("c1", "stats", "a", Document(1))
        values = {"a": Document(10), "b": Document(20), "c": Document(30)}
        with pytest.raises(PreconditionFailed) as failed:
            await store.put_many("c1", "stats", values, expect={"a": etag_of(1), "b": ANY})
        assert failed.value.conflicts == {"b": None}
        assert stored(tmp_path, "a") == 1
        assert sorted(p.name for p in tmp_path.rglob("*.json")) == ["a.json"]
        etags = await store.put_many("c1", "stats", values, expect={"a": etag_of(1), "b": None})
        assert etags == {key: etag_of(value) for key, value in values.items()}
        assert [stored(tmp_path, key) for key in "abc"] == [10, 20, 30]
        await engine.close()

    run(main)


def test_conditional_writes_queued_with_others_see_every_earlier_write(
    make_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    """Queued in one go, so one batch: each condition is checked against the writes queued
    before it (the batch is cut where a key repeats), never against a stale value."""

    async def main() -> None:
        engine = make_engine()
        store = engine.store
        await store.write("c1", "stats", "n", Document(0))
        pending = [store.write("c1", "stats", "n", Document(1))]
        # Each one expects the value the write before it stores: every one must pass.
        pending += [store.write("c1", "stats", "n", Document(step + 1), expect=etag_of(step))
                    for step in range(1, 20)]  # fmt: skip
        # ... and this one expects a value that was overwritten meanwhile: it must fail.
        pending.append(store.write("c1", "stats", "n", Document(99), expect=etag_of(5)))
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert results[:-1] == [True] * 20
        assert isinstance(results[-1], PreconditionFailed)
        assert results[-1].conflicts == {"n": etag_of(20)}
        assert stored(tmp_path, "n") == 20
        await engine.close()

    run(main)


def test_concurrent_read_modify_write_loops_lose_no_update(
    make_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    async def increment(engine: Engine, times: int) -> None:
        for _ in range(times):
            while True:
                body, etag = await engine.store.read_body("c1", "stats", "count")
                try:
                    value = Document(json.loads(body) + 1)
                    await engine.store.write("c1", "stats", "count", value, expect=etag)
                    break
                except PreconditionFailed:
                    continue

    async def main() -> None:
        engine = make_engine()
        await engine.store.write("c1", "stats", "count", Document(0))
        await asyncio.gather(*(increment(engine, 25) for _ in range(8)))
        assert stored(tmp_path, "count") == 200
        await engine.close()

    run(main)
