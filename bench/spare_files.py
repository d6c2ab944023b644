"""Large json files written over their folders' spares, against the raw loop and a new file.

A batch of four 100 KB chat-message files (indented, as the json backend
writes them), one in each of four folders, as four channels' PUTs of
``bench/daemon.py --only put-large`` are, written the ways below in
alternating rounds of a second; every figure is files per second, and each
ratio is against the raw loop of the same round:

- ``raw loop``: temp file, fsync, rename, one file after another (the
  baseline ``bench/daemon.py`` measures the daemon against);
- ``new files``: ``write_directly`` with the folders' spares removed before
  each batch, so that every file is a new one and the version it replaces is
  freed (here, where large files were written before spares freed it on a
  thread of their own);
- ``spares``: ``write_directly`` as the json backend calls it, the C
  extension's form (``spare_files``);
- the same two beside a thread that runs Python half of the time, as the
  daemon's event loop does under load: ``spares, Python form`` takes the GIL
  back after each system call, the C form once per file.

Run: ``python3 bench/spare_files.py`` (about 40 s; ``--rounds 10``, longer).
``BENCH_DIR`` picks the file system (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from chanstore.backends import spare_files
from chanstore.backends.files import Root
from chanstore.backends.journal_direct import write_directly

sys.path.insert(0, str(Path(__file__).parent))
from harness import markdown_table, raw_write, text_table
from json_libraries import shapes

FOLDERS = 4
ROUND_SECONDS = 1.0


def raw_loop(folders: list[Path], data: bytes) -> None:
    for folder in folders:
        raw_write(folder / ".tmp", folder / "key.json", data)


def directly(root: Root, files: list[tuple[str, bytes]], spares: list[Path] | None) -> None:
    if spares is not None:  # every file a new one, its old version freed
        for spare in spares:
            spare.unlink(missing_ok=True)
    errors = write_directly(root, files)
    if any(errors):
        raise RuntimeError(f"a write failed: {errors}")


@contextlib.contextmanager
def python_form() -> Iterator[None]:
    compiled, spare_files._compiled = spare_files._compiled, None
    try:
        yield
    finally:
        spare_files._compiled = compiled


@contextlib.contextmanager
def busy_beside() -> Iterator[None]:
    """A thread that runs Python for about a millisecond, then sleeps one, until the end."""
    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            ends = time.perf_counter() + 0.001
            while time.perf_counter() < ends:
                pass
            time.sleep(0.001)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10)


def files_per_second(batch: Callable[[], None]) -> float:
    started = time.perf_counter()
    written = 0
    while time.perf_counter() - started < ROUND_SECONDS:
        batch()
        written += FOLDERS
    return written / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if spare_files._compiled is None:
        raise SystemExit("the _spare_files extension is not built: python3 setup.py build_ext -i")
    data = json.dumps(json.loads(shapes(100_000)["text"]), indent=2).encode()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as where:
        base = Path(where)
        raw_folders = [base / "raw" / f"channel-{index}" for index in range(FOLDERS)]
        for folder in raw_folders:
            folder.mkdir(parents=True)
        root = Root(str(base / "root"))
        files = [(os.path.join(f"channel-{index}", "key.json"), data) for index in range(FOLDERS)]
        spares = [base / "root" / f"channel-{index}" / spare_files.SPARE_NAME
                  for index in range(FOLDERS)]  # fmt: skip

        def spares_python() -> None:
            with python_form():
                directly(root, files, None)

        ways: dict[str, Callable[[], None]] = {
            "raw loop": lambda: raw_loop(raw_folders, data),
            "new files": lambda: directly(root, files, spares),
            "spares": lambda: directly(root, files, None),
            "spares, Python form, beside a busy thread": spares_python,
            "spares, beside a busy thread": lambda: directly(root, files, None),
        }
        found: dict[str, list[float]] = {name: [] for name in ways}
        ratios: dict[str, list[float]] = {name: [] for name in ways}
        for index in range(args.rounds):
            for name, way in ways.items():
                way()  # the folders' spares as this way leaves them
                with busy_beside() if "busy" in name else contextlib.nullcontext():
                    found[name].append(files_per_second(way))
                ratios[name].append(found[name][-1] / found["raw loop"][-1])
            figures = ", ".join(f"{name} {values[-1]:,.0f}/s" for name, values in found.items())
            print(f"  .. round {index + 1}: {figures}", flush=True)
    headers = ["way", "files/s (median)", "ratio to the raw loop (median of rounds)"]
    body = [[name, f"{statistics.median(values):,.0f}", f"{statistics.median(ratios[name]):.2f}x"]
            for name, values in found.items()]  # fmt: skip
    print(f"\n{FOLDERS} files of {len(data):,} bytes a batch, one per folder; medians of "
          f"{args.rounds} rounds of {ROUND_SECONDS:g} s\n")  # fmt: skip
    print(text_table(headers, body, {1, 2}))
    print("\n--- markdown for the README ---\n")
    print(markdown_table(headers, body, {1, 2}))


if __name__ == "__main__":
    main()
