"""Fixtures for in-process tests of the daemon's storage side: an Engine on real backends.

An :class:`~chanstore.engine.Engine` starts tasks (its write lanes), so it is
built inside the test's event loop: tests are plain functions that run one
coroutine with ``asyncio.run`` and build the engine there with ``make_engine``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chanstore.config import load_db_config
from chanstore.engine import Engine, EngineSettings
from chanstore.metrics import Metrics


def _json_entry(name: str, root: Path, **fields: Any) -> dict[str, Any]:
    return {"implementation": "json", "name": name, "load": True, "clear": False,
            "settings": {"root_dir": str(root), "fsync": False}, **fields}  # fmt: skip


@pytest.fixture
def json_entry() -> Callable[..., dict[str, Any]]:
    """Makes a db_config entry for a json container: ``json_entry(name, root, **fields)``."""
    return _json_entry


@pytest.fixture
def entries(tmp_path: Path) -> list[dict[str, Any]]:
    """Two json containers: ``stats`` (loaded) and ``log`` (not loaded)."""
    return [_json_entry("stats", tmp_path / "data"),
            _json_entry("log", tmp_path / "data", load=False)]  # fmt: skip


@pytest.fixture
def make_engine(entries: list[dict[str, Any]], metrics: Metrics) -> Callable[..., Engine]:
    """Builds an Engine (call it inside the test's event loop); closed by the caller."""

    def make(config: list[dict[str, Any]] | None = None, **settings: Any) -> Engine:
        return Engine(EngineSettings(**settings), load_db_config(config or entries), metrics)

    return make
