"""db_config: every mistake named by entry, field and expectation; nothing built from it."""

from __future__ import annotations

import json

import pytest

from chanstore import MoobiusStorage
from chanstore.config import ContainerSpec, DbConfig, load_db_config, parse_db_config
from chanstore.errors import ConfigError
from support import DictDatabase

GOOD = {"implementation": "json", "name": "stats", "settings": {"root_dir": "data"}}


def problems_of(config) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_db_config(config)
    assert str(raised.value) == "; ".join(raised.value.problems)
    return raised.value.problems


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"implementation": "mongo", "name": "x"},
            [
                "entry 0 ('x')",
                "field 'implementation'",
                "unknown implementation 'mongo'",
                "known: chanstore, json, null, redis",
            ],
        ),
        (
            {"implementation": 5, "name": "x"},
            ["entry 0 ('x')", "field 'implementation'", "expected a backend name", "int 5"],
        ),
        ({"name": "x"}, ["entry 0 ('x')", "field 'implementation'", "got nothing"]),
        ({"implementation": "json"}, ["entry 0", "field 'name'", "expected a string"]),
        (
            {"implementation": "json", "name": 7},
            ["entry 0", "field 'name'", "expected a string, got int 7"],
        ),
        (
            {"implementation": "json", "name": "1st"},
            ["entry 0 ('1st')", "field 'name'", "not a Python identifier"],
        ),
        (
            {"implementation": "json", "name": "has space"},
            ["field 'name'", "not a Python identifier"],
        ),
        ({"implementation": "json", "name": ""}, ["field 'name'", "not a Python identifier"]),
        ({"implementation": "json", "name": "_private"}, ["field 'name'", "starts with '_'"]),
        ({"implementation": "json", "name": "__dict__"}, ["field 'name'", "starts with '_'"]),
        *[
            (
                {"implementation": "json", "name": attr},
                [f"entry 0 ('{attr}')", "field 'name'", "MoobiusStorage attribute"],
            )
            for attr in (
                "close",
                "put",
                "add_container",
                "remove_container",
                "containers",
                "domain_of",
                "service_id",
                "channel_id",
                "strict_mode",
            )
        ],
        (
            {"implementation": "json", "name": "a", "load": "yes"},
            ["entry 0 ('a')", "field 'load'", "expected true or false", "str 'yes'"],
        ),
        (
            {"implementation": "json", "name": "a", "clear": 1},
            ["entry 0 ('a')", "field 'clear'", "expected true or false", "int 1"],
        ),
        (
            {"implementation": "json", "name": "a", "load": None},
            ["field 'load'", "expected true or false, got nothing"],
        ),
        (
            {"implementation": "json", "name": "a", "settings": ["root_dir", "x"]},
            ["entry 0 ('a')", "field 'settings'", "expected an object", "list"],
        ),
        (
            {"implementation": "json", "name": "a", "settings": "data"},
            ["field 'settings'", "expected an object", "str 'data'"],
        ),
        (
            {"implementation": "json", "name": "a", "settings": {"root_dir": 5}},
            ["entry 0 ('a')", "field 'settings'", "'root_dir' must be str, not int"],
        ),
        (
            {"implementation": "json", "name": "a", "settings": {"fsync": "no"}},
            ["field 'settings'", "'fsync' must be bool, not str"],
        ),
        (
            {"implementation": "redis", "name": "a", "settings": {"port": "6379"}},
            ["field 'settings'", "'port' must be int, not str"],
        ),
        (
            {"implementation": "redis", "name": "a", "settings": {"port": True}},
            ["field 'settings'", "'port' must be int, not bool"],
        ),
        (
            {"implementation": "redis", "name": "a", "settings": {"socket_timeout": "1s"}},
            ["field 'settings'", "'socket_timeout' must be int or float"],
        ),
        (
            {"implementation": "redis", "name": "a", "settings": {"prot": 6380}},
            [
                "entry 0 ('a')",
                "field 'settings'",
                "'prot' is not a setting of RedisDatabase",
                "known: db, host, key_prefix, master_name, min_replicas, mode, nodes, password,",
            ],
        ),
        (
            {"implementation": "json", "name": "a", "settings": {"fsinc": False}},
            [
                "field 'settings'",
                "'fsinc' is not a setting of JSONDatabase",
                "(known: fsync, root_dir)",
            ],
        ),
        (
            {"implementation": "null", "name": "a", "settings": {"host": "x"}},
            ["field 'settings'", "'host' is not a setting of NullDatabase (known: none)"],
        ),
        (
            {"implementation": "json", "name": "a", "colour": "red"},
            ["entry 0", "unknown field 'colour'", "known: implementation, name"],
        ),
        (5, ["entry 0", "expected an object", "got int"]),
    ],
    ids=lambda v: None if isinstance(v, list) else json.dumps(v)[:60],
)
def test_a_bad_entry_names_its_index_field_and_expectation(entry, expected):
    # The bad entry is second, after a good one: the index must be its own.
    problems = problems_of([GOOD, entry])
    assert len(problems) == 1
    message = problems[0].replace("entry 1", "entry 0")
    assert message.startswith("db_config: entry 0")
    for part in expected:
        assert part in message


