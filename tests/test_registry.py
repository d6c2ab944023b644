"""get_engine: the original's aliases, registered backends and entry points."""

from __future__ import annotations

import importlib.metadata
import textwrap

import pytest

import chanstore
from chanstore import MoobiusStorage, get_engine, known_engines, register_engine
from chanstore.backends import registry
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.backends.null import NullDatabase
from chanstore.backends.redisdb import RedisDatabase
from chanstore.errors import ConfigError, UnknownEngine
from support import DictDatabase


@pytest.fixture(autouse=True)
def private_registrations(monkeypatch):
    """Registrations made by a test are forgotten after it."""
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))


@pytest.mark.parametrize(
    ("name", "engine"),
    [
        *[(n, JSONDatabase) for n in ("json", "JSONdb", "JSONDatabase", "JSON", " json ",
                                       "jsondb\n", "\tJsonDataBase")],
        *[(n, RedisDatabase) for n in ("redis", "RedisDB", "RedisDatabase", "REDIS", " redisdb ")],
        *[(n, NullDatabase) for n in ("null", "None", "False", "NullDatabase", " NULL ", "none")],
    ],
)  # fmt: skip
def test_the_original_aliases(name, engine):
    assert get_engine(name) is engine


@pytest.mark.parametrize("load", [True, False])
@pytest.mark.parametrize("name", ["null", "None", "False", "NullDatabase"])
def test_a_null_container_stores_nothing_and_reads_every_key_as_none(name, load, metrics):
    """As the README says. Values used to stay in the cache and read back, and a loaded
    null container raised KeyError for a key never written."""
    storage = MoobiusStorage("s", "c", [
        {"implementation": name, "name": "scratch", "load": load},
    ], metrics=metrics)  # fmt: skip
    scratch = storage.scratch
    assert scratch.loaded  # nothing to load: complete, and empty
    assert scratch["never"] is None
    assert scratch.get("never", "default") is None
    scratch["hp"] = {"hp": 100}  # acknowledged, and forgotten
    assert scratch["hp"] is None
    scratch.update({"a": 1})
    assert scratch.setdefault("b", 2) is None
    with scratch.editing("c", default=[]) as value:
        assert value is None
    del scratch["hp"]
    assert (list(scratch), len(scratch), dict(scratch.items()), scratch.copy()) == ([], 0, {}, {})
    assert scratch.fetch_many(["x", "y"]) == {"x": None, "y": None}
    assert metrics.registry.get_sample_value(
        "chanstore_cache_entries", {"container": "scratch"}
    ) in (None, 0)  # fmt: skip
    storage.close()


def test_the_storage_module_re_exports_get_engine():
    from chanstore.storage import get_engine as from_storage  # noqa: PLC0415

    assert from_storage is get_engine


@pytest.mark.parametrize("name", ["mongo", "", "jsonn", "red is", "sql"])
def test_an_unknown_name_lists_the_known_ones(name):
    with pytest.raises(UnknownEngine) as raised:
        get_engine(name)
    message = str(raised.value)
    assert f"unknown implementation {name!r}" in message
    assert "known: chanstore, json, null, redis" in message
    assert "jsondb" in message  # the aliases too
    assert isinstance(raised.value, ConfigError)


def test_register_engine_with_aliases():
    register_engine("Dict", DictDatabase, "dictdb", " Memory ")
    for name in ("dict", "DICT", "DictDB", "memory"):
        assert get_engine(name) is DictDatabase
    assert "dict" in known_engines()
    assert "memory" in known_engines()


def test_register_engine_refuses_what_is_not_a_backend():
    with pytest.raises(TypeError, match="not a DatabaseInterface subclass"):
        register_engine("bad", dict)
    with pytest.raises(TypeError):
        register_engine("bad", DictDatabase())


def test_a_registered_engine_works_in_a_db_config():
    register_engine("dict", DictDatabase)
    storage = MoobiusStorage("s", "c", [{"implementation": "dict", "name": "mem"}])
    storage.mem["k"] = {"v": 1}
    assert storage.mem.database.data == {"k": '{"v":1}'}
    assert type(storage.mem.database) is DictDatabase
    storage.close()


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A package that declares a backend in the ``chanstore.backends`` entry-point group."""
    (tmp_path / "chanstore_memo.py").write_text(
        textwrap.dedent(
            """
            from chanstore.backends.base import DatabaseInterface
            from chanstore import codec

            class MemoDatabase(DatabaseInterface):
                engine_name = "memo"
                SETTINGS = {"capacity": (int,)}
                shelves = {}

                def __init__(self, domain="", capacity=10):
                    super().__init__(domain)
                    self.shelf = self.shelves.setdefault(domain, {})

                def get_value(self, key):
                    return True, codec.decode(self.shelf[key])

                def set_value(self, key, value):
                    self.shelf[key] = codec.encode(value)
                    return True, key

                def delete_key(self, key):
                    del self.shelf[key]
                    return True, key

                def all_keys(self):
                    return list(self.shelf)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    declared = [
        importlib.metadata.EntryPoint(
            name="Memo", value="chanstore_memo:MemoDatabase", group=registry.ENTRY_POINT_GROUP
        )
    ]
    asked: list[str] = []

    def entry_points(*, group):
        asked.append(group)
        return declared if group == registry.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(registry, "entry_points", entry_points)
    return asked


def test_an_entry_point_backend(plugin, metrics):
    assert "memo" in known_engines()
    engine = get_engine(" MEMO ")
    assert engine.__name__ == "MemoDatabase"
    assert plugin == [registry.ENTRY_POINT_GROUP, registry.ENTRY_POINT_GROUP]
    # Measured like any backend, and usable from a db_config with its own settings checked.
    storage = MoobiusStorage("s", "c", [
        {"implementation": "memo", "name": "notes", "settings": {"capacity": 5}},
    ], metrics=metrics)  # fmt: skip
    storage.notes["k"] = [1, 2]
    assert storage.notes.database.get_value("k") == (True, [1, 2])
    assert (
        metrics.registry.get_sample_value(
            "chanstore_backend_operation_duration_seconds_count",
            {"backend": "memo", "container": "notes", "operation": "set"},
        )
        == 1
    )
    ok, failure = storage.notes.database.get_value("missing")  # its KeyError is "absent"
    assert (ok, failure.kind) == (False, "not_found")
    with pytest.raises(ConfigError, match="'capacity' must be int"):
        MoobiusStorage("s", "c", [
            {"implementation": "memo", "name": "notes", "settings": {"capacity": "5"}},
        ])  # fmt: skip
    storage.close()


def test_the_redis_backend_is_importable_from_the_package():
    assert chanstore.RedisDatabase is RedisDatabase
    with pytest.raises(AttributeError):
        chanstore.NoSuchThing  # noqa: B018
