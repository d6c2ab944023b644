"""What the daemon's storage side is told: the part of the daemon's settings it uses."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineSettings"]


@dataclass(frozen=True)
class EngineSettings:
    """Limits and names for the channels in memory and their backends."""

    #: The ``service_<id>`` part of every domain.
    service_id: str = "chanstore"
    #: Seconds after which an unused channel leaves memory.
    idle_timeout: float = 300.0
    #: Channels kept in memory at most; the idlest leave first.
    max_channels: int = 100_000
    #: Write queues per container.
    write_lanes: int = 1
    #: Seconds a request waits for a backend before it fails.
    backend_timeout: float = 10.0
    #: Change-feed streams open at most.
    max_watchers: int = 1024
    #: Changes kept per channel's container, for feeds that resume.
    event_history: int = 1000
    #: Bytes of change history held in memory for containers whose backend keeps none.
    event_history_bytes: int = 64 * 1024 * 1024
    #: Bytes of events one feed stream may fall behind by before it is dropped.
    watcher_buffer_bytes: int = 1024 * 1024
    #: Seconds a shared backend's cached container is answered from memory at most
    #: before it is read again: a backstop behind the invalidation link.
    cache_max_age: float = 60.0
