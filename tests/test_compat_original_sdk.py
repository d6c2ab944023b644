"""Data directories the original SDK wrote load as they are, and chanstore writes the same."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from chanstore import MoobiusStorage, codec
from chanstore.backends.jsonfiles import JSONDatabase
from support import Point


@dataclasses.dataclass
class Character:
    """A class of the service's that the original stored as a type mark."""

    name: str
    hp: int
    position: Point
    items: list[str]


# The original SDK's JSONDatabase wrote json.dumps(<type-marked value>, indent=2) to
# root_dir/service_<sid>/channel_<cid>/<name>/<key>.json; these are such files.
ORIGINAL_FILES: dict[str, dict[str, object]] = {
    "health_bars": {
        "alice": 100,
        "bob": 0,
        "user-3f9a": 87.5,
        "Ünïcødé 玩家": 12,
        "with space": None,
    },
    "profiles": {
        "alice": {"name": "Alice", "tags": ["brave", "fast"], "stats": {"str": 3, "dex": 5}},
        "empty": {},
        "flags": [True, False, None],
        "greeting": "hello\nworld",
        "hero": {
            "_moobius_type": "game.models.Character",
            "_moobius_val": {
                "name": "Hero",
                "hp": 30,
                "position": {"x": 1, "y": 2},
                "items": ["sword"],
            },
        },
        "visited": {"_moobius_type": "builtins.set", "_moobius_val": ["a", "b"]},
        "pair": {"_moobius_type": "builtins.tuple", "_moobius_val": [1, "x"]},
    },
}


def write_original_data_directory(root: Path, service_id: str, channel_id: str) -> None:
    for name, files in ORIGINAL_FILES.items():
        folder = root / f"service_{service_id}" / f"channel_{channel_id}" / name
        folder.mkdir(parents=True)
        for key, value in files.items():
            (folder / f"{key}.json").write_text(json.dumps(value, indent=2))


@pytest.fixture
def character_registered():
    # The class lived in the service's own module game.models; it is registered under that mark.
    codec.register_type(Character, name="game.models.Character")
    yield
    codec.unregister_type("game.models.Character")


def config(root: Path) -> list[dict[str, object]]:
    # Written as the original's example config was.
    return [
        {"implementation": "json", "name": name, "load": True, "clear": False,
         "settings": {"root_dir": str(root)}}
        for name in ORIGINAL_FILES
    ]  # fmt: skip


def test_the_originals_data_directory_loads(tmp_path, character_registered):
    root = tmp_path / "json_db"
    write_original_data_directory(root, "9b3c1f2e-service", "1a2b3c4d-channel")
    storage = MoobiusStorage("9b3c1f2e-service", "1a2b3c4d-channel", config(root))
    assert storage.health_bars.loaded
    assert dict(storage.health_bars.items()) == ORIGINAL_FILES["health_bars"]
    profiles = dict(storage.profiles.items())
    assert profiles["alice"] == ORIGINAL_FILES["profiles"]["alice"]
    assert profiles["hero"] == Character("Hero", 30, Point(1, 2), ["sword"])
    assert isinstance(profiles["hero"].position, Point)
    assert profiles["visited"] == {"a", "b"}
    assert profiles["pair"] == (1, "x")
    assert profiles["greeting"] == "hello\nworld"
    assert sorted(profiles) == sorted(ORIGINAL_FILES["profiles"])
    storage.close()


def test_changes_keep_the_originals_files(tmp_path, character_registered):
    root = tmp_path / "json_db"
    write_original_data_directory(root, "svc", "chan")
    storage = MoobiusStorage("svc", "chan", config(root))
    storage.health_bars["alice"] -= 1
    storage.profiles["hero"].hp = 29
    storage.profiles.save("hero")
    folder = root / "service_svc" / "channel_chan"
    assert (folder / "health_bars" / "alice.json").read_text() == json.dumps(99, indent=2)
    hero = json.loads(json.dumps(ORIGINAL_FILES["profiles"]["hero"]))
    hero["_moobius_val"]["hp"] = 29
    assert (folder / "profiles" / "hero.json").read_text() == json.dumps(hero, indent=2)
    # No file was added, renamed or left behind.
    for name, files in ORIGINAL_FILES.items():
        assert sorted(p.name for p in (folder / name).iterdir()) == sorted(
            f"{key}.json" for key in files
        )
    storage.close()


def test_a_file_written_without_ascii_escapes_loads(tmp_path):
    folder = tmp_path / "service_s" / "channel_c" / "names"
    folder.mkdir(parents=True)
    (folder / "玩家.json").write_text(
        json.dumps({"name": "玩家 🎉"}, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    storage = MoobiusStorage("s", "c", [
        {"implementation": "JSONdb", "name": "names", "settings": {"root_dir": str(tmp_path)}},
    ])  # fmt: skip
    assert dict(storage.names.items()) == {"玩家": {"name": "玩家 🎉"}}
    storage.close()


def test_unregistered_marks_stay_plain_and_survive_a_rewrite(tmp_path):
    root = tmp_path / "json_db"
    write_original_data_directory(root, "svc", "chan")
    storage = MoobiusStorage("svc", "chan", config(root))
    hero = storage.profiles["hero"]
    assert hero == ORIGINAL_FILES["profiles"]["hero"]  # the plain marked dict
    storage.profiles.save("hero")
    path = root / "service_svc" / "channel_chan" / "profiles" / "hero.json"
    assert path.read_text() == json.dumps(ORIGINAL_FILES["profiles"]["hero"], indent=2)
    storage.close()


@pytest.mark.parametrize(
    "value",
    [
        100,
        87.5,
        "text with ünïcödé",
        None,
        True,
        [1, [2, 3], {"a": None}],
        {"name": "Alice", "tags": ["brave"], "nested": {"deep": {"er": [1.5, "x"]}}},
        {},
    ],
    ids=repr,
)
def test_chanstore_writes_exactly_what_the_original_wrote(tmp_path, value):
    db = JSONDatabase(domain="service_s.channel_c.stats", root_dir=str(tmp_path))
    db.set_value("key", value)
    path = tmp_path / "service_s" / "channel_c" / "stats" / "key.json"
    assert path.read_bytes() == json.dumps(value, indent=2).encode()


def test_a_dataclass_is_written_as_the_originals_mark(tmp_path, character_registered):
    db = JSONDatabase(domain="service_s.channel_c.stats", root_dir=str(tmp_path))
    db.set_value("where", Point(1, 2))
    db.set_value("hero", Character("Hero", 30, Point(1, 2), ["sword"]))
    assert (db.path / "where.json").read_text() == json.dumps(
        {"_moobius_type": "support.Point", "_moobius_val": {"x": 1, "y": 2}}, indent=2
    )
    # Registered under the mark the data already had, it keeps writing that mark.
    assert json.loads((db.path / "hero.json").read_text()) == {
        "_moobius_type": "game.models.Character",
        "_moobius_val": {"name": "Hero", "hp": 30, "position": {"x": 1, "y": 2},
                         "items": ["sword"]},
    }  # fmt: skip
    reopened = JSONDatabase(domain="service_s.channel_c.stats", root_dir=str(tmp_path))
    assert reopened.load_all() == {
        "where": Point(1, 2),
        "hero": Character("Hero", 30, Point(1, 2), ["sword"]),
    }
