"""A json root a daemon serves: ``chanstore import`` and ``migrate`` refuse to write there.

The daemon answers from memory and hears of no write another process makes to
a json root, so a transfer writing there would report its keys stored while
the daemon went on answering the old values. These run a real daemon and the
``chanstore`` command as an operator would, in the daemon's working directory.
"""

from __future__ import annotations

import json
import signal

import pytest
from daemon_harness import json_entry, run_cli, wait_until

from chanstore.backends import json_serving
from chanstore.backends.json_serving import MARK_NAME
from support import free_port

SERVICE = ("--service-id", "e2e")


def line(channel: str, container: str, key: str, value: object) -> str:
    record = {"channel": channel, "container": container, "key": key, "value": value}
    return json.dumps(record) + "\n"


def test_import_into_a_root_the_daemon_serves_is_refused_and_changes_nothing(start_daemon):
    daemon = start_daemon()
    assert daemon.put("c1", "stats", "hp", {"v": 1}).status_code == 200
    files_before = daemon.data_files()
    (daemon.workdir / "backup.jsonl").write_text(line("c1", "stats", "hp", {"v": 2}))

    ran = run_cli("import", "--db-config", "db.json", *SERVICE, "backup.jsonl",
                  cwd=daemon.workdir)  # fmt: skip

    assert ran.returncode == 2, ran.stderr
    assert "container 'stats': a running chanstore daemon serves its json root" in ran.stderr
    assert "Stop the daemon first, or import through it" in ran.stderr
    assert daemon.data_files() == files_before
    assert daemon.get("c1", "stats", "hp").json() == {"v": 1}


def test_a_dry_run_import_reads_beside_the_daemon(start_daemon):
    daemon = start_daemon()
    (daemon.workdir / "backup.jsonl").write_text(line("c1", "stats", "hp", 7))

    ran = run_cli("import", "--db-config", "db.json", *SERVICE, "--dry-run", "backup.jsonl",
                  cwd=daemon.workdir)  # fmt: skip

    assert ran.returncode == 0, ran.stderr
    assert "would copy" in ran.stdout


def test_import_goes_ahead_once_the_daemon_is_stopped(start_daemon):
    daemon = start_daemon()
    assert daemon.put("c1", "stats", "hp", {"v": 1}).status_code == 200
    (daemon.workdir / "backup.jsonl").write_text(line("c1", "stats", "hp", {"v": 2}))
    assert daemon.stop() == 0

    ran = run_cli("import", "--db-config", "db.json", *SERVICE, "backup.jsonl",
                  cwd=daemon.workdir)  # fmt: skip
    assert ran.returncode == 0, ran.stderr

    daemon.start(same_port=True)
    assert daemon.get("c1", "stats", "hp").json() == {"v": 2}


def test_a_killed_daemon_serves_nothing_any_more(start_daemon):
    daemon = start_daemon()
    (daemon.workdir / "backup.jsonl").write_text(line("c1", "stats", "hp", 3))
    daemon.stop(signal.SIGKILL)

    ran = run_cli("import", "--db-config", "db.json", *SERVICE, "backup.jsonl",
                  cwd=daemon.workdir)  # fmt: skip

    assert ran.returncode == 0, ran.stderr


def test_migrate_into_a_root_the_daemon_serves_is_refused(start_daemon, tmp_path):
    daemon = start_daemon()
    source = tmp_path / "old.json"
    source.write_text(json.dumps([json_entry("stats", root_dir=str(tmp_path / "old"))]))
    (tmp_path / "old.jsonl").write_text(line("c1", "stats", "hp", 5))
    filled = run_cli("import", "--db-config", str(source), *SERVICE, "old.jsonl", cwd=tmp_path)
    assert filled.returncode == 0, filled.stderr

    ran = run_cli("migrate", "--from", str(source), "--to", "db.json", *SERVICE,
                  cwd=daemon.workdir)  # fmt: skip

    assert ran.returncode == 2, ran.stderr
    assert "container 'stats': a running chanstore daemon serves its json root" in ran.stderr
    assert "migrate through it" in ran.stderr
    assert daemon.keys("c1", "stats") == []


