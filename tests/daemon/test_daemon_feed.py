"""The change feed (DESIGN.md section 6), read the way a browser or curl reads it.

``GET /v1/channels/{channel}/-/events`` against real ``chanstore serve``
processes and a real redis-server: json containers (whose history the daemon
keeps in memory) and Redis-backed ones (whose history lives in Redis) alike.
Streams are read over raw sockets (:class:`Stream` de-chunks the answer and
splits it into Server-Sent Events, so that framing, comments and the end of a
stream are seen exactly as sent), and once through curl; writes are plain
httpx calls.

Every wait is bounded: a stream read fails the test after ``EVENT_TIMEOUT``,
a state the daemon reaches later (a gauge, a dropped watcher) is polled with a
deadline, and no test asserts how long anything took.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from daemon_fixtures import for_the_module, json_and_redis_containers
from daemon_harness import (
    JSON_CONTAINERS,
    DaemonProcess,
    RedisServer,
    json_entry,
    key_path,
    wait_until,
)

from chanstore import codec
from chanstore.storage import container_domain
from chanstore.versions import etag_of

#: Seconds an event, or the head of an answer, may take to arrive.
EVENT_TIMEOUT = 15.0
#: Seconds the daemon may take to reach a state the test polls for.
SETTLE_TIMEOUT = 15.0
#: The route template the feed's requests are counted under.
EVENTS_ROUTE = "/v1/channels/{channel}/-/events"

CONTAINERS = pytest.mark.parametrize("container", ["stats", "mana"])


# -- reading a stream ------------------------------------------------------------------


@dataclass
class Event:
    """One block of a Server-Sent Events stream (a comment block has only ``comment``)."""

    event: str | None = None
    id: str | None = None
    data: str | None = None
    retry: str | None = None
    comment: str | None = None

    @property
    def json(self) -> Any:
        assert self.data is not None, self
        return json.loads(self.data)


class Stream:
    """One GET of a channel's change feed over a socket of its own.

    The answer's head is read at once (``status``, ``headers``; a refusal's JSON
    ``body``). Then :meth:`next` gives the body's events one at a time, as the
    daemon wrote them; ``finished`` says whether the chunked body was ended
    properly (its last, empty chunk) and ``eof`` whether the daemon closed.
    """

    def __init__(
        self,
        daemon: DaemonProcess,
        channel: str,
        query: str = "",
        headers: dict[str, str] | None = None,
        *,
        receive_buffer: int | None = None,
        read_head: bool = True,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(EVENT_TIMEOUT)
        self.sock.connect(("127.0.0.1", daemon.port))
        path = f"/v1/channels/{quote(channel, safe='')}/-/events" + (f"?{query}" if query else "")
        lines = [f"GET {path} HTTP/1.1", "Host: chanstore", "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.raw = b""  # received, not yet de-chunked
        self.text = b""  # de-chunked, not yet split into events
        self.pending: deque[Event] = deque()  # split, not yet taken
        self.finished = False
        self.eof = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: Any = None
        if read_head:
            self._read_head()

    def _read_head(self) -> None:
        deadline = time.monotonic() + EVENT_TIMEOUT
        while b"\r\n\r\n" not in self.raw:
            self._receive(deadline, "the head of the answer")
            assert not self.eof, f"the daemon closed before answering: {self.raw!r}"
        head, self.raw = self.raw.split(b"\r\n\r\n", 1)
        status_line, *fields = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for field in fields:
            name, _, value = field.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if self.status != 200:
            length = int(self.headers["content-length"])
            while len(self.raw) < length:
                self._receive(deadline, "the body of a refusal")
                assert not self.eof, "the daemon closed before the whole refusal came"
            self.body = json.loads(self.raw[:length])

    def _receive(self, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"{what} did not arrive in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(262144)
        except TimeoutError:
            pytest.fail(f"{what} did not arrive in time; had {self.text[-300:]!r}")
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
        self.raw += data

    def _dechunk(self) -> None:
        """Move every whole chunk of ``raw`` to ``text`` (in one pass: a stream of many
        megabytes is read in linear time), and every whole event of it to ``pending``."""
        pieces, at, raw = [], 0, self.raw
        while not self.finished:
            line_end = raw.find(b"\r\n", at)
            if line_end < 0:
                break
            size = int(raw[at:line_end], 16)
            end = line_end + 2 + size
            if len(raw) < end + 2:
                break
            assert raw[end : end + 2] == b"\r\n", f"bad chunk framing: {raw[at : at + 80]!r}"
            pieces.append(raw[line_end + 2 : end])
            at = end + 2
            if size == 0:
                self.finished = True
        if at:
            self.raw = raw[at:]
            self.text += b"".join(pieces)
        if b"\n\n" in self.text:
            *blocks, self.text = self.text.split(b"\n\n")
            self.pending.extend(_parse(block.decode("utf-8")) for block in blocks)

    def next(self, timeout: float = EVENT_TIMEOUT) -> Event | None:
        """The next event (or comment); None once the stream is over."""
        assert self.status == 200, (self.status, self.body)
        deadline = time.monotonic() + timeout
        while True:
            self._dechunk()
            if self.pending:
                return self.pending.popleft()
            if self.finished or self.eof:
                assert not self.text, f"a stream ended in the middle of an event: {self.text!r}"
                return None
            self._receive(deadline, "the next event")

    def next_event(self, timeout: float = EVENT_TIMEOUT) -> Event:
        """The next event that is not a comment (a keep-alive); fails if the stream ends."""
        while True:
            event = self.next(timeout)
            assert event is not None, "the stream ended"
            if event.comment is None:
                return event

    def events(self, count: int, timeout: float = EVENT_TIMEOUT) -> list[Event]:
        return [self.next_event(timeout) for _ in range(count)]

    def ready(self) -> Event:
        """The opening event, checked: ``retry``, ``event: ready``, its cursor, ``data: {}``."""
        opening = self.next_event()
        assert opening.event == "ready", opening
        assert opening.retry == "1000"
        assert opening.id
        assert opening.data == "{}"
        return opening

    def rest(self, timeout: float = EVENT_TIMEOUT) -> list[Event]:
        """Every event until the daemon closes the stream."""
        found: list[Event] = []
        deadline = time.monotonic() + timeout
        while (event := self.next(max(0.01, deadline - time.monotonic()))) is not None:
            found.append(event)
        if not self.eof:  # the last chunk came: the close follows
            while not self.eof:
                self._receive(deadline, "the close after the last chunk")
        return found

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes a thread blocked reading it
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(block: str) -> Event:
    event = Event()
    for line in block.split("\n"):
        if line.startswith(":"):
            event.comment = line[1:].strip()
            continue
        name, _, value = line.partition(":")
        assert name in ("event", "id", "data", "retry"), f"an unknown field: {line!r}"
        assert getattr(event, name) is None, f"{name} twice in one event: {block!r}"
        setattr(event, name, value.removeprefix(" "))
    return event


def change(event: Event) -> tuple[str | None, str, Any]:
    """``(kind, key, value)`` of a set or delete event, its data checked on the way."""
    data = event.json
    if event.event == "delete":
        assert set(data) == {"container", "key"}, data
        return "delete", data["key"], None
    assert event.event == "set", event
    assert set(data) == {"container", "key", "etag", "value"}, data
    assert data["etag"] == etag_of(codec.decode(json.dumps(data["value"]))), data
    return "set", data["key"], data["value"]


def cursor_of(positions: dict[str, str]) -> str:
    """A cursor written by hand, the way the feed encodes them (for malformed ones)."""
    text = ",".join(f"{name}:{position}" for name, position in positions.items())
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


# -- daemons -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_both(
    tmp_path_factory: pytest.TempPathFactory, module_redis: RedisServer
) -> Iterator[DaemonProcess]:
    """json ``stats`` and Redis ``mana``; keep-alive comments every half second."""
    yield from for_the_module(
        DaemonProcess(
            tmp_path_factory.mktemp("feed"),
            json_and_redis_containers(module_redis),
            args=["--heartbeat-interval", "0.5"],
        )
    )


@pytest.fixture
def both(module_both: DaemonProcess) -> Iterator[DaemonProcess]:
    """The module's daemon; the test fails if it logs a crash meanwhile."""
    mark = module_both.log_size()
    yield module_both
    crashes = module_both.crashes(since=mark)
    if crashes:
        pytest.fail("the daemon logged a crash:\n" + "\n".join(crashes))


