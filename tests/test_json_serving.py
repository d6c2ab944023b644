"""The mark of a json root a daemon serves (chanstore.backends.json_serving), through the
json backend's class methods, as the daemon and the transfers use it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from chanstore.backends import json_serving
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


def as_daemon(daemon_key: int | None) -> str:
    """Python that makes a helper process one of daemon ``daemon_key``'s (None: its own)."""
    if daemon_key is None:
        return ""
    return f"from chanstore.backends import json_serving; json_serving.serve_for({daemon_key})"


def asked_by_another_process(root: Path, daemon_key: int | None = None) -> str | None:
    """What ``served_elsewhere`` answers of ``root`` in a process of its own, one of daemon
    ``daemon_key``'s when given."""
    asking = textwrap.dedent(f"""
        {as_daemon(daemon_key)}
        from chanstore.backends.jsonfiles import JSONDatabase as J
        print(J.served_elsewhere({{'root_dir': {str(root)!r}}}))
    """)
    done = subprocess.run([sys.executable, "-c", asking], capture_output=True, text=True,
                          timeout=HELPER_TIMEOUT, check=True)  # fmt: skip
    answer = done.stdout.strip()
    return None if answer == "None" else answer


#: How a daemon of an earlier release marked a root: the shared lock alone.
EARLIER_RELEASE = """
import fcntl, os
fd = os.open(os.path.join({root!r}, ".chanstore-served"), os.O_RDONLY | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_SH)
"""


@contextlib.contextmanager
def holding(root: Path, daemon_key: int | None = None, *,
            earlier_release: bool = False) -> Iterator[None]:  # fmt: skip
    """A process of its own (one of daemon ``daemon_key``'s when given, or a daemon of an
    earlier release) that marks ``root`` served until the block ends; it is killed then."""
    if earlier_release:
        marking = EARLIER_RELEASE.format(root=str(root))
    else:
        marking = textwrap.dedent(f"""
            {as_daemon(daemon_key)}
            from chanstore.backends.jsonfiles import JSONDatabase
            JSONDatabase.mark_served({{"root_dir": {str(root)!r}}})
        """)
    holder = f"{marking}\nimport sys\nprint('marked', flush=True)\nsys.stdin.read()\n"
    process = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "marked\n"  # a dead helper reads as ""
        yield
    finally:
        process.kill()
        process.wait(HELPER_TIMEOUT)


def test_marks_are_shared_and_the_root_is_served_until_the_last_is_taken_back(tmp_path):
    root = tmp_path / "data"
    first = JSONDatabase.mark_served(settings(root))  # the root is made
    second = JSONDatabase.mark_served(settings(root))
    assert (root / MARK_NAME).stat().st_size == 0
    said = asked_by_another_process(root)
    assert said == f"a running chanstore daemon serves its json root {root} from memory"
    first()
    first()  # taken back once, however often asked
    assert asked_by_another_process(root) is not None
    second()
    assert asked_by_another_process(root) is None


def test_a_root_this_process_marks_is_not_served_elsewhere_for_it(tmp_path):
    release = JSONDatabase.mark_served(settings(tmp_path))
    try:
        assert JSONDatabase.served_elsewhere(settings(tmp_path)) is None
    finally:
        release()


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
    with holding(tmp_path):
        assert JSONDatabase.served_elsewhere(settings(tmp_path)) is not None
    assert JSONDatabase.served_elsewhere(settings(tmp_path)) is None


needs_byte_locks = pytest.mark.skipif(not json_serving.BYTE_LOCKS,
                                      reason="open file description locks are Linux's")  # fmt: skip
SIBLINGS, OTHERS = 7_000_001, 9_000_002


@needs_byte_locks
def test_a_worker_is_not_told_that_its_own_group_serves_a_root(tmp_path):
    """A group's workers reload one by one: one asking of a root a sibling marked a moment
    before is told nobody else serves it; a process of any other daemon, or a tool, is
    told the root is served."""
    with holding(tmp_path, SIBLINGS):
        assert asked_by_another_process(tmp_path, SIBLINGS) is None
        assert asked_by_another_process(tmp_path, OTHERS) is not None
        assert asked_by_another_process(tmp_path) is not None
        assert JSONDatabase.served_elsewhere(settings(tmp_path)) is not None


