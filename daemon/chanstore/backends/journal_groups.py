"""Group commit across callers: batches that wait for the journal share its next flush.

Why
---
The journal flushes once per batch, and a batch is whatever one caller
hands it: one write lane's queue. A root's batches come from several
threads at once when its containers have several lanes (``--write-lanes``),
when a root holds several containers, or from a library's own threads;
while one batch holds the journal's lock for its flush the others wait for
that lock. Taken one at a time, they cost a flush each: four lanes writing
one key each flushed four times, where one flush would do (four threads
writing 100 KB values to one root stored fewer values per second than one
thread: ``bench/journal_groups.py``).

How
---
A caller puts its batch in :class:`Waiting` (a :class:`Commit`), then takes
the journal's lock. Whoever holds the lock takes every commit waiting by
then (:meth:`Waiting.take`) and journals them as one batch, with one flush;
the others find theirs done when they get the lock, and return its answer.
No thread is added and nothing waits on a timer: a commit waits only for
the batch ahead of it, as before.

Order is kept: commits are taken in the order they arrived, and a group
stops before a commit that names a file already in it, which waits for the
next group. So two writes of one file are journaled and applied in the
order they were made, as the journal's invariants require, and a group
never writes one file twice (the large files of a group are written in
parallel).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

__all__ = ["Commit", "Waiting", "journal_group"]

#: One file of a batch: its path relative to the root, and its contents.
File = tuple[str, bytes]
#: What a batch's write answers: each file's error, or None.
Errors = list[Exception | None]


class Commit:
    """One caller's batch, until the holder of the journal's lock has journaled it."""

    __slots__ = ("done", "files", "outcome", "paths")

    def __init__(self, files: Sequence[File]) -> None:
        self.files = files
        self.paths = {path for path, _data in files}
        self.done = False
        self.outcome: Errors | BaseException = []

    def settle(self, outcome: Errors | BaseException) -> None:
        """Each file's error, or the error of the whole batch."""
        self.outcome = outcome
        self.done = True

    def answer(self) -> Errors:
        """Each file's error; raises the error of the whole batch."""
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class Waiting:
    """Commits waiting for the journal, in the order they arrived.

    Any thread may :meth:`add`; only the holder of the journal's lock may
    :meth:`take`. At most one commit per thread waits here, so it holds no
    more than the threads that write to the root.
    """

    #: Commits a group takes at most; 1 journals each batch alone, as chanstore did
    #: before group commit (``bench/journal_groups.py`` measures the two side by side).
    most = 1 << 30

    def __init__(self) -> None:
        self._commits: deque[Commit] = deque()  # appends and pops are atomic

    def __len__(self) -> int:
        return len(self._commits)

    def add(self, commit: Commit) -> None:
        self._commits.append(commit)

    def take(self) -> list[Commit]:
        """The commits that can be journaled together, the first waiting one first: up to
        (not including) the first that names a file one of them names."""
        group: list[Commit] = []
        paths: set[str] = set()
        commits = self._commits
        while commits and len(group) < self.most and paths.isdisjoint(commits[0].paths):
            commit = commits.popleft()
            group.append(commit)
            paths |= commit.paths
        return group


def journal_group(group: Sequence[Commit], write: Callable[[list[File]], Errors]) -> None:
    """Journal the batches of ``group`` as one, by ``write`` (the files, to each one's
    error), and settle each commit with its own answer: its files' errors, or the error
    that failed the whole group."""
    files = [file for commit in group for file in commit.files]
    try:
        errors = write(files)
    except BaseException as exc:  # every caller of the group raises it
        for commit in group:
            commit.settle(exc)
        if not isinstance(exc, Exception):
            raise  # an interrupt stops this thread too
        return
    start = 0
    for commit in group:
        end = start + len(commit.files)
        commit.settle(errors[start:end])
        start = end
