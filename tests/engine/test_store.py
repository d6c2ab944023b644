"""The storage side's reads and writes, in-process: what every HTTP request ends up asking."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from chanstore import codec, stored_form
from chanstore.backends.json_serving import MARK_NAME
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.cache import UnreadableValue
from chanstore.codec import Document, parse_document
from chanstore.engine import ABSENT, Engine, UnknownContainer
from chanstore.engine.channels import KEPT_AS_BYTES
from chanstore.errors import CorruptValue
from chanstore.metrics import Metrics
from support import files_under, unwritable


def run(coroutine_function: Callable[[], object]) -> object:
    return asyncio.run(asyncio.wait_for(coroutine_function(), 30))  # type: ignore[arg-type]


def test_a_write_is_acknowledged_once_stored_and_then_read_from_memory(
    make_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    """A PUT's future is True once the file holds the value; the next read needs no backend."""

    async def main() -> None:
        engine = make_engine()
        store = engine.store
        assert store.cached_body("c1", "stats", "hp") is None  # the channel is not in memory
        assert await store.write("c1", "stats", "hp", Document({"hp": 3})) is True
        assert list((tmp_path / "data").rglob("hp.json"))
        assert store.cached_body("c1", "stats", "hp")[0] == b'{"hp":3}'
        assert store.cached_body("c1", "stats", "other") is ABSENT  # the cache is complete
        await engine.close()

    run(main)


def test_a_document_shaped_like_a_type_mark_is_stored_as_it_is(
    make_engine: Callable[..., Engine],
) -> None:
    """What a client PUTs is what a GET answers, even a dict that looks like a mark."""
    document = {"_moobius_type": "builtins.set", "_moobius_val": [2, 1]}

    async def main() -> None:
        engine = make_engine()
        await engine.store.write("c1", "stats", "tags", Document(document))
        await engine.close()
        again = make_engine()
        assert (await again.store.read_body("c1", "stats", "tags"))[0] == (
            b'{"_moobius_type":"builtins.set","_moobius_val":[2,1]}'
        )  # as stored, byte for byte: not revived into a set and written out again
        await again.close()

    run(main)


