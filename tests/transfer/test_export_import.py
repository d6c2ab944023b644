"""Export then import, over json and Redis, through the ``chanstore`` command."""

from __future__ import annotations

import json

import pytest
from transfer_fixtures import fill, read_back, report, storage

from support import VALUES, assert_same

#: Keys a backend must carry across: path-like, dot-dot, non-ASCII, long.
ODD_KEYS = ["a/b", "..", ".", "ü 🎉", "k" * 300, "%2F", "back\\slash"]
CHANNELS = ["c1", "chan/2", "ünï"]


def every_value() -> dict[str, object]:
    items: dict[str, object] = dict(VALUES)
    items.update({key: f"value of {key[:10]}" for key in ODD_KEYS})
    return items


@pytest.fixture(params=["json", "redis"])
def kind(request):
    return request.param


def config_of(configs, kind, name):
    return configs.json(root=name) if kind == "json" else configs.redis(prefix=f"{name}:")


def test_export_then_import_round_trips_every_value_type_and_odd_key(configs, cli, kind):
    source, target = config_of(configs, kind, "old"), config_of(configs, kind, "new")
    stored = fill(source, {channel: {"stats": every_value(), "profiles": {"p": 1}}
                           for channel in CHANNELS})  # fmt: skip
    exported = cli("export", "--db-config", str(source), "-o", "backup.jsonl")
    assert exported.status == 0, exported.stderr
    backup = (configs.folder / "backup.jsonl").read_text()
    assert backup.isascii() and len(backup.splitlines()) == stored
    imported = cli("import", "--db-config", str(target), "backup.jsonl")
    assert imported.status == 0, imported.stderr
    for channel in CHANNELS:
        held = read_back(target, channel, "stats")
        assert held.keys() == every_value().keys()
        for key, value in every_value().items():
            assert_same(held[key], value, f"{channel}/{key[:20]}")
        assert read_back(target, channel, "profiles") == {"p": 1}


def test_import_twice_stores_nothing_the_second_time(configs, cli, kind):
    source, target = config_of(configs, kind, "old"), config_of(configs, kind, "new")
    fill(source, {"c1": {"stats": {"a": 1, "b": {2}}}, "c2": {"profiles": {"x": "y"}}})
    lines = cli("export", "--db-config", str(source)).stdout.encode()
    first = cli("import", "--db-config", str(target), stdin=lines)
    second = cli("import", "--db-config", str(target), stdin=lines)
    assert first.status == second.status == 0
    assert report(first.stdout)["stats"][:4] == [
        "1",
        "2",
        "2",
        "0",
    ]  # channels keys copied unchanged
    assert report(second.stdout)["stats"][:4] == ["1", "2", "0", "2"]
    assert report(second.stdout)["profiles"][:4] == ["1", "1", "0", "1"]
    assert read_back(target, "c1", "stats") == {"a": 1, "b": {2}}


def test_a_bad_line_is_named_and_nothing_is_stored(configs, cli):
    target = configs.json(root="new")
    good = json.dumps({"channel": "c", "container": "stats", "key": "k", "value": 1})
    lines = f"{good}\n{good.replace('stats', 'nope')}\n{{oops\n".encode()
    ran = cli("import", "--db-config", str(target), stdin=lines)
    assert ran.status == 2
    assert (
        "line 2: container 'nope' is not in the db_config (it has: profiles, stats)" in ran.stderr
    )
    assert "line 3: not JSON" in ran.stderr
    assert not (configs.folder / "new").exists()


def test_export_takes_only_the_channels_and_containers_named(configs, cli):
    source = configs.json()
    fill(source, {"c1": {"stats": {"a": 1}, "profiles": {"b": 2}}, "c2": {"stats": {"c": 3}}})
    ran = cli("export", "--db-config", str(source), "--channel", "c1", "--container", "stats")
    assert ran.status == 0, ran.stderr
    assert [json.loads(line) for line in ran.stdout.splitlines()] == [
        {"channel": "c1", "container": "stats", "key": "a", "value": 1}
    ]
    unknown = cli("export", "--db-config", str(source), "--container", "nope")
    assert unknown.status == 2
    assert "has no container 'nope' (it has: stats, profiles)" in unknown.stderr


def test_a_damaged_value_is_reported_not_exported_and_the_rest_is(configs, cli):
    source = configs.json()
    fill(source, {"c1": {"stats": {"good": 1, "bad": 2}}})
    (configs.folder / "data/service_svc/channel_c1/stats/bad.json").write_text("{torn")
    ran = cli("export", "--db-config", str(source), "-o", "out.jsonl")
    assert ran.status == 1
    assert "FAILED: 1 damaged" in ran.stderr and "'bad'" in ran.stderr
    lines = (configs.folder / "out.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["good"]


def test_a_null_container_exports_nothing(configs, cli):
    config = configs.write([{"implementation": "null", "name": "stats", "settings": {}}])
    ran = cli("export", "--db-config", str(config))
    assert ran.status == 0, ran.stderr
    assert ran.stdout == ""


def test_import_reads_values_written_by_this_process_registered_types_included(configs, cli):
    # The CLI process knows no dataclass of the service: values cross in stored form.
    source, target = configs.json(root="old"), configs.json(root="new")
    fill(source, {"c1": {"stats": {"player": VALUES["nested dataclass"]}}})
    lines = cli("export", "--db-config", str(source)).stdout.encode()
    assert cli("import", "--db-config", str(target), stdin=lines).status == 0
    held = storage(target, "c1")
    try:
        assert_same(held.stats["player"], VALUES["nested dataclass"])
    finally:
        held.close()