def test_duplicate_names():
    problems = problems_of([GOOD, {"implementation": "null", "name": "other"}, GOOD])
    assert problems == [
        "db_config: entry 2: field 'name': 'stats' is already the name of entry 0; "
        "names must be unique"
    ]


def test_every_problem_is_reported_at_once():
    problems = problems_of([
        {"implementation": "nope", "name": "a"},
        GOOD,
        {"implementation": "json", "name": "_b", "load": 1},
    ])  # fmt: skip
    assert [p.split(":")[1].strip() for p in problems] == [
        "entry 0 ('a')", "entry 2 ('_b')", "entry 2 ('_b')",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("config", "kind"),
    [({"name": "x"}, "dict"), (b"[]", "bytes"), (5, "int"), (None, "NoneType")],
    ids=repr,
)
def test_db_config_that_is_not_a_list(config, kind):
    assert problems_of(config) == [f"db_config: expected a list of container entries, got {kind}"]


def test_a_file_that_cannot_be_read(tmp_path):
    missing = tmp_path / "missing.json"
    (problem,) = problems_of(str(missing))
    assert str(missing) in problem
    assert "cannot be read" in problem
    (problem,) = problems_of(tmp_path)  # a folder
    assert "cannot be read" in problem


def test_a_file_that_is_not_json(tmp_path):
    path = tmp_path / "db.json"
    path.write_text('[{"implementation": "json",\n  "name": }]')
    (problem,) = problems_of(path)
    assert str(path) in problem
    assert "not valid JSON" in problem
    assert "line 2" in problem
    path.write_bytes(b"\xff\xfe[")
    (problem,) = problems_of(path)
    assert "not UTF-8" in problem


def test_a_file_holding_bad_entries_names_the_file(tmp_path):
    path = tmp_path / "db.json"
    path.write_text(json.dumps([GOOD, {"implementation": "json", "name": "x", "load": "no"}]))
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: entry 1 ('x'): field 'load'")


def test_a_good_file(tmp_path):
    path = tmp_path / "db.json"
    path.write_text(json.dumps([GOOD, {"implementation": "null", "name": "scratch",
                                       "load": False, "clear": True}]))  # fmt: skip
    config = load_db_config(path)
    assert config.source == str(path)
    assert [spec.name for spec in config] == ["stats", "scratch"]
    assert len(config) == 2
    assert config.by_name()["scratch"] == ContainerSpec(
        name="scratch", implementation="null", settings={}, load=False, clear=True
    )
    assert load_db_config(config) is config