def put(
    daemon: DaemonProcess, channel: str, container: str, key: str, value: Any, **headers: str
) -> httpx.Response:
    return daemon.http.put(
        key_path(channel, container, key),
        content=json.dumps(value),
        headers={
            "content-type": "application/json",
            **{k.replace("_", "-"): v for k, v in headers.items()},
        },
    )


def stored(response: httpx.Response) -> str:
    """The ETag of a PUT that succeeded."""
    assert response.status_code == 200, response.text
    return response.json()["etag"]


def gauge(daemon: DaemonProcess, name: str, **labels: str) -> float:
    value = daemon.metric(name, **labels)
    assert value is not None, f"{name}{labels} is not in /metrics"
    return value


def wait_for_metric(daemon: DaemonProcess, name: str, expected: float, **labels: str) -> None:
    wait_until(
        lambda: daemon.metric(name, **labels) == expected,
        SETTLE_TIMEOUT,
        f"{name}{labels} == {expected} (it is {daemon.metric(name, **labels)})",
    )


def requests_counted(daemon: DaemonProcess, status: str) -> float:
    return (
        daemon.metric(
            "chanstore_http_requests_total", method="GET", route=EVENTS_ROUTE, status=status
        )
        or 0.0
    )


# -- opening -------------------------------------------------------------------------------


