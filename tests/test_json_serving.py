"""The mark of a json root a daemon serves (chanstore.backends.json_serving), through the
json backend's class methods, as the daemon and the transfers use it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from chanstore.backends.files import PlantedLink
from chanstore.backends.json_serving import MARK_NAME
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.backends.null import NullDatabase

#: Seconds a helper process gets to take its mark, or to die.
HELPER_TIMEOUT = 20


def settings(root: Path) -> dict[str, str]:
    return {"root_dir": str(root)}


def test_a_root_nobody_marked_is_served_by_nobody(tmp_path):
    assert JSONDatabase.served_elsewhere(settings(tmp_path / "missing")) is None
    assert JSONDatabase.served_elsewhere(settings(tmp_path)) is None
    assert not (tmp_path / "missing").exists()  # asking makes nothing


def test_marks_are_shared_and_the_root_is_served_until_the_last_is_taken_back(tmp_path):
    root = tmp_path / "data"
    first = JSONDatabase.mark_served(settings(root))  # the root is made
    second = JSONDatabase.mark_served(settings(root))
    assert (root / MARK_NAME).stat().st_size == 0
    said = JSONDatabase.served_elsewhere(settings(root))
    assert said == f"a running chanstore daemon serves its json root {root} from memory"
    first()
    assert JSONDatabase.served_elsewhere(settings(root)) is not None
    second()
    assert JSONDatabase.served_elsewhere(settings(root)) is None


def test_the_mark_is_no_key_and_no_domain(tmp_path):
    release = JSONDatabase.mark_served(settings(tmp_path))
    try:
        db = JSONDatabase(domain="", root_dir=str(tmp_path))
        db.set_value("k", 1)
        assert list(db.all_keys()) == ["k"]
        db.close()
        assert list(JSONDatabase.list_domains("service_", root_dir=str(tmp_path))) == []
    finally:
        release()


def test_a_process_that_dies_holding_its_mark_serves_nothing(tmp_path):
    holder = textwrap.dedent(f"""
        import sys
        from chanstore.backends.jsonfiles import JSONDatabase
        JSONDatabase.mark_served({{"root_dir": {str(tmp_path)!r}}})
        print("marked", flush=True)
        sys.stdin.read()
    """)
    process = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "marked\n"
        assert JSONDatabase.served_elsewhere(settings(tmp_path)) is not None
    finally:
        process.kill()
        process.wait(HELPER_TIMEOUT)
    assert JSONDatabase.served_elsewhere(settings(tmp_path)) is None


def test_a_link_planted_as_the_mark_is_reported_never_followed(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir()
    outside.write_text("not chanstore's")
    (root / MARK_NAME).symlink_to(outside)
    with capture_logs() as logs, pytest.raises(PlantedLink) as raised:
        JSONDatabase.mark_served(settings(root))
    assert raised.value.path == str(root / MARK_NAME)
    assert [e["found_by"] for e in logs if e["event"] == "json_planted_link"] == [
        "marking the root served"
    ]
    db = JSONDatabase(domain="", root_dir=str(root))
    try:
        assert [p.kind for p in db.integrity_problems()] == ["planted_link"]
    finally:
        db.close()
    with pytest.raises(PlantedLink):
        JSONDatabase.served_elsewhere(settings(root))
    assert outside.read_text() == "not chanstore's"
    assert os.path.islink(root / MARK_NAME)


def test_a_store_that_tells_every_daemon_needs_no_mark(tmp_path):
    release = NullDatabase.mark_served({})
    release()
    assert NullDatabase.served_elsewhere({}) is None
