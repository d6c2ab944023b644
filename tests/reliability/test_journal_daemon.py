"""The daemon's json writes go through the root's journal: replayed after SIGKILL, emptied on stop.

Writers PUT (and bulk-set) to a json container with fsync on; the daemon is
killed with SIGKILL while the journal still holds records (it is checkpointed
only every few thousand), restarted, and every acknowledged write must read
back; the restart replays the journal before the root is read. A graceful
stop checkpoints it: it then holds no record.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from load_helpers import Ledger, Writer, daemon_running, json_entry, json_files_parse, wait_until

from chanstore.backends.journal import JOURNAL_NAME, decode_records


def journal_records(data_dir: Path) -> list[tuple[str, bytes]]:
    return decode_records((data_dir / JOURNAL_NAME).read_bytes())[0]


def test_the_journal_is_replayed_after_sigkill_and_emptied_on_stop(tmp_path: Path) -> None:
    ledger = Ledger()
    config = [json_entry("jdur", settings={"fsync": True})]
    with daemon_running(tmp_path / "daemon", config) as daemon:
        writers = [
            Writer(daemon.url, ledger, "jdur", f"ch-{index % 3}", f"w{index}", bulk=index == 0)
            for index in range(4)
        ]
        for writer in writers:
            writer.start()
        wait_until(lambda: ledger.acknowledged >= 100, 30, "writes to be acknowledged")
        time.sleep(0.2)
        daemon.stop(signal.SIGKILL)
        for writer in writers:
            writer.stop()
        pending = journal_records(daemon.data_dir)
        assert pending, "the daemon's writes did not go through the journal"
        assert {path.split("/")[-1] for path, _data in pending} <= {
            f"{key}.json" for _container, _channel, key in ledger.sent
        }

        since = daemon.log_size()
        daemon.start(same_port=True)
        assert ledger.lost(daemon) == []
        assert json_files_parse(daemon.data_dir) > 0
        replayed = daemon.events("json_journal_replayed", since=since)
        assert len(replayed) == 1 and replayed[0]["records"] == len(pending), replayed
        assert journal_records(daemon.data_dir) == []

        for index in range(20):
            response = daemon.put("ch-0", "jdur", f"after-{index}", {"n": index})
            assert response.status_code == 200
        assert journal_records(daemon.data_dir)
        assert daemon.stop(signal.SIGTERM) == 0
        assert journal_records(daemon.data_dir) == []  # the shutdown checkpointed it
        daemon.start(same_port=True)
        assert daemon.get("ch-0", "jdur", "after-19").json() == {"n": 19}
