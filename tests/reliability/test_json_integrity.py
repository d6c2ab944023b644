"""A real daemon over a json root with planted links and a damaged journal: the truth is told.

Links planted in the data root (a channel folder pointing out of the root, a
key's file pointing at a file outside, the journal pointing at a file
outside) are never followed: requests get an error instead of the target's
content, writes and deletes never reach the target (contents and mtimes
compared), and the daemon logs and counts each one. A journal damaged after a
SIGKILL (its key files lost, as a power loss loses them) is replayed past the
damage: every record that verifies is served again, and the loss is logged at
error, kept aside in the root and counted in
``chanstore_integrity_problems_total{kind="journal_damaged"}``.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx
import pytest
from load_helpers import daemon_running, json_entry, wait_until

from chanstore.backends.journal_records import DAMAGED_SUFFIX, JOURNAL_NAME, decode_records
from support import journal_records

SERVICE = "service_e2e"  # the harness runs the daemon with --service-id e2e


class Outside:
    """Files outside the data root, which a followed link would reach; watched for changes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "box").mkdir(parents=True)
        (folder / "box" / "k.json").write_text('{"stolen": true}')
        (folder / "secret.json").write_text('"outside secret"')
        (folder / "journal").write_bytes(b"precious, not a journal")
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        return {
            str(path.relative_to(self.folder)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(self.folder.rglob("*"))
            if path.is_file()
        }

    def untouched(self) -> bool:
        return self.snapshot() == self.before


def planted_errors(daemon) -> float:
    text = daemon.metrics_text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("chanstore_backend_operation_errors_total{")
        and 'error="planted_link"' in line
    )


def integrity_problems(daemon, container: str, kind: str) -> float:
    daemon.http.get("/readyz")  # asks every backend, as the probe does every few seconds
    return daemon.metric("chanstore_integrity_problems_total", container=container, kind=kind) or 0


def test_links_planted_in_the_data_root_are_never_followed(tmp_path: Path) -> None:
    outside = Outside(tmp_path / "outside")
    with daemon_running(tmp_path / "daemon", [json_entry("box")]) as daemon:
        assert daemon.put("alice", "box", "k", {"hp": 1}).status_code == 200
        service = daemon.data_dir / SERVICE
        (alice,) = [path for path in service.iterdir() if "alice" in path.name]
        # A channel folder that is a link out of the root, before the channel is first used.
        bob = service / alice.name.replace("alice", "bob")
        bob.symlink_to(outside.folder, target_is_directory=True)
        # A key's file that is a link to a file outside, in a channel not loaded yet.
        carol = service / alice.name.replace("alice", "carol") / "box"
        carol.mkdir(parents=True)
        (carol / "k.json").symlink_to(outside.folder / "secret.json")
        (carol / "fine.json").write_text('"carol\'s"')
        mark = daemon.log_size()

        # The previous release answered 200 {"stolen": true}: the outside file as the value.
        answer = daemon.get("bob", "box", "k")
        assert answer.status_code >= 500, answer.text
        assert answer.json()["code"] != "ok" and "stolen" not in answer.text
        for request in (daemon.put("bob", "box", "new", {"hp": 2}),
                        daemon.http.delete("/v1/channels/bob/box/k")):  # fmt: skip
            assert request.status_code >= 500, request.text
        # The previous release answered 200 "outside secret".
        answer = daemon.get("carol", "box", "k")
        assert answer.status_code >= 500 and "outside secret" not in answer.text
        assert daemon.get("carol", "box", "fine").json() == "carol's"  # the others still read
        assert sorted(daemon.keys("carol", "box")) == ["fine", "k"]  # listed, not skipped
        for request in (daemon.put("carol", "box", "k", {"hp": 3}),
                        daemon.http.delete("/v1/channels/carol/box/k")):  # fmt: skip
            assert request.status_code >= 500, request.text
        # Every answer names the kind, and never a path: where the link is, is for the log.
        for answer in (daemon.get("bob", "box", "k"), daemon.get("carol", "box", "k"),
                       daemon.put("bob", "box", "new", {"hp": 2}),
                       daemon.put("carol", "box", "k", {"hp": 3})):  # fmt: skip
            assert (answer.status_code, answer.json()["code"]) == (500, "planted_link"), answer.text
            assert str(tmp_path) not in answer.text

        assert outside.untouched()
        assert (carol / "k.json").is_symlink() and bob.is_symlink()
        failed = [e for e in daemon.events("backend_operation_failed", since=mark)
                  if e.get("error_kind") == "planted_link"]  # fmt: skip
        assert any(str(bob) in e["error"] for e in failed)
        assert any(str(carol / "k.json") in e["error"] for e in failed)
        assert planted_errors(daemon) >= 5
        # Its other channels serve on.
        assert daemon.get("alice", "box", "k").json() == {"hp": 1}
        assert daemon.put("alice", "box", "j", {"hp": 4}).status_code == 200

        # The journal itself swapped for a link while the daemon runs: batches fail.
        journal = daemon.data_dir / JOURNAL_NAME
        journal.rename(daemon.data_dir / "journal.moved")
        journal.symlink_to(outside.folder / "journal")
        answer = daemon.put("alice", "box", "j", {"hp": 5})
        assert answer.status_code >= 500, answer.text
        assert outside.untouched()
        assert daemon.get("alice", "box", "j").json() == {"hp": 4}
        assert daemon.crashes(since=mark) == []

        # Started again with the link in place: it is reported and counted, never replayed.
        daemon.stop(signal.SIGTERM)
        mark = daemon.log_size()
        daemon.start(same_port=True)
        (event,) = daemon.events("json_planted_link", since=mark)
        assert event["path"] == str(journal) and event["level"] == "error"
        wait_until(lambda: integrity_problems(daemon, "box", "planted_link") >= 1, 15,
                   "the planted journal to be counted")  # fmt: skip
        assert daemon.get("alice", "box", "j").json() == {"hp": 4}
        assert daemon.put("alice", "box", "j", {"hp": 6}).status_code >= 500
        assert outside.untouched()
        journal.unlink()  # an operator removed it
        assert daemon.put("alice", "box", "j", {"hp": 7}).status_code == 200
        assert not journal.is_symlink() and journal.is_file()


