"""Where a large value is cheaper written directly than through the json root's journal.

A batch of the json backend (fsync on) journals each file (one record, one
flush for the batch) and writes it again unflushed; checkpoints flush those
files later and zero the journal, every 4 MiB. A direct write is a temporary
file, flushed, renamed, and the folder flushed. This times one-key batches
(``set_many``, what a daemon's write lane does under a light load) of each
size both ways, checkpoints included, alternating rounds in fresh folders.

Run: ``python bench/json_crossover.py`` (about a minute); the journal's
threshold, ``chanstore.backends.journal_direct.DIRECT_BYTES``, is set from it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from chanstore.backends import journal as journal_module
from chanstore.backends import journal_direct
from chanstore.backends.registry import get_engine
from chanstore.codec import Document

SIZES = [16 << 10, 64 << 10, 128 << 10, 256 << 10, 384 << 10, 512 << 10, 900 << 10]


def per_write(size: int, direct: bool, total: int) -> float:
    """Mean ms of a one-key set_many of a ``size``-byte file, direct or journaled."""
    journal_module.DIRECT_BYTES = 0 if direct else 1 << 40
    count = max(8, min(200, total // size))
    value = Document({"text": "x" * (size - 20)}, parsed=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as root:
        backend = get_engine("json")(domain="bench.crossover", root_dir=root)
        try:
            backend.set_many({"warm": value})
            started = time.perf_counter()
            for number in range(count):
                backend.set_many({f"k{number}": value})
            elapsed = time.perf_counter() - started
        finally:
            backend.close()
    return elapsed / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--total-mib", type=int, default=24, help="bytes written per measure")
    args = parser.parse_args()
    print("| file bytes | journaled ms/write | direct ms/write | direct / journaled |")
    print("| ---: | ---: | ---: | ---: |")
    for size in SIZES:
        journaled, direct = [], []
        for _ in range(args.rounds):
            journaled.append(per_write(size, False, args.total_mib << 20))
            direct.append(per_write(size, True, args.total_mib << 20))
        j, d = statistics.median(journaled), statistics.median(direct)
        print(f"| {size:,} | {j:.2f} | {d:.2f} | {d / j:.2f}x |")
    print(f"threshold in use: DIRECT_BYTES = {journal_direct.DIRECT_BYTES:,}")


if __name__ == "__main__":
    main()
