"""Integrity problems of json roots that chanstore finds by itself, told once.

What no operation's answer carries: a journal replay that had to skip
records, a planted link a listing came across. They are kept per root (the
root resolved once) until a backend of that root hands them over through
:meth:`~chanstore.backends.base.DatabaseInterface.integrity_problems`, which
the daemon's readiness probe calls every few seconds, logging each at error
and counting it in ``chanstore_integrity_problems_total``.
"""

from __future__ import annotations

import threading

from chanstore import logs
from chanstore.backends.files import PlantedLink
from chanstore.errors import IntegrityProblem

__all__ = ["problems", "report_planted"]

log = logs.get_logger(backend="json")


class _Problems:
    """Integrity problems found in json roots, kept per root until a backend hands them over.

    For what no operation's answer carries (a journal replay that skipped
    records, a planted link a listing came across): any backend of the root
    hands them over once, through ``integrity_problems()``, which the
    daemon's readiness probe calls every few seconds. Each problem is told
    once per process; a bounded memory of what was told keeps an attacker
    who plants links by the million from growing it without end.
    """

    #: Problems remembered as told, at most; past it the memory starts afresh.
    REMEMBERED = 10_000
    #: Problems of one root kept for a backend to hand over, at most.
    PENDING = 1_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[IntegrityProblem]] = {}
        self._told: set[tuple[str, str]] = set()

    def add(self, root: str, problem: IntegrityProblem) -> bool:
        """Keep ``problem`` of ``root`` for the next backend that asks; False if known already."""
        with self._lock:
            if (root, problem.message) in self._told:
                return False
            if len(self._told) >= self.REMEMBERED:
                self._told.clear()
            self._told.add((root, problem.message))
            pending = self._pending.setdefault(root, [])
            if len(pending) < self.PENDING:  # past it, the log alone tells them
                pending.append(problem)
            return True

    def take(self, root: str) -> list[IntegrityProblem]:
        """The problems of ``root`` not handed over yet (each is handed over once)."""
        if root not in self._pending:  # the usual case, without the lock
            return []
        with self._lock:
            return self._pending.pop(root, [])


#: The integrity problems of every json root in this process.
problems = _Problems()


def report_planted(root: str, path: str, where: str) -> None:
    """A planted link found by something other than an operation on it (a listing, a replay).

    Logged at error and kept as an integrity problem, once per path.
    """
    problem = IntegrityProblem(kind="planted_link", message=str(PlantedLink(path)))
    if problems.add(root, problem):
        log.error("json_planted_link", root=root, path=path, found_by=where)