def test_a_stream_opens_with_retry_and_a_ready_event(both: DaemonProcess, channel: str) -> None:
    for query in ["", "containers=stats", "containers=mana", "containers=stats,mana"]:
        with Stream(both, channel, query) as stream:
            assert stream.status == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["transfer-encoding"] == "chunked"
            assert stream.headers["cache-control"] == "no-store"
            assert stream.headers["x-request-id"]
            stream.ready()


@CONTAINERS
def test_sets_and_deletes_arrive_in_acknowledgement_order(
    both: DaemonProcess, channel: str, container: str
) -> None:
    with Stream(both, channel, f"containers={container}") as stream:
        ready = stream.ready()
        etags = [
            stored(put(both, channel, container, "a", {"hp": 1})),
            stored(put(both, channel, container, "b", [1, "two", None])),
        ]
        etags.append(
            stored(put(both, channel, container, "a", {"hp": 2}, if_match=f'"{etags[0]}"'))
        )
        # Neither a failed precondition nor a delete of an absent key is a change.
        assert put(both, channel, container, "a", 0, if_match=f'"{etags[0]}"').status_code == 412
        assert both.http.delete(key_path(channel, container, "b")).status_code == 200
        assert both.http.delete(key_path(channel, container, "nobody")).status_code == 404
        bulk = both.http.post(
            key_path(channel, container) + "/-/set", json={"values": {"c": "x", "d": None}}
        )
        assert bulk.status_code == 200
        gone = both.http.post(
            key_path(channel, container) + "/-/delete", json={"keys": ["c", "nobody"]}
        )
        assert gone.json() == {"deleted": ["c"], "missing": ["nobody"]}
        pair = codec.to_json_shape((1, "a"))
        etags.append(stored(put(both, channel, container, "e", pair)))

        events = stream.events(8)

    assert [change(event) for event in events] == [
        ("set", "a", {"hp": 1}),
        ("set", "b", [1, "two", None]),
        ("set", "a", {"hp": 2}),
        ("delete", "b", None),
        ("set", "c", "x"),
        ("set", "d", None),
        ("delete", "c", None),
        ("set", "e", pair),
    ]
    assert all(event.json["container"] == container for event in events)
    # Each set carries the ETag its PUT answered; each event a cursor of its own.
    sets = [event.json["etag"] for event in events if event.event == "set"]
    assert sets == [*etags[:3], *bulk.json()["etags"].values(), etags[3]]
    ids = [event.id for event in events]
    assert all(ids) and len(set(ids) | {ready.id}) == len(ids) + 1


def test_containers_narrow_the_feed(both: DaemonProcess, channel: str) -> None:
    with (
        Stream(both, channel, "containers=stats") as stats,
        Stream(both, channel, "containers=mana") as mana,
        Stream(both, channel) as every,
        Stream(both, channel, "containers=mana,stats") as named,
    ):
        for stream in (stats, mana, every, named):
            stream.ready()
        for number in range(3):
            stored(put(both, channel, "stats", "hp", number))
            stored(put(both, channel, "mana", "mp", number))
        # A last change of each: a stream that got the other container's changes
        # would show them before it.
        stored(put(both, channel, "stats", "last", True))
        stored(put(both, channel, "mana", "last", True))

        stats_seen = [change(event) for event in stats.events(4)]
        mana_seen = [change(event) for event in mana.events(4)]
        both_seen = [every.events(8), named.events(8)]

    assert stats_seen == [
        ("set", "hp", 0),
        ("set", "hp", 1),
        ("set", "hp", 2),
        ("set", "last", True),
    ]
    assert mana_seen == [
        ("set", "mp", 0),
        ("set", "mp", 1),
        ("set", "mp", 2),
        ("set", "last", True),
    ]
    for seen in both_seen:
        # Order is kept within a container; across containers it is not defined.
        by_container = {"stats": [], "mana": []}
        for event in seen:
            by_container[event.json["container"]].append(change(event))
        assert by_container == {"stats": stats_seen, "mana": mana_seen}


# -- resuming --------------------------------------------------------------------------------