# -- a damaged journal -------------------------------------------------------------------


def write_for_a_while(daemon, count: int) -> dict[tuple[str, str], int]:
    """``count`` PUTs of distinct keys from three threads; what was acknowledged."""
    acked: dict[tuple[str, str], int] = {}
    lock = threading.Lock()

    def writer(index: int) -> None:
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            for n in range(index, count, 3):
                channel, key = f"ch-{n % 4}", f"k{n}"
                if client.put(f"/v1/channels/{channel}/jbox/{key}", json=n).status_code == 200:
                    with lock:
                        acked[(channel, key)] = n

    threads = [threading.Thread(target=writer, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return acked


@pytest.mark.slow
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_journal_damaged_after_sigkill_is_replayed_past_the_damage_and_told(
    tmp_path: Path, where: str
) -> None:
    config = [json_entry("jbox", settings={"fsync": True})]
    with daemon_running(tmp_path / "daemon", config) as daemon:
        acked = write_for_a_while(daemon, 240)
        assert len(acked) == 240
        daemon.stop(signal.SIGKILL)
        journal = daemon.data_dir / JOURNAL_NAME
        records = journal_records(journal.read_bytes())
        assert len(records) == 240  # every write, and nothing checkpointed yet
        index = {"start": 0, "middle": len(records) // 2, "end": len(records) - 2}[where]
        lost = records[index]
        for record in records:  # a power loss takes what was written since the checkpoint
            (daemon.data_dir / record.path).unlink()
        data = bytearray(journal.read_bytes())
        data[(lost.start + lost.end) // 2] ^= 0x10
        journal.write_bytes(bytes(data))

        mark = daemon.log_size()
        daemon.start(same_port=True)
        lost_key = Path(lost.path).stem
        for (channel, key), value in acked.items():
            answer = daemon.get(channel, "jbox", key)
            if key == lost_key:
                assert answer.status_code == 404  # lost with the crash: told below
            else:
                # The previous release replayed up to the damage: the rest answered 404.
                assert (answer.status_code, answer.json()) == (200, value), (key, answer.text)

        (event,) = daemon.events("json_journal_damaged", since=mark)
        assert event["level"] == "error"
        assert (event["records_lost"], event["replayed"]) == (1, len(records) - 1)
        assert event["stretches"] == [[lost.start, lost.end, 1]]
        (kept,) = sorted(daemon.data_dir.glob(JOURNAL_NAME + DAMAGED_SUFFIX + "*"))
        assert event["kept"] == str(kept) and kept.read_bytes() == bytes(data).rstrip(b"\0")
        wait_until(lambda: integrity_problems(daemon, "jbox", "journal_damaged") == 1, 15,
                   "the damaged journal to be counted")  # fmt: skip
        (told,) = daemon.events("integrity_problem", since=mark)
        assert told["kind"] == "journal_damaged" and str(kept) in told["error"]
        assert decode_records(journal.read_bytes())[0] == []  # emptied after the replay
        assert integrity_problems(daemon, "jbox", "journal_damaged") == 1  # counted once
        assert os.listdir(daemon.data_dir).count(kept.name) == 1
