"""A json root on a disk that fills up or turns read-only: clean 503s, nothing damaged.

The data root is a small tmpfs (root ignores file modes, so only a real
filesystem can refuse a write): filled with a filler file, or remounted
read-only, then given back.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parents[1] / "daemon"))
from daemon_harness import IN_CI, DaemonProcess, json_entry, wait_until

STORED = {f"k{n}": {"n": n, "text": "v" * 50} for n in range(20)}


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/daemon/data``: a 256 KiB tmpfs, unmounted afterwards."""
    data = tmp_path / "daemon" / "data"
    data.mkdir(parents=True)
    done = _mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(data))
    if done.returncode != 0:
        message = f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield data
    finally:
        _mount("-o", "remount,rw", str(data))
        subprocess.run(["umount", "-l", str(data)], capture_output=True, timeout=30, check=False)


@pytest.fixture
def disk_daemon(small_disk: Path) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(small_disk.parent, [json_entry("stats"), json_entry("profiles")])
    daemon.start()
    yield daemon
    problems = daemon.close()
    assert not problems, "the daemon crashed or hung:\n" + "\n".join(problems)


def store_and_snapshot(daemon: DaemonProcess) -> dict[str, bytes]:
    for key, value in STORED.items():
        assert daemon.put("ch", "stats", key, value).status_code == 200
    files = daemon.data_files()
    assert len(files) == len(STORED)
    return files


def assert_nothing_damaged(daemon: DaemonProcess, before: dict[str, bytes]) -> None:
    after = daemon.data_files()
    for name, data in before.items():
        assert after.get(name) == data, f"{name} changed"
        json.loads(data)
    for key, value in STORED.items():  # cached reads still answer
        response = daemon.get("ch", "stats", key)
        assert response.status_code == 200 and response.json() == value


def error_count(daemon: DaemonProcess, kind: str) -> float:
    """chanstore_backend_operation_errors_total of container stats and ``kind``, any operation."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(daemon.metrics_text())
        for sample in family.samples
        if sample.name == "chanstore_backend_operation_errors_total"
        and sample.labels.get("container") == "stats"
        and sample.labels.get("error") == kind
    )


def refused(daemon: DaemonProcess, kind: str) -> None:
    """A PUT to stats gets a 503 naming ``kind``; readiness and the error counter say so."""
    errors_before = error_count(daemon, kind)
    for attempt in range(3):
        response = daemon.put("ch", "stats", f"new{attempt}", {"big": "x" * 4000})
        assert response.status_code == 503, response.text
        body = response.json()
        assert kind in body["error"], body
        assert daemon.get("ch", "stats", f"new{attempt}").status_code == 404
    errors = error_count(daemon, kind)
    assert errors >= errors_before + 3, daemon.metrics_text()[-3000:]

    def not_ready() -> dict | None:
        response = daemon.http.get("/readyz")
        return response.json() if response.status_code == 503 else None

    problems = wait_until(not_ready, 10, "/readyz to answer 503")["problems"]
    assert "stats" in problems, problems
    assert daemon.metric("chanstore_ready") == 0


def recovered(daemon: DaemonProcess) -> None:
    assert daemon.put("ch", "stats", "after", {"ok": True}).status_code == 200
    assert daemon.get("ch", "stats", "after").json() == {"ok": True}
    wait_until(lambda: daemon.http.get("/readyz").status_code == 200, 10, "/readyz back to 200")
    assert daemon.metric("chanstore_ready") == 1


def test_disk_full(disk_daemon: DaemonProcess, small_disk: Path) -> None:
    before = store_and_snapshot(disk_daemon)
    filler_path = small_disk / ".filler"
    fd = os.open(filler_path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    refused(disk_daemon, "disk_full")
    before.pop("data/.filler", None)
    assert_nothing_damaged(disk_daemon, before)
    temp_files = [p.name for p in small_disk.iterdir() if p.name.startswith(".chanstore-tmp")]
    assert not temp_files, f"failed writes left temporary files: {temp_files}"
    filler_path.unlink()
    recovered(disk_daemon)


def test_disk_read_only(disk_daemon: DaemonProcess, small_disk: Path) -> None:
    before = store_and_snapshot(disk_daemon)
    done = _mount("-o", "remount,ro", str(small_disk))
    assert done.returncode == 0, done.stderr
    with pytest.raises(OSError):
        (small_disk / "probe").write_text("x")
    refused(disk_daemon, "read_only")
    assert_nothing_damaged(disk_daemon, before)
    assert disk_daemon.http.delete("/v1/channels/ch/stats/k1").status_code == 503
    assert disk_daemon.get("ch", "stats", "k1").json() == STORED["k1"]
    done = _mount("-o", "remount,rw", str(small_disk))
    assert done.returncode == 0, done.stderr
    recovered(disk_daemon)


def test_one_channels_folder_read_only_keeps_the_daemon_in_rotation(
    disk_daemon: DaemonProcess, small_disk: Path
) -> None:
    """One channel's folder turns read-only (a bind mount over it): its writes get 503
    read_only, but /readyz stays 200 and the other channels are written as before."""
    assert disk_daemon.put("stuck", "stats", "k", {"n": 1}).status_code == 200
    assert disk_daemon.put("free", "stats", "k", {"n": 1}).status_code == 200
    (folder,) = [path for path in small_disk.rglob("*stuck*") if path.is_dir()]
    assert _mount("--bind", str(folder), str(folder)).returncode == 0
    try:
        done = _mount("-o", "remount,bind,ro", str(folder))
        assert done.returncode == 0, done.stderr
        for attempt in range(3):
            refused = disk_daemon.put("stuck", "stats", f"new{attempt}", {"n": attempt})
            assert refused.status_code == 503, refused.text
            assert "read_only" in refused.json()["error"]
        assert disk_daemon.put("free", "stats", "k", {"n": 2}).status_code == 200
        # Probes run every few seconds and on each /readyz: none takes the daemon out.
        for _ in range(3):
            assert disk_daemon.http.get("/readyz").status_code == 200
        assert disk_daemon.metric("chanstore_ready") == 1
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30, check=False)
    assert disk_daemon.put("stuck", "stats", "again", {"n": 3}).status_code == 200