def test_reads_of_an_unknown_channel_create_nothing_on_disk(
    make_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    """A scan of random channel ids must not grow the data tree."""

    async def main() -> None:
        engine = make_engine()
        for number in range(20):
            assert await engine.store.read_body(f"random-{number}", "stats", "k") is ABSENT
            assert await engine.store.read_body(f"random-{number}", "log", "k") is ABSENT
            assert await engine.store.keys_page(f"random-{number}", "log", None, 10) == ([], None)
        await engine.close()

    run(main)
    # The root holds the mark of a root served (made when the engine starts), nothing more.
    assert files_under(tmp_path / "data") == [MARK_NAME]


@pytest.mark.parametrize("container", ["stats", "log"])
def test_pages_list_every_key_once_in_key_order(
    make_engine: Callable[..., Engine], container: str
) -> None:
    """Loaded or not, a container's keys come in pages that end with next = None."""
    keys = [f"k{number:03d}" for number in range(25)] + ["Z", "é", "a/b"]

    async def main() -> list[str]:
        engine = make_engine()
        await engine.store.put_many("c1", container, {key: Document(1) for key in keys})
        seen: list[str] = []
        after = None
        for _ in range(100):
            page, after = await engine.store.keys_page("c1", container, after, 7)
            seen.extend(page)
            if after is None:
                break
        await engine.store.write("c1", container, "k000", None, delete=True)
        first, _ = await engine.store.keys_page("c1", container, None, 2)
        await engine.close()
        assert first == [key for key in sorted(keys) if key != "k000"][:2]
        return seen

    assert run(main) == sorted(keys)


def test_deleting_an_absent_key_says_so_and_stores_nothing(
    make_engine: Callable[..., Engine],
) -> None:
    async def main() -> None:
        engine = make_engine()
        assert await engine.store.write("c1", "stats", "nope", None, delete=True) is False
        assert await engine.store.write("c1", "log", "nope", None, delete=True) is False
        await engine.store.write("c1", "log", "yes", Document(1))
        assert await engine.store.write("c1", "log", "yes", None, delete=True) is True
        assert await engine.store.read_body("c1", "log", "yes") is ABSENT
        await engine.close()

    run(main)


def test_an_unknown_container_is_an_error_that_lists_the_served_ones(
    make_engine: Callable[..., Engine],
) -> None:
    async def main() -> None:
        engine = make_engine()
        with pytest.raises(UnknownContainer, match="serves: stats, log"):
            await engine.store.read_body("c1", "nope", "k")
        with pytest.raises(UnknownContainer):
            engine.store.check_container("nope")
        await engine.close()

    run(main)


def test_a_refused_write_fails_its_future_and_the_cache_stops_answering_for_the_key(
    make_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    """A disk that refuses writes: the write fails (never acknowledged), readiness says why."""

    async def main() -> None:
        engine = make_engine()
        await engine.store.write("c1", "stats", "hp", Document(1))
        with unwritable(tmp_path / "data"):
            with pytest.raises(Exception) as failure:
                await engine.store.write("c1", "stats", "hp", Document(2))
            assert getattr(failure.value, "kind", None) in ("permission", "read_only")
            problems = await engine.readiness.check()
            # Both containers live under that root; each is named with a kind, never a path.
            assert set(problems) == {"stats", "log"}
            assert all(kind.isidentifier() for kind in problems.values()), problems
        assert engine.store.cached_body("c1", "stats", "hp") is None  # asks the backend
        assert (await engine.store.read_body("c1", "stats", "hp"))[0] == b"1"
        await engine.close()

    run(main)


def test_writes_queued_together_are_stored_in_one_batch(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many channels' writes that queue while the lane is busy share one call to the
    backend (one journal flush), and each is acknowledged and cached."""
    calls: list[int] = []
    store_together = JSONDatabase.set_many_together

    def counted(parts):  # the real call, counted
        calls.append(len(parts))
        return store_together(parts)

    async def main() -> None:
        engine = make_engine()
        for n in range(50):  # every channel's container in memory: writes queue at once
            await engine.store.read_body(f"c{n}", "stats", "k")
        monkeypatch.setattr(JSONDatabase, "set_many_together", classmethod(
            lambda cls, parts: counted(parts)))  # fmt: skip
        futures = [engine.store.write(f"c{n}", "stats", "k", Document(n)) for n in range(50)]
        assert await asyncio.gather(*futures) == [True] * 50
        for n in range(50):
            assert engine.store.cached_body(f"c{n}", "stats", "k")[0] == str(n).encode()
        await engine.close()

    run(main)
    assert calls == [50], calls


def test_idle_channels_leave_memory_and_their_data_stays(
    make_engine: Callable[..., Engine],
) -> None:
    async def main() -> None:
        engine = make_engine(idle_timeout=0.1)
        await engine.store.write("c1", "stats", "k", Document("v"))
        assert len(engine.channels) == 1
        await asyncio.sleep(0.2)
        assert engine.sweep_idle() == 1
        assert len(engine.channels) == 0
        assert (await engine.store.read_body("c1", "stats", "k"))[0] == b'"v"'
        await engine.close()

    run(main)


# -- a stored value that cannot be decoded -----------------------------------------------


def container_folder(root: Path, container: str, channel: str = "c1") -> Path:
    return root / "data" / "service_chanstore" / f"channel_{channel}" / container


@pytest.mark.parametrize("container", ["stats", "log"])  # loaded, and not
def test_a_damaged_value_is_an_error_that_stays_listed_and_can_be_deleted(
    make_engine: Callable[..., Engine], metrics: Metrics, tmp_path: Path, container: str
) -> None:
    folder = container_folder(tmp_path, container)
    folder.mkdir(parents=True)
    (folder / "good.json").write_text("1")
    (folder / "bad.json").write_text('{"hp": ')  # a torn write

    async def main() -> None:
        engine = make_engine()
        store = engine.store
        for _ in range(2):  # from the backend, then from memory
            with pytest.raises(CorruptValue) as raised:  # it used to read as ABSENT
                await store.read_body("c1", container, "bad")
            assert isinstance(raised.value, UnreadableValue)
            with pytest.raises(UnreadableValue):  # the cached read answers the same
                store.cached_body("c1", container, "bad")
        assert "bad.json" not in str(raised.value)  # container and key, not the file
        assert await store.keys_page("c1", container, None, 10) == (["bad", "good"], None)
        found = await store.get_many("c1", container, ["good", "bad", "none"])
        assert found["good"] == Document(1) and isinstance(found["bad"], UnreadableValue)
        assert await store.write("c1", container, "bad", None, delete=True) is True
        assert not (folder / "bad.json").exists()
        assert await store.read_body("c1", container, "bad") is ABSENT
        (folder / "torn.json").write_text("{")
        engine.channels.evict_all()  # found again when the channel is next opened
        with pytest.raises(CorruptValue):
            await store.read_body("c1", container, "torn")
        assert await store.write("c1", container, "torn", Document({"new": 1})) is True
        assert (await store.read_body("c1", container, "torn"))[0] == b'{"new":1}'
        await engine.close()

    run(main)
    assert metrics.registry.get_sample_value(
        "chanstore_integrity_problems_total", {"container": container, "kind": "corrupt_value"}
    ) == 2  # fmt: skip


def test_a_null_container_stores_nothing_and_answers_null_for_every_key(
    make_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    config = [{"implementation": "null", "name": "scratch", "load": True}]

    async def main() -> None:
        engine = make_engine(config)
        store = engine.store
        assert (await store.read_body("c1", "scratch", "never"))[0] == b"null"  # not ABSENT
        assert await store.write("c1", "scratch", "hp", Document({"hp": 1})) is True
        for key in ("hp", "never", *(f"random-{n}" for n in range(100))):
            assert store.cached_body("c1", "scratch", key)[0] == b"null"
        assert await store.keys_page("c1", "scratch", None, 10) == ([], None)
        assert await store.get_many("c1", "scratch", ["hp", "x"]) == {"hp": None, "x": None}
        assert await store.write("c1", "scratch", "hp", None, delete=True) is True
        slot = engine.channels.ready_slot("c1", "scratch")
        assert slot is not None
        # Nothing kept per key read or written: a scan of keys does not grow memory.
        assert not slot.encoded and slot.cached is not None and len(slot.cached.memory) == 0
        assert slot.sorted_keys in (None, [])
        await engine.close()

    run(main)
    assert not (tmp_path / "data").exists()


def test_a_large_written_value_is_held_as_its_stored_bytes_alone(
    make_engine: Callable[..., Engine],
) -> None:
    """A value of KEPT_AS_BYTES or more is held in memory as its stored bytes (the body a
    GET answers), not as the parsed document, which would take 2.5 times as much; asked
    for as a document, it is parsed again, the same."""
    value = [{"id": number, "text": "hello " * 8, "tags": ["a", "b"]} for number in range(4000)]
    body = json.dumps(value, separators=(",", ":")).encode()
    assert len(body) >= KEPT_AS_BYTES

    async def main() -> None:
        engine = make_engine()
        store = engine.store
        await store.write("c1", "stats", "warm", Document(1))  # the channel, loaded
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            assert await store.write("c1", "stats", "log", parse_document(body)) is True
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # The body's bytes are the test's own (kept as sent): what is held is little more.
        assert held < len(body) // 4, f"{held:,} bytes held for a {len(body):,}-byte value"
        assert store.cached_body("c1", "stats", "log")[0] is body
        await engine.close()
        again = make_engine()  # read from the file the json backend wrote directly
        assert (await again.store.read_body("c1", "stats", "log"))[0] == body
        await again.close()

    run(main)
    document = parse_document(body)
    document.keep_only_stored()
    document.keep_stored(None)  # its bytes are all it holds: kept
    assert document.stored is body
    assert codec.encode_bytes(document) is body
    assert document.doc == value


def test_a_file_form_made_ahead_is_written_as_it_is_and_not_kept(
    make_engine: Callable[..., Engine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon makes a large body's file form beside the event loop: the json backend
    writes it as given (the write lane does not indent the value again), and once the
    write settles the document in memory no longer holds it."""
    value = [{"id": number, "text": "hello " * 8, "tags": ["a", "b"]} for number in range(4000)]
    body = json.dumps(value, separators=(",", ":")).encode()
    document = codec.stored_document(body)
    document.file_form = json.dumps(value, indent=2).encode()

    def not_again(data: bytes) -> bytes:
        raise AssertionError("the write indented a value whose file form was made ahead")

    monkeypatch.setattr(stored_form, "indented", not_again)

    async def main() -> None:
        engine = make_engine()
        store = engine.store
        assert store.writes_file_form("stats") and not store.writes_file_form("nowhere")
        assert await store.write("c1", "stats", "log", document) is True
        assert document.file_form is None  # the form went with the write
        assert store.cached_body("c1", "stats", "log")[0] is body
        await engine.close()

    run(main)
    [path] = (tmp_path / "data").rglob("log.json")
    assert path.read_bytes() == json.dumps(value, indent=2).encode()
