"""The redis backend's data-loss marker: whether a Redis database still holds what chanstore stored.

A Redis that lost what chanstore stored (``FLUSHALL``, a restart without
persistence, a failover to a replica that never had the data) answers every
read with "absent", which looks like an empty channel. :class:`Marker` tells
the two apart with one key per key prefix and database,
``<key_prefix>-marker`` (:data:`MARKER_SUFFIX`), and gives a ``data_lost``
:class:`~chanstore.errors.IntegrityProblem` when it vanishes or changes; its
docstring says what it sees and what it cannot. A Redis Cluster loses data
per shard, so :class:`ClusterMarkers` keeps one marker per primary,
``<key_prefix>-marker{<tag>}``, in a slot that primary holds.

Apart from the backend because only the daemon's readiness probe uses it,
through :meth:`~chanstore.backends.redisdb.RedisDatabase.integrity_problems`:
reads and writes never touch it, and the thousands of backends of channels
in memory never make one.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import socket
import threading
import time
import uuid

import redis
from redis.crc import key_slot

from chanstore.errors import IntegrityProblem

__all__ = ["MARKER_SUFFIX", "ClusterMarkers", "Marker", "lowest_slots", "slot_tag"]

#: The marker key's name after the key prefix: ``chanstore:-marker`` by default.
#: No domain of a MoobiusStorage (``service_...``) can be named so.
MARKER_SUFFIX = "-marker"


class Marker:
    """Whether one Redis database still holds what chanstore stored under one key prefix.

    The marker is a string key holding a token that no other database can
    hold (a random id, with when and by whom it was written, for a person
    who looks). Data and marker go together: ``FLUSHALL``/``FLUSHDB``, a
    restart without persistence and a failover to a replica that never had
    the data take both, while a restart that reloads the data (AOF or RDB)
    and a failover to a replica that has it bring the marker back too.

    Each check writes a marker if there is none (``SET NX``), reads the one
    there, and reads the server's ``run_id`` (only to word the message), in
    one round trip. The token seen first is adopted; a later one that
    differs means the data this process saw is gone: the marker vanished
    (this check wrote a new one) or was replaced (another daemon sharing the
    Redis noticed first and wrote a new one, or an older backup was
    restored). The new token is adopted, so one loss is told once.

    Not seen: a loss while no chanstore watched (the marker is gone with the
    data, and a new daemon adopts the empty database), deleting single keys,
    and the writes a snapshot-only Redis loses in a crash (the snapshot
    brings an old marker back with old data).
    """

    def __init__(self, name: bytes, where: str) -> None:
        self.name = name
        self.where = where
        self.seen: bytes | None = None
        self.run_id: str | None = None
        # Two readiness checks may overlap: one loss is still told once.
        self._lock = threading.Lock()

    def check(self, client: redis.Redis) -> IntegrityProblem | None:
        pipe = client.pipeline(transaction=False)
        pipe.set(self.name, _new_marker(), nx=True)
        pipe.get(self.name)
        pipe.info("server")
        with self._lock:
            armed, current, info = pipe.execute(raise_on_error=False)
            if isinstance(current, Exception):
                raise current  # WRONGTYPE, NOPERM: the marker cannot be read at all
            run_id = info.get("run_id") if isinstance(info, dict) else None
            seen, self.seen = self.seen, current
            old_run_id, self.run_id = self.run_id, run_id or self.run_id
            if seen is None or current == seen:
                return None
        gone = armed is True or current is None  # this check found no marker at all
        return IntegrityProblem("data_lost", self._message(gone, old_run_id, run_id))

    def _message(self, gone: bool, old_run_id: str | None, run_id: str | None) -> str:
        name = self.name.decode(errors="replace")
        if old_run_id and run_id and old_run_id != run_id:
            how = (f"restarted (run_id {old_run_id[:8]} -> {run_id[:8]}) without it: it does "
                   "not persist its data, a replica that never had it took over, or an older "
                   "backup was restored")  # fmt: skip
        elif gone:
            how = ("lost it while it ran (run_id unchanged): FLUSHALL, FLUSHDB, an eviction "
                   f"policy other than noeviction, or a deleted key {name!r}")  # fmt: skip
        else:
            how = (f"holds another marker in {name!r}: another daemon found the data lost "
                   "first, or the database was replaced")  # fmt: skip
        return f"Redis at {self.where} no longer holds the data chanstore stored there; it {how}"


def _new_marker() -> bytes:
    """A marker token no other database holds, readable by a person who finds it."""
    return json.dumps({
        "chanstore": "if this key is gone, so is the data chanstore stored in this database",
        "id": uuid.uuid4().hex,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": f"{socket.gethostname()} pid {os.getpid()}",
    }, separators=(",", ":")).encode()  # fmt: skip


class ClusterMarkers:
    """:class:`Marker` for a Redis Cluster: one marker per primary, in a slot it holds.

    A cluster loses data shard by shard (a primary restarted without
    persistence, a failover to a replica that never had the data), so every
    primary gets a marker of its own, named ``<key_prefix>-marker{<tag>}``
    where the hash tag puts it in the lowest slot that primary holds (the
    first of its ranges): every daemon reading the same slot table picks
    the same name, and after a failover the new primary of those slots
    holds (or lacks) the same key. Markers are remembered by that slot, so
    a failover to a replica that has the data is no loss, and one to a
    replica that has not is.

    One round trip per primary per check. Not seen, beyond what
    :class:`Marker` cannot see: a loss in slots that moved to another
    primary by a resharding, until the marker's own slot moves too.
    """

    def __init__(self, prefix: str, where: str) -> None:
        self.prefix = prefix
        self.where = where
        self._markers: dict[int, Marker] = {}

    def check(self, primaries: list[tuple[str, int, redis.Redis]]) -> list[IntegrityProblem]:
        """Check each primary, given as its name, the lowest slot it holds, and its client."""
        problems = []
        for name, slot, client in primaries:
            marker = self._markers.get(slot)
            if marker is None:
                key = f"{self.prefix}{MARKER_SUFFIX}{{{slot_tag(slot)}}}".encode()
                marker = self._markers[slot] = Marker(key, f"{self.where} (node {name})")
            marker.where = f"{self.where} (node {name})"
            problem = marker.check(client)
            if problem is not None:
                problems.append(problem)
        return problems


def lowest_slots(slots_cache: dict[int, list[object]]) -> dict[str, int]:
    """The lowest slot each primary holds, by the primary's name (from redis-py's
    ``nodes_manager.slots_cache``: slot -> [primary, replicas...])."""
    lowest: dict[str, int] = {}
    for slot, nodes in slots_cache.items():
        if nodes:
            name = nodes[0].name  # type: ignore[attr-defined]
            if slot < lowest.get(name, 16384):
                lowest[name] = slot
    return lowest


@functools.cache
def slot_tag(slot: int) -> str:
    """The first of ``0``, ``1``, ``2``... whose hash slot is ``slot``: a hash tag for it."""
    for number in itertools.count():
        tag = str(number)
        if key_slot(tag.encode()) == slot:
            return tag
    raise AssertionError("unreachable")
