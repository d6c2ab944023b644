"""Fixtures of the HTTP door's tests: real ``chanstore serve`` processes, as in tests/daemon.

* ``start_daemon`` starts daemons for one test, with any flags (``args=[...]``);
* ``daemon`` is one daemon shared by a test module: json containers ``stats``
  and ``profiles``, ``--max-body-bytes`` :data:`DOOR_MAX_BODY` (room for the
  100 KB values of the backpressure tests), every other setting at its default;
* ``daemon_with(*flags, token=None)`` is a daemon a module shares with the
  other tests that ask for the same flags (``daemon_with("--header-timeout", "1")``),
  started on first use;
* ``channel`` is a channel id no other test uses.

The daemons and the shared fixtures come from tests/daemon (daemon_harness.py
and daemon_fixtures.py, put on sys.path here). Each is stopped after its test
or module, and a test fails when its daemon logged a crash or did not exit in
time.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "daemon"))
from daemon_fixtures import StartDaemon, channel, daemon, module_daemon_fixture, start_daemon
from daemon_harness import JSON_CONTAINERS, DaemonProcess

__all__ = ["channel", "daemon", "daemon_with", "module_daemon", "start_daemon"]

#: The body limit of the module's shared daemon: above a 100 KB value, small enough
#: that the 413 tests send little.
DOOR_MAX_BODY = 200_000

module_daemon = module_daemon_fixture("door", DOOR_MAX_BODY)


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
            daemon.start(same_port=daemon.port is not None)
        return daemon

    yield get
    problems = [f"{d.workdir}: {problem}" for d in daemons.values() for problem in d.close()]
    if problems:
        pytest.fail("a daemon crashed or hung:\n" + "\n".join(problems))