def test_defaults_and_as_entry():
    (spec,) = parse_db_config([{"implementation": " JSONdb ", "name": "x"}]).containers
    assert (spec.load, spec.clear, dict(spec.settings)) == (True, False, {})
    assert spec.engine.__name__ == "JSONDatabase"
    assert spec.as_entry() == {
        "implementation": " JSONdb ", "name": "x", "load": True, "clear": False, "settings": {},
    }  # fmt: skip
    assert parse_db_config([spec.as_entry()]).containers == (spec,)


def test_same_backend():
    first, second, third = parse_db_config([
        {"implementation": "json", "name": "a", "settings": {"root_dir": "d"}},
        {"implementation": "JSONDatabase", "name": "b", "settings": {"root_dir": "d"}},
        {"implementation": "json", "name": "c", "settings": {"root_dir": "e"}},
    ]).containers  # fmt: skip
    assert first.same_backend(second)
    assert not first.same_backend(third)


def test_root_dir_on_a_backend_that_does_not_use_it_is_only_a_warning(redis_settings):
    # The original SDK's own example config gives a redis entry a root_dir.
    entry = {"implementation": "redis", "name": "mana_bars", "load": True, "clear": False,
             "settings": {**redis_settings, "root_dir": "json_db"}}  # fmt: skip
    config = load_db_config([entry, {"implementation": "null", "name": "scratch",
                                     "settings": {"root_dir": "json_db"}}])  # fmt: skip
    assert isinstance(config, DbConfig)
    first, second = config.warnings
    assert "entry 0 ('mana_bars')" in first
    assert "'root_dir' is not used by RedisDatabase" in first
    assert "entry 1 ('scratch')" in second
    storage = MoobiusStorage("svc", "chan", [entry])
    storage.mana_bars["alice"] = 10
    assert storage.mana_bars["alice"] == 10
    storage.close()


def test_a_misspelt_setting_is_a_problem_and_reaches_no_server(redis_settings):
    """A typo must not silently send the data to the default server."""
    entry = {"implementation": "redis", "name": "mana_bars",
             "settings": {**redis_settings, "prot": redis_settings["port"]}}  # fmt: skip
    (problem,) = problems_of([entry])
    assert problem.startswith("db_config: entry 0 ('mana_bars'): field 'settings': ")
    assert "'prot' is not a setting of RedisDatabase" in problem
    assert "port" in problem.split("known:")[1]
    with pytest.raises(ConfigError, match="'prot'"):
        MoobiusStorage("svc", "chan", [entry])


class Declared(DictDatabase):
    SETTINGS = {"size": (int,)}


class Undeclared(DictDatabase):
    def __init__(self, domain="", store=None, *, size=1):
        super().__init__(domain, store)


class Anything(DictDatabase):
    def __init__(self, domain="", **options):
        super().__init__(domain)


@pytest.mark.parametrize(
    ("backend", "known"),
    [(Declared, {"size"}), (Undeclared, {"store", "size"}), (Anything, None)],
    ids=["declared", "from-the-constructor", "cannot-tell"],
)
def test_a_third_party_backends_settings(backend, known):
    """SETTINGS when declared; else the constructor's; a **kwargs one cannot be checked."""
    assert backend.known_settings() == (frozenset(known) if known is not None else None)
    problems, warnings = backend.check_settings({"size": 2, "colour": "red"})
    if known is None:
        assert (problems, warnings) == ([], [])
    else:
        assert problems == [
            f"setting 'colour' is not a setting of {backend.__name__} "
            f"(known: {', '.join(sorted(known))})"
        ]


def test_nothing_is_built_from_a_config_with_a_problem(tmp_path):
    root = tmp_path / "data"
    config = [
        {"implementation": "json", "name": "first", "settings": {"root_dir": str(root)}},
        {"implementation": "json", "name": "second", "load": "yes",
         "settings": {"root_dir": str(root)}},
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="entry 1 \\('second'\\): field 'load'"):
        MoobiusStorage("svc", "chan", config)
    assert not root.exists()
