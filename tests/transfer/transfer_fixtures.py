"""What the transfer tests share: db_config files over real backends, and the CLI as a process.

* ``configs`` writes db_config files (``configs.json(root)``, ``configs.redis(prefix)``)
  over json roots under the test's folder and the session's real redis-server;
* ``cli`` runs ``chanstore`` as a separate process, as an operator would,
  and answers its exit status, stdout and stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chanstore.storage import MoobiusStorage

SERVICE = "svc"
#: The containers every test config names: two, so that filters have something to leave out.
CONTAINERS = ("stats", "profiles")


@dataclass
class Ran:
    """What a ``chanstore`` command did."""

    status: int
    stdout: str
    stderr: str


class Configs:
    """Writes db_config files naming :data:`CONTAINERS` on one backend each."""

    def __init__(self, folder: Path, request: pytest.FixtureRequest) -> None:
        self.folder = folder
        self._request = request
        self._count = 0

    def json(self, root: str = "data", names: tuple[str, ...] = CONTAINERS) -> Path:
        settings = {"root_dir": str(self.folder / root)}
        return self.write([_entry("json", name, settings) for name in names])

    def redis(self, prefix: str = "chanstore:", names: tuple[str, ...] = CONTAINERS,
              **more: Any) -> Path:  # fmt: skip
        if not more:
            more = dict(self._request.getfixturevalue("redis_settings"))
        settings = {**more, "key_prefix": prefix}
        return self.write([_entry("redis", name, settings) for name in names])

    def write(self, entries: list[dict[str, Any]]) -> Path:
        self._count += 1
        path = self.folder / f"db-{self._count}.json"
        path.write_text(json.dumps(entries), encoding="utf-8")
        return path


def _entry(implementation: str, name: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {"implementation": implementation, "name": name, "load": False, "clear": False,
            "settings": settings}  # fmt: skip


@pytest.fixture
def configs(tmp_path: Path, request: pytest.FixtureRequest) -> Configs:
    return Configs(tmp_path, request)


def storage(config: Path, channel: str) -> MoobiusStorage:
    """The channel's storage over ``config``, strict, as a service would open it."""
    return MoobiusStorage(SERVICE, channel, str(config), strict_mode=True)


def fill(config: Path, channels: dict[str, dict[str, dict[str, Any]]]) -> int:
    """Store ``{channel: {container: {key: value}}}``; how many keys that is."""
    stored = 0
    for channel, containers in channels.items():
        held = storage(config, channel)
        try:
            for container, items in containers.items():
                held.containers[container].update(items)
                stored += len(items)
        finally:
            held.close()
    return stored


def read_back(config: Path, channel: str, container: str) -> dict[str, Any]:
    held = storage(config, channel)
    try:
        return held.containers[container].copy()
    finally:
        held.close()


@pytest.fixture
def cli(tmp_path: Path):
    """Run ``chanstore ARGS`` (service :data:`SERVICE`) as a process; bounded by ``timeout``."""

    def run(*args: str, stdin: bytes | None = None, timeout: float = 120) -> Ran:
        env = {**os.environ, "CHANSTORE_SERVICE_ID": SERVICE}
        command = [sys.executable, "-m", "chanstore.cli", *args]
        done = subprocess.run(command, input=stdin, capture_output=True, timeout=timeout,
                              env=env, cwd=tmp_path, check=False)  # fmt: skip
        return Ran(done.returncode, done.stdout.decode(), done.stderr.decode())

    return run


def report(text: str) -> dict[str, list[str]]:
    """A transfer report's rows by container: the cells after the name (numbers
    without their thousands separators)."""
    rows = {}
    for line in text.splitlines()[1:]:
        cells = line.split()
        if cells and cells[0] in CONTAINERS:
            rows[cells[0]] = [cell.replace(",", "") if cell[:1].isdigit() else cell
                              for cell in cells[1:]]  # fmt: skip
    return rows
