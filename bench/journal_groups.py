"""What group commit gives writers that share a json root: batches that share a flush.

Each writer is a thread that stores one key at a time in its own domain of
one root (``set_many_together``, as a daemon's write lane does with a light
load), fsync on. Three ways, alternating in rounds, in fresh roots:

* one writer alone;
* four writers, each batch journaled alone (``Waiting.most = 1``: the
  journal before group commit);
* four writers with group commit: a batch that waits for the journal's flush
  shares the next one.

Run: ``python3 bench/journal_groups.py`` (about a minute and a half); figures
are values stored per second, medians of the rounds, and the ratios of the
medians.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator

from chanstore.backends.journal_groups import Waiting
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.codec import parse_document
from json_libraries import shapes

SIZES = (("100 B", 100), ("4 KB", 4_000), ("100 KB", 100_000))
WRITERS = 4


@contextlib.contextmanager
def groups_of(most: int | None) -> Iterator[None]:
    """Journal groups of at most ``most`` batches (None: as many as wait) meanwhile."""
    every = Waiting.most
    Waiting.most = every if most is None else most
    try:
        yield
    finally:
        Waiting.most = every


def values_per_second(body: bytes, writers: int, grouped: bool, seconds: float) -> float:
    """Values stored per second by ``writers`` threads, each in its own domain of one root."""
    value = parse_document(body)
    stored = [0] * writers
    with groups_of(None if grouped else 1), \
            tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as root:  # fmt: skip
        backends = [JSONDatabase(domain=f"bench.c{n}.box", root_dir=root) for n in range(writers)]
        backends[0].set_many({"warm": value})
        deadline = time.perf_counter() + seconds

        def write(index: int) -> None:
            while time.perf_counter() < deadline:
                JSONDatabase.set_many_together([(backends[index], {"k": value})])
                stored[index] += 1

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 60)
        elapsed = time.perf_counter() - started
        for backend in backends:
            backend.close()
    return sum(stored) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(
        f"| value | 1 writer | {WRITERS} writers, a flush per batch | {WRITERS} writers, "
        "group commit | group commit / a flush per batch | group commit / 1 writer |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, size in SIZES:
        body = shapes(size)["text"]
        alone, each, grouped = [], [], []
        for _ in range(args.rounds):
            alone.append(values_per_second(body, 1, True, args.seconds))
            each.append(values_per_second(body, WRITERS, False, args.seconds))
            grouped.append(values_per_second(body, WRITERS, True, args.seconds))
        a, e, g = (statistics.median(figures) for figures in (alone, each, grouped))
        print(
            f"| {label} | {a:,.0f}/s | {e:,.0f}/s | {g:,.0f}/s | {g / e:.2f}x | {g / a:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
