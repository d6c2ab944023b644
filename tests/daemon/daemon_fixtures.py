"""Fixtures shared by every suite that runs ``chanstore serve`` as a real process.

A conftest imports the ones it uses (tests/daemon and tests/http do), and
defines its own ``module_daemon``: the daemon a module shares, with that
suite's flags. Every daemon is stopped after its test or module (SIGTERM,
SIGKILL past a timeout), and a test fails when its daemon logged a crash
(``request_crashed`` or a Traceback) or did not exit in time.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import IN_CI, JSON_CONTAINERS, DaemonProcess, RedisServer, json_entry

__all__ = ["StartDaemon", "channel", "daemon", "for_the_module", "redis", "start_daemon"]

StartDaemon = Callable[..., DaemonProcess]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """Start a daemon of this test's own: ``start_daemon(config, args=..., env=..., token=...)``."""
    started: list[DaemonProcess] = []

    def start(config: list[dict[str, Any]] | None = None, *, workdir: Path | None = None,
              **options: Any) -> DaemonProcess:  # fmt: skip
        folder = workdir or tmp_path / f"daemon{len(started)}"
        if config is None and "config_path" not in options:
            config = JSON_CONTAINERS
        daemon = DaemonProcess(folder, config, **options)
        started.append(daemon)
        return daemon.start()

    yield start
    problems = [f"{d.workdir}: {problem}" for d in started for problem in d.close()]
    if problems:
        pytest.fail("a daemon crashed or hung:\n" + "\n".join(problems))


@pytest.fixture
def daemon(module_daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    """The module's shared daemon (see the conftest's ``module_daemon``); the test fails
    if it logs a crash meanwhile."""
    if not module_daemon.running:
        module_daemon.start(same_port=True)
    mark = module_daemon.log_size()
    yield module_daemon
    crashes = module_daemon.crashes(since=mark)
    if crashes:
        pytest.fail("the daemon logged a crash:\n" + "\n".join(crashes))


@pytest.fixture
def channel() -> str:
    """A channel id no other test uses."""
    return f"ch-{uuid.uuid4().hex[:12]}"


def _need_redis_server() -> None:
    """Skip without redis-server (fail in CI, which must have it)."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may stop and start again."""
    _need_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by a test module (tests that do not stop it)."""
    _need_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def json_and_redis_containers(redis: RedisServer, *more: dict[str, Any]) -> list[dict[str, Any]]:
    """A db_config of json ``stats`` (under ``data/``) and Redis-backed ``mana``, and ``more``."""
    mana = {"implementation": "redis", "name": "mana", "load": True,
            "settings": {**redis.settings, "socket_timeout": 5.0}}  # fmt: skip
    return [json_entry("stats"), mana, *more]


def for_the_module(daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    """The body of a module-scoped daemon fixture (``yield from`` it): ``daemon`` started,
    then stopped once the module's tests ran, failing them if it crashed or hung."""
    daemon.start()
    yield daemon
    problems = daemon.close()
    if problems:
        pytest.fail("the module's daemon crashed or hung:\n" + "\n".join(problems))


def module_daemon_fixture(folder_name: str, max_body: int) -> Any:
    """A module-scoped ``module_daemon`` fixture: json containers ``stats`` and
    ``profiles``, ``--max-body-bytes max_body``, in a folder named ``folder_name``."""

    @pytest.fixture(scope="module")
    def module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
        folder = tmp_path_factory.mktemp(folder_name)
        yield from for_the_module(
            DaemonProcess(folder, JSON_CONTAINERS, args=["--max-body-bytes", str(max_body)])
        )

    return module_daemon