#: Seconds the marking and asking race of the next test runs.
RACE_SECONDS = 2.0


@needs_byte_locks
def test_a_sibling_marking_again_and_again_is_never_taken_for_another_daemon(tmp_path):
    """One worker marks a root and takes the mark back, over and over, while a sibling
    asks, over and over: the sibling must never see the one lock without the other, and
    so never be told another daemon serves the root (a reload of a group was refused so,
    once, when the shared lock was taken first)."""
    racing = textwrap.dedent(f"""
        import sys, time
        {as_daemon(SIBLINGS)}
        from chanstore.backends import json_serving
        root, until = {str(tmp_path)!r}, time.monotonic() + {RACE_SECONDS}
        times = wrong = 0
        while time.monotonic() < until:
            times += 1
            if sys.argv[1] == "mark":
                json_serving.mark_served(root)()
            else:
                wrong += json_serving.served(root)
        print(times, wrong)
    """)
    json_serving.mark_served(str(tmp_path))()  # the mark exists for the asker from the start
    racers = [subprocess.Popen([sys.executable, "-c", racing, role], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
              for role in ("mark", "ask")]  # fmt: skip
    counts = []
    try:
        for racer in racers:
            out, err = racer.communicate(timeout=HELPER_TIMEOUT)
            assert racer.returncode == 0, err
            counts.append([int(number) for number in out.split()])
    finally:
        for racer in racers:
            racer.kill()
            racer.wait(HELPER_TIMEOUT)
    (marks, _), (asks, wrong) = counts
    assert marks > 100 and asks > 100, (marks, asks)
    assert wrong == 0, f"told another daemon serves the root {wrong} times of {asks}"


@needs_byte_locks
def test_a_worker_is_told_of_another_daemon_beside_its_own_group(tmp_path):
    with holding(tmp_path, OTHERS), holding(tmp_path, SIBLINGS):
        assert asked_by_another_process(tmp_path, SIBLINGS) is not None
    with holding(tmp_path, SIBLINGS), holding(tmp_path, OTHERS):  # either order
        assert asked_by_another_process(tmp_path, SIBLINGS) is not None
    assert asked_by_another_process(tmp_path, SIBLINGS) is None


@needs_byte_locks
def test_a_process_marking_a_root_is_told_of_another_daemon_marking_it_too(tmp_path):
    release = JSONDatabase.mark_served(settings(tmp_path))
    try:
        with holding(tmp_path):
            said = JSONDatabase.served_elsewhere(settings(tmp_path))
            assert said == f"a running chanstore daemon serves its json root {tmp_path} from memory"
        assert JSONDatabase.served_elsewhere(settings(tmp_path)) is None
    finally:
        release()


def test_a_daemon_that_locks_no_byte_is_seen_all_the_same(tmp_path):
    """A daemon of an earlier release takes the shared lock alone."""
    with holding(tmp_path, earlier_release=True):
        assert asked_by_another_process(tmp_path, OTHERS) is not None
        assert JSONDatabase.served_elsewhere(settings(tmp_path)) is not None


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
    assert JSONDatabase.served_elsewhere(settings(root)) is None  # no daemon marks through it
    assert outside.read_text() == "not chanstore's"
    assert os.path.islink(root / MARK_NAME)


def test_a_store_that_tells_every_daemon_needs_no_mark(tmp_path):
    release = NullDatabase.mark_served({})
    release()
    assert NullDatabase.served_elsewhere({}) is None


def test_a_root_that_cannot_be_reached_is_served_by_nobody(tmp_path):
    (tmp_path / "file").write_text("")
    assert JSONDatabase.served_elsewhere(settings(tmp_path / "file" / "data")) is None
