"""What several test modules share: processes they start, a third-party backend,
sample values and comparisons. Fixtures live in conftest.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from chanstore import codec, register_type
from chanstore.backends.base import DatabaseInterface

# -- processes and waiting --------------------------------------------------------


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll ``predicate`` until it returns a true value or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def files_under(folder: str | os.PathLike[str]) -> list[str]:
    """Every file below ``folder``, as sorted paths relative to it."""
    return sorted(
        os.path.relpath(os.path.join(where, name), folder)
        for where, _dirs, names in os.walk(folder)
        for name in names
    )


@contextlib.contextmanager
def reaped(process: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """``process``; on leaving, killed if still running, waited for, its stderr closed."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


def sigkill_after(process: subprocess.Popen[bytes], seconds: float) -> None:
    """Let ``process`` run ``seconds`` more (it must not exit meanwhile), then SIGKILL it."""
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=seconds)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL


class RedisServer:
    """A redis-server process this test session started, on a free port."""

    def __init__(self, folder: Path, *extra: str) -> None:
        self.folder = folder
        self.port = free_port()
        self.extra = extra
        # A server started with --requirepass is pinged, flushed and used with it.
        self.password = (
            extra[extra.index("--requirepass") + 1] if "--requirepass" in extra else None
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def settings(self) -> dict[str, object]:
        settings: dict[str, object] = {
            "host": "127.0.0.1",
            "port": self.port,
            "socket_timeout": 2.0,
            "socket_connect_timeout": 1.0,
        }
        if self.password is not None:
            settings["password"] = self.password
        return settings

    def client(self, **options: Any) -> redis.Redis:
        """A plain redis-py client of this server, for looking behind a backend's back."""
        return redis.Redis(port=self.port, password=self.password, **options)

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", str(self.folder)]  # fmt: skip
        self.process = subprocess.Popen(
            ["redis-server", *options, *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        client = self.client(socket_connect_timeout=0.2)
        wait_until(lambda: _pings(client), 10, f"redis-server on port {self.port}")
        client.close()
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def flush(self) -> None:
        client = self.client()
        client.flushall()
        client.close()


class ReplyLosingProxy:
    """A TCP proxy in front of a server on this machine. Requests always pass; replies
    on the connections open when :meth:`lose_replies` is called are dropped from then on,
    as when a network loses an answer after the server acted on the request. Connections
    opened later pass both ways."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_replies(self) -> None:
        with self._lock:
            for _client, _upstream, losing in self._open:
                losing.set()

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for client, upstream, _losing in self._open:
                client.close()
                upstream.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _address = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            upstream.settimeout(None)
            losing = threading.Event()
            with self._lock:
                self._open.append((client, upstream, losing))
            threading.Thread(target=_pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=_pipe, args=(upstream, client, losing), daemon=True).start()


def _pipe(source: socket.socket, target: socket.socket, losing: threading.Event | None) -> None:
    """Copy source to target until either end closes, dropping what comes while losing."""
    try:
        while data := source.recv(65536):
            if losing is None or not losing.is_set():
                target.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def close_connections(client: redis.Redis) -> None:
    """Have the server ``client`` talks to close every other client connection, as a
    restart, a ``CLIENT KILL`` or its idle ``timeout`` would; then close ``client``."""
    try:
        assert client.client_kill_filter(_type="normal", skipme=True) >= 1
    finally:
        client.close()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """While the block runs, this process can read ``folder`` but not write in it.

    root ignores file modes, so as root the block runs with the effective uid of
    ``nobody`` (the real and saved uids stay 0, which is what gives root back);
    ``folder`` and its parents must then be enterable by everyone
    (see ``open_tmp_path``).
    """
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


# -- a third-party backend -------------------------------------------------------


class DictDatabase(DatabaseInterface):
    """What a third party writes: the four methods, nothing else, no metrics code.

    It stores encoded text (as a real store would, so no object is shared with
    a cache), answers an absent get in the original tuple style and an absent
    delete by raising ``KeyError``: the two styles the contract allows.
    Instances built on the same ``store`` and domain see the same data.
    """

    engine_name = "dictdb"

    def __init__(self, domain: str = "", store: dict[str, dict[str, str]] | None = None):
        super().__init__(domain)
        self.data = (store if store is not None else {}).setdefault(domain, {})

    def get_value(self, key):
        if key not in self.data:
            return False, f"{key!r} is not stored"
        return True, codec.decode(self.data[key])

    def set_value(self, key, value):
        self.data[key] = codec.encode(value)
        return True, key

    def delete_key(self, key):
        del self.data[key]
        return True, key

    def all_keys(self):
        return iter(list(self.data))


# -- dataclasses an application registers ---------------------------------------


@register_type
@dataclasses.dataclass
class Point:
    x: int
    y: int


@register_type
@dataclasses.dataclass
class Inventory:
    items: list[str]
    counts: dict[str, int]
    tags: set[str]
    slot: tuple[int, int]


@register_type
@dataclasses.dataclass
class Player:
    name: str
    hp: int
    where: Point
    trail: list[Point]
    inventory: Inventory | None = None


# Every kind of value a backend must store and give back unchanged, type included.
VALUES: dict[str, Any] = {
    "dict": {"hp": 100, "name": "alice"},
    "empty dict": {},
    "dict with odd keys": {"a/b": 1, "": 2, "ü 🎉": 3, "_moobius_type": 4},
    "list": [1, "two", 3.5, None, True],
    "empty list": [],
    "str": "hello",
    "empty str": "",
    "unicode str": "héllo 世界 🎉 \u200b",
    "str with escapes": 'quote " backslash \\ newline \n tab \t nul \x00',
    "int": 42,
    "negative int": -7,
    "big int": 2**80,
    "float": 3.25,
    "small float": 1e-300,
    "negative zero": -0.0,
    "true": True,
    "false": False,
    "none": None,
    "nested": {"a": [{"b": {"c": [1, [2, [3, {"d": None}]]]}}], "e": {"f": {}}},
    "set": {1, 2, 3},
    "set of str": {"a", "b", "c"},
    "empty set": set(),
    "frozenset": frozenset({"x", "y"}),
    "tuple": (1, "a", None),
    "empty tuple": (),
    "nested tuple": ((1, 2), [3, (4,)]),
    "set of tuples": {(1, 2), (3, (4, 5))},
    "containers in a dict": {"s": {1}, "t": (1, 2), "l": [frozenset({2})]},
    "dataclass": Point(1, 2),
    "nested dataclass": Player(
        name="alice",
        hp=7,
        where=Point(3, 4),
        trail=[Point(0, 0), Point(1, 1)],
        inventory=Inventory(["sword"], {"gold": 3}, {"brave"}, (1, 2)),
    ),
    "dataclasses in containers": {"points": [Point(5, 6)], "pair": (Point(7, 8),)},
    "unknown type mark": {"_moobius_type": "elsewhere.Unknown", "_moobius_val": {"a": 1}},
}


def assert_same(actual: Any, expected: Any, where: str = "value") -> None:
    """``actual == expected`` with every type the same, all the way down (1 is not True)."""
    assert type(actual) is type(expected), f"{where}: {actual!r} is not a {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{index}]")
    elif isinstance(expected, set | frozenset):
        assert {(type(m), m) for m in actual} == {(type(m), m) for m in expected}, where
    elif dataclasses.is_dataclass(expected):
        for field in dataclasses.fields(expected):
            assert_same(
                getattr(actual, field.name), getattr(expected, field.name), f"{where}.{field.name}"
            )
    elif isinstance(expected, float) and expected == 0:
        assert str(actual) == str(expected), f"{where}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


# Keys that are not plain file names, or look like encodings, or are long.
ODD_KEYS: list[str] = [
    "plain",
    "with space",
    " leading and trailing ",
    "a/b",
    "/leading-slash",
    "../escape",
    "../../../../etc/passwd",
    ".",
    "..",
    "...",
    ".hidden",
    "a.b.c",
    "back\\slash",
    "%",
    "100%",
    "%2F",
    "%252F",
    "%2E%2E",
    "%H" + "0" * 64,
    "name.json",
    ".json",
    ".chanstore-tmp-0123456789abcdef",
    "tab\there",
    "new\nline",
    "\x7fdel",
    "ünïcödé",
    "汉字キー",
    "emoji 🎉🐍",
    "zero\u200bwidth",
    "CaseSensitive",
    "casesensitive",
    "k" * 200,
    "long " + "x" * 260,
    "é" * 500,  # 1000 bytes of UTF-8
    "z" * 1024,  # the limit exactly
]


# -- the json write-ahead journal, read and crashed the way tests need ---------------

_JOURNAL_HEADER = struct.Struct("<4sQIII")


@dataclasses.dataclass(frozen=True)
class JournalRecord:
    """One record of a json root's journal: where it lies, and the write it holds."""

    start: int
    end: int
    path: str
    data: bytes


def journal_records(data: bytes) -> list[JournalRecord]:
    """A journal's records, read strictly from offset 0: the tests' own reader of the
    format (CSJ3), independent of the one under test."""
    found, offset = [], 0
    while offset + _JOURNAL_HEADER.size <= len(data):
        magic, generation, sequence, length, crc = _JOURNAL_HEADER.unpack_from(data, offset)
        end = offset + _JOURNAL_HEADER.size + length
        payload = data[offset + _JOURNAL_HEADER.size : end]
        checked = zlib.crc32(struct.pack("<QII", generation, sequence, length))
        if magic != b"CSJ3" or end > len(data) or zlib.crc32(payload, checked) != crc:
            break
        (size,) = struct.unpack_from("<H", payload)
        path = payload[2 : 2 + size].decode()
        found.append(JournalRecord(offset, end, path, payload[2 + size :]))
        offset = end
    return found


def crash_journal(backend: Any) -> None:
    """Drop a json backend's journal the way a killed process does: no checkpoint, its
    lock released. (Reaches into the journal's internals: only a test may.)"""
    from chanstore.backends.journal import journals  # noqa: PLC0415

    journal = backend._journal
    with journal._lock:
        if journal._fd is not None:
            os.close(journal._fd)
            journal._fd = None
        journal._owner = False
        journal._closed = True
    with journals._lock:
        if journals._open.get(journal.root) is journal:
            del journals._open[journal.root]
