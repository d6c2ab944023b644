"""MoobiusStorage: one CachedDict per db_config entry, on the original's domains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from chanstore import CachedDict, ChannelStorage, MoobiusStorage
from chanstore.backends.json_layout import NAME_FILE, hashed_name
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.backends.null import NullDatabase
from chanstore.errors import ConfigError, InvalidKey, WriteRefused
from chanstore.storage import RESERVED_NAMES, container_domain
from support import files_under, unwritable


def json_entry(root, name="stats", **fields):
    return {"implementation": "json", "name": name, "settings": {"root_dir": str(root)}, **fields}


def test_an_attribute_per_entry(tmp_path, metrics):
    storage = MoobiusStorage("svc", "chan", [
        json_entry(tmp_path, "health_bars"),
        {"implementation": "null", "name": "scratch"},
    ], metrics=metrics)  # fmt: skip
    assert isinstance(storage.health_bars, CachedDict)
    assert isinstance(storage.scratch.database, NullDatabase)
    assert list(storage.containers) == ["health_bars", "scratch"]
    assert storage.containers["health_bars"] is storage.health_bars
    with pytest.raises(TypeError):
        storage.containers["x"] = storage.scratch
    storage.health_bars["alice"] = 100
    assert (
        json.loads((tmp_path / "service_svc/channel_chan/health_bars/alice.json").read_text())
        == 100
    )
    assert "health_bars" in repr(storage)
    assert storage.health_bars.name == "health_bars"  # the container label in metrics
    storage.close()


def test_channel_storage_is_the_same_class():
    assert ChannelStorage is MoobiusStorage


def test_the_domain_is_the_originals(tmp_path):
    storage = MoobiusStorage("svc-1", 42, [json_entry(tmp_path)])
    assert storage.domain_of("stats") == "service_svc-1.channel_42.stats"
    assert storage.stats.database.domain == "service_svc-1.channel_42.stats"
    assert storage.channel_id == "42"
    storage.stats["k"] = 1
    assert files_under(tmp_path) == [os.path.join("service_svc-1", "channel_42", "stats", "k.json")]
    storage.close()


@pytest.mark.parametrize(
    ("service_id", "channel_id"),
    [
        ("..", ".."),
        ("../..", "../../etc"),
        ("/abs", "/etc/passwd"),
        (".", "."),
        ("a.b", "c"),
        ("a", "b.c"),
        ("a%2Eb", "c"),
        ("a\\b", "c\x01d"),
        ("s", "c" * 256),
        ("s" * 256, "é" * 128),
    ],
)
def test_ids_cannot_escape_root_dir(tmp_path, service_id, channel_id):
    root = tmp_path / "root"
    storage = MoobiusStorage(service_id, channel_id, [json_entry(root)])
    storage.stats["k"] = {"who": [service_id, channel_id]}
    root_real = os.path.realpath(root)
    for where, dirs, names in os.walk(tmp_path):
        for name in dirs + names:
            path = os.path.realpath(os.path.join(where, name))
            assert path == root_real or path.startswith(root_real + os.sep)
    # Three folder levels, then the file: an id added no level and left none.
    (only, *names) = sorted(files_under(root), key=lambda path: not path.endswith(".json"))
    assert only.endswith(".json") and len(only.split(os.sep)) == 4
    # Besides it, only the name file of each folder named by a hash (a part over 255
    # bytes), inside that folder, holding the part whose hash names it.
    folders = os.path.dirname(only).split(os.sep)
    parts = container_domain(service_id, channel_id, "stats").split(".")
    hashed = [depth for depth, part in enumerate(parts) if folders[depth] != part]
    assert [len(parts[depth].encode()) > 255 for depth in hashed] == [True] * len(hashed)
    expected = [os.path.join(*folders[: depth + 1], NAME_FILE) for depth in hashed]
    assert sorted(names) == sorted(expected)
    for depth, name in zip(hashed, expected, strict=True):
        assert hashed_name((root / name).read_text("utf-8")) == folders[depth]
    reopened = MoobiusStorage(service_id, channel_id, [json_entry(root)])
    assert reopened.stats["k"] == {"who": [service_id, channel_id]}
    storage.close()
    reopened.close()


def test_ids_that_look_alike_do_not_collide(tmp_path):
    pairs = [("a.b", "c"), ("a", "b.c"), ("a%2Eb", "c"), ("a", "b%2Ec"), ("a", "b/c"), ("a/b", "c")]
    domains = {container_domain(s, c, "stats") for s, c in pairs}
    assert len(domains) == len(pairs)
    for index, (service_id, channel_id) in enumerate(pairs):
        storage = MoobiusStorage(service_id, channel_id, [json_entry(tmp_path)])
        storage.stats["k"] = index
        storage.close()
    for index, (service_id, channel_id) in enumerate(pairs):
        storage = MoobiusStorage(service_id, channel_id, [json_entry(tmp_path)])
        assert dict(storage.stats.items()) == {"k": index}
        storage.close()


def test_channel_id_limits(tmp_path):
    MoobiusStorage("s", "c" * 256, [json_entry(tmp_path)]).close()
    MoobiusStorage("s", "€" * 85, []).close()  # 255 bytes
    with pytest.raises(InvalidKey, match="257 bytes"):
        MoobiusStorage("s", "c" * 257, [json_entry(tmp_path / "never")])
    with pytest.raises(InvalidKey, match="258 bytes"):
        MoobiusStorage("s", "€" * 86, [])
    with pytest.raises(InvalidKey, match="NUL"):
        MoobiusStorage("s", "c\x00", [])
    with pytest.raises(InvalidKey, match="empty"):
        MoobiusStorage("s", "", [])
    with pytest.raises(InvalidKey, match="service id"):
        MoobiusStorage("s" * 257, "c", [])
    assert not (tmp_path / "never").exists()


def test_key_limits(tmp_path):
    storage = MoobiusStorage("s", "c", [json_entry(tmp_path)])
    storage.stats["k" * 1024] = 1
    storage.stats["€" * 341] = 2  # 1023 bytes
    assert storage.stats["k" * 1024] == 1
    with pytest.raises(InvalidKey, match="1025 bytes"):
        storage.stats["k" * 1025] = 1
    with pytest.raises(InvalidKey, match="1026 bytes"):
        storage.stats["€" * 342] = 1
    with pytest.raises(InvalidKey, match="NUL"):
        storage.stats["a\x00b"] = 1
    assert sorted(storage.stats) == sorted(["k" * 1024, "€" * 341])
    storage.close()


def test_load_and_clear(tmp_path):
    first = MoobiusStorage("s", "c", [json_entry(tmp_path, "a"), json_entry(tmp_path, "b")])
    first.a.update({"x": 1, "y": 2})
    first.b.update({"x": 1})
    first.close()

    loaded = MoobiusStorage("s", "c", [json_entry(tmp_path, "a", load=True)])
    assert loaded.a.loaded
    memory = loaded.a.memory
    held_keys = memory.keys()  # a list: CacheMemory is not a mapping
    assert {key: memory.peek(key) for key in held_keys} == {"x": 1, "y": 2}
    loaded.close()

    lazy = MoobiusStorage("s", "c", [json_entry(tmp_path, "a", load=False)])
    assert not lazy.a.loaded
    assert len(lazy.a.memory) == 0
    assert lazy.a["y"] == 2  # read from the backend on demand
    assert len(lazy.a) == 2
    lazy.close()

    # clear wins over load, and clears only its own container.
    cleared = MoobiusStorage("s", "c", [json_entry(tmp_path, "a", load=True, clear=True)])
    assert dict(cleared.a.items()) == {}
    assert JSONDatabase(domain="service_s.channel_c.a", root_dir=str(tmp_path)).load_all() == {}
    assert JSONDatabase(domain="service_s.channel_c.b", root_dir=str(tmp_path)).load_all() == {
        "x": 1
    }
    cleared.close()


def test_close_detaches_every_container_and_keeps_the_data(tmp_path):
    storage = MoobiusStorage("s", "c", [json_entry(tmp_path, "a"), json_entry(tmp_path, "b")])
    storage.a["k"] = 1
    storage.close()
    assert not hasattr(storage, "a")
    assert not hasattr(storage, "b")
    assert dict(storage.containers) == {}
    assert MoobiusStorage("s", "c", [json_entry(tmp_path, "a")]).a["k"] == 1


def test_add_and_remove_containers(tmp_path):
    storage = MoobiusStorage("s", "c")
    added = storage.add_container("json", {"root_dir": str(tmp_path)}, name="later", load=True)
    assert storage.later is added
    storage.later["k"] = "v"
    with pytest.raises(ConfigError, match="already a container"):
        storage.add_container("null", name="later")
    with pytest.raises(ConfigError, match="MoobiusStorage attribute"):
        storage.put("close", NullDatabase())
    with pytest.raises(ConfigError, match="starts with '_'"):
        storage.put("_cache", NullDatabase())
    removed = storage.remove_container("later")
    assert removed is added
    assert not hasattr(storage, "later")
    storage.put("mem", NullDatabase(), load=False)
    assert isinstance(storage.mem, CachedDict)
    storage.close()


def test_reserved_names_cover_every_public_attribute():
    storage = MoobiusStorage("s", "c")
    public = {name for name in dir(storage) if not name.startswith("_")}
    assert public <= RESERVED_NAMES
    storage.close()


def test_db_config_from_a_file(tmp_path):
    path = tmp_path / "db.json"
    path.write_text(json.dumps([json_entry(tmp_path / "data", "from_file")]))
    storage = MoobiusStorage("s", "c", str(path))
    storage.from_file["k"] = 1
    assert (tmp_path / "data/service_s/channel_c/from_file/k.json").exists()
    storage.close()
    storage = MoobiusStorage("s", "c", path)  # a Path works too
    assert storage.from_file["k"] == 1
    storage.close()


def test_strict_mode_reaches_every_container(open_tmp_path):
    strict = MoobiusStorage("s", "c", [json_entry(open_tmp_path)], strict_mode=True)
    lenient = MoobiusStorage("s", "c", [json_entry(open_tmp_path)])
    with unwritable(strict.stats.database.path):
        with pytest.raises(WriteRefused):
            strict.stats["k"] = 1
        lenient.stats["k"] = 1  # kept in memory, logged and counted
    assert "k" not in strict.stats
    assert lenient.stats["k"] == 1
    strict.close()
    lenient.close()


def test_metrics_of_the_containers_go_to_the_registry_given(tmp_path, metrics):
    storage = MoobiusStorage("s", "c", [json_entry(tmp_path, load=True)], metrics=metrics)
    storage.stats["k"] = 1
    assert (
        metrics.registry.get_sample_value(
            "chanstore_backend_operation_duration_seconds_count",
            {"backend": "json", "container": "stats", "operation": "set"},
        )
        == 1
    )
    assert metrics.registry.get_sample_value("chanstore_cache_entries", {"container": "stats"}) == 1
    storage.close()


# -- used by a tool that prints JSON: the log stays out of its output ------------------

TOOL = textwrap.dedent("""
    import json, logging, sys
    from chanstore import MoobiusStorage
    from chanstore.errors import CorruptValue

    root, level = sys.argv[1], sys.argv[2]
    if level != "unset":  # the tool's own logging set-up
        logging.basicConfig(stream=sys.stderr, level=getattr(logging, level),
                            format="%(name)s|%(levelname)s|%(message)s")
    storage = MoobiusStorage("svc", "chan", [{"implementation": "json", "name": "stats",
                                              "load": True, "settings": {"root_dir": root}}])
    report = {}
    for key in sorted(storage.stats):
        try:
            report[key] = storage.stats[key]
        except CorruptValue:
            report[key] = "damaged"
    print(json.dumps(report))
