"""A json writer killed with SIGKILL mid-write leaves only whole values that were written."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

from chanstore.backends.journal_direct import DIRECT_BYTES
from chanstore.backends.jsonfiles import TEMP_PREFIX, JSONDatabase
from chanstore.backends.spare_files import SPARE_NAME
from chanstore.errors import CorruptValue
from support import reaped, sigkill_after, wait_until

KEYS = ["a", "b", "c/d", "long " + "k" * 300]
#: Round n of the writer numbers its writes from n * ROUND.
ROUND = 1_000_000
# Big values keep the writer inside a write most of the time. With fsync on, values under
# DIRECT_BYTES go through the json root's journal, larger ones are written directly.
PADS = {"journaled": DIRECT_BYTES // 2, "direct": DIRECT_BYTES + 30_000}

WRITER = textwrap.dedent(
    """
    import sys
    from chanstore.backends.jsonfiles import JSONDatabase

    root, fsync, first, log_path = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
    keys = {keys!r}
    pad = "x" * {pad}
    db = JSONDatabase(domain="crash.test", root_dir=root, fsync=fsync)
    log = open(log_path, "a", buffering=1)
    seq = first
    while True:
        # Every write is logged before it starts: the log is what "was written" may hold.
        for key in keys:
            log.write(f"{{key}}\\t{{seq}}\\n")
            ok, message = db.set_value(key, {{"seq": seq, "pad": pad}})
            assert ok, message
            seq += 1
        batch = {{}}
        for key in keys:
            log.write(f"{{key}}\\t{{seq}}\\n")
            batch[key] = {{"seq": seq, "pad": pad}}
            seq += 1
        db.set_many(batch)
    """
)


def attempted(log_path):
    """Per key, the sequence numbers the writer started to write, in order."""
    seqs: dict[str, list[int]] = {key: [] for key in KEYS}
    if not log_path.exists():
        return seqs
    for line in log_path.read_text().splitlines():
        key, _tab, seq = line.rpartition("\t")
        if key in seqs and seq.isdigit():  # the last line may be cut short
            seqs[key].append(int(seq))
    return seqs


def may_hold(seqs: list[int]) -> tuple[set[int], bool]:
    """What a key may hold after every round's kill, and whether it must be there.

    A round is killed once, so of a key's writes in a round only the last can
    have been cut short: each earlier one returned before the writer logged the
    next (a ``set_many`` logs its whole batch first, but holds a key once). The
    key holds its last write known to have finished, or any round's last write
    begun after it, which the kill may have let finish or not.
    """
    rounds: dict[int, list[int]] = {}
    for seq in seqs:
        rounds.setdefault(seq // ROUND, []).append(seq)
    finished = [seq for in_round in rounds.values() for seq in in_round[:-1]]
    last_finished = max(finished, default=-1)
    cut_short = {in_round[-1] for in_round in rounds.values()}
    allowed = {seq for seq in cut_short if seq > last_finished}
    if finished:
        allowed.add(last_finished)
    return allowed, bool(finished)


@pytest.mark.parametrize("pad", PADS.values(), ids=PADS.keys())
@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_sigkill_mid_write_leaves_every_file_whole(tmp_path, fsync, pad):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(keys=KEYS, pad=pad))
    root = tmp_path / "data"
    log_path = tmp_path / "attempts.log"
    db = JSONDatabase(domain="crash.test", root_dir=str(root))
    rnd = random.Random()
    for round_number in range(4):
        writer = subprocess.Popen(
            [sys.executable, str(script), str(root), "1" if fsync else "0",
             str(round_number * ROUND), str(log_path)],
            stderr=subprocess.PIPE,
        )  # fmt: skip
        with reaped(writer):
            # Wait until this round has written something, then kill it at a random moment.
            first = round_number * ROUND
            wait_until(
                lambda writer=writer, first=first: (
                    writer.poll() is not None
                    or any(seq >= first for seqs in attempted(log_path).values() for seq in seqs)
                ),
                30,
                "the writer to start writing",
            )
            assert writer.poll() is None, writer.stderr.read().decode()
            sigkill_after(writer, rnd.uniform(0.0, 0.25))  # it writes for a random while

        seqs = attempted(log_path)
        for name in os.listdir(db.path):
            if name.startswith(TEMP_PREFIX):
                continue  # a write the kill interrupted before its rename
            if name == SPARE_NAME:
                continue  # a version a large write replaced, kept to be written over
            assert name.endswith(".json")
            value = json.loads((db.path / name).read_text())  # every file parses
            assert value.keys() in ({"seq", "pad"}, {"_chanstore_key", "_chanstore_val"})
        loaded = db.load_all()
        assert not any(isinstance(value, CorruptValue) for value in loaded.values())
        assert sorted(db.all_keys()) == sorted(loaded)
        assert set(loaded) <= set(KEYS)
        for key in KEYS:
            allowed, must_be_there = may_hold(seqs[key])
            if key not in loaded:
                assert not must_be_there, (key, "lost a finished write", seqs[key][-3:])
                continue
            assert loaded[key]["pad"] == "x" * pad
            assert loaded[key]["seq"] in allowed, (key, loaded[key]["seq"], sorted(allowed))


def test_may_hold_allows_a_cut_short_write_of_every_round():
    # The failure CI met: round 1 killed inside the set_many that held 1000079, round 2
    # inside the key's first write, 2000003; 1000075 is the last write known to have finished.
    allowed, must_be_there = may_hold([1_000_071, 1_000_075, 1_000_079, 2_000_003])
    assert (allowed, must_be_there) == ({1_000_075, 1_000_079, 2_000_003}, True)
    assert may_hold([3, 7, 1_000_002]) == ({3, 7, 1_000_002}, True)
    assert may_hold([3, 7, 1_000_002, 1_000_006]) == ({1_000_002, 1_000_006}, True)
    assert may_hold([3, 2_000_001]) == ({3, 2_000_001}, False)
