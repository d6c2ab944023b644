"""Batches: a key written over and over within one batch, where the backend allows it,
costs one stored write; where every write must reach the backend (Redis), one round trip;
every write is still acknowledged, in order, and seen by watchers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from chanstore.backends import journal as journal_module
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.backends.redisdb import RedisDatabase
from chanstore.codec import Document
from chanstore.engine import Engine
from chanstore.engine.batches import apply_batch, apply_batch_on_loop, stores_on_loop
from chanstore.engine.lanes import Condition
from chanstore.errors import BulkWriteError
from chanstore.versions import ANY, Change
from support import DictDatabase


def run(coroutine_function: Callable[[], object]) -> object:
    return asyncio.run(asyncio.wait_for(coroutine_function(), 30))  # type: ignore[arg-type]


@pytest.fixture
def stored_json(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """What each json ``set_many_together`` call was given, key to value (the real call runs)."""
    calls: list[dict[str, object]] = []
    real = JSONDatabase.set_many_together

    def counted(cls, parts):
        calls.append({key: value for _backend, items in parts for key, value in items.items()})
        return real(parts)

    monkeypatch.setattr(JSONDatabase, "set_many_together", classmethod(counted))
    return calls


def queued(backend, key, value, delete=False, condition=None):
    return SimpleNamespace(backend=backend, key=key, value=value, delete=delete,
                           condition=condition, etag=None, owner=None)  # fmt: skip


def test_a_key_written_over_and_over_is_stored_once_and_every_write_acknowledged(
    make_engine: Callable[..., Engine], stored_json: list[dict[str, object]]
) -> None:
    async def main() -> None:
        engine = make_engine()
        await engine.store.read_body("c1", "stats", "hp")  # in memory: the writes queue at once
        watcher = await engine.feed.open("c1", ["stats"], None)
        stored_json.clear()
        futures = [engine.store.write("c1", "stats", "hp", Document(n)) for n in range(20)]
        futures.append(engine.store.write("c1", "stats", "mana", Document(5)))
        assert await asyncio.gather(*futures) == [True] * 21
        assert engine.store.cached_body("c1", "stats", "hp")[0] == b"19"
        events = watcher.take(at_most=100)
        assert [(e.key, e.value) for _, _, e in events] == [
            *(("hp", str(n).encode()) for n in range(20)), ("mana", b"5")]  # fmt: skip
        watcher.release()
        await engine.close()

    run(main)
    # One call, one journal flush: the last value of hp and the write after it.
    assert len(stored_json) == 1
    assert {key: value.doc for key, value in stored_json[0].items()} == {"hp": 19, "mana": 5}


def test_a_failed_write_fails_the_writes_it_replaced(tmp_path, monkeypatch) -> None:
    backend = JSONDatabase(domain="s.c", root_dir=str(tmp_path))
    backend.set_many({"hp": 0})
    real = journal_module.replace_with

    def full(folder, name, data, fsync, where, **kwargs):
        if name == "hp.json":
            raise OSError(28, "No space left on device")
        real(folder, name, data, fsync, where, **kwargs)

    monkeypatch.setattr(journal_module, "replace_with", full)
    results = apply_batch([queued(backend, "hp", 1), queued(backend, "other", 2),
                           queued(backend, "hp", 3)])  # fmt: skip
    assert results[1] is True
    for replaced_or_failed in (results[0], results[2]):
        assert isinstance(replaced_or_failed, BulkWriteError)
        assert replaced_or_failed.kind == "disk_full"
    assert backend.load_all() == {"hp": 0, "other": 2}
    backend.close()


def test_a_delete_between_two_sets_is_stored_in_order(tmp_path, stored_json) -> None:
    backend = JSONDatabase(domain="s.c", root_dir=str(tmp_path))
    backend.set_many({"hp": 0})
    stored_json.clear()
    batch = [queued(backend, "hp", 1), queued(backend, "hp", None, delete=True),
             queued(backend, "hp", 3)]  # fmt: skip
    assert apply_batch(batch) == [True, True, True]
    assert stored_json == [{"hp": 1}, {"hp": 3}]  # the set before the delete was stored
    assert json.loads((backend.path / "hp.json").read_text()) == 3
    backend.close()


def test_a_batch_with_a_condition_stores_every_write(tmp_path, stored_json) -> None:
    backend = JSONDatabase(domain="s.c", root_dir=str(tmp_path))
    owner = SimpleNamespace(known_etag=lambda key: None)
    condition = Condition({"new": None}, 1)  # "new" must not exist yet
    batch = [queued(backend, "hp", 1), queued(backend, "hp", 2),
             queued(backend, "new", 7, condition=condition)]  # fmt: skip
    batch[2].owner = owner
    assert apply_batch(batch) == [True, True, True]
    assert [list(call.items()) for call in stored_json] == [[("hp", 1)], [("hp", 2), ("new", 7)]]
    backend.close()


def test_a_backend_that_sees_every_write_gets_every_write() -> None:
    given: list[object] = []

    class Recording(DictDatabase):
        def set_value(self, key, value):
            given.append(value)
            return super().set_value(key, value)

    assert Recording.sees_every_write and not JSONDatabase.sees_every_write
    backend = Recording(domain="d")
    assert apply_batch([queued(backend, "hp", n) for n in range(3)]) == [True] * 3
    assert given == [0, 1, 2]
    assert backend.get_value("hp") == (True, 2)


@pytest.fixture
def redis_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[tuple[str, object]]]]:
    """Each call a batch made of the redis backend's two asyncio methods (the real call
    runs): its name and its parts, as (domain, what it was given)."""
    calls: list[tuple[str, list[tuple[str, object]]]] = []
    for name in ("set_many_together_async", "apply_if_together_async"):
        real = getattr(RedisDatabase, name)

        def counted(cls, parts, real=real, name=name):
            calls.append((name, [(backend.domain, given) for backend, given in parts]))
            return real(parts)

        monkeypatch.setattr(RedisDatabase, name, classmethod(counted))
    return calls


def test_runs_where_a_key_repeats_go_to_redis_in_one_call(redis_settings, redis_calls) -> None:
    """Redis applies one call's parts in order (keeps_part_order): a key written by many
    clients at once costs one round trip per batch, not one per write."""

    async def main() -> list[object]:
        hp, other = (RedisDatabase(domain=d, **redis_settings) for d in ("s.hp", "s.other"))
        batch = [queued(hp, "hp", 1), queued(hp, "mp", 1), queued(other, "x", 1),
                 queued(hp, "hp", 2), queued(hp, "hp", 3), queued(other, "x", 2)]  # fmt: skip
        assert stores_on_loop(batch)
        try:
            return [await apply_batch_on_loop(batch), hp.load_all(), other.load_all()]
        finally:
            hp.close()
            other.close()

    results, hp_values, other_values = run(main)
    assert results == [True] * 6
    assert (hp_values, other_values) == ({"hp": 3, "mp": 1}, {"x": 2})
    assert redis_calls == [("set_many_together_async", [
        ("s.hp", {"hp": 1, "mp": 1}), ("s.other", {"x": 1}),  # the first run
        ("s.hp", {"hp": 2}),  # the second: hp again
        ("s.hp", {"hp": 3}), ("s.other", {"x": 2}),  # the third
    ])]  # fmt: skip


def test_a_conditional_write_is_never_joined_with_the_runs_around_it(
    redis_settings, redis_calls
) -> None:
    async def main() -> list[object]:
        hp = RedisDatabase(domain="s.hp", **redis_settings)
        batch = [queued(hp, "hp", 1), queued(hp, "hp", 2, condition=Condition({"hp": ANY}, 1)),
                 queued(hp, "hp", 3), queued(hp, "hp", 4)]  # fmt: skip
        try:
            return [await apply_batch_on_loop(batch), hp.load_all()]
        finally:
            hp.close()

    results, values = run(main)
    assert results == [True] * 4
    assert values == {"hp": 4}

    def described(given: object) -> object:
        return (given.sets, given.expect) if isinstance(given, Change) else given

    assert [(name, [described(given) for _domain, given in parts])
            for name, parts in redis_calls] == [
        ("set_many_together_async", [{"hp": 1}]),
        ("apply_if_together_async", [({"hp": 2}, {"hp": ANY})]),
        ("set_many_together_async", [{"hp": 3}, {"hp": 4}]),  # these two runs go together
    ]  # fmt: skip
