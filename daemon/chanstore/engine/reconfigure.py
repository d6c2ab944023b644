"""Applying a new db_config to the running daemon: only what changed is rebuilt.

Added containers appear; removed ones stop being served (their queued writes
still finish, and their metric series go); a container whose backend changed
is rebuilt from the new backend, its caches dropped; one whose other fields
changed (``load``, ``clear``) keeps its caches. Stored data is never deleted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from chanstore import logs
from chanstore.config import DbConfig
from chanstore.engine.channels import ChannelTable, Slot
from chanstore.engine.containers import ContainerRuntime, Containers
from chanstore.engine.settings import EngineSettings
from chanstore.metrics import Metrics

__all__ = ["Changes", "Reconfiguration"]

log = logs.get_logger()


@dataclass(frozen=True)
class Changes:
    """What a new db_config changed, by container name."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, list[str]]:
        return {"added": list(self.added), "removed": list(self.removed),
                "changed": list(self.changed), "updated": list(self.updated)}  # fmt: skip

    @property
    def new_backends(self) -> tuple[str, ...]:
        """Containers whose backend is new: worth checking that it answers."""
        return self.added + self.changed


class Reconfiguration:
    """Swaps the containers of a running daemon for those of a new db_config."""

    def __init__(self, config: DbConfig, containers: Containers, table: ChannelTable,
                 settings: EngineSettings, metrics: Metrics) -> None:  # fmt: skip
        self.config = config
        self.containers = containers
        self.table = table
        self.settings = settings
        self.metrics = metrics
        self._retiring: set[asyncio.Task[None]] = set()

    def apply(self, config: DbConfig) -> Changes:
        """Serve ``config`` from now on."""
        old, new = self.config.by_name(), config.by_name()
        changes = Changes(
            added=tuple(n for n in new if n not in old),
            removed=tuple(n for n in old if n not in new),
            changed=tuple(n for n in new if n in old and not old[n].same_backend(new[n])),
            updated=tuple(
                n for n in new if n in old and old[n].same_backend(new[n]) and old[n] != new[n]
            ),
        )
        runtimes = self.containers.runtimes
        for name in changes.removed + changes.changed:
            self._retire(runtimes.pop(name), forget_series=name in changes.removed)
        for name in changes.new_backends:
            runtimes[name] = ContainerRuntime(new[name], self.settings, self.metrics)
        for name in changes.updated:
            runtimes[name].spec = new[name]
        self.containers.runtimes = {name: runtimes[name] for name in new}
        self.config = config
        return changes

    def _retire(self, runtime: ContainerRuntime, *, forget_series: bool) -> None:
        """Stop serving ``runtime``'s container; its queued writes still finish."""
        slots = self.table.drop_container(runtime.name)
        task = asyncio.get_running_loop().create_task(
            self._close(runtime, slots, forget_series), name=f"retire {runtime.name}"
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close(self, runtime: ContainerRuntime, slots: list[Slot],
                     forget_series: bool) -> None:  # fmt: skip
        try:
            await runtime.close()
        finally:
            for slot in slots:
                if slot.cached is not None:
                    slot.cached.close()
            if forget_series:
                self.metrics.forget_container(runtime.name)

    async def finish(self) -> None:
        """Wait for retired containers to finish their writes."""
        await asyncio.gather(*self._retiring, return_exceptions=True)