@CONTAINERS
def test_resume_by_last_event_id_or_since_delivers_exactly_what_followed(
    both: DaemonProcess, channel: str, container: str
) -> None:
    narrowed = f"containers={container}"
    with Stream(both, channel, narrowed) as first:
        opened = first.ready()
        for number in (1, 2, 3):
            stored(put(both, channel, container, "n", number))
        seen = first.events(3)
    assert [change(event) for event in seen] == [("set", "n", 1), ("set", "n", 2), ("set", "n", 3)]
    # While nobody watches.
    stored(put(both, channel, container, "n", 4))
    assert both.http.delete(key_path(channel, container, "n")).status_code == 200

    missed = [("set", "n", 2), ("set", "n", 3), ("set", "n", 4), ("delete", "n", None)]
    for live, how in enumerate(("last-event-id", "since"), start=11):
        cursor = seen[0].id
        query, headers = (
            (narrowed, {"Last-Event-ID": cursor})
            if how == "last-event-id"
            else (f"{narrowed}&since={quote(cursor)}", {})
        )
        with Stream(both, channel, query, headers) as resumed:
            ready = resumed.ready()
            assert ready.id == cursor  # the stream starts where the client left
            backlog = resumed.events(len(missed))
            assert [change(event) for event in backlog] == missed, how
            assert [event.id for event in backlog[:2]] == [seen[1].id, seen[2].id]
            # Then live changes, and nothing in between.
            stored(put(both, channel, container, "n", live))
            assert change(resumed.next_event()) == ("set", "n", live)
        missed.append(("set", "n", live))

    # From the latest event: only what comes next. From the first ready: everything.
    with (
        Stream(both, channel, narrowed, {"Last-Event-ID": backlog[-1].id}) as latest,
        Stream(both, channel, f"{narrowed}&since={quote(opened.id)}") as everything,
    ):
        latest.ready()
        everything.ready()
        whole = [change(event) for event in everything.events(1 + len(missed))]
        assert whole == [("set", "n", 1), *missed]
        assert [change(event) for event in latest.events(1)] == [("set", "n", 12)]
        stored(put(both, channel, container, "n", 13))
        assert change(latest.next_event()) == ("set", "n", 13)
        assert change(everything.next_event()) == ("set", "n", 13)


def test_refusals_come_before_any_stream(both: DaemonProcess, channel: str) -> None:
    with Stream(both, channel, "containers=stats") as stats:
        stats_cursor = stats.ready().id

    def refused(query: str = "", headers: dict[str, str] | None = None) -> tuple[int, str]:
        with Stream(both, channel, query, headers) as stream:
            assert stream.headers["content-type"].startswith("application/json")
            assert stream.body["error"]
            return stream.status, stream.body["code"]

    malformed = [
        ("since=!!!", None),
        ("since=abc", None),
        ("", {"Last-Event-ID": "garbage"}),
        (f"since={cursor_of({'stats': 'not-a-number'})}&containers=stats", None),
        (f"since={cursor_of({'mana': 'garbage'})}&containers=mana", None),
    ]
    for query, headers in malformed:
        assert refused(query, headers) == (400, "bad_request"), (query, headers)
    assert refused("containers=nosuch") == (404, "unknown_container")
    assert refused("containers=stats,nosuch") == (404, "unknown_container")
    # Well formed, but not a cursor whose successors are held: 410.
    expired = [
        f"containers=mana&since={cursor_of({'mana': '99999999999999-0'})}",
        f"containers=mana&since={quote(stats_cursor)}",  # it does not cover mana
        f"containers=stats&since={cursor_of({'stats': 'f00d.12'})}",
    ]
    for query in expired:
        assert refused(query) == (410, "cursor_expired"), query
    wait_for_metric(both, "chanstore_watchers", 0)


# -- Redis: one history for every daemon, kept across restarts --------------------------------


def test_a_redis_feed_spans_daemons_and_survives_a_restart(
    start_daemon, redis: RedisServer, channel: str
) -> None:
    config = json_and_redis_containers(redis)
    near, far = start_daemon(config), start_daemon(config)

    with Stream(near, channel, "containers=mana") as watched:
        watched.ready()
        etag = stored(put(far, channel, "mana", "mp", 1))
        assert far.http.delete(key_path(channel, "mana", "mp")).status_code == 200
        stored(put(far, channel, "mana", "mp", 2))
        seen = watched.events(3)
    assert [change(event) for event in seen] == [
        ("set", "mp", 1),
        ("delete", "mp", None),
        ("set", "mp", 2),
    ]
    assert seen[0].json["etag"] == etag
    cursor = seen[-1].id

    near.stop()
    for number in (3, 4):  # while the watcher's daemon is down
        stored(put(far, channel, "mana", "mp", number))
    assert far.http.delete(key_path(channel, "mana", "mp")).status_code == 200
    near.start(same_port=True)

    missed = [("set", "mp", 3), ("set", "mp", 4), ("delete", "mp", None)]
    with (
        Stream(near, channel, "containers=mana", {"Last-Event-ID": cursor}) as resumed,
        Stream(far, channel, f"containers=mana&since={quote(cursor)}") as elsewhere,
    ):
        assert resumed.ready().id == cursor
        assert elsewhere.ready().id == cursor
        backlog = resumed.events(3)
        assert [change(event) for event in backlog] == missed
        # The same cursors whichever daemon serves them.
        assert [event.id for event in elsewhere.events(3)] == [event.id for event in backlog]
        stored(put(far, channel, "mana", "mp", 5))
        stored(put(near, channel, "mana", "mp", 6))
        assert [change(event) for event in resumed.events(2)] == [
            ("set", "mp", 5),
            ("set", "mp", 6),
        ]
        assert [change(event) for event in elsewhere.events(2)] == [
            ("set", "mp", 5),
            ("set", "mp", 6),
        ]


