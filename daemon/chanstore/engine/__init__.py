"""The daemon's storage side: live channels, write lanes, change feed, reconfiguration, readiness.

It knows nothing of HTTP. :class:`Engine` puts the parts together for one
db_config; the HTTP layer reads and writes through :attr:`Engine.store`, and
the server applies reloads (:meth:`Engine.apply_config`), sweeps idle
channels and asks for readiness.
"""

from __future__ import annotations

import asyncio

from chanstore.config import DbConfig
from chanstore.engine.channels import ChannelTable
from chanstore.engine.containers import ContainerRuntime, Containers, check_not_served_elsewhere
from chanstore.engine.errors import BackendTimeout, UnknownContainer
from chanstore.engine.feed import Feed, TooManyWatchers
from chanstore.engine.readiness import Readiness
from chanstore.engine.reconfigure import Changes, Reconfiguration
from chanstore.engine.settings import EngineSettings
from chanstore.engine.store import ABSENT, NO_EXPECTATION, Store
from chanstore.engine.watchers import Watcher
from chanstore.metrics import Metrics

__all__ = [
    "ABSENT",
    "NO_EXPECTATION",
    "BackendTimeout",
    "Changes",
    "Engine",
    "EngineSettings",
    "Feed",
    "Store",
    "TooManyWatchers",
    "UnknownContainer",
    "Watcher",
    "check_not_served_elsewhere",
]


class Engine:
    """The channels in memory and the containers of one running db_config."""

    def __init__(self, settings: EngineSettings, config: DbConfig, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.containers = Containers(
            {spec.name: ContainerRuntime(spec, settings, metrics) for spec in config}
        )
        self.channels = ChannelTable(settings, self.containers, metrics)
        self.store = Store(self.channels, self.containers)
        self.feed = Feed(settings, self.channels, self.containers, metrics)
        self.readiness = Readiness(self.containers, metrics)
        self._reconfiguration = Reconfiguration(config, self.containers, self.channels,
                                                settings, metrics)  # fmt: skip

    @property
    def config(self) -> DbConfig:
        """The db_config being served."""
        return self._reconfiguration.config

    def apply_config(self, config: DbConfig) -> Changes:
        """Serve ``config`` from now on; only what changed is rebuilt."""
        return self._reconfiguration.apply(config)

    async def check_containers(self, names: tuple[str, ...]) -> dict[str, BaseException]:
        """The containers among ``names`` whose backend does not answer now, and why."""
        found = {}
        for name in names:
            runtime = self.containers.get(name)
            if runtime is not None and (failure := await runtime.check()) is not None:
                found[name] = failure
        return found

    def sweep_idle(self) -> int:
        """Drop channels idle for ``idle_timeout``; how many left."""
        return self.channels.sweep_idle()

    async def close(self) -> None:
        """End every change-feed stream, finish every queued write, then close every backend."""
        await self.feed.close()
        runtimes = list(self.containers)
        await asyncio.gather(*(runtime.close() for runtime in runtimes))
        links = {id(link): link for runtime in runtimes if (link := runtime.link) is not None}
        await asyncio.gather(*(link.close() for link in links.values()))
        await self._reconfiguration.finish()
        self.channels.evict_all()
