"""The clients' side of versions, conditional writes and the change feed (DESIGN.md 5 and 6).

Against real daemons (json containers, and Redis-backed ones on a redis-server
of the test's own): ``update()`` from many threads and tasks, conditional
writes, all-or-nothing bulk writes, ``watch()`` and its automatic resume
(after a daemon restart, after being dropped as a slow reader, after a 503
past ``--max-watchers``), and ``chanstore watch``. Against a stand-in
(:class:`FeedDouble`, a stdlib HTTP server that plays scripted event streams
byte for byte): the Server-Sent Events parsing, the resume after a dropped
connection or an ``end`` event, an idle stream taken for dead, the answers
that end a watch, and closing a watch from another thread or task.

Every wait is bounded: events are read through :class:`Reader`, whose
``next(timeout)`` fails the test rather than hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from daemon_harness import (
    DaemonProcess,
    RedisServer,
    free_port,
    json_entry,
    run_cli,
    wait_until,
)

from chanstore.client import (
    ABSENT,
    ANY,
    AsyncClient,
    Client,
    ClientError,
    CursorExpired,
    DaemonUnreachable,
    PreconditionFailed,
    UnauthorizedError,
    Versioned,
    Watch,
    WatchEvent,
    _SSEDecoder,
)

#: Seconds an event (or a line of ``chanstore watch``) may take to arrive.
EVENT_TIMEOUT = 15.0
#: Seconds a resume may take: the daemon's restart, and the watch's backoff meanwhile.
RESUME_TIMEOUT = 40.0

#: Updaters and the increments each makes, in the concurrency tests.
THREADS, INCREMENTS = 8, 25


# -- helpers ---------------------------------------------------------------------------


class Reader:
    """Reads a sync :class:`Watch` with a timeout on every event (in a worker thread)."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="watch")

    def ask(self) -> concurrent.futures.Future[WatchEvent]:
        """The next event, as a future: the watch is read (and waits) meanwhile."""
        return self._pool.submit(next, self.watch)

    def next(self, timeout: float = EVENT_TIMEOUT) -> WatchEvent:
        future = self.ask()
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            self.close()
            pytest.fail(f"no event within {timeout} s (cursor {self.watch.cursor!r})")

    def changes(self, count: int, timeout: float = EVENT_TIMEOUT) -> list[WatchEvent]:
        """The next ``count`` set and delete events (ready events passed over)."""
        found: list[WatchEvent] = []
        while len(found) < count:
            event = self.next(timeout)
            if event.kind != "ready":
                found.append(event)
        return found

    def close(self) -> None:
        self.watch.close()  # from this thread: the worker, if waiting, is woken
        self._pool.shutdown(wait=True, cancel_futures=True)


def _both_containers(redis: RedisServer, *extra: dict[str, Any]) -> list[dict[str, Any]]:
    settings = {**redis.settings, "socket_timeout": 2.0, "socket_connect_timeout": 1.0}
    return [json_entry("stats"),
            {"implementation": "redis", "name": "mana", "load": True, "settings": settings},
            *extra]  # fmt: skip


@pytest.fixture
def both(start_daemon, redis: RedisServer) -> DaemonProcess:
    """A daemon of the test's own: json container ``stats``, Redis-backed ``mana``."""
    return start_daemon(_both_containers(redis))


CONTAINERS = pytest.mark.parametrize("container", ["stats", "mana"])


# -- update(): read, apply, write if unchanged, again on conflict ----------------------


