"""Coherence: how a cache hears that another process changed what it copied.

Several daemons may serve the same Redis. Each keeps its channels' values in
memory, so each must learn of every write made through any other, quickly,
or it answers a value that is no longer stored. A backend shared by several
processes answers :meth:`DatabaseInterface.invalidations
<chanstore.backends.base.DatabaseInterface.invalidations>` with the
:class:`Invalidations` link of its server: one per server (or deployment)
and process, however many domains use it. A backend that only this process
writes answers None, and its caches are always current.

A listener hears, on the event loop, of the keys other processes wrote
(never of this process's own writes, which it already knows), and whether
the link is up. While the link is down the listener cannot know what
changed, so it must stop answering from memory; once it is up again, it
must drop what it held before answering from memory again.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["InvalidationListener", "Invalidations"]


class InvalidationListener(Protocol):
    """Whoever holds caches of a shared backend's domains."""

    def invalidated(self, domain: str, keys: list[str]) -> None:
        """Another process wrote (set or deleted) ``keys`` of ``domain``. On the loop."""
        ...

    def link_changed(self, up: bool) -> None:
        """The link went up (every write from now on will be heard) or down. On the loop."""
        ...


class Invalidations(Protocol):
    """The link through which a shared backend tells of writes made by other processes."""

    #: What the link is to, for metrics labels, logs and readiness (no secrets in it).
    name: str

    @property
    def up(self) -> bool:
        """Whether every write made by another process is heard now."""
        ...

    def subscribe(self, listener: InvalidationListener) -> None:
        """Tell ``listener`` of invalidations and of the link's state from now on (it is
        told the current state at once). Starts the link if it is not running."""
        ...

    def unsubscribe(self, listener: InvalidationListener) -> None:
        """Stop telling ``listener``; the link stops once nobody listens."""
        ...

    async def close(self) -> None:
        """Stop the link for good (the process stops): its task ends, its connection closes."""
        ...