""")


def run_tool(root, level):
    return subprocess.run([sys.executable, "-c", TOOL, str(root), level], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


@pytest.fixture
def tool_data(tmp_path):
    """A container holding a good value, a torn one and one of an unregistered type."""
    folder = tmp_path / "service_svc" / "channel_chan" / "stats"
    folder.mkdir(parents=True)
    (folder / "good.json").write_text('{"hp": 1}')
    (folder / "bad.json").write_text('{"hp": ')
    (folder / "mark.json").write_text('{"_moobius_type": "app.Gone", "_moobius_val": {"a": 1}}')
    return tmp_path


REPORT = {"bad": "damaged", "good": {"hp": 1}, "mark": {"_moobius_type": "app.Gone",
                                                       "_moobius_val": {"a": 1}}}  # fmt: skip


def test_library_events_go_to_standard_logging_never_to_stdout(tool_data):
    """They used to be printed on stdout by structlog's default, breaking the tool's JSON."""
    done = run_tool(tool_data, "INFO")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == REPORT  # stdout is the tool's output alone
    lines = done.stderr.splitlines()
    # Through the logger "chanstore", at their levels, formatted by the tool's own format.
    assert any(line.startswith("chanstore|ERROR|integrity_problem ") and "bad.json" in line
               for line in lines), lines  # fmt: skip
    assert any(line.startswith("chanstore|WARNING|unregistered_type ") and "app.Gone" in line
               for line in lines), lines  # fmt: skip


def test_library_events_obey_the_applications_level(tool_data):
    done = run_tool(tool_data, "CRITICAL")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == REPORT
    assert "chanstore|" not in done.stderr
    assert "integrity_problem" not in done.stderr


def test_without_any_logging_set_up_warnings_reach_stderr_alone(tool_data):
    """Python's last-resort handler: warnings and errors on stderr, as for any library."""
    done = run_tool(tool_data, "unset")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == REPORT
    assert "integrity_problem" in done.stderr and "unregistered_type" in done.stderr
