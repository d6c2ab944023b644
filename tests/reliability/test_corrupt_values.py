"""Stored values a real daemon cannot decode, and its null containers: no comforting lies.

A value is stored through the daemon, the daemon is stopped, its file is
truncated (a torn write, a disk that lost a block), and the daemon is started
again. It used to answer such a key with 404, leave it out of listings, and
answer DELETE with 404 while the file stayed. Now: 500 ``corrupt`` naming
container and key (the path goes to the log only), listed, reported per key by
a bulk get, logged at error and counted once per discovery, deletable, and
overwritable. Both a loaded container and one read key by key are checked.

A null container stores nothing: every key answers 200 ``null``, nothing is
listed, nothing is written to disk, and a loaded one is fine.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from load_helpers import DaemonProcess, daemon_running, json_entry, key_path

from chanstore.client import DamagedValueError
from chanstore.versions import etag_of

CHANNEL = "ch-torn"
CONFIG = [
    json_entry("stats"),  # loaded when the channel is first used
    json_entry("lazy", load=False),  # read key by key
    {"implementation": "null", "name": "scratch", "load": True, "clear": False},
]


def value_file(daemon: DaemonProcess, container: str, key: str) -> Path:
    return daemon.data_dir / "service_e2e" / f"channel_{CHANNEL}" / container / f"{key}.json"


def tear(daemon: DaemonProcess, container: str, key: str) -> Path:
    """Truncate ``key``'s file to half its bytes while the daemon is stopped."""
    assert daemon.stop(signal.SIGTERM) == 0
    path = value_file(daemon, container, key)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    daemon.start(same_port=True)
    return path


def integrity_problems(daemon: DaemonProcess, container: str) -> float | None:
    return daemon.metric("chanstore_integrity_problems_total", container=container,
                         kind="corrupt_value")  # fmt: skip


@pytest.mark.parametrize("container", ["stats", "lazy"])
def test_a_torn_value_is_an_error_that_stays_listed_and_can_be_deleted(
    tmp_path: Path, container: str
) -> None:
    with daemon_running(tmp_path / "daemon", CONFIG) as daemon:
        for key in ("good", "bad", "other"):
            assert daemon.put(CHANNEL, container, key, {"hp": 10, "name": key}).status_code == 200
        since = daemon.log_size()
        path = tear(daemon, container, "bad")

        for _ in range(3):
            got = daemon.get(CHANNEL, container, "bad")
            assert got.status_code == 500, got.text  # it used to be 404
            error = got.json()
            assert error["code"] == "corrupt"
            assert "'bad'" in error["error"] and f"'{container}'" in error["error"]
            assert str(daemon.workdir) not in error["error"] and ".json" not in error["error"]
        assert daemon.get(CHANNEL, container, "good").json() == {"hp": 10, "name": "good"}

        # Listed (it used to drop out), and reported per key by a bulk get.
        assert daemon.keys(CHANNEL, container) == ["bad", "good", "other"]
        bulk = daemon.http.post(key_path(CHANNEL, container) + "/-/get",
                                json={"keys": ["good", "bad", "absent"]})  # fmt: skip
        assert bulk.status_code == 200
        good = {"hp": 10, "name": "good"}
        assert bulk.json() == {"values": {"good": good}, "missing": ["absent"],
                               "corrupt": ["bad"], "etags": {"good": etag_of(good)}}  # fmt: skip

        # The clients say so too: never a KeyError, never a shorter dict without a word.
        with daemon.client() as client:
            with pytest.raises(DamagedValueError) as damaged:
                client.get(CHANNEL, container, "bad")
            assert damaged.value.keys == ["bad"]
            with pytest.raises(DamagedValueError) as damaged:
                client.get_many(CHANNEL, container, ["good", "bad"])
            assert damaged.value.keys == ["bad"]
            assert damaged.value.values == {"good": {"hp": 10, "name": "good"}}

        # Logged at error once, with the file; counted once: the daemon found it once.
        found = daemon.events("integrity_problem", since=since)
        assert len(found) == 1, found
        assert found[0]["level"] == "error"
        assert (found[0]["kind"], found[0]["container"], found[0]["key"]) == (
            "corrupt_value", container, "bad",
        )  # fmt: skip
        assert str(path) in found[0]["error"]
        assert integrity_problems(daemon, container) == 1

        # An operator can clean up: DELETE answers 200 and removes the file.
        deleted = daemon.http.delete(key_path(CHANNEL, container, "bad"))
        assert deleted.status_code == 200, deleted.text  # it used to be 404, file left
        assert not path.exists()
        assert daemon.get(CHANNEL, container, "bad").status_code == 404
        assert daemon.keys(CHANNEL, container) == ["good", "other"]

        # Or store a new value over a damaged one.
        tear(daemon, container, "other")
        assert daemon.get(CHANNEL, container, "other").status_code == 500
        assert daemon.put(CHANNEL, container, "other", {"fixed": True}).status_code == 200
        assert daemon.get(CHANNEL, container, "other").json() == {"fixed": True}
        assert integrity_problems(daemon, container) == 1  # this daemon process found one


def test_a_null_container_reads_every_key_as_null_and_keeps_nothing(tmp_path: Path) -> None:
    with daemon_running(tmp_path / "daemon", CONFIG) as daemon:
        # A loaded null container used to answer 404 for keys never written...
        got = daemon.get(CHANNEL, "scratch", "never")
        assert (got.status_code, got.content) == (200, b"null")
        # ... and read back what was written, from memory.
        assert daemon.put(CHANNEL, "scratch", "hp", {"hp": 100}).status_code == 200
        got = daemon.get(CHANNEL, "scratch", "hp")
        assert (got.status_code, got.content) == (200, b"null")
        assert daemon.keys(CHANNEL, "scratch") == []
        bulk = daemon.http.post(key_path(CHANNEL, "scratch") + "/-/get", json={"keys": ["hp"]})
        expected = {"values": {"hp": None}, "missing": [], "etags": {"hp": etag_of(None)}}
        assert bulk.json() == expected
        assert daemon.http.delete(key_path(CHANNEL, "scratch", "hp")).status_code == 200
        assert daemon.data_files() == {}


def test_the_daemon_serves_marks_of_unknown_types_without_warning(tmp_path: Path) -> None:
    """It carries values in their stored form: a type it never revives is not a mistake."""
    document = {"_moobius_type": "app.Profile", "_moobius_val": {"name": "a"}}
    with daemon_running(tmp_path / "daemon", CONFIG) as daemon:
        assert daemon.put(CHANNEL, "lazy", "profile", document).status_code == 200
        assert daemon.stop(signal.SIGTERM) == 0
        daemon.start(same_port=True)  # read from the file, decoded by the codec
        assert daemon.get(CHANNEL, "lazy", "profile").json() == document
        assert daemon.events("unregistered_type") == []