def test_every_worker_marks_the_root_and_the_mark_is_no_key(start_daemon):
    daemon = start_daemon(args=["--workers", "2"])
    mark = daemon.data_dir / MARK_NAME
    assert mark.is_file() and mark.stat().st_size == 0
    assert daemon.put("c1", "stats", "hp", 1).status_code == 200
    assert daemon.keys("c1", "stats") == ["hp"]
    (daemon.workdir / "backup.jsonl").write_text(line("c2", "stats", "hp", 2))

    ran = run_cli("import", "--db-config", "db.json", *SERVICE, "backup.jsonl",
                  cwd=daemon.workdir)  # fmt: skip

    assert ran.returncode == 2, ran.stderr
    assert daemon.keys("c2", "stats") == []


def test_a_link_planted_as_the_mark_is_reported_and_the_daemon_serves_all_the_same(
    start_daemon, tmp_path
):
    workdir = tmp_path / "planted"
    (workdir / "data").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_text("not chanstore's")
    (workdir / "data" / MARK_NAME).symlink_to(outside)

    daemon = start_daemon(workdir=workdir)

    assert daemon.put("c1", "stats", "hp", 1).status_code == 200
    failed = daemon.events("served_mark_failed")
    assert sorted(event["container"] for event in failed) == ["profiles", "stats"]
    assert all("symbolic link" in event["error"] for event in failed)
    assert daemon.http.get("/readyz").status_code == 200  # the probe hands problems on

    def counted() -> float:  # the root's problem, told once, by whichever container asks
        found = [daemon.metric("chanstore_integrity_problems_total", container=name,
                               kind="planted_link") for name in ("stats", "profiles")]  # fmt: skip
        return sum(value or 0 for value in found)

    wait_until(lambda: counted() == 1, 15, "the planted mark counted")
    assert outside.read_text() == "not chanstore's"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_reload_moves_the_mark_with_the_containers(start_daemon, workers):
    """At ``--workers 2`` the workers reload one by one, and the second must not take the
    mark the first took a moment before for another daemon's."""
    daemon = start_daemon(args=["--workers", workers])
    old, new = daemon.data_dir, daemon.workdir / "moved"
    assert json_serving.served(str(old)) and not json_serving.served(str(new))

    daemon.write_config([json_entry("stats", root_dir="moved"),
                         json_entry("profiles", root_dir="moved")])  # fmt: skip
    reloaded = daemon.http.post("/-/reload")

    assert reloaded.status_code == 200, reloaded.text
    wait_until(lambda: json_serving.served(str(new)) and not json_serving.served(str(old)),
               15, "the mark to follow the containers")  # fmt: skip


def second_daemon(first, *more: str):
    """``chanstore serve`` of the same db_config in the same folder, as a second operator
    would start it; it must give up at once."""
    listen = f"127.0.0.1:{free_port()}"
    return run_cli("serve", "--db-config", "db.json", "--listen", listen, *SERVICE,
                   "--log-format", "json", *more, cwd=first.workdir, timeout=30)  # fmt: skip


def test_a_second_daemon_on_a_served_root_does_not_start(start_daemon):
    first = start_daemon()
    assert first.put("c1", "stats", "hp", 1).status_code == 200

    for more in ((), ("--workers", "2")):
        refused = second_daemon(first, *more)

        assert refused.returncode == 2, (more, refused.stderr)
        problems = [json.loads(line)["problem"] for line in refused.stderr.splitlines()
                    if '"cannot_start"' in line]  # fmt: skip
        assert len(problems) == 2, refused.stderr  # stats and profiles, one root
        assert "container 'stats': a running chanstore daemon serves its json root" in problems[0]
        assert "one daemon serves a json root (its --workers share it)" in problems[0]
    assert first.get("c1", "stats", "hp").json() == 1

    assert first.stop() == 0
    started = start_daemon(workdir=first.workdir)  # the first gone, the root is free
    assert started.get("c1", "stats", "hp").json() == 1


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_reload_into_a_root_another_daemon_serves_is_rejected(start_daemon, tmp_path, workers):
    other = start_daemon(workdir=tmp_path / "other")
    daemon = start_daemon(args=["--workers", workers])
    assert daemon.put("c1", "stats", "hp", 1).status_code == 200

    daemon.write_config([json_entry("stats", root_dir=str(other.data_dir)),
                         json_entry("profiles")])  # fmt: skip
    reloaded = daemon.http.post("/-/reload")

    assert reloaded.status_code == 400, reloaded.text
    assert "a running chanstore daemon serves its json root" in reloaded.json()["problems"][0]
    assert daemon.get("c1", "stats", "hp").json() == 1  # still the old config
