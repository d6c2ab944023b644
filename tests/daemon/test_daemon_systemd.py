"""sd_notify: what the daemon tells systemd, read from a socket the test binds."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess, NotifyListener, json_entry, wait_until

NO_POLL = ["--config-poll-interval", "60"]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    """A socket bound in the test's folder, as systemd's $NOTIFY_SOCKET is."""
    folder = tmp_path
    if len(str(folder / "notify.sock")) > 100:  # AF_UNIX paths are short
        folder = Path(tempfile.mkdtemp(prefix="cs-notify-"))
    listener = NotifyListener(folder / "notify.sock")
    yield listener
    listener.close()
    if folder != tmp_path:
        shutil.rmtree(folder)


def _has(field: str, value: str | None = None):
    return lambda message: field in message and (value is None or message[field] == value)


def test_ready_with_status_then_stopping_on_sigterm(
    start_daemon, notify_socket: NotifyListener
) -> None:
    daemon: DaemonProcess = start_daemon(env={"NOTIFY_SOCKET": notify_socket.address})

    _, ready = notify_socket.wait_for(_has("READY", "1"), "READY=1")
    assert "STATUS" in ready
    assert daemon.listen in ready["STATUS"]
    assert "stats" in ready["STATUS"]

    assert daemon.stop(signal.SIGTERM) == 0
    _, stopping = notify_socket.wait_for(_has("STOPPING", "1"), "STOPPING=1")
    assert "STATUS" in stopping
    # Without WATCHDOG_USEC there are no watchdog pings.
    assert not any("WATCHDOG" in message for message in notify_socket.received())


def test_abstract_namespace_socket(start_daemon) -> None:
    name = f"@chanstore-test-{uuid.uuid4().hex}"
    listener = NotifyListener(name)
    try:
        daemon = start_daemon(env={"NOTIFY_SOCKET": name})
        listener.wait_for(_has("READY", "1"), "READY=1 on the abstract socket")
        assert daemon.stop() == 0
        listener.wait_for(_has("STOPPING", "1"), "STOPPING=1 on the abstract socket")
    finally:
        listener.close()


def test_reloading_then_ready_around_a_reload_and_a_rejected_one_says_so(
    start_daemon, notify_socket: NotifyListener
) -> None:
    daemon = start_daemon(env={"NOTIFY_SOCKET": notify_socket.address}, args=NO_POLL)
    ready_at, _ = notify_socket.wait_for(_has("READY", "1"), "READY=1")

    before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.write_config([json_entry("stats"), json_entry("profiles"), json_entry("inventory")])
    assert daemon.http.post("/-/reload").status_code == 200
    after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    reloading_at, reloading = notify_socket.wait_for(
        _has("RELOADING", "1"), "RELOADING=1", after=ready_at + 1
    )
    # MONOTONIC_USEC is CLOCK_MONOTONIC, the same clock in every process on the machine.
    assert before_usec <= int(reloading["MONOTONIC_USEC"]) <= after_usec
    _, reloaded = notify_socket.wait_for(_has("READY", "1"), "READY=1 after the reload",
                                         after=reloading_at + 1)  # fmt: skip
    assert "reloaded" in reloaded["STATUS"]
    assert "inventory" in reloaded["STATUS"]

    count = len(notify_socket.received())
    daemon.write_config("[{broken")
    assert daemon.http.post("/-/reload").status_code == 400
    reloading_at, _ = notify_socket.wait_for(_has("RELOADING", "1"), "RELOADING=1", after=count)
    _, rejected = notify_socket.wait_for(_has("STATUS"), "a STATUS line", after=reloading_at + 1)
    assert rejected.get("READY") == "1"
    assert "rejected" in rejected["STATUS"]
    assert "previous config" in rejected["STATUS"]


def test_watchdog_pings_when_asked(start_daemon, notify_socket: NotifyListener) -> None:
    start_daemon(env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "400000"})

    def pings() -> int:
        return sum(message.get("WATCHDOG") == "1" for message in notify_socket.received())

    wait_until(lambda: pings() >= 3, 10, "three WATCHDOG=1 pings")
    assert all(set(m) <= {"WATCHDOG"} for m in notify_socket.received() if "WATCHDOG" in m)


def test_watchdog_meant_for_another_process_is_ignored(
    start_daemon, notify_socket: NotifyListener
) -> None:
    # systemd sets WATCHDOG_PID to the main process; a child that inherits the variables
    # must not ping for it.
    daemon = start_daemon(
        env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    )
    notify_socket.wait_for(_has("READY", "1"), "READY=1")
    assert daemon.stop() == 0
    notify_socket.wait_for(_has("STOPPING", "1"), "STOPPING=1")
    assert not any("WATCHDOG" in message for message in notify_socket.received())