def test_a_redis_cursor_older_than_the_history_is_expired(
    start_daemon, redis: RedisServer, channel: str
) -> None:
    """``--event-history 5``: the stream in Redis is trimmed (``MAXLEN ~ 5``: at least the
    last 5 are kept; Redis drops whole nodes of entries), so a cursor from before the
    trimmed part is 410, and one of the last five resumes exactly."""
    daemon = start_daemon(json_and_redis_containers(redis), args=["--event-history", "5"])
    history = "chanstore:-events:" + container_domain("e2e", channel, "mana")
    events: list[Event] = []
    with Stream(daemon, channel, "containers=mana") as stream, redis.client() as client:
        stream.ready()

        def trimmed() -> bool:
            # One change at a time, each read before the next is made.
            stored(put(daemon, channel, "mana", "n", len(events)))
            events.append(stream.next_event())
            return client.xlen(history) < len(events)

        wait_until(
            lambda: trimmed() or len(events) >= 1000,
            SETTLE_TIMEOUT * 4,
            "Redis to trim the history",
        )
        held = client.xlen(history)
    assert 5 <= held < len(events)
    assert [change(event) for event in events] == [("set", "n", n) for n in range(len(events))]

    with Stream(daemon, channel, f"containers=mana&since={quote(events[0].id)}") as old:
        assert old.status == 410
        assert old.body["code"] == "cursor_expired"
    # Within the last five: exactly what followed.
    with Stream(daemon, channel, "containers=mana", {"Last-Event-ID": events[-5].id}) as recent:
        recent.ready()
        assert [event.id for event in recent.events(4)] == [event.id for event in events[-4:]]
        stored(put(daemon, channel, "mana", "after", 1))
        assert change(recent.next_event()) == ("set", "after", 1)


def test_a_burst_longer_than_the_redis_history_reaches_a_watcher_whole(
    start_daemon, redis: RedisServer, channel: str
) -> None:
    """One bulk write of 100 keys with ``--event-history 5``: a watcher that reads gets all
    100 events in order, or its stream ends with ``history_lost`` (so that its client
    resumes, and hears 410 or exactly what followed); it must never see some and
    silently miss others."""
    daemon = start_daemon(json_and_redis_containers(redis), args=["--event-history", "5"])
    keys = [f"k{number:03d}" for number in range(100)]
    expected = [*keys, "last"]
    with Stream(daemon, channel, "containers=mana") as stream:
        cursor = stream.ready().id
        bulk = daemon.http.post(
            key_path(channel, "mana") + "/-/set", json={"values": {key: key for key in keys}}
        )
        assert bulk.status_code == 200, bulk.text
        stored(put(daemon, channel, "mana", "last", True))  # read up to it, no further
        seen: list[str] = []
        end: Event | None = None
        while not seen or seen[-1] != "last":
            event = stream.next()
            if event is None or event.event == "end":
                end = event
                break  # ended: the client is told to resume
            if event.comment is None:
                seen.append(change(event)[1])
                cursor = event.id
    assert seen == expected[: len(seen)], f"{len(seen)} events, the first {seen[:3]}"
    if seen == expected:
        return
    # Ended before the burst was through: said so, and resuming skips nothing either.
    assert end is not None and end.json == {"reason": "history_lost"}, end
    wait_for_metric(daemon, "chanstore_watchers_ended_total", 1, reason="history_lost")
    with Stream(daemon, channel, "containers=mana", {"Last-Event-ID": cursor}) as resumed:
        if resumed.status == 410:
            assert resumed.body["code"] == "cursor_expired"
        else:
            assert resumed.ready().id == cursor
            rest = resumed.events(len(expected) - len(seen))
            assert [change(event)[1] for event in rest] == expected[len(seen) :]


# -- bounds and keep-alives ------------------------------------------------------------------


def test_past_max_watchers_a_stream_is_503_until_one_closes(start_daemon, channel: str) -> None:
    daemon = start_daemon(JSON_CONTAINERS, args=["--max-watchers", "2"])
    first, second = Stream(daemon, channel), Stream(daemon, f"{channel}-other")
    try:
        first.ready()
        second.ready()
        with Stream(daemon, channel) as third:
            assert third.status == 503
            assert third.body["code"] == "too_many_watchers"
        assert requests_counted(daemon, "503") == 1
        # The two streams still flow.
        stored(put(daemon, channel, "stats", "hp", 1))
        assert change(first.next_event()) == ("set", "hp", 1)

        second.close()

        def admitted() -> Stream | None:
            stream = Stream(daemon, channel)
            if stream.status == 200:
                return stream
            assert stream.body["code"] == "too_many_watchers"
            stream.close()
            return None

        with wait_until(admitted, SETTLE_TIMEOUT, "a place for a new stream") as fourth:
            fourth.ready()
            stored(put(daemon, channel, "stats", "hp", 2))
            assert change(fourth.next_event()) == ("set", "hp", 2)
            assert change(first.next_event()) == ("set", "hp", 2)
    finally:
        first.close()
        second.close()


