"""How often the daemon's cyclic garbage collector runs.

A value arrives as JSON and is parsed into Python objects: a PUT of 900 KB
of chat messages builds some 12,000 dicts and lists, and a cached copy of it
lives on in memory. CPython collects its youngest generation every 700 new
container objects (its default thresholds are 700, 10, 10), so a parse of
such a body is interrupted a dozen times, the half-built document is
promoted to the oldest generation, and once a quarter of that generation is
new, the next collection is a full one: every cached value walked again.
On this 2-core machine the collector so took a third of the CPU of a large
PUT (one 900 KB PUT at a time to a redis container: 17.0 ms each with the
default thresholds, 11.0 ms with these; 100 KB: 2.40 ms and 1.57 ms).

The daemon makes few reference cycles (a value is a tree; asyncio's
futures, tasks and exceptions make the rest), so collecting the youngest
generation every :data:`YOUNG_GENERATION` new objects instead costs at most
that many objects' worth of memory held a little longer, and a parsed body
is stored or freed before a collection sees it. The older generations'
thresholds stay as they are, and so does :func:`gc.collect` where the
daemon gives memory back (:mod:`chanstore.server.memory`).

Applied to the daemon's processes only: the in-process library leaves its
host application's collector alone.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_GENERATION", "tune_collector"]

#: New container objects between two collections of the youngest generation.
YOUNG_GENERATION = 10_000


def tune_collector() -> None:
    """Collect the youngest generation every :data:`YOUNG_GENERATION` new objects."""
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION, middle, oldest)
