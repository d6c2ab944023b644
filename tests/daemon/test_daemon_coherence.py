"""Several daemons on one Redis stay coherent (DESIGN.md section 7, issue 12).

Three real ``chanstore serve`` processes share one real redis-server. Each
serves the Redis-backed container ``mana`` (shared: every daemon reads and
writes the same hashes) and a json container ``stats`` of its own (its own
data root, never shared, so never invalidated). Every write goes through one
Lua script that also publishes an invalidation on
``<key_prefix>-invalidations``; each daemon's link hears the writes of the
others and forgets those keys, while its cache keeps answering every other
read from memory.

What is checked, over raw HTTP:

* read-your-writes across daemons: a PUT acknowledged on one daemon is what
  the others answer soon after (each polled with a deadline of ``SOON``; the
  staleness observed is recorded, never asserted);
* monotonic reads: a client reading one daemon in a loop while another
  writes increasing values never sees a value go down;
* listings and bulk gets agree on every daemon after writes and deletes
  made through another;
* If-Match read-modify-write loops from every daemon on one counter lose no
  increment;
* the change feed of one daemon carries, in order, the writes made through
  the others;
* the invalidation link cut (``CLIENT KILL TYPE pubsub``, and once held down
  by taking ``SUBSCRIBE`` away from the user): no daemon ever answers a value
  older than one it answered, each answers a write acknowledged elsewhere
  soon, and at once while its link is down; ``/readyz`` and
  ``chanstore_invalidation_link_up`` say the link is down, and once it is back
  the daemons answer from memory again;
* a write made behind chanstore's back (``redis-cli HSET``) bypasses the
  invalidation link: it is seen once the cache's maximum age
  (``--cache-max-age``) has passed, not before it is heard of.

That a daemon answers from memory at all (so that coherence is not had by
never caching) is read on the Redis side: ``INFO commandstats`` counts the
HGETs that reads sent.

Every wait is bounded: HTTP calls have timeouts, polls have deadlines, and no
test asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from daemon_harness import DaemonProcess, RedisServer, json_entry, key_path, wait_until
from prometheus_client.parser import text_string_to_metric_families

from chanstore.storage import container_domain
from chanstore.versions import etag_of

#: The service id every daemon of the harness runs with (``--service-id e2e``).
SERVICE_ID = "e2e"
#: Seconds within which another daemon must answer a write acknowledged elsewhere.
#: DESIGN.md aims at well under 100 ms on one host; this is the test's deadline, not a
#: measurement (bench/coherence.py measures it).
SOON = 1.0
#: Seconds a daemon may take to reach a state the test polls for (a link back up, ready).
SETTLE = 15.0
#: Seconds an event of the change feed may take to arrive.
EVENT_TIMEOUT = 15.0
#: Seconds a read-modify-write loop may run in all before the test gives up.
LOOP_DEADLINE = 60.0
#: The redis-server's default user, as it is before a test takes SUBSCRIBE away.
EVERYTHING = "+@all"


def _config(redis: RedisServer) -> list[dict[str, Any]]:
    """json ``stats`` (under the daemon's own ``data/``) and Redis-backed ``mana``."""
    return [
        json_entry("stats"),
        {
            "implementation": "redis",
            "name": "mana",
            "load": True,
            "settings": {**redis.settings, "socket_timeout": 5.0},
        },
    ]


# -- three daemons -------------------------------------------------------------------------


class Trio:
    """Three daemons on one redis-server: ``a``, ``b``, ``c``."""

    def __init__(self, daemons: list[DaemonProcess], redis: RedisServer) -> None:
        self.daemons = daemons
        self.a, self.b, self.c = daemons
        self.redis = redis

    def __iter__(self) -> Iterator[DaemonProcess]:
        return iter(self.daemons)

    def others(self, daemon: DaemonProcess) -> list[DaemonProcess]:
        return [other for other in self.daemons if other is not daemon]

    def hash_name(self, channel: str, container: str = "mana") -> str:
        return "chanstore:" + container_domain(SERVICE_ID, channel, container)


def coherent(trio: Trio) -> Trio:
    """Wait until each daemon's invalidation link is up (it starts with the first use of a
    redis container), so that a test starts with every daemon answering from memory."""
    for daemon in trio:
        assert daemon.get("warm-up", "mana", "nothing").status_code == 404
    for daemon in trio:
        wait_until(lambda daemon=daemon: ready(daemon), SETTLE, f"{daemon.url} ready")
        wait_until(
            lambda daemon=daemon: link_gauges(daemon) and set(link_gauges(daemon).values()) == {1},
            SETTLE,
            f"chanstore_invalidation_link_up 1 on {daemon.url}",
        )
    return trio


@pytest.fixture(scope="module")
def module_trio(
    tmp_path_factory: pytest.TempPathFactory, module_redis: RedisServer
) -> Iterator[Trio]:
    daemons = [
        DaemonProcess(tmp_path_factory.mktemp(f"daemon-{name}"), _config(module_redis))
        for name in "abc"
    ]
    try:
        for daemon in daemons:
            daemon.start()
        yield coherent(Trio(daemons, module_redis))
    finally:
        problems = [problem for daemon in daemons for problem in daemon.close()]
        if problems:
            pytest.fail("a daemon of the module crashed or hung:\n" + "\n".join(problems))


@pytest.fixture
def trio(module_trio: Trio) -> Iterator[Trio]:
    """The module's three daemons; the test fails if one logs a crash meanwhile."""
    marks = [daemon.log_size() for daemon in module_trio]
    yield module_trio
    crashes = [
        line
        for daemon, mark in zip(module_trio, marks, strict=True)
        for line in daemon.crashes(since=mark)
    ]
    if crashes:
        pytest.fail("a daemon logged a crash:\n" + "\n".join(crashes))


def own_trio(start_daemon: Callable[..., DaemonProcess], redis: RedisServer,
             args: list[str] | None = None) -> Trio:  # fmt: skip
    """Three daemons of this test's own (for tests that cut links or change settings)."""
    return coherent(Trio([start_daemon(_config(redis), args=args or []) for _ in range(3)], redis))


# -- reading what the daemons answer ----------------------------------------------------------


def ready(daemon: DaemonProcess) -> bool:
    return daemon.http.get("/readyz").status_code == 200


def readyz(daemon: DaemonProcess) -> tuple[int, dict[str, Any]]:
    answer = daemon.http.get("/readyz")
    return answer.status_code, answer.json()


def samples(daemon: DaemonProcess, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample ``name`` of the daemon's /metrics, by its labels."""
    found = {}
    for family in text_string_to_metric_families(daemon.metrics_text()):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def link_gauges(daemon: DaemonProcess) -> dict[str, float]:
    """``chanstore_invalidation_link_up`` by link."""
    return {
        dict(labels)["link"]: value
        for labels, value in samples(daemon, "chanstore_invalidation_link_up").items()
    }


def invalidations(daemon: DaemonProcess, container: str = "mana") -> float:
    """``chanstore_cache_invalidations_total`` of ``container`` (its series appears with the
    first invalidation: absent is 0)."""
    value = daemon.metric("chanstore_cache_invalidations_total", container=container)
    return 0.0 if value is None else value


def hget_calls(redis: RedisServer) -> int:
    """HGETs the redis-server ran so far, by every client: reads that memory did not answer."""
    with redis.client() as client:
        return int(client.info("commandstats").get("cmdstat_hget", {}).get("calls", 0))


def value_of(http: httpx.Client, channel: str, key: str, container: str = "mana") -> Any:
    """What a daemon answers for ``key``: its value, or None for 404."""
    answer = http.get(key_path(channel, container, key))
    if answer.status_code == 404:
        assert answer.json()["code"] == "not_found", answer.text
        return None
    assert answer.status_code == 200, answer.text
    return answer.json()


def put(daemon: DaemonProcess, channel: str, key: str, value: Any,
        container: str = "mana") -> str:  # fmt: skip
    """PUT ``value``; the ETag acknowledged."""
    answer = daemon.http.put(key_path(channel, container, key), json=value)
    assert answer.status_code == 200, answer.text
    return answer.json()["etag"]


def listing(daemon: DaemonProcess, channel: str, page: int = 7) -> list[str]:
    """Every key of ``mana`` in ``channel``, page by page (``page`` keys each)."""
    keys: list[str] = []
    after: str | None = None
    for _ in range(1000):
        query = f"?limit={page}" + ("" if after is None else f"&after={quote(after, safe='')}")
        answer = daemon.http.get(key_path(channel, "mana") + query)
        assert answer.status_code == 200, answer.text
        keys += answer.json()["keys"]
        after = answer.json()["next"]
        if after is None:
            return keys
    raise AssertionError("the listing did not end")


def bulk_get(daemon: DaemonProcess, channel: str, keys: list[str]) -> dict[str, Any]:
    answer = daemon.http.post(key_path(channel, "mana") + "/-/get", json={"keys": keys})
    assert answer.status_code == 200, answer.text
    return answer.json()


class Observer:
    """One client's reads of one key on one daemon, in order (increasing integers).

    Every read is checked not to go back: a daemon never answers an older value
    once it answered a newer one (None, absent, counts as older than any value).
    """

    def __init__(self, daemon: DaemonProcess, channel: str, key: str) -> None:
        self.daemon = daemon
        self.channel = channel
        self.key = key
        self.last: int | None = None
        self.reads = 0
        #: Reads that answered something older than the value just acknowledged elsewhere.
        self.stale_reads = 0

    def read(self, http: httpx.Client | None = None) -> int | None:
        value = value_of(http or self.daemon.http, self.channel, self.key)
        self.reads += 1
        if self.last is not None:
            assert value is not None and value >= self.last, (
                f"{self.daemon.url} answered {value!r} for {self.key!r} after it had "
                f"answered {self.last!r}"
            )
        self.last = value
        return value

    def until(self, expected: int, acknowledged: float, timeout: float = SOON) -> float:
        """Read until the daemon answers ``expected`` (written and acknowledged elsewhere at
        ``acknowledged``, CLOCK_MONOTONIC); the seconds from the acknowledgement to that
        answer. Fails past ``timeout`` (and on any read that goes back)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.read()
            if value == expected:
                return time.monotonic() - acknowledged
            assert value is None or value < expected, (
                f"{self.daemon.url} answered {value!r}, newer than {expected!r} just written"
            )
            self.stale_reads += 1
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.daemon.url} still answered {value!r} for {self.key!r} {timeout}s "
                    f"after {expected!r} was acknowledged by another daemon"
                )
            time.sleep(0.001)


def staleness_text(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * len(ordered)))]
    return (
        f"{len(ordered)} reads: median {statistics.median(ordered) * 1000:.2f} ms, "
        f"p99 {p99 * 1000:.2f} ms, max {ordered[-1] * 1000:.2f} ms"
    )


def run_threads(targets: list[Callable[[], None]], timeout: float = LOOP_DEADLINE + 30) -> None:
    """Run ``targets`` in threads, wait for all (bounded), re-raise the first failure."""
    failures: list[BaseException] = []

    def wrapped(target: Callable[[], None]) -> None:
        try:
            target()
        except Exception as exc:  # noqa: BLE001 - re-raised in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=wrapped, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish in time"
    if failures:
        raise failures[0]


# -- the change feed, read over a socket -------------------------------------------------------


class FeedStream:
    """``GET /v1/channels/{channel}/-/events`` over a socket of its own: the events as dicts
    (``event``, ``id``, ``data``), de-chunked and split as the daemon sent them."""

    def __init__(self, daemon: DaemonProcess, channel: str, query: str = "") -> None:
        self.sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=EVENT_TIMEOUT)
        path = f"/v1/channels/{quote(channel, safe='')}/-/events" + (f"?{query}" if query else "")
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: chanstore\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        self.raw = b""
        self.text = b""
        self.pending: deque[dict[str, str]] = deque()
        deadline = time.monotonic() + EVENT_TIMEOUT
        while b"\r\n\r\n" not in self.raw:
            self._receive(deadline)
        head, self.raw = self.raw.split(b"\r\n\r\n", 1)
        assert head.split(b" ", 2)[1] == b"200", head
        assert b"transfer-encoding: chunked" in head.lower(), head

    def _receive(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"the change feed sent nothing more within {EVENT_TIMEOUT}s")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the change feed sent nothing more within {EVENT_TIMEOUT}s")
        assert data, "the daemon closed the change feed"
        self.raw += data

    def _split(self) -> None:
        while (line_end := self.raw.find(b"\r\n")) >= 0:
            size = int(self.raw[:line_end], 16)
            end = line_end + 2 + size
            if len(self.raw) < end + 2:
                break
            self.text += self.raw[line_end + 2 : end]
            self.raw = self.raw[end + 2 :]
        while b"\n\n" in self.text:
            block, self.text = self.text.split(b"\n\n", 1)
            event: dict[str, str] = {}
            for line in block.decode().split("\n"):
                if not line.startswith(":"):  # a keep-alive comment
                    name, _, value = line.partition(":")
                    event[name] = value.removeprefix(" ")
            if "event" in event:
                self.pending.append(event)

    def next(self) -> dict[str, str]:
        deadline = time.monotonic() + EVENT_TIMEOUT
        while True:
            self._split()
            if self.pending:
                return self.pending.popleft()
            self._receive(deadline)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def change(event: dict[str, str]) -> tuple[str, str, str, Any]:
    """``(kind, container, key, value)`` of a set or delete event."""
    data = json.loads(event["data"])
    if event["event"] == "delete":
        return "delete", data["container"], data["key"], None
    assert event["event"] == "set", event
    assert data["etag"] == etag_of(data["value"]), data
    return "set", data["container"], data["key"], data["value"]


# -- memory answers, and coherently ----------------------------------------------------------------


def test_each_daemon_answers_from_memory_while_its_link_is_up(trio: Trio, channel: str) -> None:
    """Coherence is not had by never caching: repeated reads on every daemon send no HGET."""
    put(trio.a, channel, "mp", 1)
    for daemon in trio:
        Observer(daemon, channel, "mp").until(1, time.monotonic())
    before = hget_calls(trio.redis)
    for daemon in trio:
        for _ in range(50):
            assert value_of(daemon.http, channel, "mp") == 1
    assert hget_calls(trio.redis) == before


def test_a_write_acknowledged_on_one_daemon_is_what_the_others_answer_soon(
    trio: Trio, channel: str, record_property: Callable[[str, Any], None]
) -> None:
    """Each round, every daemon answers the current value (so holds it in memory), then one
    daemon (in turn) writes the next: the two others answer it within ``SOON``, and the
    writer at once. Each daemon hears exactly the writes of the two others."""
    rounds = 60
    before = {daemon.url: invalidations(daemon) for daemon in trio}
    hget_before = hget_calls(trio.redis)
    observers = {daemon.url: Observer(daemon, channel, "counter") for daemon in trio}
    staleness: list[float] = []
    for number in range(rounds):
        writer = trio.daemons[number % 3]
        for daemon in trio:  # each holds number - 1 in memory (or knows the key is absent)
            expected = None if number == 0 else number - 1
            assert observers[daemon.url].read() == expected
        put(writer, channel, "counter", number)
        acknowledged = time.monotonic()
        assert observers[writer.url].read() == number  # read-your-writes on the writer itself
        for daemon in trio.others(writer):
            staleness.append(observers[daemon.url].until(number, acknowledged))

    # Each daemon heard the writes of the two others, one key each; never its own.
    for index, daemon in enumerate(trio):
        written_elsewhere = sum(1 for n in range(rounds) if n % 3 != index)
        try:
            wait_until(
                lambda daemon=daemon, n=written_elsewhere: (
                    invalidations(daemon) == before[daemon.url] + n
                ),
                SETTLE,
                "",
            )
        except TimeoutError:
            raise AssertionError(
                f"{daemon.url} counted {invalidations(daemon) - before[daemon.url]:g} "
                f"invalidations, not {written_elsewhere}; its link went down "
                f"{len(daemon.events('invalidation_link_down'))} times"
            ) from None
    # Each daemon read Redis once per write made elsewhere (the read that followed the
    # invalidation), then answered from memory again.
    assert hget_calls(trio.redis) - hget_before <= 2 * rounds
    stale = sum(observer.stale_reads for observer in observers.values())
    summary = f"staleness after acknowledgement, {staleness_text(staleness)}; stale reads {stale}"
    record_property("staleness", summary)
    print(summary)


def test_reads_on_one_daemon_never_go_back_while_another_writes(trio: Trio, channel: str) -> None:
    """A writes 1..300 one after another; clients read B and C in loops meanwhile: neither
    daemon ever answers a value lower than one it answered before, and both end at 300."""
    writes = 300
    put(trio.a, channel, "level", 0)
    for daemon in (trio.b, trio.c):
        Observer(daemon, channel, "level").until(0, time.monotonic())
    done = threading.Event()
    done_at = [0.0]  # when the last write was acknowledged
    observers = [Observer(daemon, channel, "level") for daemon in (trio.b, trio.c)]
    seen: dict[str, set[int]] = {observer.daemon.url: set() for observer in observers}

    def read_in_a_loop(observer: Observer) -> None:
        deadline = time.monotonic() + LOOP_DEADLINE
        with httpx.Client(base_url=observer.daemon.url, timeout=15) as http:
            while time.monotonic() < deadline:
                finished = done.is_set()  # before the read: one more read after the last write
                value = observer.read(http)
                assert value is not None
                seen[observer.daemon.url].add(value)
                if finished and value == writes:
                    return
                if finished and time.monotonic() > done_at[0] + SOON:
                    raise AssertionError(
                        f"{observer.daemon.url} answered {value} {SOON}s after {writes} "
                        "was acknowledged by another daemon"
                    )
        raise AssertionError("the reader ran out of time")

    def write_in_a_loop() -> None:
        with httpx.Client(base_url=trio.a.url, timeout=15) as http:
            for number in range(1, writes + 1):
                answer = http.put(key_path(channel, "mana", "level"), json=number)
                assert answer.status_code == 200, answer.text
        done_at[0] = time.monotonic()
        done.set()

    run_threads([write_in_a_loop] + [lambda o=o: read_in_a_loop(o) for o in observers])
    for observer in observers:
        # The readers ran beside the writes, not only after them.
        assert len(seen[observer.daemon.url]) > 2, (observer.daemon.url, observer.reads)


def test_listings_and_bulk_gets_agree_across_daemons_after_writes_and_deletes_elsewhere(
    trio: Trio, channel: str
) -> None:
    initial = {f"k{number:02d}": number for number in range(30)}
    answer = trio.a.http.post(key_path(channel, "mana") + "/-/set", json={"values": initial})
    assert answer.status_code == 200, answer.text
    every_key = [*initial, *(f"n{number}" for number in range(5))]

    def agrees(daemon: DaemonProcess, expected: dict[str, int]) -> bool:
        found = bulk_get(daemon, channel, every_key)
        return (
            listing(daemon, channel) == sorted(expected)
            and found["values"] == expected
            and found["missing"] == [key for key in every_key if key not in expected]
            and found["etags"] == {key: etag_of(value) for key, value in expected.items()}
        )

    for daemon in trio:  # every daemon lists and reads it all: all of it in memory
        wait_until(lambda daemon=daemon: agrees(daemon, initial), SOON, f"{daemon.url} agrees")

    # Writes and deletes through A and through C, single and bulk.
    expected = dict(initial)
    assert trio.a.http.delete(key_path(channel, "mana", "k03")).status_code == 200
    del expected["k03"]
    gone = [f"k{number}" for number in range(10, 15)]
    answer = trio.a.http.post(key_path(channel, "mana") + "/-/delete", json={"keys": gone})
    assert answer.status_code == 200 and sorted(answer.json()["deleted"]) == gone, answer.text
    for key in gone:
        del expected[key]
    put(trio.a, channel, "k05", 500)
    expected["k05"] = 500
    added = {f"n{number}": 1000 + number for number in range(5)}
    answer = trio.a.http.post(key_path(channel, "mana") + "/-/set", json={"values": added})
    assert answer.status_code == 200, answer.text
    expected |= added
    assert trio.c.http.delete(key_path(channel, "mana", "k20")).status_code == 200
    del expected["k20"]
    put(trio.c, channel, "k21", 2100)
    expected["k21"] = 2100

    for daemon in trio:
        wait_until(
            lambda daemon=daemon: agrees(daemon, expected),
            SOON,
            f"{daemon.url}'s listing and bulk get of {channel} agreeing with the writes",
        )
    # And what they agree on is what Redis holds.
    with trio.redis.client() as client:
        stored = client.hgetall(trio.hash_name(channel))
    assert {field.decode(): json.loads(data) for field, data in stored.items()} == expected


def test_conditional_writes_from_every_daemon_lose_no_increment(trio: Trio, channel: str) -> None:
    """Two clients per daemon each add 1, 15 times: GET from their daemon, PUT If-Match the
    ETag read; on 412 they read again from their daemon (which must come to answer the
    current version), so the counter ends at exactly clients x increments."""
    per_daemon, increments = 2, 15
    clients = per_daemon * len(trio.daemons)
    total = clients * increments
    put(trio.a, channel, "counter", 0)
    path = key_path(channel, "mana", "counter")
    counts = {"written": 0, "conflicts": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + LOOP_DEADLINE

    def increment_many(daemon: DaemonProcess) -> None:
        with httpx.Client(base_url=daemon.url, timeout=15) as http:
            for _ in range(increments):
                while True:
                    assert time.monotonic() < deadline, "the loops made no progress"
                    read = http.get(path)
                    assert read.status_code == 200, read.text
                    assert read.headers["etag"] == f'"{etag_of(read.json())}"'
                    written = http.put(
                        path, json=read.json() + 1, headers={"if-match": read.headers["etag"]}
                    )
                    if written.status_code == 200:
                        with lock:
                            counts["written"] += 1
                        break
                    assert written.status_code == 412, written.text
                    with lock:
                        counts["conflicts"] += 1

    run_threads([lambda d=daemon: increment_many(d) for daemon in trio for _ in range(per_daemon)])
    assert counts["written"] == total
    with trio.redis.client() as client:
        assert client.hget(trio.hash_name(channel), "counter") == str(total).encode()
    for daemon in trio:
        Observer(daemon, channel, "counter").until(total, time.monotonic())
        answer = daemon.get(channel, "mana", "counter")
        assert answer.headers["etag"] == f'"{etag_of(total)}"'
    print(f"{total} increments from {clients} clients on 3 daemons; {counts['conflicts']} 412s")


def test_the_feed_of_one_daemon_carries_the_writes_made_through_the_others(
    trio: Trio, channel: str
) -> None:
    stream = FeedStream(trio.b, channel)
    try:
        opening = stream.next()
        assert opening["event"] == "ready", opening
        # A's json container is A's own: nothing of it reaches B's feed.
        put(trio.a, channel, "private", 1, container="stats")
        put(trio.a, channel, "hp", 1)
        put(trio.c, channel, "hp", 2)
        assert trio.a.http.delete(key_path(channel, "mana", "hp")).status_code == 200
        answer = trio.c.http.post(
            key_path(channel, "mana") + "/-/set", json={"values": {"hp": 3, "mp": 4}}
        )
        assert answer.status_code == 200, answer.text
        put(trio.b, channel, "mp", 5)
        put(trio.a, channel, "mp", 6)
        expected = [
            ("set", "mana", "hp", 1),
            ("set", "mana", "hp", 2),
            ("delete", "mana", "hp", None),
            ("set", "mana", "hp", 3),
            ("set", "mana", "mp", 4),
            ("set", "mana", "mp", 5),
            ("set", "mana", "mp", 6),
        ]
        events = [stream.next() for _ in expected]
        assert [change(event) for event in events] == expected
        assert len({event["id"] for event in events}) == len(events)
    finally:
        stream.close()
    # B's reads agree with its feed.
    Observer(trio.b, channel, "mp").until(6, time.monotonic())
    Observer(trio.b, channel, "hp").until(3, time.monotonic())
    assert value_of(trio.b.http, channel, "private", "stats") is None


def test_json_containers_are_each_daemons_own_and_never_invalidated(
    trio: Trio, channel: str
) -> None:
    """``stats`` is a json root per daemon: a write on one is not the others' to see, the
    invalidation link never touches it, and readiness never names it."""
    for number, daemon in enumerate(trio):
        put(daemon, channel, "own", number, container="stats")
    for number, daemon in enumerate(trio):
        assert value_of(daemon.http, channel, "own", "stats") == number
        assert invalidations(daemon, "stats") == 0
        status, body = readyz(daemon)
        assert status == 200, body


# -- the link cut ---------------------------------------------------------------------------------


def kill_subscriptions(redis: RedisServer) -> int:
    """``CLIENT KILL TYPE pubsub``: every daemon's invalidation link dropped at once."""
    with redis.client() as client:
        return int(client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))


def test_a_cut_invalidation_link_never_leads_to_a_stale_answer(
    start_daemon, redis: RedisServer, channel: str, record_property: Callable[[str, Any], None]
) -> None:
    """Write v on A, read on B and C, over and over, while every daemon's subscription is
    killed (three times, each a brief outage: the links come back at once), then held down
    (the default user may not SUBSCRIBE any more, so no link can come back), then let back.

    What must hold, and is checked on every read: a daemon never answers a value older
    than one it answered before, and B and C answer v within ``SOON`` of its
    acknowledgement on A, across every outage. While a daemon's link is down (held down:
    its /readyz says so first), its very first read after the write answers v, because it
    reads Redis (counted by HGETs there). The outages are seen on /readyz, in
    ``chanstore_invalidation_link_up`` (0, then 1) and in each daemon's log (a brief one
    is logged even when no poll of /readyz could catch it). Once the links are back, the
    daemons answer from memory again.

    Not asserted: that B's first read right after A's acknowledgement is v while the link
    is up. The invalidation is published in the write's own step, but B's event loop may
    take the GET before the message that arrived on its link just before it; such a read
    is stale by a few milliseconds (the design's promise is "soon" and "never older than
    answered before", both checked). How often it happened is printed.
    """
    trio = own_trio(start_daemon, redis)
    marks = [daemon.log_size() for daemon in trio]
    observers = {daemon.url: Observer(daemon, channel, "v") for daemon in trio.others(trio.a)}
    staleness: list[float] = []
    number = 0

    def write_then_read(strict: bool = False) -> None:
        nonlocal number
        number += 1
        put(trio.a, channel, "v", number)
        acknowledged = time.monotonic()
        for observer in observers.values():
            if strict:
                assert observer.read() == number, f"{observer.daemon.url}: link down, yet stale"
            else:
                staleness.append(observer.until(number, acknowledged))

    # Brief outages: killed, and back at once.
    for _ in range(3):
        for _ in range(20):
            write_then_read()
        for daemon in trio:
            wait_until(
                lambda daemon=daemon: set(link_gauges(daemon).values()) == {1},
                SETTLE,
                f"chanstore_invalidation_link_up 1 on {daemon.url}",
            )
        # One subscription per serving process (however many channels and domains it serves).
        assert kill_subscriptions(redis) == sum(daemon.workers for daemon in trio.daemons)
        for _ in range(20):
            write_then_read()
    for daemon, mark in zip(trio, marks, strict=True):
        # Each daemon noticed each outage, however brief, and came back.
        wait_until(
            lambda daemon=daemon, mark=mark: len(daemon.events("invalidation_link_up", mark)) >= 3,
            SETTLE,
            f"{daemon.url} logging its link back up three times",
        )
        assert len(daemon.events("invalidation_link_down", mark)) >= 3
    for daemon in trio:
        wait_until(lambda daemon=daemon: ready(daemon), SETTLE, f"{daemon.url} ready again")

    # A held outage: the links are killed and cannot subscribe again.
    with redis.client() as client:
        client.execute_command("ACL", "SETUSER", "default", "-subscribe", "-psubscribe")
    try:
        kill_subscriptions(redis)
        for daemon in trio:
            wait_until(
                lambda daemon=daemon: (
                    readyz(daemon)
                    == (
                        503,
                        {"status": "not ready", "problems": {"mana": "invalidation_link_down"}},
                    )
                ),
                SETTLE,
                f"{daemon.url}'s /readyz naming mana's invalidation link (and not stats)",
            )
            wait_until(
                lambda daemon=daemon: set(link_gauges(daemon).values()) == {0},
                SETTLE,
                f"chanstore_invalidation_link_up 0 on {daemon.url}",
            )
        hget_before = hget_calls(redis)
        for _ in range(30):
            write_then_read(strict=True)
        # Those reads went to Redis, one HGET each: memory was not trusted.
        assert hget_calls(redis) - hget_before >= 30 * len(observers)
        # The json container is served as ever.
        put(trio.b, channel, "own", 1, container="stats")
        assert value_of(trio.b.http, channel, "own", "stats") == 1
    finally:
        with redis.client() as client:
            client.execute_command("ACL", "SETUSER", "default", EVERYTHING)

    for daemon in trio:
        wait_until(lambda daemon=daemon: ready(daemon), SETTLE, f"{daemon.url} ready again")
        wait_until(
            lambda daemon=daemon: set(link_gauges(daemon).values()) == {1},
            SETTLE,
            f"chanstore_invalidation_link_up back to 1 on {daemon.url}",
        )
    for _ in range(20):
        write_then_read()
    # Memory answers again: repeated reads send no HGET.
    hget_before = hget_calls(redis)
    for observer in observers.values():
        for _ in range(20):
            assert observer.read() == number
    assert hget_calls(redis) == hget_before
    stale = sum(observer.stale_reads for observer in observers.values())
    summary = (
        f"{number} writes across 4 outages; staleness with the link up, "
        f"{staleness_text(staleness)}; stale reads {stale}"
    )
    record_property("link_cut", summary)
    print(summary)


# -- writes behind chanstore's back ----------------------------------------------------------------


def test_a_write_made_with_redis_cli_is_seen_within_the_cache_max_age(
    start_daemon, redis: RedisServer, channel: str
) -> None:
    """``redis-cli HSET`` on a container's hash does not go through chanstore's write script,
    so it publishes no invalidation: the daemons learn of it only when their copy reaches
    ``--cache-max-age`` (1 s here) and is read again. Coherence covers the writes made
    through chanstore (by any daemon); the maximum age bounds how long a write made behind
    its back (redis-cli, another program, a restore) goes unseen."""
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    trio = own_trio(start_daemon, redis, ["--cache-max-age", "1"])
    put(trio.a, channel, "mp", 1)
    put(trio.a, channel, "gone", 1)
    for daemon in trio:  # each answers (so holds) mp, and the listing
        Observer(daemon, channel, "mp").until(1, time.monotonic())
        assert listing(daemon, channel) == ["gone", "mp"]
    heard = {daemon.url: invalidations(daemon) for daemon in trio}

    def redis_cli(*args: str) -> None:
        done = subprocess.run(
            ["redis-cli", "-p", str(redis.port), *args],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        assert done.returncode == 0 and "ERR" not in done.stdout, (done.stdout, done.stderr)

    hash_name = trio.hash_name(channel)
    redis_cli("HSET", hash_name, "mp", "2", "added", '"by redis-cli"')
    redis_cli("HDEL", hash_name, "gone")
    written = time.monotonic()
    expected = {
        "GET mp": 2,
        "GET added": "by redis-cli",
        "GET gone": None,
        "bulk get": {"mp": 2, "added": "by redis-cli"},
        "listing": ["added", "mp"],
    }

    def answers(daemon: DaemonProcess) -> dict[str, Any]:
        return {
            "GET mp": value_of(daemon.http, channel, "mp"),
            "GET added": value_of(daemon.http, channel, "added"),
            "GET gone": value_of(daemon.http, channel, "gone"),
            "bulk get": bulk_get(daemon, channel, ["mp", "added", "gone"])["values"],
            "listing": listing(daemon, channel),
        }

    for daemon in trio:
        try:
            wait_until(lambda daemon=daemon: answers(daemon) == expected, 1 + SETTLE, "")
        except TimeoutError:
            raise AssertionError(
                f"{daemon.url} still answers {answers(daemon)} {time.monotonic() - written:.1f}"
                f" s after redis-cli wrote {expected} (--cache-max-age 1)"
            ) from None
    print(f"redis-cli's writes seen on all three daemons {time.monotonic() - written:.2f} s later")
    # No invalidation was heard of them: they bypassed the link.
    assert {daemon.url: invalidations(daemon) for daemon in trio} == heard
    # Writes through chanstore are still heard through the link.
    put(trio.a, channel, "mp", 3)
    acknowledged = time.monotonic()
    for daemon in trio.others(trio.a):
        Observer(daemon, channel, "mp").until(3, acknowledged)