def test_an_idle_stream_gets_keep_alive_comments(both: DaemonProcess, channel: str) -> None:
    """``--heartbeat-interval 0.5`` (the module's daemon): comments, and events still flow."""
    with Stream(both, channel, "containers=stats") as stream:
        stream.ready()
        for _ in range(2):
            comment = stream.next()
            assert comment == Event(comment="keep-alive")
        stored(put(both, channel, "stats", "hp", 1))
        assert change(stream.next_event()) == ("set", "hp", 1)


# -- the end of a stream ----------------------------------------------------------------------


def test_sigterm_ends_every_stream_and_only_redis_cursors_outlive_the_daemon(
    start_daemon, redis: RedisServer, channel: str
) -> None:
    """SIGTERM: each open stream (curl's too) gets ``event: end`` with the reason
    ``shutdown``, its chunked body is ended, and the connection closes. Started again,
    the daemon resumes a Redis cursor from before; a json one (its history was in the
    memory of the process that stopped) is 410."""
    daemon = start_daemon(json_and_redis_containers(redis))
    url = f"{daemon.url}/v1/channels/{channel}/-/events"
    curl = subprocess.Popen(
        ["curl", "--silent", "--show-error", "--no-buffer", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with (
            Stream(daemon, channel, "containers=stats") as stats,
            Stream(daemon, channel, "containers=mana") as mana,
        ):
            stats.ready()
            mana.ready()
            wait_for_metric(daemon, "chanstore_watchers", 3)  # curl's too
            stored(put(daemon, channel, "stats", "hp", 1))
            stored(put(daemon, channel, "mana", "mp", 1))
            stats_event, mana_event = stats.next_event(), mana.next_event()
            assert change(stats_event) == ("set", "hp", 1)
            assert change(mana_event) == ("set", "mp", 1)

            daemon.send_signal(signal.SIGTERM)

            for stream in (stats, mana):
                assert [event for event in stream.rest() if event.comment is None] == [
                    Event(event="end", data='{"reason":"shutdown"}')
                ]
                assert stream.finished, "the chunked body was not ended by its last chunk"
                assert stream.eof
        out, err = curl.communicate(timeout=EVENT_TIMEOUT)
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait(timeout=10)
    # curl exits 0 only for a complete chunked body (18 for one cut short).
    assert curl.returncode == 0, err
    text = out.decode()
    assert text.startswith("retry: 1000\nevent: ready\nid: ")
    assert text.endswith('event: end\ndata: {"reason":"shutdown"}\n\n'), text[-300:]
    assert text.count("event: set") == 2
    assert daemon.stop() == 0
    closed = [
        record for record in daemon.events("watcher_closed") if record.get("channel") == channel
    ]
    reasons = [record["reason"] for record in closed]
    if daemon.workers == 1:
        assert reasons == ["shutdown"] * 3
    else:
        # A stream relayed by the worker that accepted it was ended by that worker's stop
        # (its client got the same "shutdown" end, above); the owner may see its relaying
        # peer leave before it stops itself, and log that as its client leaving.
        assert len(reasons) == 3 and set(reasons) <= {"shutdown", "client"}, reasons

    daemon.start(same_port=True)
    for query, headers in [
        (f"containers=stats&since={quote(stats_event.id)}", {}),
        ("containers=stats", {"Last-Event-ID": stats_event.id}),
    ]:
        with Stream(daemon, channel, query, headers) as old:
            assert old.status == 410
            assert old.body["code"] == "cursor_expired"
    with Stream(daemon, channel, "containers=mana", {"Last-Event-ID": mana_event.id}) as kept:
        assert kept.ready().id == mana_event.id
        stored(put(daemon, channel, "mana", "mp", 2))
        assert change(kept.next_event()) == ("set", "mp", 2)
    # Re-read, then watch without a cursor: that works for json too.
    assert daemon.get(channel, "stats", "hp").json() == 1
    with Stream(daemon, channel, "containers=stats") as fresh:
        fresh.ready()
        stored(put(daemon, channel, "stats", "hp", 2))
        assert change(fresh.next_event()) == ("set", "hp", 2)


@pytest.mark.parametrize(
    "container",
    [
        "profiles",
        "more_mana",
    ],
)
def test_a_reload_that_removes_a_container_ends_its_streams(
    start_daemon, redis: RedisServer, channel: str, container: str
) -> None:
    removed = [
        json_entry("profiles"),
        {
            "implementation": "redis",
            "name": "more_mana",
            "load": True,
            "settings": {**redis.settings, "socket_timeout": 5.0},
        },
    ]
    daemon = start_daemon(
        json_and_redis_containers(redis, *removed), args=["--heartbeat-interval", "0.5"]
    )
    mark = daemon.log_size()
    with (
        Stream(daemon, channel, f"containers={container}") as gone,
        Stream(daemon, channel, "containers=stats,mana") as kept,
    ):
        gone.ready()
        kept.ready()
        stored(put(daemon, channel, container, "k", 1))
        assert change(gone.next_event()) == ("set", "k", 1)

        daemon.write_config(json_and_redis_containers(redis))
        reloaded = daemon.http.post("/-/reload")
        assert reloaded.status_code == 200, reloaded.text

        # The streams of the containers that stay go on.
        stored(put(daemon, channel, "stats", "hp", 1))
        stored(put(daemon, channel, "mana", "mp", 1))
        assert sorted(change(event) for event in kept.events(2)) == [
            ("set", "hp", 1),
            ("set", "mp", 1),
        ]
        # The reload ended the other stream before it answered: its end is out already.
        rest = [event for event in gone.rest(timeout=3) if event.comment is None]
        assert rest == [Event(event="end", data='{"reason":"reload"}')]
        assert gone.finished
    with Stream(daemon, channel, f"containers={container}") as refused:
        assert refused.status == 404
    closed = [record["reason"] for record in daemon.events("watcher_closed", since=mark)]
    assert "reload" in closed


# -- a slow reader -----------------------------------------------------------------------------


def rss_bytes(daemon: DaemonProcess) -> int:
    assert daemon.process is not None
    with open(f"/proc/{daemon.process.pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Collector:
    """Reads a stream on a thread of its own, as fast as the events come."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                event = self.stream.next(timeout=60)
                if event is None:
                    return
                if event.comment is None:
                    self.events.append(event)
        except BaseException as exc:  # noqa: BLE001 - reported by wait_for
            self.error = exc

    def wait_for(self, count: int, timeout: float) -> list[Event]:
        def enough() -> bool:
            assert self.error is None, f"the collector failed: {self.error!r}"
            assert self._thread.is_alive() or len(self.events) >= count, (
                f"the stream ended after {len(self.events)} events: {self.events[-1:]}"
            )
            return len(self.events) >= count

        wait_until(enough, timeout, f"{count} events (have {len(self.events)})")
        return self.events[:count]

    def stop(self) -> None:
        self._stop.set()
        self.stream.close()
        self._thread.join(10)


#: Bytes of values written while a watcher does not read, their size each, and how
#: many go in one bulk request: a burst well within the 64 KiB a stream may queue
#: (see test_a_watcher_that_reads_is_not_dropped_for_one_large_write).
SLOW_VOLUME, VALUE_SIZE, PER_REQUEST = 50_000_000, 4000, 6
#: How much the daemon's memory may grow meanwhile: more than what it keeps by design
#: (a json container's history holds its last 1,000 events, about 4 MB of them; the
#: feed keeps its last 4,096 events as sent, about 34 MB of them, but see
#: test_the_daemons_memory_does_not_grow_with_the_size_of_the_values_streamed), less
#: than what is written, so that a stream that kept everything queued would fail it.
RSS_GROWTH_BOUND = 64 * 1024 * 1024


def test_a_slow_watcher_is_dropped_and_writers_keep_going(
    start_daemon, redis: RedisServer, channel: str
) -> None:
    """A stream nobody reads, while 50 MB of 4 KB values are written, in turn to a json and
    a Redis-backed container: the writers' requests all succeed, the stream is dropped
    (slow_reader), a stream that reads gets every event in order, and the daemon's memory
    stays bounded."""
    config = [json_entry("stats", settings={"fsync": False}), *json_and_redis_containers(redis)[1:]]
    daemon = start_daemon(config, args=["--watcher-buffer-bytes", "65536"])
    slow_before = gauge(daemon, "chanstore_watchers_ended_total", reason="slow_reader")

    reading = Stream(daemon, channel)
    reading.ready()
    collector = Collector(reading)
    # Never read, not even the head; a small receive buffer so that the kernel holds little.
    slow = Stream(daemon, channel, receive_buffer=4096, read_head=False)
    written: dict[str, list[tuple[str, str]]] = {"stats": [], "mana": []}
    try:
        wait_for_metric(daemon, "chanstore_watchers", 2)
        baseline = peak = rss_bytes(daemon)
        count = answered = 0
        with httpx.Client(base_url=daemon.url, timeout=30) as http:
            while count * VALUE_SIZE < SLOW_VOLUME:
                container = ("stats", "mana")[answered % 2]
                values = {}
                for _ in range(PER_REQUEST):
                    key, value = f"k{count % 64:02d}", f"{count:08d}".ljust(VALUE_SIZE, "x")
                    values[key] = value
                    written[container].append((key, value))
                    count += 1
                answer = http.post(key_path(channel, container) + "/-/set", json={"values": values})
                assert answer.status_code == 200, answer.text
                answered += 1
                peak = max(peak, rss_bytes(daemon))
        assert answered * PER_REQUEST == count

        wait_for_metric(
            daemon, "chanstore_watchers_ended_total", slow_before + 1, reason="slow_reader"
        )
        wait_for_metric(daemon, "chanstore_watchers", 1)
        events = collector.wait_for(count, timeout=60)
        for container, values in written.items():
            # In order within each container.
            got = [event for event in events if event.json["container"] == container]
            assert [(event.json["key"], event.json["value"]) for event in got] == values
            assert all(
                event.json["etag"] == etag_of(value)
                for event, (_key, value) in zip(got[:50], values, strict=False)
            )
        assert peak - baseline < RSS_GROWTH_BOUND, (baseline, peak)
    finally:
        collector.stop()
        slow.close()
    dropped = [
        record
        for record in daemon.events("watcher_closed")
        if record.get("reason") == "slow_reader"
    ]
    assert len(dropped) == 1, dropped
    wait_for_metric(daemon, "chanstore_watchers", 0)


def test_the_daemons_memory_does_not_grow_with_the_size_of_the_values_streamed(
    start_daemon, redis: RedisServer, channel: str
) -> None:
    """One stream reads every change of a Redis-backed container (whose history lives in
    Redis, 10 events of it) while 48 values of 500 KB are written over 4 keys: the
    daemon holds 4 values and a few in flight, so its memory grows by far less than the
    24 MB that went through it."""
    daemon = start_daemon(json_and_redis_containers(redis), args=["--event-history", "10"])
    with Stream(daemon, channel, "containers=mana") as stream:
        stream.ready()
        baseline = peak = rss_bytes(daemon)
        for number in range(48):
            value = f"{number:04d}".ljust(500_000, "x")
            stored(put(daemon, channel, "mana", f"k{number % 4}", value))
            event = stream.next_event()
            assert event.json["value"] == value
            peak = max(peak, rss_bytes(daemon))
    assert peak - baseline < 16 * 1024 * 1024, (baseline, peak)


def test_a_watcher_that_reads_is_not_dropped_for_one_large_write(
    start_daemon, redis: RedisServer, channel: str
) -> None:
    """``--watcher-buffer-bytes 65536`` and one ``-/set`` of 20 values of 4 KB (84 KB of
    events): a stream whose client reads gets all 20, and is not ended."""
    daemon = start_daemon(
        json_and_redis_containers(redis), args=["--watcher-buffer-bytes", "65536"]
    )
    values = {f"k{number:02d}": f"{number:02d}".ljust(VALUE_SIZE, "x") for number in range(20)}
    for container in ("stats", "mana"):
        with Stream(daemon, channel, f"containers={container}") as stream:
            stream.ready()
            bulk = daemon.http.post(
                key_path(channel, container) + "/-/set", json={"values": values}
            )
            assert bulk.status_code == 200, bulk.text
            stored(put(daemon, channel, container, "last", True))
            seen = []
            while not seen or (seen[-1].event == "set" and seen[-1].json["key"] != "last"):
                event = stream.next()
                assert event is not None, "the stream closed"
                if event.comment is None:
                    seen.append(event)
            assert [change(event) for event in seen] == [
                *(("set", key, value) for key, value in values.items()),
                ("set", "last", True),
            ], (container, seen[-1])
    assert gauge(daemon, "chanstore_watchers_ended_total", reason="slow_reader") == 0


# -- what the daemon tells of its streams ---------------------------------------------------------


def test_watchers_are_counted_and_logged(both: DaemonProcess, channel: str) -> None:
    wait_for_metric(both, "chanstore_watchers", 0)
    mark = both.log_size()
    sent_before = gauge(both, "chanstore_feed_events_sent_total")
    opened_before = requests_counted(both, "200")
    refused_before = requests_counted(both, "404")

    first = Stream(both, channel, "containers=stats")
    second = Stream(both, channel)
    try:
        first.ready()
        second.ready()
        wait_for_metric(both, "chanstore_watchers", 2)
        for number in range(3):
            stored(put(both, channel, "stats", "hp", number))
        assert len(first.events(3)) == len(second.events(3)) == 3
        wait_for_metric(both, "chanstore_feed_events_sent_total", sent_before + 6)

        first.close()
        wait_for_metric(both, "chanstore_watchers", 1)
    finally:
        first.close()
        second.close()
    wait_for_metric(both, "chanstore_watchers", 0)
    with Stream(both, channel, "containers=nosuch") as refused:
        assert refused.status == 404
    wait_until(
        lambda: requests_counted(both, "200") == opened_before + 2,
        SETTLE_TIMEOUT,
        "both streams counted under the feed's route",
    )
    assert requests_counted(both, "404") == refused_before + 1
    # No path of a channel of its own: the route is the template.
    assert channel not in both.metrics_text()

    opened = [
        record
        for record in both.events("watcher_opened", since=mark)
        if record.get("channel") == channel
    ]
    assert [sorted(record["containers"]) for record in opened] == [["stats"], ["mana", "stats"]]
    assert all(record["resumed"] is False for record in opened)

    def closed() -> list[dict[str, Any]] | None:
        found = [
            record
            for record in both.events("watcher_closed", since=mark)
            if record.get("channel") == channel
        ]
        return found if len(found) >= 2 else None

    records = wait_until(closed, SETTLE_TIMEOUT, "two watcher_closed records")
    assert [record["reason"] for record in records] == ["client", "client"]