@CONTAINERS
def test_update_from_many_threads_loses_no_increment(both: DaemonProcess, channel: str,
                                                     container: str) -> None:  # fmt: skip
    stored: list[int] = []
    lock = threading.Lock()

    def updater() -> None:
        with both.client() as client:
            view = client.channel(channel)[container]
            for _ in range(INCREMENTS):
                value = view.update("counter", lambda n: n + 1, default=0, attempts=1000)
                with lock:
                    stored.append(value)

    threads = [threading.Thread(target=updater) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "an updater did not finish"
    with both.client() as client:
        assert client.get(channel, container, "counter") == THREADS * INCREMENTS
    # Every update stored a value of its own: 1, 2, ... NxM, each once.
    assert sorted(stored) == list(range(1, THREADS * INCREMENTS + 1))


@CONTAINERS
def test_update_from_many_tasks_loses_no_increment(both: DaemonProcess, channel: str,
                                                   container: str) -> None:  # fmt: skip
    async def increments(client: AsyncClient) -> list[int]:
        return [await client.update(channel, container, "counter", lambda n: n + 1, default=0,
                                    attempts=1000) for _ in range(INCREMENTS)]  # fmt: skip

    async def scenario() -> list[int]:
        async with AsyncClient(both.url) as client:
            done = await asyncio.wait_for(
                asyncio.gather(*(increments(client) for _ in range(THREADS))), 120
            )
            assert await client.get(channel, container, "counter") == THREADS * INCREMENTS
            return [value for values in done for value in values]

    assert sorted(asyncio.run(scenario())) == list(range(1, THREADS * INCREMENTS + 1))


@CONTAINERS
def test_update_of_an_absent_key_creates_it_once(both: DaemonProcess, channel: str,
                                                 container: str) -> None:  # fmt: skip
    default: list[int] = []
    with both.client() as client:
        view = client.channel(channel)[container]
        assert view.update("log", lambda items: [*items, 1], default=default) == [1]
        assert view.update("log", lambda items: [*items, 2], default=default) == [1, 2]
        items = view.update("tags", lambda tags: tags | {"a"}, default=set())
        assert items == {"a"}
        assert view["tags"] == {"a"}  # a set, as the codec stores it
        assert default == []  # fn was given a copy of the default, never the default

        async def scenario() -> Any:
            async with AsyncClient(both.url) as async_client:

                async def add(value: Any) -> Any:  # fn may be a coroutine function
                    return (value or 0) + 10

                return await async_client.update(channel, container, "async", add)

        assert asyncio.run(scenario()) == 10
        assert view["async"] == 10
        # The dict form of update() still stores items with one bulk request.
        view.update({"a": 1}, b=2)
        assert view.get_many(["a", "b"]) == {"a": 1, "b": 2}


@CONTAINERS
def test_update_gives_up_after_its_attempts(both: DaemonProcess, channel: str,
                                            container: str) -> None:  # fmt: skip
    with both.client() as client, both.client() as other:
        view = client.channel(channel)[container]
        view["hp"] = 0
        calls: list[Any] = []

        def meddling(value: Any) -> Any:
            # Each time update() has read, another client writes first.
            calls.append(value)
            other.set(channel, container, "hp", 1000 + len(calls))
            return value + 1

        with pytest.raises(PreconditionFailed) as failed:
            view.update("hp", meddling, attempts=3)
        assert calls == [0, 1001, 1002]
        assert failed.value.status == 412
        assert "3 times" in str(failed.value)
        assert view["hp"] == 1003  # the other client's last write; none of update()'s
        current = view.get_versioned("hp")
        assert failed.value.conflicts == {"hp": current.etag}
        assert failed.value.etag == current.etag

        # Create-only fails the same way when the key appears meanwhile.
        def creating(value: Any) -> Any:
            other.set(channel, container, "fresh", "theirs")
            return "mine"

        with pytest.raises(PreconditionFailed):
            view.update("fresh", creating, attempts=1)
        assert view["fresh"] == "theirs"

        with pytest.raises(ValueError, match="attempts"):
            view.update("hp", lambda v: v, attempts=0)


# -- conditional writes ----------------------------------------------------------------


@CONTAINERS
def test_conditional_set_and_delete(both: DaemonProcess, channel: str, container: str) -> None:
    with both.client() as client:
        view = client.channel(channel)[container]
        first = view.set("k", {"a": 1})
        assert isinstance(first, str) and len(first) == 40
        read = view.get_versioned("k")
        assert read == Versioned({"a": 1}, first)
        value, etag = read
        assert (value, etag) == ({"a": 1}, first)

        # If-Match: the version read; a stale one is refused and changes nothing.
        second = view.set("k", {"a": 2}, expect=first)
        assert second is not None and second != first
        with pytest.raises(PreconditionFailed) as stale:
            view.set("k", {"a": 3}, expect=first)
        assert stale.value.status == 412
        assert stale.value.conflicts == {"k": second}
        assert stale.value.etag == second
        assert view.get_versioned("k") == (({"a": 2}), second)
        # Quoted as the header has it, the same ETag works alike.
        third = view.set("k", {"a": 3}, expect=f'"{second}"')
        assert view["k"] == {"a": 3}

        # Create-only, and "must exist".
        with pytest.raises(PreconditionFailed) as exists:
            view.set("k", "new", expect=ABSENT)
        assert exists.value.conflicts == {"k": third}
        assert view.set("new", "created", expect=ABSENT) is not None
        with pytest.raises(PreconditionFailed) as missing:
            view.set("nothing", 1, expect=ANY)
        assert missing.value.conflicts == {"nothing": None}
        assert missing.value.etag is None
        with pytest.raises(KeyError):
            view["nothing"]
        assert view.set("k", {"a": 4}, expect=ANY) is not None

        # Conditional DELETE.
        current = view.get_versioned("k").etag
        with pytest.raises(PreconditionFailed) as kept:
            view.delete("k", expect=third)
        assert kept.value.conflicts == {"k": current}
        assert kept.value.etag == current
        assert view["k"] == {"a": 4}
        view.delete("k", expect=current)
        assert "k" not in view
        view.delete("new", expect=ANY)
        assert "new" not in view

        # The sync client's own calls, and the ETags of a bulk read.
        document = {"_moobius_type": "builtins.set", "_moobius_val": [1]}
        tag = client.set_document(channel, container, "doc", document)
        assert client.get_versioned(channel, container, "doc") == ({1}, tag)
        assert client.get_many_versioned(channel, container, ["doc", "absent"]) == {
            "doc": Versioned({1}, tag)
        }  # fmt: skip

        with pytest.raises(ValueError, match="not an ETag"):
            view.set("k", 1, expect='bad"etag')


@CONTAINERS
def test_async_conditional_writes(both: DaemonProcess, channel: str, container: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(both.url) as client:
            tag = await client.set(channel, container, "k", (1, 2), expect=ABSENT)
            assert await client.get_versioned(channel, container, "k") == ((1, 2), tag)
            with pytest.raises(PreconditionFailed) as failed:
                await client.set(channel, container, "k", (3,), expect=ABSENT)
            assert failed.value.conflicts == {"k": tag}
            with pytest.raises(PreconditionFailed):
                await client.delete(channel, container, "k", expect="0" * 40)
            versions = await client.get_many_versioned(channel, container, ["k"])
            assert versions == {"k": Versioned((1, 2), tag)}
            await client.delete(channel, container, "k", expect=tag)
            with pytest.raises(KeyError):
                await client.get_versioned(channel, container, "k")

    asyncio.run(scenario())


@CONTAINERS
def test_bulk_set_with_expectations_is_all_or_nothing(both: DaemonProcess, channel: str,
                                                      container: str) -> None:  # fmt: skip
    with both.client() as client:
        view = client.channel(channel)[container]
        etags = view.set_many({"a": 1, "b": 2})
        assert set(etags) == {"a", "b"}
        assert view.get_many_versioned(["a", "b"]) == {
            "a": Versioned(1, etags["a"]), "b": Versioned(2, etags["b"])
        }  # fmt: skip

        # One failed expectation among several: nothing is stored.
        with pytest.raises(PreconditionFailed) as failed:
            view.set_many({"a": 10, "b": 20, "c": 30},
                          expect={"a": etags["a"], "b": "0" * 40, "c": ABSENT})  # fmt: skip
        assert failed.value.status == 412
        assert failed.value.conflicts == {"b": etags["b"]}
        assert view.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}

        with pytest.raises(PreconditionFailed) as absent:
            view.set_many({"a": 10}, expect={"zzz": ANY, "a": etags["a"]})
        assert absent.value.conflicts == {"zzz": None}
        assert view["a"] == 1

        # Every expectation holds: every value is stored, with its new ETag.
        stored = view.set_many({"a": 10, "b": {"x"}, "c": 30},
                               expect={"a": etags["a"], "b": ANY, "c": ABSENT})  # fmt: skip
        assert view.get_many_versioned(["a", "b", "c"]) == {
            "a": Versioned(10, stored["a"]), "b": Versioned({"x"}, stored["b"]),
            "c": Versioned(30, stored["c"]),
        }  # fmt: skip


# -- watch() against the daemon --------------------------------------------------------


@CONTAINERS
def test_watch_yields_ready_then_each_change_in_order(both: DaemonProcess, channel: str,
                                                      container: str) -> None:  # fmt: skip
    with both.client() as client:
        reader = Reader(client.watch(channel, containers=[container]))
        try:
            ready = reader.next()
            assert ready.kind == "ready" and ready.channel == channel and ready.cursor
            view = client.channel(channel)[container]
            tags = view.set("tags", {"a", "b"})
            hp = view.set("hp", 5)
            view.set("other", 1)
            client.set(channel, "stats" if container == "mana" else "mana", "elsewhere", 1)
            view.update("hp", lambda n: n + 1)
            del view["tags"]
            events = reader.changes(5)
        finally:
            reader.close()
    assert [(e.kind, e.container, e.key) for e in events] == [
        ("set", container, "tags"), ("set", container, "hp"), ("set", container, "other"),
        ("set", container, "hp"), ("delete", container, "tags"),
    ]  # fmt: skip
    assert events[0].value == {"a", "b"} and type(events[0].value) is set
    assert events[0].document["_moobius_type"] == "builtins.set"
    assert (events[0].etag, events[1].etag) == (tags, hp)
    assert events[3].value == 6
    assert events[4].value is None and events[4].etag is None
    assert len({e.cursor for e in events}) == 5
    assert reader.watch.cursor == events[-1].cursor


def test_watch_since_a_cursor_replays_what_followed(both: DaemonProcess, channel: str) -> None:
    with both.client() as client:
        view = client.channel(channel).mana
        reader = Reader(client.watch(channel, "mana"))
        try:
            reader.next()
            view["a"] = 1
            (first,) = reader.changes(1)
        finally:
            reader.close()
        view["b"] = 2
        view["c"] = 3
        replay = Reader(client.watch(channel, ["mana"], since=first.cursor))
        try:
            assert replay.next().kind == "ready"
            assert [(e.key, e.value) for e in replay.changes(2)] == [("b", 2), ("c", 3)]
        finally:
            replay.close()


def test_async_watch(both: DaemonProcess, channel: str) -> None:
    async def scenario() -> list[tuple[str, str | None, Any]]:
        async with AsyncClient(both.url) as client:
            seen: list[tuple[str, str | None, Any]] = []
            async with client.watch(channel, containers=["stats", "mana"]) as events:
                ready = await asyncio.wait_for(anext(events), EVENT_TIMEOUT)
                seen.append((ready.kind, None, None))
                await client.set(channel, "stats", "s", (1,))
                await client.set(channel, "mana", "m", 2)
                await client.delete(channel, "stats", "s")
                for _ in range(3):
                    event = await asyncio.wait_for(anext(events), EVENT_TIMEOUT)
                    seen.append((event.kind, event.key, event.value))
            return seen

    seen = asyncio.run(scenario())
    assert seen[0] == ("ready", None, None)
    # In order within a container; the two containers' events may interleave.
    assert [s for s in seen[1:] if s[1] == "s"] == [("set", "s", (1,)), ("delete", "s", None)]
    assert ("set", "m", 2) in seen


def test_watch_resumes_by_itself_across_a_daemon_restart(start_daemon, redis: RedisServer,
                                                         channel: str) -> None:  # fmt: skip
    daemon = start_daemon(_both_containers(redis))
    with daemon.client() as client:
        reader = Reader(client.watch(channel, containers=["mana"]))
        try:
            assert reader.next().kind == "ready"
            client.set(channel, "mana", "before", 1)
            (before,) = reader.changes(1)
            # The watch is not read while the daemon restarts and two writes follow:
            # they reach it only from the Redis history, after its cursor.
            daemon.restart()
            with daemon.client() as writer:
                writer.set(channel, "mana", "after", 2)
                writer.delete(channel, "mana", "before")
            events = [reader.next(RESUME_TIMEOUT)]
            while len([e for e in events if e.kind != "ready"]) < 2:
                events.append(reader.next(RESUME_TIMEOUT))
        finally:
            reader.close()
    changes = [(e.kind, e.key, e.value) for e in events if e.kind != "ready"]
    assert changes == [("set", "after", 2), ("delete", "before", None)]
    assert events[0].kind == "ready"  # the resumed stream's
    assert before.cursor not in {e.cursor for e in events[1:]}


def test_cursor_expired_when_the_history_is_gone(start_daemon, redis: RedisServer,
                                                 channel: str) -> None:  # fmt: skip
    daemon = start_daemon(_both_containers(redis), args=["--event-history", "2"])
    with daemon.client() as client:
        reader = Reader(client.watch(channel, containers=["stats"]))
        try:
            reader.next()
            client.set(channel, "stats", "k", 0)
            (first,) = reader.changes(1)
        finally:
            reader.close()
        # More changes than the history holds: the cursor's successors are gone.
        for number in range(1, 6):
            client.set(channel, "stats", "k", number)
        with pytest.raises(CursorExpired) as trimmed:
            next(client.watch(channel, ["stats"], since=first.cursor))
        assert trimmed.value.status == 410
        assert trimmed.value.cursor == first.cursor

        # A json container's history lives in its daemon: a restart forgets it, so a
        # cursor from before is well formed, and old.
        reader = Reader(client.watch(channel, containers=["stats"]))
        try:
            reader.next()
            client.set(channel, "stats", "k", 99)
            (latest,) = reader.changes(1)
        finally:
            reader.close()
    daemon.restart()
    with daemon.client() as client, client.watch(channel, ["stats"], since=latest.cursor) as old:
        with pytest.raises(CursorExpired):
            next(old)
        # Re-read, then watch without a cursor: that works.
        assert client.get(channel, "stats", "k") == 99
        reader = Reader(client.watch(channel, ["stats"]))
        try:
            assert reader.next().kind == "ready"
        finally:
            reader.close()


def test_watch_refusals_from_the_daemon(both: DaemonProcess, channel: str) -> None:
    with both.client() as client:
        with pytest.raises(ClientError) as unknown:
            next(client.watch(channel, ["nosuch"]))
        assert unknown.value.status == 404
        assert not isinstance(unknown.value, KeyError)
        with pytest.raises(ClientError) as malformed:
            next(client.watch(channel, since="not-a-cursor"))
        assert malformed.value.status == 400
    nobody = Client(f"http://127.0.0.1:{free_port()}", timeout=2)
    with nobody, pytest.raises(DaemonUnreachable):
        next(nobody.watch(channel))


def test_a_watch_dropped_as_a_slow_reader_resumes(start_daemon, channel: str) -> None:
    """The watch is not read while 2,000 changes of 5 KB are made: past its buffer (and
    the sockets') the daemon drops the stream, and the watch resumes after the last
    event it read."""
    daemon = start_daemon(args=["--watcher-buffer-bytes", "65536", "--event-history", "3000"])
    keys = [f"k{number:04d}" for number in range(2000)]
    with daemon.client() as client:
        reader = Reader(client.watch(channel, ["stats"]))
        try:
            assert reader.next().kind == "ready"
            for start in range(0, len(keys), 50):
                batch = {key: key + "x" * 5000 for key in keys[start : start + 50]}
                client.set_many(channel, "stats", batch)
            events = []
            while len([e for e in events if e.kind == "set"]) < len(keys):
                events.append(reader.next())
        finally:
            reader.close()
    assert [e.key for e in events if e.kind == "set"] == keys  # none lost, none twice
    assert [e.kind for e in events].count("ready") >= 1  # the resumed stream's
    dropped = daemon.events("watcher_closed")
    assert any(record.get("reason") == "slow_reader" for record in dropped), dropped


def test_a_watch_past_max_watchers_waits_for_a_place(start_daemon, channel: str) -> None:
    """A 503 (too many watchers) is asked again later: the watch opens once a place is free."""
    daemon = start_daemon(args=["--max-watchers", "1"])

    def refused() -> bool:
        return any(line.startswith("chanstore_http_requests_total") and "events" in line
                   and 'status="503"' in line
                   for line in daemon.metrics_text().splitlines())  # fmt: skip

    with daemon.client() as client:
        first, second = Reader(client.watch(channel)), Reader(client.watch(channel))
        try:
            assert first.next().kind == "ready"
            waiting = second.ask()
            wait_until(refused, EVENT_TIMEOUT, "a 503 to the second watch")
            assert not waiting.done()
            first.close()
            assert waiting.result(timeout=EVENT_TIMEOUT).kind == "ready"
        finally:
            first.close()
            second.close()


def test_heartbeats_keep_an_idle_watch_open(start_daemon, channel: str) -> None:
    """Comments every 0.2 s, a watch that takes 1 s of silence for a dead stream, and 3 s
    without a change: the stream stays the one it was (no second ready, no reconnection)."""
    daemon = start_daemon(args=["--heartbeat-interval", "0.2"])
    with daemon.client() as client:
        reader = Reader(client.watch(channel, idle_timeout=1.0))
        try:
            assert reader.next().kind == "ready"
            waiting = reader.ask()
            threading.Event().wait(3.0)  # idle, three times the watch's idle timeout
            client.set(channel, "stats", "k", 1)
            event = waiting.result(timeout=EVENT_TIMEOUT)
        finally:
            reader.close()
    assert (event.kind, event.key) == ("set", "k")
    assert len(daemon.events("watcher_opened")) == 1


# -- chanstore watch -------------------------------------------------------------------


class Lines:
    """The lines a process writes to a pipe, read by a thread, each awaited with a timeout."""

    def __init__(self, stream: Any) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in iter(stream.readline, b""):
            self._queue.put(line.decode())
        self._queue.put(None)

    def finish(self, timeout: float = EVENT_TIMEOUT) -> None:
        """Wait until the writer closed the pipe and every line was read."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the pipe was not closed"

    def next(self, timeout: float = EVENT_TIMEOUT) -> str:
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no line within {timeout} s")
        assert line is not None, "the stream ended"
        return line


def _watch_command(*args: str) -> subprocess.Popen[bytes]:
    env = {name: value for name, value in os.environ.items()
           if name != "PYTHONUNBUFFERED" and not name.startswith("CHANSTORE_")}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "chanstore.cli", "watch", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env)  # fmt: skip


def test_watch_command_prints_json_lines(both: DaemonProcess, channel: str) -> None:
    with _watch_command(channel, "--containers", "stats,mana", "--listen", both.listen) as process:
        try:
            lines = Lines(process.stdout)
            ready = json.loads(lines.next())
            assert ready["event"] == "ready" and ready["id"]
            with both.client() as client:
                tag = client.set(channel, "mana", "tags", {"a"})
                client.delete(channel, "mana", "tags")
            set_line, delete_line = json.loads(lines.next()), json.loads(lines.next())
            process.send_signal(signal.SIGINT)  # Ctrl-C
            assert process.wait(timeout=15) == 0
            lines.finish()
        finally:
            if process.poll() is None:
                process.kill()
        errors = process.stderr.read().decode()
    assert set_line == {"event": "set", "id": set_line["id"], "container": "mana", "key": "tags",
                        "etag": tag, "value": {"_moobius_type": "builtins.set",
                                               "_moobius_val": ["a"]}}  # fmt: skip
    assert delete_line == {"event": "delete", "id": delete_line["id"], "container": "mana",
                           "key": "tags", "etag": None, "value": None}  # fmt: skip
    assert "Traceback" not in errors

    # --since replays what followed; a reader that goes away (``| head -n 2``) ends it
    # quietly, with status 0, at the next line it would print.
    command = (f"{sys.executable} -m chanstore.cli watch {channel} --since {ready['id']} "
               f"--listen {both.listen} | head -n 2; exit ${{PIPESTATUS[0]}}")  # fmt: skip
    with subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL) as process:  # fmt: skip
        try:
            lines = Lines(process.stdout)
            assert json.loads(lines.next())["event"] == "ready"
            assert json.loads(lines.next())["id"] == set_line["id"]
            with both.client() as client:
                for number in range(3):  # something more to print, past head's exit
                    client.set(channel, "stats", "more", number)
            assert process.wait(timeout=15) == 0, process.stderr.read().decode()
            lines.finish()
        finally:
            if process.poll() is None:
                process.kill()
        assert "Traceback" not in process.stderr.read().decode()


def test_watch_command_refusals(both: DaemonProcess, channel: str) -> None:
    unknown = run_cli("watch", channel, "--containers", "nosuch", "--listen", both.listen,
                      timeout=30)  # fmt: skip
    assert unknown.returncode == 1
    assert "404" in unknown.stderr and "nosuch" in unknown.stderr
    nobody = run_cli("watch", channel, "--listen", f"127.0.0.1:{free_port()}", timeout=30)
    assert nobody.returncode == 3
    assert "no chanstore daemon" in nobody.stderr
    with FeedDouble() as double:
        double.script(_status(410, "cursor_expired"))
        expired = run_cli("watch", "c", "--since", "b2xk", "--listen", double.listen, timeout=30)
        assert expired.returncode == 5, expired.stderr
        assert "b2xk" in expired.stderr and "without --since" in expired.stderr
        double.script(_status(401, "unauthorized"))
        refused = run_cli("watch", "c", "--listen", double.listen, timeout=30)
        assert refused.returncode == 1
        assert "unauthorized" in refused.stderr


# -- the clients' side of the feed, against a stand-in ---------------------------------


def _status(status: int, code: str) -> list[Any]:
    body = json.dumps({"error": f"refused: {code}", "code": code}).encode()
    return [("status", status, body)]


def _event(kind: str, cursor: str | None, data: Any) -> bytes:
    head = f"event: {kind}\n" + (f"id: {cursor}\n" if cursor is not None else "")
    return (head + f"data: {json.dumps(data)}\n\n").encode()


READY = b"retry: 50\nevent: ready\nid: c0\ndata: {}\n\n"


class FeedDouble:
    """A stand-in daemon whose change feed plays scripts, one per connection.

    ``script(steps)`` queues what the next connection gets: bytes are written
    as they are (each flushed), ``("status", code, body)`` answers that
    instead of a stream, ``("hold",)`` keeps the stream open and silent until
    the client closes it (or 30 s pass). When the steps are done the
    connection is closed. With no script queued, a connection is held open
    and silent. ``requests`` records each connection's path and headers;
    ``closed_by_client`` is set when a held stream was closed by its client.
    """

    def __init__(self) -> None:
        self.scripts: queue.Queue[list[Any]] = queue.Queue()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.closed_by_client = threading.Event()
        self.stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _FeedHandler)
        self._server.daemon_threads = True
        self._server.double = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def script(self, steps: list[Any]) -> None:
        self.scripts.put(steps)

    def last_event_ids(self) -> list[str | None]:
        return [headers.get("last-event-id") for _path, headers in self.requests]

    def __enter__(self) -> FeedDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class _FeedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # a stream's end is the connection's

    def do_GET(self) -> None:
        double: FeedDouble = self.server.double  # type: ignore[attr-defined]
        double.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        try:
            steps = double.scripts.get_nowait()
        except queue.Empty:
            steps = [("hold",)]
        if steps and isinstance(steps[0], tuple) and steps[0][0] == "status":
            _kind, status, body = steps[0]
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for step in steps:
            if isinstance(step, bytes):
                self.wfile.write(step)
                self.wfile.flush()
            elif step == ("hold",):
                self._hold(double)

    def _hold(self, double: FeedDouble) -> None:
        """Wait, silent, until the client closes the connection (or 30 s, or shutdown)."""
        for _ in range(600):
            if double.stopping.is_set():
                return
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if readable:
                try:
                    data = self.connection.recv(1024)
                except OSError:
                    data = b""
                if not data:
                    double.closed_by_client.set()
                    return

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def double() -> Iterator[FeedDouble]:
    with FeedDouble() as stand_in:
        yield stand_in


def test_the_decoder_reads_every_line_ending_wherever_the_chunks_split() -> None:
    stream = (
        "\ufeffretry: 1500\r\n: a comment\r\n"
        "event: ready\r\nid: c0\r\ndata: {}\r\n\r\n"
        'event: set\rid: c1\rdata: {"container": "stats",\rdata:  "key": "k\u2028é",\r'
        'data:"etag": "e1", "value": [1]}\r\r'
        "event: unknown\nid: c1b\ndata\n\n"
        "id: c2\nevent: delete\n"
        'data: {"container": "stats", "key": "k"}\n\n'
        "id\ndata: no id now\n\n"
        "id: bad\0id\nevent: partial\ndata: never dispatched"
    ).encode()
    expected = [
        ("ready", "{}", "c0"),
        ("set", '{"container": "stats",\n "key": "k\u2028é",\n"etag": "e1", "value": [1]}', "c1"),
        ("unknown", "", "c1b"),
        ("delete", '{"container": "stats", "key": "k"}', "c2"),
        ("message", "no id now", ""),
    ]

    def decode(chunks: list[bytes]) -> tuple[list[tuple[str, str, str]], float | None]:
        decoder = _SSEDecoder()
        events = [tuple(event) for chunk in chunks for event in decoder.feed(chunk)]
        return events, decoder.retry  # type: ignore[return-value]

    assert decode([stream]) == (expected, 1.5)
    assert decode([stream[i : i + 1] for i in range(len(stream))]) == (expected, 1.5)
    for cut in range(len(stream)):
        assert decode([stream[:cut], stream[cut:]]) == (expected, 1.5), cut

    too_big = _SSEDecoder(max_event_bytes=100)
    with pytest.raises(ClientError, match="larger than 100 bytes"):
        too_big.feed(b"data: " + b"x" * 200)


def test_watch_reads_a_stream_and_resumes_after_an_end_event(double: FeedDouble) -> None:
    tags = {"_moobius_type": "builtins.set", "_moobius_val": ["a"]}
    double.script([
        b"\xef\xbb\xbf" + READY, b": keep-alive\n\n",
        _event("set", "c1", {"container": "stats", "key": "tags", "etag": "e1", "value": tags}),
        b'event: set\r\nid: c2\r\ndata: {"container": "stats", "key": "multi",\r\n'
        b'data: "etag": "e2", "value": {"x": "\xe2\x80\xa8"}}\r\n\r\n',
        _event("other", "c3", {}),  # an event this client does not know: passed over
        _event("end", None, {"reason": "slow_reader"}),
        _event("set", "c9", {"container": "stats", "key": "after-end", "etag": "e", "value": 0}),
    ])  # fmt: skip
    deleted = _event("delete", "c4", {"container": "stats", "key": "tags"})
    double.script([READY.replace(b"c0", b"c3"), deleted, ("hold",)])
    with Client(double.url) as client:
        reader = Reader(client.watch("ch/1", containers=["stats", "a b"]))
        try:
            events = [reader.next() for _ in range(5)]
        finally:
            reader.close()
    # The event after "end" is never read: the stream is over once the daemon says so.
    assert [(e.kind, e.key, e.cursor) for e in events] == [
        ("ready", None, "c0"), ("set", "tags", "c1"), ("set", "multi", "c2"),
        ("ready", None, "c3"), ("delete", "tags", "c4"),
    ]  # fmt: skip
    assert events[1] == WatchEvent("set", "ch/1", "stats", "tags", {"a"}, "e1", "c1", tags)
    assert events[1].document == tags
    assert events[2].value == {"x": "\u2028"}
    # The first connection had no cursor; the second resumed after the last event read.
    assert double.last_event_ids()[:2] == [None, "c3"]
    path, headers = double.requests[0]
    assert path == "/v1/channels/ch%2F1/-/events?containers=stats,a%20b"
    assert headers["accept"] == "text/event-stream"


def test_watch_resumes_after_a_connection_dropped_mid_event(double: FeedDouble) -> None:
    double.script([READY, _event("set", "c1", {"container": "s", "key": "a", "etag": "e",
                                               "value": 1}),
                   b'event: set\nid: c2\ndata: {"container": "s", "ke'])  # fmt: skip
    second = _event("set", "c2", {"container": "s", "key": "b", "etag": "e", "value": 2})
    double.script([READY.replace(b"c0", b"c1"), second])
    with Client(double.url) as client:
        reader = Reader(client.watch("ch", since="c0"))
        try:
            events = [reader.next() for _ in range(4)]
            assert reader.watch.cursor == "c2"
        finally:
            reader.close()
    assert [(e.kind, e.key) for e in events] == [("ready", None), ("set", "a"), ("ready", None),
                                                 ("set", "b")]  # fmt: skip
    # since= went as Last-Event-ID; the resume sent the last complete event's id.
    assert double.last_event_ids()[:2] == ["c0", "c1"]


def test_a_silent_stream_is_taken_for_dead_and_reopened(double: FeedDouble) -> None:
    double.script([READY, ("hold",)])  # then silence, longer than idle_timeout
    double.script([READY, _event("set", "c1", {"container": "s", "key": "k", "etag": "e",
                                               "value": None})])  # fmt: skip
    with Client(double.url) as client:
        reader = Reader(client.watch("ch", idle_timeout=0.5))
        try:
            events = [reader.next() for _ in range(3)]
        finally:
            reader.close()
    assert [e.kind for e in events] == ["ready", "ready", "set"]
    assert double.last_event_ids()[:2] == [None, "c0"]
    assert double.closed_by_client.wait(timeout=10), "the silent stream was not closed"


def test_watch_answers_that_end_it_or_are_retried(double: FeedDouble) -> None:
    with Client(double.url) as client:
        double.script(_status(410, "cursor_expired"))
        with pytest.raises(CursorExpired) as expired:
            next(client.watch("ch", since="old"))
        assert (expired.value.status, expired.value.cursor) == (410, "old")
        double.script(_status(401, "unauthorized"))
        with pytest.raises(UnauthorizedError):
            next(client.watch("ch"))
        double.script(_status(404, "unknown_container"))
        with pytest.raises(ClientError) as unknown:
            next(client.watch("ch", "nosuch"))
        assert unknown.value.status == 404 and not isinstance(unknown.value, KeyError)
        # 503 (too many watchers): asked again later, and then the stream opens.
        double.script(_status(503, "too_many_watchers"))
        double.script([READY])
        with client.watch("ch") as watch:
            assert Reader(watch).next().kind == "ready"
        with pytest.raises(ValueError, match="cursor"):
            client.watch("ch", since="two words")
        with pytest.raises(ValueError, match="containers"):
            client.watch("ch", containers=[])


def test_closing_a_watch_from_another_thread_closes_its_connection(double: FeedDouble) -> None:
    double.script([READY, ("hold",)])
    with Client(double.url) as client:
        watch = client.watch("ch")
        assert next(watch).kind == "ready"
        outcome: queue.Queue[Any] = queue.Queue()

        def read_on() -> None:
            try:
                outcome.put(next(watch))
            except StopIteration:
                outcome.put("stopped")
            except Exception as exc:  # noqa: BLE001 - reported to the test
                outcome.put(exc)

        thread = threading.Thread(target=read_on, daemon=True)
        thread.start()
        thread.join(timeout=0.3)
        assert thread.is_alive()  # waiting in next() on a silent stream
        watch.close()
        thread.join(timeout=10)
        assert not thread.is_alive(), "next() did not return after close()"
        assert outcome.get(timeout=1) == "stopped"
        assert double.closed_by_client.wait(timeout=10)
        watch.close()  # again: nothing happens
        with pytest.raises(StopIteration):
            next(watch)


def test_async_watch_resumes_and_closes(double: FeedDouble) -> None:
    double.script([READY, _event("set", "c1", {"container": "s", "key": "a", "etag": "e",
                                               "value": [1, {"_moobius_type": "builtins.tuple",
                                                             "_moobius_val": [2]}]}),
                   _event("end", None, {"reason": "shutdown"})])  # fmt: skip
    double.script([READY.replace(b"c0", b"c1"), ("hold",)])

    async def scenario() -> list[WatchEvent]:
        async with AsyncClient(double.url) as client:
            seen = []
            async with client.watch("ch") as events:
                for _ in range(3):
                    seen.append(await asyncio.wait_for(anext(events), EVENT_TIMEOUT))
                # Closed from another task while this one waits in anext().
                waiting = asyncio.ensure_future(anext(events))
                await asyncio.sleep(0.2)
                assert not waiting.done()
                await events.aclose()
                with pytest.raises(StopAsyncIteration):
                    await asyncio.wait_for(waiting, EVENT_TIMEOUT)
            async with client.watch("ch", since="x") as expired:
                double.script(_status(410, "cursor_expired"))
                with pytest.raises(CursorExpired):
                    await asyncio.wait_for(anext(expired), EVENT_TIMEOUT)
            return seen

    seen = asyncio.run(scenario())
    assert [(e.kind, e.cursor) for e in seen] == [("ready", "c0"), ("set", "c1"), ("ready", "c1")]
    assert seen[1].value == [1, (2,)]
    assert double.last_event_ids()[:2] == [None, "c1"]
    assert double.closed_by_client.wait(timeout=10)


def test_async_watch_unreachable_at_the_first_connection() -> None:
    async def scenario() -> None:
        async with AsyncClient(f"http://127.0.0.1:{free_port()}", timeout=2) as client:
            await anext(client.watch("ch"))

    with pytest.raises(DaemonUnreachable):
        asyncio.run(scenario())
