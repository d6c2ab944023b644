"""``min_replicas``: a redis write is acknowledged only once that many replicas hold it.

Redis replicates asynchronously: a primary answers a write before any replica
has it, and a failover to a replica then loses what the replica never
received. With ``min_replicas: N`` the redis backend follows its write
scripts with ``WAIT N <replica_timeout ms>`` on the same connection (so the
``WAIT`` counts the replicas that hold every write that connection made) and
acknowledges the writes only if at least N replicas answered in time.
Otherwise each of those writes fails with a
:class:`~chanstore.errors.BackendUnavailable` (the daemon answers 503) that
says how many replicas acknowledged, and that the write is *not*
acknowledged: it was made on the primary, so it may still be read and may
still reach the replicas, or it may be lost with the primary.

How the ``WAIT`` is sent depends on the topology: standalone and sentinel
send it in the writes' own pipeline, one round trip
(:mod:`chanstore.backends.redis_writes`); in a cluster each node that
holds written slots gets its own pipeline ending in a ``WAIT``
(:mod:`chanstore.backends.redis_cluster`). ``WAIT`` is not a guarantee of
durability by itself (a replica acknowledges what it received, not what it
wrote to disk), but a failover promotes the replica with the most data, so
a write that N >= 1 replicas acknowledged survives the loss of its primary.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from chanstore.errors import BackendUnavailable

__all__ = ["ReplicaWait"]


class _Answered(Protocol):
    answer: Any


@dataclass(frozen=True)
class ReplicaWait:
    """How many replicas must hold a write (``min_replicas``), waiting at most ``timeout`` s."""

    replicas: int
    timeout: float

    def command(self) -> tuple[Any, ...]:
        """The ``WAIT`` to send after the writes, on their connection.

        Never ``WAIT n 0``, which would block until n replicas answer, forever.
        """
        return ("WAIT", self.replicas, max(1, round(self.timeout * 1000)))

    def holds(self, reply: Any) -> bool:
        """Whether ``WAIT``'s reply (the number of replicas that acknowledged) is enough."""
        return isinstance(reply, int) and reply >= self.replicas

    def refuse(self, writes: Iterable[_Answered], reply: Any, where: str) -> None:
        """The writes that were made but not acknowledged by enough replicas (``WAIT``
        answered ``reply``) fail with BackendUnavailable; failed writes keep their errors."""
        if isinstance(reply, BaseException):
            how = f"WAIT failed ({reply}), so nobody knows how many replicas hold it"
        else:
            n = reply if isinstance(reply, int) else 0
            replicas = "replica" if self.replicas == 1 else "replicas"
            how = (f"only {n} of the {self.replicas} {replicas} required (min_replicas) "
                   f"acknowledged it within {self.timeout:g} s (replica_timeout)")  # fmt: skip
        for write in writes:
            if isinstance(write.answer, BaseException):
                continue
            write.answer = BackendUnavailable(
                f"Redis at {where}: the write is not acknowledged: {how}. It was made on "
                "the primary, so it may still be read and reach the replicas later, or be "
                "lost if the primary fails"
            )
