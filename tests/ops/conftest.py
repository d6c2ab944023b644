"""Fixtures of the ops tests: the real promtool and prometheus, and chanstore daemons.

The tools come from Debian's prometheus package (scripts/test installs it).
Where one is missing, its tests skip with the reason, unless CI is set: in CI
a missing tool fails them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ops_support import Daemon, free_port, ops_db_config, require_tool, running_redis

from support import RedisServer


@pytest.fixture(scope="session")
def promtool() -> str:
    """The path of promtool."""
    return require_tool("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """The path of the prometheus server."""
    return require_tool("prometheus")


@pytest.fixture
def shared_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, with a password, for daemons to share.

    Ask for it before ``start_daemon``: the daemons then stop before it does.
    """
    with running_redis(tmp_path / "redis", "--requirepass", "ops-secret") as server:
        yield server


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start ``chanstore serve`` on a free port: ``start_daemon(entries=None)``.

    The default db_config is :func:`ops_db_config`. Every daemon is stopped
    after the test, and must exit 0.
    """
    started: list[Daemon] = []

    def start(entries: list[dict[str, Any]] | None = None) -> Daemon:
        if entries is None:
            entries = ops_db_config(free_port())
        daemon = Daemon(tmp_path / f"daemon{len(started)}", entries)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()
