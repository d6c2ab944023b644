"""What every benchmark under bench/ needs around its measures: processes, timing and tables.

Starting and stopping the processes a benchmark measures (free ports, polling
with a deadline, a redis-server that answers), finding the ``chanstore``
script and the source it runs, timing a call in one process, progress lines,
the text and markdown tables each benchmark prints, and the domain names a
Redis write is made for without a backend. The benchmarks import it as a
sibling module (``python3 bench/feed.py`` puts bench/ first on the path).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Domain",
    "chanstore_command",
    "cpu_seconds",
    "free_port",
    "markdown_table",
    "on_time_limit",
    "per_call",
    "progress",
    "raw_write",
    "redis_pings",
    "redis_server",
    "source_state",
    "stop",
    "text_table",
    "tree_cpu_seconds",
    "wait_until",
]


@dataclass(frozen=True)
class Domain:
    """A domain's hash and history stream, as ``redis_writes.Write`` needs them of its backend
    (its ``WriteTarget``): for benchmarks that build Redis writes without a backend."""

    hash_name: bytes
    stream_name: bytes
    history_length: int
    key_prefix: str


def raw_write(temp: Path, target: Path, data: bytes) -> None:
    """The raw baseline's write of a file: ``data`` to ``temp``, fsync, renamed over ``target``."""
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, target)


def per_call(fn: Callable[[], object], size: int) -> float:
    """µs per call of ``fn``, which handles ``size`` bytes: timed over enough calls to
    take tens of milliseconds (at least 5)."""
    runs = max(5, 3_000_000 // max(size, 100))
    started = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - started) / runs * 1e6


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[Any], timeout: float = 20.0) -> int:
    """Stop ``process`` with SIGTERM (SIGKILL past ``timeout``); its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return process.returncode


def wait_until(check: Callable[[], bool], process: subprocess.Popen[bytes], what: str,
               log: Path, timeout: float) -> None:  # fmt: skip
    """Poll ``check`` until it holds; explain (with ``log``'s tail) if it never does."""
    deadline = time.monotonic() + timeout
    while not check():
        if process.poll() is not None or time.monotonic() > deadline:
            state = (f"exited with status {process.returncode}" if process.poll() is not None
                     else f"was not ready within {timeout:g}s")  # fmt: skip
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{what} {state}; its output ends with:\n{tail}")
        time.sleep(0.05)


def redis_pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(workdir: Path, timeout: float = 10.0) -> Iterator[int]:
    """A redis-server of our own on a free port, without persistence, logging to
    ``workdir``/redis.log; yields the port once it answers PING, stops it after."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    log = workdir / "redis.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_until(lambda: redis_pings(port), process, "redis-server", log, timeout)
            yield port
        finally:
            stop(process)


CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and of every live process below it (a supervisor and
    its workers). A process that ended in between is left out, so take the two
    readings of a difference while the tree stays the same."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree, grown = {pid}, True
    while grown:
        below = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= below
        grown = bool(below)
    total = 0.0
    for member in tree:
        with contextlib.suppress(OSError):
            total += cpu_seconds(member)
    return total


def chanstore_command() -> str:
    """The ``chanstore`` script of the running Python, or the one on PATH."""
    beside = Path(sys.executable).with_name("chanstore")
    found = str(beside) if beside.exists() else shutil.which("chanstore")
    if found is None:
        raise SystemExit("chanstore is not installed: pip install -e '.[test]'")
    return found


def source_state() -> str:
    """The commit of the daemon's source, and whether daemon/ differs from it."""
    spec = importlib.util.find_spec("chanstore")
    if spec is None or spec.origin is None:
        return "chanstore source: not found"
    root = Path(spec.origin).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True,
                                timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "daemon"], capture_output=True, text=True, check=True,
                               timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "chanstore source: not a git checkout"
    state = "with uncommitted changes in daemon/" if dirty else "daemon/ as committed"
    return f"chanstore source: commit {commit}, {state}"


def text_table(headers: Sequence[str], body: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(row[i]) for row in [headers, *body]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, body)])


def markdown_table(headers: Sequence[str], body: Sequence[Sequence[str]], right: set[int]) -> str:
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [headers, align, *body])


def on_time_limit(signum: int, frame: object) -> None:
    raise TimeoutError("the benchmark ran past its time limit")
