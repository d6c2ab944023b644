"""A stored type mark never makes chanstore call what it names.

The original SDK revived ``{"_moobius_type": name, "_moobius_val": v}`` with
``pydoc.locate(name)(v)``: whoever could write a value could make the service
call any importable function. chanstore revives only registered types.
"""

from __future__ import annotations

import json
import sys

import pytest

from chanstore import MoobiusStorage, codec
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.backends.redisdb import RedisDatabase

CALLS: list[object] = []


def record_call(*args: object, **kwargs: object) -> None:
    """A function an attacker would like called: it records that it was."""
    CALLS.append((args, kwargs))


class Recorder:
    """A class whose construction would be just as bad."""

    def __init__(self, *args: object) -> None:
        CALLS.append(args)


@pytest.fixture(autouse=True)
def no_calls_yet():
    CALLS.clear()
    yield
    assert CALLS == []


def payloads(canary) -> dict[str, dict[str, object]]:
    """Type marks naming callables, each of which would leave a trace if called."""
    return {
        "os.system": {"_moobius_type": "os.system", "_moobius_val": f"touch {canary}"},
        "builtins.eval": {
            "_moobius_type": "builtins.eval",
            "_moobius_val": f"open({str(canary)!r}, 'w').close()",
        },
        "builtins.exec": {
            "_moobius_type": "builtins.exec",
            "_moobius_val": f"open({str(canary)!r}, 'w').close()",
        },
        "subprocess.call": {
            "_moobius_type": "subprocess.call",
            "_moobius_val": ["touch", str(canary)],
        },
        "pathlib.Path.touch": {"_moobius_type": "pathlib.Path", "_moobius_val": str(canary)},
        "module function": {
            "_moobius_type": f"{__name__}.record_call",
            "_moobius_val": {"x": 1},
        },
        "module class": {"_moobius_type": f"{__name__}.Recorder", "_moobius_val": [1, 2]},
        "nested": {
            "outer": [{"_moobius_type": f"{__name__}.record_call", "_moobius_val": "inner"}]
        },
    }


def test_decode_calls_nothing(tmp_path):
    canary = tmp_path / "canary"
    for name, payload in payloads(canary).items():
        assert codec.decode(json.dumps(payload)) == payload, name
    assert not canary.exists()


def test_a_data_directory_with_marks_loads_them_as_plain_dicts(tmp_path):
    canary = tmp_path / "canary"
    folder = tmp_path / "data" / "service_s" / "channel_c" / "box"
    folder.mkdir(parents=True)
    marks = payloads(canary)
    for index, payload in enumerate(marks.values()):
        (folder / f"k{index}.json").write_text(json.dumps(payload, indent=2))
    storage = MoobiusStorage("s", "c", [
        {"implementation": "json", "name": "box", "settings": {"root_dir": str(tmp_path / "data")}},
    ])  # fmt: skip
    assert dict(storage.box.items()) == {
        f"k{index}": payload for index, payload in enumerate(marks.values())
    }
    backend = JSONDatabase(domain="service_s.channel_c.box", root_dir=str(tmp_path / "data"))
    assert backend.get_value("k0") == (True, marks["os.system"])
    storage.close()
    assert not canary.exists()


def test_marks_stored_in_redis_call_nothing(tmp_path, redis_settings, redis_server):
    canary = tmp_path / "canary"
    marks = payloads(canary)
    client = redis_server.client()
    client.hset(
        "chanstore:evil", mapping={name: json.dumps(payload) for name, payload in marks.items()}
    )
    client.close()
    backend = RedisDatabase(domain="evil", **redis_settings)
    assert backend.load_all() == marks
    assert backend.get_value("os.system") == (True, marks["os.system"])
    backend.close()
    assert not canary.exists()


def test_a_mark_never_imports_the_module_it_names(tmp_path, monkeypatch):
    canary = tmp_path / "canary"
    (tmp_path / "chanstore_evil_module.py").write_text(
        f"open({str(canary)!r}, 'w').close()\ndef run(value):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    payload = {"_moobius_type": "chanstore_evil_module.run", "_moobius_val": 1}
    assert codec.decode(json.dumps(payload)) == payload
    assert "chanstore_evil_module" not in sys.modules
    assert not canary.exists()
