"""Applying a new db_config to a running engine: only what changed is rebuilt."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chanstore.codec import Document
from chanstore.config import load_db_config
from chanstore.engine import ABSENT, Engine, UnknownContainer
from chanstore.metrics import Metrics


def run(coroutine_function: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine_function(), 30))


def series(metrics: Metrics, container: str) -> list[str]:
    """The exposed series that name ``container``."""
    metrics.fold()
    return [
        sample.name
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.labels.get("container") == container
    ]


def test_added_removed_changed_and_updated_containers(
    make_engine: Callable[..., Engine], json_entry: Callable[..., Any], tmp_path: Path
) -> None:
    data, other = tmp_path / "data", tmp_path / "other"

    async def main() -> None:
        engine = make_engine([json_entry("stats", data), json_entry("log", data),
                              json_entry("gone", data)])  # fmt: skip
        store = engine.store
        for name in ("stats", "log", "gone"):
            await store.write("c1", name, "k", Document(name))
        changes = engine.apply_config(load_db_config([
            json_entry("stats", data, load=False),  # updated: same backend
            json_entry("log", other),  # changed: another root
            json_entry("new", data),  # added
        ]))  # fmt: skip
        assert changes.as_dict() == {"added": ["new"], "removed": ["gone"],
                                     "changed": ["log"], "updated": ["stats"]}  # fmt: skip
        assert store.cached_body("c1", "stats", "k")[0] == b'"stats"'  # its cache was kept
        assert await store.read_body("c1", "log", "k") is ABSENT  # the empty new root
        try:
            await store.read_body("c1", "gone", "k")
        except UnknownContainer:
            pass
        else:
            raise AssertionError("a removed container is still served")
        await engine.close()

    run(main)
    assert list(data.rglob("gone/k.json")), "a reload never deletes stored data"


def test_a_removed_containers_metric_series_go_with_it(
    make_engine: Callable[..., Engine],
    json_entry: Callable[..., Any],
    metrics: Metrics,
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"

    async def main() -> None:
        engine = make_engine([json_entry("stats", data), json_entry("gone", data)])
        await engine.store.write("c1", "gone", "k", Document(1))
        await engine.store.read_body("c1", "gone", "k")
        await engine.readiness.check()
        assert series(metrics, "gone")
        engine.apply_config(load_db_config([json_entry("stats", data)]))
        await engine.close()

    run(main)
    assert series(metrics, "gone") == []
    assert series(metrics, "stats")


def test_a_new_backend_that_does_not_answer_is_reported(
    make_engine: Callable[..., Engine], json_entry: Callable[..., Any], tmp_path: Path
) -> None:
    """A reload onto an unreachable backend is applied, and the caller hears why it fails."""
    settings = {"host": "127.0.0.1", "port": 1, "socket_connect_timeout": 0.5}
    unreachable = {"implementation": "redis", "name": "mana", "settings": settings}

    async def main() -> None:
        engine = make_engine([json_entry("stats", tmp_path / "data")])
        changes = engine.apply_config(
            load_db_config([json_entry("stats", tmp_path / "data"), unreachable])
        )
        failures = await engine.check_containers(changes.new_backends)
        assert list(failures) == ["mana"]
        assert "127.0.0.1:1" in str(failures["mana"])
        await engine.close()

    run(main)


def test_every_integrity_counter_a_backend_can_meet_exists_at_zero(
    make_engine: Callable[..., Engine], metrics: Metrics
) -> None:
    """So that a rate over them sees a container's first problem (a counter born at 1
    has no increase to show)."""

    async def main() -> None:
        engine = make_engine()
        await engine.close()

    run(main)
    for kind in ("corrupt_value", "journal_damaged", "planted_link"):
        labels = {"container": "stats", "kind": kind}
        assert metrics.registry.get_sample_value("chanstore_integrity_problems_total", labels) == 0
