"""Hot reload of db_config: file edits of every kind, SIGHUP, POST /-/reload, `chanstore reload`.

The daemons here poll the file's checksum only every 60 s (unless a test is
about the poll), so a change applied within the few seconds a test waits was
seen by the folder watch, or by the trigger the test pulled.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess, free_port, json_entry, run_cli, wait_until

#: Seconds a change of db_config may take to be applied (the design says within one).
APPLIED_WITHIN = 5.0
NO_POLL = ["--config-poll-interval", "60"]

STATS, PROFILES, INVENTORY = json_entry("stats"), json_entry("profiles"), json_entry("inventory")


class MountedConfig:
    """db_config mounted the way Kubernetes mounts a ConfigMap.

    ``db.json`` links to ``..data/db.json`` and ``..data`` to a folder per
    version; a new version is an atomic swap of ``..data``. The file's folder
    sees events for ``..data`` only, never for ``db.json``.
    """

    def __init__(self, folder: Path, entries: Any) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        self.path = folder / "db.json"
        self.versions = 0
        self.publish(entries)
        os.symlink("..data/db.json", self.path)

    def publish(self, entries: Any) -> None:
        self.versions += 1
        version = self.folder / f"..v{self.versions}"
        version.mkdir()
        text = entries if isinstance(entries, str) else json.dumps(entries)
        (version / "db.json").write_text(text)
        staged = self.folder / "..data_tmp"
        os.symlink(version.name, staged)
        os.rename(staged, self.folder / "..data")


class UnseenConfig:
    """db_config edited through a hard link in another folder.

    inotify reports a change to the folder a file was reached through, so the
    config's folder sees no event at all: only the checksum poll, SIGHUP or
    POST /-/reload can pick a change up.
    """

    def __init__(self, folder: Path, entries: Any) -> None:
        (folder / "etc").mkdir(parents=True)
        (folder / "elsewhere").mkdir()
        self.path = folder / "etc" / "db.json"
        self._other = folder / "elsewhere" / "db.json"
        self.path.write_text(json.dumps(entries))
        os.link(self.path, self._other)

    def publish(self, entries: Any) -> None:
        text = entries if isinstance(entries, str) else json.dumps(entries)
        with self._other.open("r+", encoding="utf-8") as file:  # the same inode, in place
            file.truncate()
            file.write(text)


def _load_alls(daemon: DaemonProcess, container: str) -> float:
    """How often the daemon has read a whole container from its backend."""
    count = daemon.metric("chanstore_backend_operation_duration_seconds_count", backend="json",
                          container=container, operation="load_all")  # fmt: skip
    return count or 0.0


def _reloads(daemon: DaemonProcess, result: str) -> float:
    return daemon.metric("chanstore_config_reloads_total", result=result) or 0.0


def _wait_serving(daemon: DaemonProcess, container: str, serving: bool = True) -> None:
    wait_until(lambda: daemon.serves(container) == serving, APPLIED_WITHIN,
               f"container {container!r} to be {'served' if serving else 'gone'}")  # fmt: skip


def _wait_verdict(daemon: DaemonProcess, successful: int, what: str) -> None:
    """Until ``chanstore_config_last_reload_successful`` reads ``successful`` (1 or 0)."""
    wait_until(lambda: daemon.metric("chanstore_config_last_reload_successful") == successful,
               APPLIED_WITHIN, what)  # fmt: skip


def _the_reload(daemon: DaemonProcess, count: int = 1) -> dict[str, Any]:
    """The ``count``-th ``config_reloaded`` event, the newest. The daemon logs it just after
    the swap that requests already see, so it is waited for, and no more are allowed."""
    wait_until(lambda: len(daemon.events("config_reloaded")) >= count, APPLIED_WITHIN,
               f"config_reloaded logged {count} time(s)")  # fmt: skip
    reloads = daemon.events("config_reloaded")
    assert len(reloads) == count, reloads
    return reloads[-1]


def test_in_place_write_adds_and_removes_containers_and_keeps_the_rest(
    start_daemon, channel: str
) -> None:
    daemon = start_daemon([STATS, PROFILES], args=NO_POLL)
    assert daemon.put(channel, "stats", "HP", 1).status_code == 200
    assert daemon.put(channel, "profiles", "name", "Ann").status_code == 200
    loads_before = _load_alls(daemon, "stats")

    daemon.write_config([STATS, INVENTORY])

    _wait_serving(daemon, "inventory")
    _wait_serving(daemon, "profiles", serving=False)
    gone = daemon.get(channel, "profiles", "name")
    assert gone.status_code == 404
    assert gone.json()["code"] == "unknown_container"
    assert daemon.put(channel, "inventory", "sword", 1).status_code == 200
    # The unchanged container kept its cache: no backend read of it since.
    assert daemon.get(channel, "stats", "HP").json() == 1
    assert _load_alls(daemon, "stats") == loads_before
    assert daemon.containers() == ["stats", "inventory"]
    reloaded = _the_reload(daemon)
    assert _reloads(daemon, "success") >= 1
    assert daemon.metric("chanstore_config_last_reload_successful") == 1
    assert reloaded["added"] == ["inventory"]
    assert reloaded["removed"] == ["profiles"]
    # A reload never deletes stored data: bring profiles back and its value is there.
    assert any("/profiles/" in name for name in daemon.data_files())
    daemon.write_config([STATS, INVENTORY, PROFILES])
    _wait_serving(daemon, "profiles")
    assert daemon.get(channel, "profiles", "name").json() == "Ann"


def test_write_to_a_temp_file_and_rename_over(start_daemon, channel: str) -> None:
    daemon = start_daemon([STATS], args=NO_POLL)
    assert daemon.put(channel, "stats", "HP", 1).status_code == 200

    staged = daemon.config_path.with_name(".db.json.swp")
    staged.write_text(json.dumps([STATS, INVENTORY]))
    os.rename(staged, daemon.config_path)

    _wait_serving(daemon, "inventory")
    assert daemon.get(channel, "stats", "HP").json() == 1
    assert daemon.containers() == ["stats", "inventory"]


def test_symlink_swap(start_daemon, tmp_path: Path, channel: str) -> None:
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "v1.json").write_text(json.dumps([STATS]))
    (versions / "v2.json").write_text(json.dumps([STATS, INVENTORY]))
    link = tmp_path / "etc" / "db.json"
    link.parent.mkdir()
    link.symlink_to(versions / "v1.json")
    daemon = start_daemon(None, config_path=link, args=NO_POLL)
    assert daemon.containers() == ["stats"]

    # ln -sfn, atomically: a new link renamed over the old one.
    staged = link.with_name("db.json.new")
    staged.symlink_to(versions / "v2.json")
    os.rename(staged, link)

    _wait_serving(daemon, "inventory")
    assert daemon.containers() == ["stats", "inventory"]


def test_a_configmap_swap_is_applied_by_the_folder_watch(start_daemon, tmp_path: Path) -> None:
    """Kubernetes re-points ``..data``; no event names db.json, and the poll is off."""
    mounted = MountedConfig(tmp_path / "mount", [STATS])
    daemon = start_daemon(None, config_path=mounted.path, args=NO_POLL)

    mounted.publish([STATS, INVENTORY])

    _wait_serving(daemon, "inventory")
    reloaded = _the_reload(daemon)
    assert reloaded["sources"] == ["file"]


def test_checksum_poll_catches_what_file_events_miss(start_daemon, tmp_path: Path) -> None:
    mounted = UnseenConfig(tmp_path / "mount", [STATS])
    daemon = start_daemon(None, config_path=mounted.path, args=["--config-poll-interval", "0.5"])

    mounted.publish([STATS, INVENTORY])

    _wait_serving(daemon, "inventory")
    reloaded = _the_reload(daemon)
    assert reloaded["sources"] == ["poll"]


BROKEN_CONFIGS = {
    "invalid-json": '[{"implementation": "json", "name": "stats", ',
    "half-written": json.dumps([STATS, INVENTORY])[:40],
    "unknown-backend": [STATS, INVENTORY, {"implementation": "nosuch", "name": "oops"}],
    "bad-field": [STATS, INVENTORY, {"implementation": "json", "name": "x", "load": "yes"}],
    "bad-name": [STATS, INVENTORY, {"implementation": "json", "name": "not a name"}],
    "duplicate-name": [STATS, INVENTORY, STATS],
    "not-a-list": {"stats": STATS},
}


@pytest.mark.parametrize("broken", BROKEN_CONFIGS.values(), ids=BROKEN_CONFIGS.keys())
def test_a_broken_file_is_rejected_and_the_running_config_stays(
    start_daemon, channel: str, broken: Any
) -> None:
    daemon = start_daemon([STATS, PROFILES], args=NO_POLL)
    assert daemon.put(channel, "stats", "HP", 1).status_code == 200
    failures = _reloads(daemon, "failure")

    daemon.write_config(broken)

    _wait_verdict(daemon, 0, "the broken file to be rejected")
    assert _reloads(daemon, "failure") >= failures + 1
    rejected = daemon.events("config_reload_rejected")
    assert rejected
    assert rejected[0]["problems"]
    # The old config keeps serving, all of it and nothing of the broken one.
    assert daemon.containers() == ["stats", "profiles"]
    assert daemon.get(channel, "stats", "HP").json() == 1
    assert daemon.put(channel, "stats", "HP", 2).status_code == 200
    assert daemon.put(channel, "profiles", "name", "Ann").status_code == 200
    assert daemon.put(channel, "inventory", "sword", 1).status_code == 404
    assert daemon.http.get("/readyz").status_code == 200

    # A later good write is applied.
    daemon.write_config([STATS, INVENTORY])
    _wait_serving(daemon, "inventory")
    _wait_verdict(daemon, 1, "the good write's reload to be successful")
    assert daemon.get(channel, "stats", "HP").json() == 2


def test_reverting_a_rejected_edit_makes_the_state_healthy_again(
    start_daemon, channel: str
) -> None:
    """A bad edit is rejected; writing the running config back is success again."""
    daemon = start_daemon([STATS, PROFILES], args=NO_POLL)
    good = daemon.config_path.read_text()

    daemon.write_config("[{not json")
    _wait_verdict(daemon, 0, "the broken file to be rejected")

    daemon.config_path.write_text(good)
    _wait_verdict(daemon, 1, "the reverted file to count as healthy")
    # In a group, a worker that read the file only once it was good again has nothing to
    # restore: the one that rejected it does.
    assert daemon.events("config_restored", every_worker=True)
    assert daemon.containers() == ["stats", "profiles"]


def test_a_reload_onto_a_backend_that_does_not_answer_warns_in_its_verdict(
    start_daemon, tmp_path: Path
) -> None:
    mounted = UnseenConfig(tmp_path / "mount", [STATS])
    daemon = start_daemon(None, config_path=mounted.path, args=NO_POLL)
    dead = {"implementation": "redis", "name": "mana", "settings": {
        "host": "127.0.0.1", "port": free_port(), "socket_connect_timeout": 0.5}}  # fmt: skip

    mounted.publish([STATS, dead])
    verdict = daemon.http.post("/-/reload").json()

    assert verdict["ok"] is True and verdict["changes"]["added"] == ["mana"]
    assert any("'mana'" in warning and "does not answer" in warning
               for warning in verdict["warnings"]), verdict  # fmt: skip


def test_a_deleted_config_file_keeps_the_running_config(start_daemon, channel: str) -> None:
    daemon = start_daemon([STATS, PROFILES], args=NO_POLL)
    assert daemon.put(channel, "profiles", "name", "Ann").status_code == 200

    daemon.config_path.unlink()

    _wait_verdict(daemon, 0, "the missing file to be rejected")
    assert "cannot be read" in daemon.events("config_reload_rejected")[-1]["problems"][0]
    assert daemon.containers() == ["stats", "profiles"]
    assert daemon.get(channel, "profiles", "name").json() == "Ann"

    daemon.write_config([STATS, PROFILES, INVENTORY])
    _wait_serving(daemon, "inventory")
    # The verdict comes just after the swap that requests already see (new backends are
    # probed between the two; see _the_reload), so it is waited for too.
    _wait_verdict(daemon, 1, "the reload after the file came back to be successful")


def test_a_changed_backend_switches_and_stored_data_stays(start_daemon, channel: str) -> None:
    daemon = start_daemon([STATS], args=NO_POLL)
    assert daemon.put(channel, "stats", "HP", 1).status_code == 200

    daemon.write_config([json_entry("stats", root_dir="data2")])
    wait_until(lambda: daemon.get(channel, "stats", "HP").status_code == 404, APPLIED_WITHIN,
               "stats to switch to the empty data2")  # fmt: skip
    assert daemon.put(channel, "stats", "HP", 2).status_code == 200
    reloaded = _the_reload(daemon)
    assert reloaded["changed"] == ["stats"]

    daemon.write_config([STATS])
    wait_until(lambda: daemon.get(channel, "stats", "HP").json() == 1, APPLIED_WITHIN,
               "stats to switch back to data")  # fmt: skip
    assert (daemon.workdir / "data2").is_dir()


def test_clear_acts_on_first_creation_never_on_reload(start_daemon, channel: str) -> None:
    scratch = json_entry("scratch", clear=True)
    daemon = start_daemon([STATS, scratch], args=NO_POLL)
    assert daemon.put(channel, "scratch", "turn", 3).status_code == 200

    daemon.write_config([STATS, INVENTORY, scratch])
    _wait_serving(daemon, "inventory")
    assert daemon.get(channel, "scratch", "turn").json() == 3

    # A new process creates the container anew: then it is cleared.
    daemon.restart()
    assert daemon.get(channel, "scratch", "turn").status_code == 404


def test_sighup_reloads(start_daemon, tmp_path: Path) -> None:
    mounted = UnseenConfig(tmp_path / "mount", [STATS])
    daemon = start_daemon(None, config_path=mounted.path, args=NO_POLL)

    daemon.send_signal(signal.SIGHUP)
    assert _the_reload(daemon)["sources"] == ["signal"]

    # A change no file event shows is applied on the next SIGHUP.
    mounted.publish([STATS, INVENTORY])
    daemon.send_signal(signal.SIGHUP)
    _wait_serving(daemon, "inventory")
    assert _the_reload(daemon, 2)["added"] == ["inventory"]

    mounted.publish("[not json")
    daemon.send_signal(signal.SIGHUP)
    _wait_verdict(daemon, 0, "the broken file to be rejected")
    assert daemon.containers() == ["stats", "inventory"]
    assert daemon.running


def test_post_reload_answers_with_the_changes_or_the_problems(start_daemon, tmp_path: Path) -> None:
    mounted = UnseenConfig(tmp_path / "mount", [STATS, PROFILES])
    daemon = start_daemon(None, config_path=mounted.path, args=NO_POLL)

    mounted.publish([STATS, INVENTORY])
    accepted = daemon.http.post("/-/reload")
    assert accepted.status_code == 200
    verdict = accepted.json()
    assert verdict["ok"] is True
    assert verdict["changes"]["added"] == ["inventory"]
    assert verdict["changes"]["removed"] == ["profiles"]
    assert daemon.containers() == ["stats", "inventory"]

    unchanged = daemon.http.post("/-/reload")
    assert unchanged.status_code == 200
    assert unchanged.json()["changes"] == {"added": [], "removed": [], "changed": [],
                                           "updated": []}  # fmt: skip

    mounted.publish([STATS, {"implementation": "json", "name": "bad", "load": "yes"}])
    rejected = daemon.http.post("/-/reload")
    assert rejected.status_code == 400
    verdict = rejected.json()
    assert verdict["ok"] is False
    assert "error" in verdict
    assert any("entry 1" in p and "'load'" in p for p in verdict["problems"]), verdict
    assert daemon.containers() == ["stats", "inventory"]
    assert daemon.metric("chanstore_config_last_reload_successful") == 0
    assert _reloads(daemon, "failure") == 1


def test_chanstore_reload_command_exit_status_says_the_verdict(
    start_daemon, tmp_path: Path
) -> None:
    mounted = UnseenConfig(tmp_path / "mount", [STATS])
    daemon = start_daemon(None, config_path=mounted.path, args=NO_POLL)

    mounted.publish([STATS, INVENTORY])
    good = run_cli("reload", "--listen", daemon.listen)
    assert good.returncode == 0, good.stderr
    assert "inventory" in good.stdout
    assert daemon.containers() == ["stats", "inventory"]

    mounted.publish([STATS, {"implementation": "nosuch", "name": "oops"}])
    bad = run_cli("reload", env={"CHANSTORE_LISTEN": daemon.listen})
    assert bad.returncode != 0
    assert "rejected" in bad.stderr
    assert "entry 1" in bad.stderr
    assert "nosuch" in bad.stderr
    assert daemon.containers() == ["stats", "inventory"]

    nobody = run_cli("reload", "--listen", f"127.0.0.1:{free_port()}")
    assert nobody.returncode != 0
    assert "no chanstore daemon" in nobody.stderr


def test_reloads_fail_no_request_in_flight(start_daemon, channel: str) -> None:
    daemon = start_daemon([STATS, PROFILES], args=NO_POLL)
    failures: list[str] = []
    done = threading.Event()
    counts = [0, 0, 0]

    def hammer(worker: int) -> None:
        with daemon.client() as client:
            while not done.is_set():
                # A key of each worker's own: another worker's write between this
                # one's set and get would otherwise read back as a lost write.
                key = f"w{worker}-k{counts[worker] % 20}"
                try:
                    client.set(channel, "stats", key, counts[worker])
                    if client.get(channel, "stats", key) != counts[worker]:
                        failures.append(f"{key}: read back another value")
                except Exception as exc:  # noqa: BLE001 - every failure is what we look for
                    failures.append(repr(exc))
                counts[worker] += 1

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    try:
        for config in ([STATS, INVENTORY], [STATS], [STATS, PROFILES], [STATS, INVENTORY]):
            daemon.write_config(config)
            assert daemon.http.post("/-/reload").json()["ok"] is True
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert min(counts) > 0
    assert daemon.containers() == ["stats", "inventory"]
