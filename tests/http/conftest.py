"""Fixtures of the HTTP door's tests: real ``chanstore serve`` processes, as in tests/daemon.

* ``start_daemon`` starts daemons for one test, with any flags (``args=[...]``);
* ``daemon`` is one daemon shared by a test module: json containers ``stats``
  and ``profiles``, ``--max-body-bytes`` :data:`DOOR_MAX_BODY` (room for the
  100 KB values of the backpressure tests), every other setting at its default;
* ``daemon_with(*flags, token=None)`` is a daemon a module shares with the
  other tests that ask for the same flags (``daemon_with("--header-timeout", "1")``),
  started on first use;
* ``channel`` is a channel id no other test uses.

The daemons come from tests/daemon/daemon_harness.py (put on sys.path here),
started by :func:`start_own`. Each is stopped after its test or
module, and a test fails when its daemon logged a crash or did not exit in time.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "daemon"))
from daemon_harness import JSON_CONTAINERS, DaemonProcess

StartDaemon = Callable[..., DaemonProcess]

#: The body limit of the module's shared daemon: above a 100 KB value, small enough
#: that the 413 tests send little.
DOOR_MAX_BODY = 200_000


def start_own(daemon: DaemonProcess, *, same_port: bool = False) -> DaemonProcess:
    """Start ``daemon``; on its old port when ``same_port`` and that port is still free,
    on a new one otherwise (the harness checks that /healthz is answered by our pid)."""
    try:
        return daemon.start(same_port=same_port)
    except RuntimeError as exc:
        if not (same_port and "cannot listen" in str(exc)):
            raise
        return daemon.start()  # the port went to another process meanwhile


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """Start a daemon of this test's own: ``start_daemon(config, args=..., env=..., token=...)``."""
    started: list[DaemonProcess] = []

    def start(config: list[dict[str, Any]] | None = None, **options: Any) -> DaemonProcess:
        daemon = DaemonProcess(
            tmp_path / f"daemon{len(started)}", config or JSON_CONTAINERS, **options
        )
        started.append(daemon)
        return start_own(daemon)

    yield start
    problems = [f"{d.workdir}: {problem}" for d in started for problem in d.close()]
    if problems:
        pytest.fail("a daemon crashed or hung:\n" + "\n".join(problems))


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    folder = tmp_path_factory.mktemp("door")
    daemon = DaemonProcess(folder, JSON_CONTAINERS, args=["--max-body-bytes", str(DOOR_MAX_BODY)])
    start_own(daemon)
    yield daemon
    problems = daemon.close()
    if problems:
        pytest.fail("the module's daemon crashed or hung:\n" + "\n".join(problems))


@pytest.fixture
def daemon(module_daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    """The module's shared daemon; the test fails if it logs a crash meanwhile."""
    if not module_daemon.running:
        start_own(module_daemon, same_port=True)
    mark = module_daemon.log_size()
    yield module_daemon
    crashes = module_daemon.crashes(since=mark)
    if crashes:
        pytest.fail("the daemon logged a crash:\n" + "\n".join(crashes))


@pytest.fixture(scope="module")
def daemon_with(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartDaemon]:
    """``daemon_with(*flags, token=None)``: the module's daemon with these flags."""
    daemons: dict[tuple[tuple[str, ...], str | None], DaemonProcess] = {}

    def get(*flags: str, token: str | None = None) -> DaemonProcess:
        daemon = daemons.get((flags, token))
        if daemon is None:
            folder = tmp_path_factory.mktemp("door")
            daemon = daemons[(flags, token)] = DaemonProcess(
                folder, JSON_CONTAINERS, args=list(flags), token=token
            )
        if not daemon.running:
            start_own(daemon, same_port=daemon.port is not None)
        return daemon

    yield get
    problems = [f"{d.workdir}: {problem}" for d in daemons.values() for problem in d.close()]
    if problems:
        pytest.fail("a daemon crashed or hung:\n" + "\n".join(problems))


@pytest.fixture
def channel() -> str:
    """A channel id no other test uses."""
    return f"ch-{uuid.uuid4().hex[:12]}"
