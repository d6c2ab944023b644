"""The daemon's HTTP door, held to its contract on the wire.

The door is the daemon's own HTTP/1.1 protocol: it parses requests, bounds
connections (head size, header, body and keep-alive timeouts, a connection
cap), keeps pipelined answers in order, and answers everything it refuses with
a JSON error ``{"error": sentence, "code": word}``. These tests talk to a real
``chanstore serve`` over raw sockets (door_support.Wire) and through real
clients (curl, httpx, http.client, wrk).

No test asserts how fast something happens: a timeout under test is set to
1 s and the test only waits (with a generous deadline) for what must follow.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon_harness import IN_CI, DaemonProcess, key_path, wait_until
from door_support import (
    TIMEOUT,
    UNMATCHED,
    Response,
    Wire,
    assert_error,
    chunked,
    chunked_put,
    count,
    metric_on_wire,
    request,
    rss_kib,
    sending,
    unread_by_server,
    wait_for_count,
)

from chanstore.versions import etag_of

#: conftest's ``start_daemon`` and ``daemon_with``.
StartDaemon = Callable[..., DaemonProcess]

TOKEN = "tok-door-Vb81"
#: The module daemon's --max-body-bytes (conftest.DOOR_MAX_BODY).
MAX_BODY = 200_000
#: The door's default --max-header-bytes.
MAX_HEADER_BYTES = 32768
#: How far above its baseline the daemon's RSS may go while a client misbehaves.
RSS_SLACK_KIB = 64 * 1024
#: A value of about 100 KB, as a JSON document (a string).
BIG_VALUE = json.dumps("x" * 100_000).encode()
#: How long a test waits to see that something does *not* happen (a close, an answer):
#: comfortably past the 1 s timeouts these tests set, so a sweep every second is seen.
QUIET = 3.0

REQUESTS = "chanstore_http_requests_total"
CONNECTIONS = "chanstore_http_connections"
CLOSED = "chanstore_http_connections_closed_total"


# -- helpers ----------------------------------------------------------------------------


def value_path(channel: str, key: str) -> str:
    return key_path(channel, "stats", key)


def stored(daemon: DaemonProcess, channel: str, key: str) -> Any:
    """The value the daemon holds under ``key`` of the test's channel (None when absent)."""
    response = daemon.get(channel, "stats", key)
    assert response.status_code in (200, 404), response.text
    return response.json() if response.status_code == 200 else None


def comparable(response: Response) -> tuple[int, bytes, dict[str, str]]:
    """A response without what differs between two identical requests."""
    headers = {k: v for k, v in response.headers.items() if k not in ("x-request-id", "date")}
    return response.status, response.body, headers


# -- errors and what the parser rejects -------------------------------------------------

TLS_CLIENT_HELLO = bytes.fromhex("16030100a5010000a10303") + bytes(range(32)) + b"\r\n\r\n"

#: (bytes sent, the method label the rejected request is counted under). ``{path}``
#: stands for a key of the test's channel; none of them may store anything there.
PARSER_REJECTS = [
    pytest.param(b"HELLO\r\n\r\n", "other", id="garbage-request-line"),
    pytest.param(TLS_CLIENT_HELLO, "other", id="tls-client-hello"),
    pytest.param(b"G(T /healthz HTTP/1.1\r\nHost: t\r\n\r\n", "other", id="invalid-method-token"),
    pytest.param(b"BREW /healthz HTTP/1.1\r\nHost: t\r\n\r\n", "other", id="unknown-method"),
    pytest.param(
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nNoColonHere\r\n\r\n",
        "GET",
        id="header-line-without-colon",
    ),
    pytest.param(
        b"PATCH /healthz HTTP/1.1\r\nHost: t\r\nNoColonHere\r\n\r\n",
        "other",
        id="header-line-without-colon-after-patch",
    ),
    pytest.param(
        b"PUT {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n1\r\n1\r\n0\r\n\r\n",
        "PUT",
        id="content-length-and-transfer-encoding",
    ),
    pytest.param(
        b"PUT {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n12",
        "PUT",
        id="two-content-lengths",
    ),
    pytest.param(
        b"PUT {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n1\r\n0\r\n\r\n",
        "PUT",
        id="bad-chunk-size",
    ),
]


@pytest.mark.parametrize(("data", "method_label"), PARSER_REJECTS)
def test_a_request_the_parser_rejects_gets_a_json_400_is_counted_and_closes(
    daemon: DaemonProcess, channel: str, data: bytes, method_label: str
) -> None:
    """A client sends bytes that are not valid HTTP/1.1: it gets 400 ``bad_request`` as a
    JSON error, the daemon closes the connection, nothing is stored, and the answer is
    counted under route "unmatched" (method "other" unless it is one the API knows)."""
    labels = {"method": method_label, "route": UNMATCHED, "status": "400"}
    before = count(daemon, REQUESTS, **labels)
    with Wire(daemon.port) as wire:
        wire.send(data.replace(b"{path}", value_path(channel, "k").encode()))
        assert_error(wire.read_response(), 400, "bad_request")
        assert wire.closed_within(TIMEOUT), "the connection stayed open after the parse error"
    wait_for_count(daemon, REQUESTS, before + 1, **labels)
    assert count(daemon, REQUESTS, **labels) == before + 1
    assert stored(daemon, channel, "k") is None


GZIPPED = gzip.compress(b'{"hp": 1}')
CODED_BODIES = [
    pytest.param(("Content-Encoding: gzip",), GZIPPED, 415, "gzip", id="content-gzip"),
    pytest.param(
        ("Content-Encoding: identity", "Content-Encoding: GZIP"),
        GZIPPED,
        415,
        "gzip",
        id="content-identity-then-gzip",
    ),
    pytest.param(
        ("Transfer-Encoding: gzip, chunked",),
        chunked(GZIPPED),
        400,
        "gzip",
        id="transfer-gzip-chunked",
    ),
]


@pytest.mark.parametrize(("headers", "body", "status", "coding"), CODED_BODIES)
def test_a_body_coded_in_a_way_not_undone_is_refused_for_what_it_is(
    daemon: DaemonProcess, channel: str, headers: tuple[str, ...], body: bytes, status: int,
    coding: str,
) -> None:  # fmt: skip
    """A client sends a gzipped body: it is told the coding is not supported (415 for a
    content coding, with ``Accept-Encoding: identity``; 400 for a transfer coding, not the
    501 RFC 9112 suggests, since a 5xx is the daemon's failure), not that its JSON is
    invalid; nothing is stored, and the connection closes (the body may still be coming)."""
    chunked_body = any(header.startswith("Transfer-Encoding") for header in headers)
    with Wire(daemon.port) as wire:
        wire.send(request("PUT", value_path(channel, "k"), body, headers,
                          length=not chunked_body))  # fmt: skip
        response = wire.read_response()
        error = assert_error(response, status, "unsupported_encoding")
        assert f"{coding!r} is not supported" in error["error"], error
        if status == 415:
            assert response.headers["accept-encoding"] == "identity"
        assert wire.closed_within(TIMEOUT), "the connection stayed open after the refusal"
    assert stored(daemon, channel, "k") is None


def test_a_body_in_identity_coding_and_a_coding_without_a_body_are_served(
    daemon: DaemonProcess, channel: str
) -> None:
    """``Content-Encoding: identity`` is no coding at all, and a GET that names a coding
    has no body to refuse: both are answered as if the header were not there."""
    path = value_path(channel, "k")
    with Wire(daemon.port) as wire:
        put, got = wire.exchange(
            request("PUT", path, b"5", ["Content-Encoding: identity"]),
            request("GET", path, headers=["Content-Encoding: gzip"]),
        )
    assert put.status == 200, put.describe()
    assert got.json() == 5


def test_every_api_error_is_json_with_a_code(daemon: DaemonProcess, channel: str) -> None:
    """A client makes each mistake the API answers with an error, on one connection: every
    answer is ``{"error": sentence, "code": word}`` as application/json, with the status
    and code that say what went wrong, and carries an x-request-id."""
    path = value_path(channel, "k")
    cases = [
        (request("GET", "/no/such/route"), 404, None),
        (request("PATCH", path, b"1"), 405, "method_not_allowed"),
        (request("PUT", path, b"{not json"), 400, "bad_request"),
        (request("PUT", path, b""), 400, "bad_request"),
        (request("GET", key_path(channel, "no-such-container", "k")), 404, "unknown_container"),
        (request("GET", value_path(channel, "absent")), 404, "not_found"),
        (request("DELETE", value_path(channel, "absent")), 404, "not_found"),
        (request("GET", key_path(channel, "stats") + "?limit=10001"), 400, "bad_request"),
        (
            request("POST", key_path(channel, "stats") + "/-/get", b'{"keys": 3}'),
            400,
            "bad_request",
        ),
        (request("PUT", value_path(channel, "k" * 5000), b"1"), 400, "bad_request"),
    ]
    with Wire(daemon.port) as wire:
        for data, status, code in cases:
            [response] = wire.exchange(data)
            assert_error(response, status, code)
            assert response.headers.get("x-request-id"), response.describe()
    assert stored(daemon, channel, "k") is None


# -- the request head: size and timeout ---------------------------------------------------


def test_a_large_head_under_the_limit_is_served(daemon: DaemonProcess) -> None:
    """A client sends a request whose head is large but under the default 32 KiB limit
    (one long header, then many headers): each is served."""
    one_long = request("GET", "/healthz", headers=["X-Pad: " + "a" * (MAX_HEADER_BYTES - 2048)])
    many = request("GET", "/healthz", headers=[f"X-Pad-{i}: {'b' * 40}" for i in range(500)])
    assert MAX_HEADER_BYTES - 4096 < len(one_long) < MAX_HEADER_BYTES - 1024
    assert MAX_HEADER_BYTES - 8192 < len(many) < MAX_HEADER_BYTES - 1024
    with Wire(daemon.port) as wire:
        assert [r.status for r in wire.exchange(one_long, many)] == [200, 200]


@pytest.mark.parametrize(
    "data",
    [
        request("GET", "/healthz", headers=["X-Pad: " + "a" * (MAX_HEADER_BYTES + 4096)]),
        request("GET", "/healthz", headers=[f"X-Pad-{i}: {'b' * 40}" for i in range(800)]),
        request("GET", "/healthz?" + "q" * (MAX_HEADER_BYTES + 4096)),
    ],
    ids=["one-long-header", "many-headers", "long-request-line"],
)
def test_a_head_over_the_limit_gets_431_and_a_close(daemon: DaemonProcess, data: bytes) -> None:
    """A client sends a request head (request line and headers) over the default
    --max-header-bytes of 32 KiB: it gets 431 ``header_too_large`` and the daemon closes."""
    assert len(data) > MAX_HEADER_BYTES + 1024
    with Wire(daemon.port) as wire:
        wire.send(data)  # may fail half-way: the daemon can answer before it has it all
        assert_error(wire.read_response(), 431, "header_too_large")
        assert wire.closed_within(TIMEOUT)


def test_max_header_bytes_sets_the_limit(daemon_with: StartDaemon) -> None:
    """An operator starts the daemon with --max-header-bytes 2048: a 1.5 KB head is
    served, a 3 KB head gets 431 ``header_too_large`` and a close."""
    daemon = daemon_with("--max-header-bytes", "2048")
    small = request("GET", "/healthz", headers=["X-Pad: " + "a" * 1400])
    large = request("GET", "/healthz", headers=["X-Pad: " + "a" * 3000])
    with Wire(daemon.port) as wire:
        assert [r.status for r in wire.exchange(small)] == [200]
        wire.send(large)
        assert_error(wire.read_response(), 431, "header_too_large")
        assert wire.closed_within(TIMEOUT)


def test_an_endless_header_is_refused_long_before_it_ends(daemon: DaemonProcess) -> None:
    """A client streams one header line that never ends: the daemon answers 431 (or
    closes) after reading little of it; the client could not push 8 MiB into it."""
    limit = 8 * 1024 * 1024
    sent = 0
    with Wire(daemon.port) as wire:
        wire.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Endless: ")
        deadline = time.monotonic() + TIMEOUT
        while sent < limit and not wire.readable() and time.monotonic() < deadline:
            pushed = wire.push(b"a" * 65536, 0.5)
            if pushed is None:
                break
            sent += pushed
        assert sent < limit, "the daemon kept reading an endless header"
        data = wire.bytes_until_close()
    assert data == b"" or data.startswith(b"HTTP/1.1 431 "), data[:300]
    if data:
        assert b"header_too_large" in data, data[:300]


def test_a_partial_head_gets_408_header_timeout_then_a_close(daemon_with: StartDaemon) -> None:
    """With --header-timeout 1, a client sends part of a request head and stops: it gets
    408 ``header_timeout``, the connection is closed, and the close is counted."""
    daemon = daemon_with("--header-timeout", "1")
    before = count(daemon, CLOSED, reason="header_timeout")
    with Wire(daemon.port) as wire:
        wire.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Half: ")
        assert_error(wire.read_response(timeout=TIMEOUT), 408, "header_timeout")
        assert wire.closed_within(TIMEOUT)
    wait_for_count(daemon, CLOSED, before + 1, reason="header_timeout")


def test_a_connection_that_sends_nothing_is_closed_silently(daemon_with: StartDaemon) -> None:
    """With --header-timeout 1, a client connects and sends nothing: the daemon closes the
    connection without sending a byte, and counts the close as a header timeout."""
    daemon = daemon_with("--header-timeout", "1")
    before = count(daemon, CLOSED, reason="header_timeout")
    with Wire(daemon.port) as wire:
        assert wire.closed_within(TIMEOUT), "an empty connection was held open"
    wait_for_count(daemon, CLOSED, before + 1, reason="header_timeout")


def test_a_head_trickled_byte_by_byte_still_times_out(daemon_with: StartDaemon) -> None:
    """With --header-timeout 1, a client sends a head one byte every 0.2 s and never
    finishes it (slowloris): the timeout bounds the whole head, not the gap between
    bytes, so the client gets 408 ``header_timeout`` and a close."""
    daemon = daemon_with("--header-timeout", "1")
    with Wire(daemon.port) as wire:
        trickle = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 10_000
        deadline = time.monotonic() + TIMEOUT
        for byte in trickle:
            if wire.readable() or time.monotonic() > deadline or not wire.send(bytes([byte])):
                break
            time.sleep(0.2)  # the trickle's pace is the point of this test
        assert_error(wire.read_response(), 408, "header_timeout")
        assert wire.closed_within(TIMEOUT)


def test_between_requests_a_connection_is_not_held_to_the_header_timeout(
    daemon_with: StartDaemon,
) -> None:
    """With --header-timeout 1 (and the default 30 s keep-alive timeout), a client makes
    a request and then waits 3 s before the next one: the connection is idle, not slow
    to send a head, so it stays open and the next request is served."""
    daemon = daemon_with("--header-timeout", "1")
    with Wire(daemon.port) as wire:
        assert [r.status for r in wire.exchange(request("GET", "/healthz"))] == [200]
        assert not wire.closed_within(QUIET)
        assert [r.status for r in wire.exchange(request("GET", "/healthz"))] == [200]


# -- keep-alive idle timeout --------------------------------------------------------------


def test_an_idle_keep_alive_connection_is_closed(daemon_with: StartDaemon) -> None:
    """With --keep-alive-timeout 1, a client makes a request and then stays idle: the
    daemon closes the connection (sending nothing) and counts an idle_timeout close."""
    daemon = daemon_with("--keep-alive-timeout", "1")
    before = count(daemon, CLOSED, reason="idle_timeout")
    with Wire(daemon.port) as wire:
        assert [r.status for r in wire.exchange(request("GET", "/healthz"))] == [200]
        assert wire.closed_within(TIMEOUT), "an idle keep-alive connection was held open"
    wait_for_count(daemon, CLOSED, before + 1, reason="idle_timeout")


@pytest.mark.parametrize("cut", ["in-the-head", "in-the-body"])
def test_the_idle_timer_spares_a_pipelined_request_still_arriving(
    daemon_with: StartDaemon, channel: str, cut: str
) -> None:
    """With --keep-alive-timeout 1, a client pipelines a GET and the start of a PUT, then
    sends the rest of the PUT 3 s later: the connection had a request in progress all
    along, so it is not closed; both are answered and the PUT is stored."""
    daemon = daemon_with("--keep-alive-timeout", "1")
    put = request("PUT", value_path(channel, "late"), b'{"late": "yes"}')
    split = put.index(b"Content-Length") if cut == "in-the-head" else len(put) - 6
    with Wire(daemon.port) as wire:
        wire.send(request("GET", "/healthz") + put[:split])
        assert wire.read_response().status == 200
        assert not wire.closed_within(QUIET), "the idle timer closed a request in progress"
        wire.send(put[split:])
        assert wire.read_response().status == 200
    assert stored(daemon, channel, "late") == {"late": "yes"}


def test_the_idle_timer_spares_answers_waiting_for_a_slow_reader(
    daemon_with: StartDaemon, channel: str
) -> None:
    """With --keep-alive-timeout 1, a client pipelines 40 GETs of a 100 KB value and reads
    nothing for 3 s: the daemon is still answering (its writes wait for the client), so
    it keeps the connection, and every answer arrives once the client reads."""
    daemon = daemon_with("--keep-alive-timeout", "1")
    assert daemon.http.put(value_path(channel, "big"), content=BIG_VALUE).status_code == 200
    with Wire(daemon.port) as wire, sending(wire, request("GET", value_path(channel, "big")) * 40):
        time.sleep(QUIET)  # the client does not read: that is the point of this test
        responses = [wire.read_response() for _ in range(40)]
    assert [(r.status, r.body == BIG_VALUE) for r in responses] == [(200, True)] * 40


# -- the body: deadline and size ----------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_that_stops_coming_gets_408_body_timeout(
    daemon_with: StartDaemon, channel: str, framing: str
) -> None:
    """With --body-timeout 1, a client sends a PUT's head and part of its body, then
    nothing: it gets 408 ``body_timeout``, the connection is closed (and counted as a
    body_timeout close), and nothing is stored."""
    daemon = daemon_with("--body-timeout", "1")
    path = value_path(channel, "slow")
    if framing == "chunked":
        data = chunked_put(path, b'{"a": 1}')[:-5]  # without the last chunk
    else:
        data = request("PUT", path, b'{"a": 1}')[:-3]
    before = count(daemon, CLOSED, reason="body_timeout")
    with Wire(daemon.port) as wire:
        wire.send(data)
        assert_error(wire.read_response(timeout=TIMEOUT), 408, "body_timeout")
        assert wire.closed_within(TIMEOUT)
    wait_for_count(daemon, CLOSED, before + 1, reason="body_timeout")
    assert stored(daemon, channel, "slow") is None


def test_a_body_at_the_limit_is_stored(daemon: DaemonProcess, channel: str) -> None:
    """A client PUTs a body of exactly --max-body-bytes: it is not over the limit; stored."""
    body = json.dumps("y" * (MAX_BODY - 2)).encode()
    assert len(body) == MAX_BODY
    with Wire(daemon.port) as wire:
        [response] = wire.exchange(request("PUT", value_path(channel, "k"), body))
    assert response.status == 200, response.describe()
    assert stored(daemon, channel, "k") == "y" * (MAX_BODY - 2)


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(
    daemon: DaemonProcess, channel: str
) -> None:
    """A client announces a body one byte over --max-body-bytes and waits before sending
    it: it gets 413 ``body_too_large`` at once, then the connection is closed."""
    with Wire(daemon.port) as wire:
        wire.send(
            request(
                "PUT",
                value_path(channel, "k"),
                length=False,
                headers=[f"Content-Length: {MAX_BODY + 1}"],
            )
        )
        assert_error(wire.read_response(), 413, "body_too_large")
        assert wire.closed_within(TIMEOUT)
    assert stored(daemon, channel, "k") is None


def test_a_chunked_body_is_refused_once_it_passes_the_limit(
    daemon: DaemonProcess, channel: str
) -> None:
    """A client sends a chunked PUT, 16 KiB a chunk, without end: once the body passes
    --max-body-bytes it gets 413 ``body_too_large`` and a close; nothing is stored."""
    piece = b"%x\r\n%s\r\n" % (16384, b"7" * 16384)
    with Wire(daemon.port) as wire:
        wire.send(
            request(
                "PUT",
                value_path(channel, "k"),
                length=False,
                headers=["Transfer-Encoding: chunked"],
            )
        )
        # The kernel's buffers take a few MiB whatever the daemon does; past that, the
        # client can only send more if the daemon keeps taking the body.
        most = 4 * MAX_BODY + 16 * 1024 * 1024
        sent = 0
        deadline = time.monotonic() + TIMEOUT
        while sent < most and not wire.readable() and time.monotonic() < deadline:
            pushed = wire.push(piece, 0.5)
            if pushed is None:
                break
            sent += pushed
            if pushed and pushed < len(piece):
                wire.send(piece[pushed:])  # keep the chunks whole
                sent += len(piece) - pushed
        assert sent < most, "the daemon kept reading a chunked body past the limit"
        assert_error(wire.read_response(), 413, "body_too_large")
        assert wire.closed_within(TIMEOUT)
    assert stored(daemon, channel, "k") is None


# -- connections: the cap, eviction, counting --------------------------------------------


def hold_alone(daemon: DaemonProcess) -> Wire:
    """A connection to a fresh daemon, once the daemon counts it as its only one (the
    harness's start-up probe has gone)."""
    wire = Wire(daemon.port)
    wait_until(
        lambda: metric_on_wire(wire, CONNECTIONS) == 1,
        TIMEOUT,
        "the daemon to hold only this connection",
    )
    return wire


def test_connections_are_counted_open_and_closed_by_the_client(start_daemon: StartDaemon) -> None:
    """Clients open three connections and close them: the gauge of open connections goes
    up by three and back down, and three closes are counted with reason "client"."""
    daemon = start_daemon()
    with hold_alone(daemon) as watcher:
        others = [Wire(daemon.port) for _ in range(3)]
        for other in others:
            assert [r.status for r in other.exchange(request("GET", "/healthz"))] == [200]
        assert metric_on_wire(watcher, CONNECTIONS) == 4
        for other in others:
            other.close()
        wait_until(
            lambda: (metric_on_wire(watcher, CLOSED, reason="client") or 0) >= 3,
            TIMEOUT,
            "three client closes to be counted",
        )
        assert metric_on_wire(watcher, CONNECTIONS) == 1


def test_at_the_cap_a_new_connection_evicts_the_longest_idle_one(
    start_daemon: StartDaemon,
) -> None:
    """With --max-connections 4 and four idle keep-alive connections open, a fifth client
    connects: it is served, the connection idle longest is closed (an "evicted" close),
    the other three stay open, and no more than four are ever open."""
    daemon = start_daemon(args=["--max-connections", "4"])
    oldest = hold_alone(daemon)  # its last request (the metrics poll) is the oldest
    rest = [Wire(daemon.port) for _ in range(3)]
    for wire in rest:
        assert [r.status for r in wire.exchange(request("GET", "/healthz"))] == [200]
    with Wire(daemon.port) as newcomer:
        assert [r.status for r in newcomer.exchange(request("GET", "/healthz"))] == [200]
        assert oldest.closed_within(TIMEOUT), "the longest-idle connection was not evicted"
        assert not any(wire.closed_within(0.2) for wire in rest)
        assert (metric_on_wire(newcomer, CLOSED, reason="evicted") or 0) >= 1
        assert metric_on_wire(newcomer, CONNECTIONS) <= 4
    for wire in [oldest, *rest]:
        wire.close()


def test_at_the_cap_with_no_idle_connection_a_new_one_gets_503(
    start_daemon: StartDaemon,
) -> None:
    """With --max-connections 2 and both connections in the middle of a request, a third
    client connects: it gets 503 ``too_many_connections`` and a close (a "refused" close);
    the two requests in progress are not disturbed and are answered when complete."""
    daemon = start_daemon(args=["--max-connections", "2"])
    first = hold_alone(daemon)
    second = Wire(daemon.port)
    half = request("GET", "/healthz")
    for wire in (first, second):
        wire.send(half[:20])
    for wire in (first, second):  # the daemon has read the halves: both are in progress
        wait_until(lambda wire=wire: unread_by_server(wire) == 0, TIMEOUT, "the daemon to read")
    with Wire(daemon.port) as third:
        assert_error(third.read_response(), 503, "too_many_connections")
        assert third.closed_within(TIMEOUT)
    for wire in (first, second):
        wire.send(half[20:])
        assert wire.read_response().status == 200
    assert (metric_on_wire(first, CLOSED, reason="refused") or 0) >= 1
    first.close()
    second.close()


# -- pipelining ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"G(T /healthz HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bad_request"),
        (request("GET", "/healthz", headers=["X-Pad: " + "a" * 40_000]), 431, "header_too_large"),
        (
            request(
                "PUT",
                "/v1/channels/c/stats/k",
                length=False,
                headers=[f"Content-Length: {MAX_BODY + 1}"],
            ),
            413,
            "body_too_large",
        ),
    ],
    ids=["garbage", "invalid-method", "head-too-large", "body-too-large"],
)
def test_an_error_never_overtakes_earlier_answers(
    daemon: DaemonProcess, channel: str, tail: bytes, status: int, code: str
) -> None:
    """A client sends, in one write, a PUT, a GET of the same key, and then a request the
    door refuses: it gets 200 for the PUT, 200 with the new value for the GET, then the
    error, in that order, then the connection closes; the PUT is stored."""
    path = value_path(channel, "ordered")
    with Wire(daemon.port) as wire:
        wire.send(request("PUT", path, b'{"n": 1}') + request("GET", path) + tail)
        put, get = wire.read_response(), wire.read_response()
        assert (put.status, get.status, get.json()) == (200, 200, {"n": 1})
        assert_error(wire.read_response(), status, code)
        assert wire.closed_within(TIMEOUT)
    assert stored(daemon, channel, "ordered") == {"n": 1}


def test_many_pipelined_requests_are_answered_in_order(daemon: DaemonProcess, channel: str) -> None:
    """A client pipelines 200 requests of every kind (PUTs, cached and uncached GETs,
    404s, DELETEs, HEADs, bulk reads) in one write: the answers come in request order."""
    requests: list[bytes] = []
    expected: list[tuple[int, bytes | None]] = []
    for n in range(25):
        path = value_path(channel, f"k{n}")
        requests += [
            request("PUT", path, b"%d" % n),
            request("GET", path),
            request("HEAD", path),
            request("GET", value_path(channel, f"absent{n}")),
            request("POST", key_path(channel, "stats") + "/-/get", b'{"keys": ["k%d"]}' % n),
            request("DELETE", path),
            request("GET", path),
            request("GET", "/healthz"),
        ]
        expected += [
            (200, None),
            (200, b"%d" % n),
            (200, b""),
            (404, None),
            (
                200,
                b'{"values":{"k%d":%d},"missing":[],"etags":{"k%d":"%s"}}'
                % (n, n, n, etag_of(n).encode()),
            ),
            (200, None),
            (404, None),
            (200, None),
        ]
    with Wire(daemon.port) as wire:
        responses = wire.exchange(*requests)
    assert [r.status for r in responses] == [status for status, _ in expected]
    for response, (_, body) in zip(responses, expected, strict=True):
        if body == b"":  # a HEAD's
            assert response.body == b"", response.describe()
        elif body is not None:
            assert response.json() == json.loads(body), response.describe()


def test_large_bodies_pipelined_between_small_requests_are_answered_in_order(
    daemon: DaemonProcess, channel: str
) -> None:
    """A client sends, in one write, large PUTs (about 100 KB each, by Content-Length and
    chunked) each followed by a GET of its key, then a request the parser rejects: each
    GET answers the value just put, byte for byte, and the error comes last."""
    values = [json.dumps(f"{n}" * 100_000).encode() for n in range(3)]
    requests = [
        request("PUT", value_path(channel, "big0"), values[0]),
        request("GET", value_path(channel, "big0")),
        chunked_put(value_path(channel, "big1"), values[1][:70_000], values[1][70_000:]),
        request("GET", value_path(channel, "big1")),
        request("PUT", value_path(channel, "big2"), values[2]),
        request("GET", value_path(channel, "big2")),
    ]
    with Wire(daemon.port) as wire:
        wire.send(b"".join(requests) + b"HELLO\r\n\r\n")
        answers = [wire.read_response() for _ in requests]
        assert [a.status for a in answers] == [200] * len(requests)
        assert [answers[i].body for i in (1, 3, 5)] == values
        assert_error(wire.read_response(), 400, "bad_request")
        assert wire.closed_within(TIMEOUT)


# -- Expect: 100-continue ----------------------------------------------------------------


def test_expect_100_continue_gets_100_then_the_answer(daemon: DaemonProcess, channel: str) -> None:
    """A client sends a PUT's head with ``Expect: 100-continue`` and waits: it gets
    ``HTTP/1.1 100 Continue``, sends the body, and gets 200; the value is stored."""
    body = b'{"continued": true}'
    data = request("PUT", value_path(channel, "k"), body, ["Expect: 100-continue"])
    with Wire(daemon.port) as wire:
        wire.send(data[: -len(body)])
        interim = wire.read_response()
        assert (interim.version, interim.status) == ("HTTP/1.1", 100), interim.describe()
        wire.send(body)
        assert wire.read_response().status == 200
        assert [r.status for r in wire.exchange(request("GET", "/healthz"))] == [200]
    assert stored(daemon, channel, "k") == {"continued": True}


def test_expect_100_continue_with_the_body_sent_at_once(
    daemon: DaemonProcess, channel: str
) -> None:
    """A client sends ``Expect: 100-continue`` but does not wait (as curl does after a
    second): whatever interim answer comes, the final one is 200 and the value is stored."""
    data = request("PUT", value_path(channel, "k"), b"[1]", ["Expect: 100-continue"])
    with Wire(daemon.port) as wire:
        wire.send(data)
        interim, final = wire.read_final()
        assert [r.status for r in interim] in ([], [100])
        assert final.status == 200
        assert [r.status for r in wire.exchange(request("GET", "/healthz"))] == [200]
    assert stored(daemon, channel, "k") == [1]


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("no-token", 401, "unauthorized"),
        ("body-too-large", 413, "body_too_large"),
        ("unknown-route", 404, None),
    ],
)
def test_a_refused_request_gets_its_answer_without_100_continue(
    daemon: DaemonProcess,
    daemon_with: StartDaemon,
    channel: str,
    case: str,
    status: int,
    code: str | None,
) -> None:
    """A client sends a head with ``Expect: 100-continue`` for a request that will be
    refused (no token while auth is on, a body over the limit, a route that does not
    exist): it gets the final error at once, never ``100 Continue``, then a close."""
    if case == "no-token":
        target = daemon_with(token=TOKEN)
        head = request(
            "PUT",
            value_path(channel, "k"),
            length=False,
            headers=["Expect: 100-continue", "Content-Length: 5"],
        )
    elif case == "body-too-large":
        target = daemon
        head = request(
            "PUT",
            value_path(channel, "k"),
            length=False,
            headers=["Expect: 100-continue", f"Content-Length: {MAX_BODY + 1}"],
        )
    else:
        target = daemon
        head = request(
            "PUT",
            "/no/such/route",
            length=False,
            headers=["Expect: 100-continue", "Content-Length: 5"],
        )
    with Wire(target.port) as wire:
        wire.send(head)
        assert_error(wire.read_response(), status, code)
        assert wire.closed_within(TIMEOUT)
    assert stored(target, channel, "k") is None


# -- chunked bodies, HTTP/1.0, Host, Authorization, Content-Length -------------------------


def test_a_chunked_put_is_stored(daemon: DaemonProcess, channel: str) -> None:
    """A client PUTs a value with ``Transfer-Encoding: chunked``, its chunks (one with a
    chunk extension) in separate writes: the value is stored and the connection stays
    usable."""
    path = value_path(channel, "chunked")
    head = request("PUT", path, length=False, headers=["Transfer-Encoding: chunked"])
    with Wire(daemon.port) as wire:
        wire.send_in_pieces(
            head + b'5;note=x\r\n{"a":\r\n' + chunked(b" [1, 2", b"]}"),
            [len(head), len(head) + 18, len(head) + 27],
        )
        assert wire.read_response().status == 200
        [get] = wire.exchange(request("GET", path))
    assert get.json() == {"a": [1, 2]}


def test_http_1_0_is_answered_then_closed(daemon: DaemonProcess, channel: str) -> None:
    """A client speaks HTTP/1.0 (no Host header, no keep-alive): a GET and a PUT are
    answered, and the daemon closes the connection after each."""
    with Wire(daemon.port) as wire:
        [get] = wire.exchange(request("GET", "/healthz", version="HTTP/1.0", host=None))
        assert get.status == 200
        assert wire.closed_within(TIMEOUT)
    with Wire(daemon.port) as wire:
        put = request("PUT", value_path(channel, "old"), b"10", version="HTTP/1.0", host=None)
        assert [r.status for r in wire.exchange(put)] == [200]
        assert wire.closed_within(TIMEOUT)
    assert stored(daemon, channel, "old") == 10


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9"])
def test_a_version_the_door_does_not_speak_is_refused_and_stores_nothing(
    daemon: DaemonProcess, channel: str, version: str
) -> None:
    """A client writes a request line naming HTTP/2.0 (the text form, which HTTP/2 never
    sends) or HTTP/0.9, which the parser lets through: it gets a 400 naming the version
    (as the parser answers HTTP/1.2; not 505, since a 5xx is the daemon's failure), not an
    HTTP/1.1 answer it did not ask for; nothing is stored, and the connection closes."""
    with Wire(daemon.port) as wire:
        wire.send(request("PUT", value_path(channel, "k"), b"1", version=version))
        error = assert_error(wire.read_response(), 400, "unsupported_version")
        assert error["error"].startswith(f"{version} is not supported"), error
        assert wire.closed_within(TIMEOUT)
    assert stored(daemon, channel, "k") is None


def test_http_1_0_with_keep_alive_keeps_the_connection(daemon: DaemonProcess) -> None:
    """A client speaks HTTP/1.0 with ``Connection: keep-alive``: its requests are answered
    on one connection, which the daemon leaves open."""
    keep = request("GET", "/healthz", headers=["Connection: keep-alive"], version="HTTP/1.0")
    with Wire(daemon.port) as wire:
        assert [r.status for r in wire.exchange(keep)] == [200]
        assert not wire.closed_within(0.5)
        assert [r.status for r in wire.exchange(keep, keep)] == [200, 200]


def test_an_http_1_1_request_without_host_gets_400(daemon: DaemonProcess, channel: str) -> None:
    """A client sends an HTTP/1.1 request without a Host header: it gets 400
    ``bad_request`` saying that Host is missing; its PUT is not stored."""
    with Wire(daemon.port) as wire:
        wire.send(request("PUT", value_path(channel, "k"), b"1", host=None))
        body = assert_error(wire.read_response(), 400, "bad_request")
    assert "host" in body["error"].lower(), body
    assert stored(daemon, channel, "k") is None


@pytest.mark.parametrize(
    "tokens",
    [(TOKEN, TOKEN), (TOKEN, "wrong"), ("wrong", TOKEN)],
    ids=["both-right", "right-then-wrong", "wrong-then-right"],
)
def test_two_authorization_headers_get_400_on_every_route(
    daemon_with: StartDaemon, channel: str, tokens: tuple[str, str]
) -> None:
    """A client sends two Authorization headers (the right token in one, or both): every
    route answers 400 ``bad_request`` (cached and uncached reads, writes, listing, bulk),
    so no two code paths can read them differently; nothing changes."""
    daemon = daemon_with(token=TOKEN)
    assert daemon.put(channel, "stats", "cached", 1).status_code == 200
    auth = [f"Authorization: Bearer {token}" for token in tokens]
    base = key_path(channel, "stats")
    requests = [
        request("GET", value_path(channel, "cached"), headers=auth),
        request("GET", value_path(channel, "uncached"), headers=auth),
        request("HEAD", value_path(channel, "cached"), headers=auth),
        request("PUT", value_path(channel, "new"), b"2", auth),
        request("DELETE", value_path(channel, "cached"), headers=auth),
        request("GET", base, headers=auth),
        request("POST", base + "/-/get", b'{"keys": ["cached"]}', auth),
        request("POST", base + "/-/set", b'{"values": {"new": 3}}', auth),
        request("POST", "/-/reload", headers=auth),
    ]
    for data in requests:
        with Wire(daemon.port) as wire:
            wire.send(data)
            response = wire.read_response(head=data.startswith(b"HEAD"))
            if data.startswith(b"HEAD"):
                assert response.status == 400, response.describe()
            else:
                assert_error(response, 400, "bad_request")
    assert daemon.get(channel, "stats", "cached").json() == 1
    assert daemon.get(channel, "stats", "new").status_code == 404


@pytest.mark.parametrize(
    "header",
    ["Content-Length: 1 ", "Content-Length:1", "Content-Length:  1"],
    ids=["trailing-space", "no-space", "two-spaces"],
)
def test_content_length_with_optional_whitespace_is_accepted(
    daemon: DaemonProcess, channel: str, header: str
) -> None:
    """A client sends ``Content-Length`` with legal optional whitespace around the
    number (``Content-Length: 1 ``): the PUT is stored."""
    with Wire(daemon.port) as wire:
        data = request("PUT", value_path(channel, "ows"), b"7", [header], length=False)
        assert [r.status for r in wire.exchange(data)] == [200]
    assert stored(daemon, channel, "ows") == 7


# -- HEAD -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["cached-key", "absent-key", "container", "/healthz", "/readyz", "/metrics"],
)
def test_head_answers_with_gets_headers_and_no_body(
    daemon: DaemonProcess, channel: str, target: str
) -> None:
    """A client sends HEAD then GET of the same address on one connection: HEAD gets the
    GET's status and headers (its Content-Length is the GET body's) and no body, so the
    GET's answer right after it parses cleanly."""
    assert daemon.put(channel, "stats", "HP", {"hp": [1, 2, 3]}).status_code == 200
    path = {
        "cached-key": value_path(channel, "HP"),
        "absent-key": value_path(channel, "absent"),
        "container": key_path(channel, "stats"),
    }.get(target, target)
    with Wire(daemon.port) as wire:
        head, get = wire.exchange(request("HEAD", path), request("GET", path))
        assert [r.status for r in wire.exchange(request("GET", "/healthz"))] == [200]
    assert head.status == get.status
    assert head.body == b""
    assert head.headers["content-length"].isdigit()
    if target == "/metrics":  # the page changes between two requests
        del head.headers["content-length"], get.headers["content-length"]
    assert comparable(head)[2] == comparable(get)[2]
    if "content-length" in get.headers:
        assert int(head.headers["content-length"]) == len(get.body)


# -- backpressure -------------------------------------------------------------------------


def test_answers_held_back_by_a_late_reader_all_arrive_in_order(
    daemon: DaemonProcess, channel: str
) -> None:
    """A client pipelines 1,000 GETs of a 100 KB value (100 MB of answers) and a GET of
    /healthz, and reads nothing for a second: the daemon stops producing answers it
    cannot send (its memory stays within 64 MiB of where it was), and when the client
    reads, all 1,001 answers arrive, complete and in order."""
    path = value_path(channel, "big")
    assert daemon.http.put(path, content=BIG_VALUE).status_code == 200
    assert daemon.http.get(path).content == BIG_VALUE  # cached from here on
    pid = daemon.process.pid
    baseline = peak = rss_kib(pid)
    gets = 1000
    data = request("GET", path) * gets + request("GET", "/healthz")
    with Wire(daemon.port) as wire, sending(wire, data):
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # the client reads nothing meanwhile
            peak = max(peak, rss_kib(pid))
            time.sleep(0.05)
        responses = []
        for _ in range(gets):
            response = wire.read_response()
            responses.append((response.status, response.body == BIG_VALUE))
            peak = max(peak, rss_kib(pid)) if len(responses) % 100 == 0 else peak
        last = wire.read_response()
    print(f"RSS baseline {baseline} KiB, peak {peak} KiB (+{(peak - baseline) / 1024:.1f} MiB)")
    assert responses == [(200, True)] * gets
    assert last.status == 200 and last.json()["status"] == "serving"
    assert peak - baseline < RSS_SLACK_KIB


# -- paths, request ids, routes --------------------------------------------------------------

#: Percent-encoded key segments and the key each means, decoded exactly once.
ENCODED_KEYS = {
    "a%2Fb": "a/b",
    "%252F": "%2F",
    "%2E": ".",
    "%2E%2E": "..",
    "sp%20ace": "sp ace",
    "%C3%A9t%C3%A9": "été",
    "q%3Fx%23y": "q?x#y",
    "plus+sign": "plus+sign",
    "%25": "%",
}


def test_keys_and_channel_ids_are_percent_decoded_once(daemon: DaemonProcess, channel: str) -> None:
    """A client PUTs keys whose path segments are percent-encoded (``%2F``, ``%252F``,
    ``%2E%2E``, UTF-8, ...) into a channel whose id is percent-encoded too: each segment
    is decoded exactly once (``%252F`` is the key ``%2F``), a key spelled with other
    escapes (``%61%2Fb``) is the same key, and every answer carries an x-request-id."""
    encoded_channel = "c%2F" + channel
    base = f"/v1/channels/{encoded_channel}/stats"
    with Wire(daemon.port) as wire:
        puts = wire.exchange(
            *[
                request("PUT", f"{base}/{raw}", json.dumps(key).encode())
                for raw, key in ENCODED_KEYS.items()
            ]
        )
        gets = wire.exchange(*[request("GET", f"{base}/{raw}") for raw in ENCODED_KEYS])
        [same] = wire.exchange(request("GET", f"{base}/%61%2F%62"))
        [listing] = wire.exchange(request("GET", base))
    assert [r.status for r in puts] == [200] * len(ENCODED_KEYS)
    assert [r.json() for r in gets] == list(ENCODED_KEYS.values())
    assert same.json() == "a/b"
    assert sorted(listing.json()["keys"]) == sorted(ENCODED_KEYS.values())  # (order: below)
    assert sorted(daemon.keys("c/" + channel, "stats")) == sorted(ENCODED_KEYS.values())
    ids = [r.headers.get("x-request-id") for r in [*puts, *gets, same, listing]]
    assert all(ids) and len(set(ids)) == len(ids), ids


def test_each_form_of_request_target_is_answered_and_none_crashes(
    daemon: DaemonProcess, channel: str
) -> None:
    """A client names what it asks for in each form RFC 9112 gives a request target, on one
    connection: the absolute form (``http://host/path``, what a client sends to a proxy,
    which every server must accept) reaches the same key as the path does, a fragment
    included; the asterisk form (``OPTIONS *``) gets a 400 that names it, not a crash;
    and the connection serves on."""
    path = value_path(channel, "k")
    with Wire(daemon.port) as wire:
        put, got, fragment, asterisk, after = wire.exchange(
            request("PUT", f"http://test{path}", b"7"),
            request("GET", f"HTTP://test:8470{path}"),
            request("GET", f"{path}#ignored"),
            request("OPTIONS", "*"),
            request("GET", path),
        )
    assert put.status == 200, put.describe()
    assert [got.json(), fragment.json(), after.json()] == [7, 7, 7]
    error = assert_error(asterisk, 400, "bad_request")
    assert error["error"].startswith("the request target '*' is not a path"), error


def test_a_sane_request_id_is_echoed(daemon: DaemonProcess) -> None:
    """A client sends ``X-Request-Id: door-42``: the answer carries the same id."""
    with Wire(daemon.port) as wire:
        [response] = wire.exchange(request("GET", "/healthz", headers=["X-Request-Id: door-42"]))
    assert response.headers["x-request-id"] == "door-42"


def list_page(daemon: DaemonProcess, channel: str, **query: Any) -> dict[str, Any]:
    response = daemon.http.get(key_path(channel, "stats"), params=query)
    assert response.status_code == 200, response.text
    page = response.json()
    assert set(page) == {"keys", "next"}, page
    return page


def test_listing_pages_through_a_container_in_key_order(
    daemon: DaemonProcess, channel: str
) -> None:
    """A client lists a container of 25 keys 10 at a time, following ``next``: the pages
    hold the keys in order, none twice, and the last page's ``next`` is null; ``after``
    starts a page after the key it names."""
    keys = sorted({f"{prefix}{n:02d}" for n in range(5) for prefix in ("b", "A", "a", "é", "_")})
    values = {key: index for index, key in enumerate(keys)}
    base = key_path(channel, "stats")
    assert daemon.http.post(base + "/-/set", json={"values": values}).status_code == 200
    seen: list[str] = []
    after = None
    for _ in range(10):
        page = list_page(daemon, channel, limit=10, **({"after": after} if after else {}))
        assert len(page["keys"]) <= 10
        seen += page["keys"]
        after = page["next"]
        if after is None:
            break
    assert after is None
    assert seen == keys
    assert list_page(daemon, channel, limit=3, after=keys[4])["keys"] == keys[5:8]


def test_listing_defaults_to_1000_keys_and_allows_at_most_10000(
    daemon: DaemonProcess, channel: str
) -> None:
    """A client lists a container of 1,001 keys: without ``limit`` it gets the first
    1,000 and a ``next``; ``limit=10000`` gets them all; ``limit=10001`` is a 400."""
    keys = sorted(f"k{n:05d}" for n in range(1001))
    base = key_path(channel, "stats")
    response = daemon.http.post(base + "/-/set", json={"values": dict.fromkeys(keys, 0)})
    assert response.status_code == 200
    first = list_page(daemon, channel)
    assert first["keys"] == keys[:1000] and first["next"] is not None
    assert list_page(daemon, channel, after=first["next"]) == {"keys": keys[1000:], "next": None}
    assert list_page(daemon, channel, limit=10000) == {"keys": keys, "next": None}
    too_many = daemon.http.get(base, params={"limit": 10001})
    assert too_many.status_code == 400
    assert too_many.json()["code"] == "bad_request"


def test_bulk_and_operations_routes_answer(daemon: DaemonProcess, channel: str) -> None:
    """A client uses the bulk routes and an operator the operations routes: bulk set,
    get and delete do what they say; /metrics, /healthz, /readyz and POST /-/reload
    answer 200."""
    base = key_path(channel, "stats")
    http = daemon.http
    stored_ = http.post(base + "/-/set", json={"values": {"a": 1, "b": [2]}})
    assert (stored_.status_code, sorted(stored_.json()["stored"])) == (200, ["a", "b"])
    got = http.post(base + "/-/get", json={"keys": ["a", "b", "c"]})
    assert got.json() == {"values": {"a": 1, "b": [2]}, "missing": ["c"],
                          "etags": {"a": etag_of(1), "b": etag_of([2])}}  # fmt: skip
    gone = http.post(base + "/-/delete", json={"keys": ["a", "c"]})
    assert gone.json() == {"deleted": ["a"], "missing": ["c"]}
    assert http.get("/metrics").text.count("chanstore_http_requests_total") > 0
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200
    assert http.post("/-/reload").status_code == 200


# -- bytes split anywhere ---------------------------------------------------------------------


def split_everywhere(daemon: DaemonProcess, data: bytes, answers: int) -> None:
    """Send ``data`` cut at each offset in turn (a fresh connection each time): every cut
    gets the same answers as the whole."""
    with Wire(daemon.port) as wire:
        wire.send(data)
        reference = [comparable(wire.read_response()) for _ in range(answers)]
    assert reference[0][0] == 200, reference
    for cut in range(1, len(data)):
        with Wire(daemon.port) as wire:
            assert wire.send_in_pieces(data, [cut], pause=0.005)
            got = [comparable(wire.read_response()) for _ in range(answers)]
        assert got == reference, f"cut at byte {cut}: {data[:cut]!r} | {data[cut:]!r}"


def test_a_put_and_get_split_at_every_byte_are_answered_the_same(
    daemon: DaemonProcess, channel: str
) -> None:
    """A client sends a PUT and a GET (pipelined) in two pieces, cut at every byte in
    turn: each time both are answered exactly as when sent whole."""
    path = value_path(channel, "split")
    split_everywhere(daemon, request("PUT", path, b'{"v": 1}') + request("GET", path), 2)
    assert stored(daemon, channel, "split") == {"v": 1}


def test_a_chunked_put_split_at_every_byte_is_answered_the_same(
    daemon: DaemonProcess, channel: str
) -> None:
    """A client sends a chunked PUT in two pieces, cut at every byte in turn (inside chunk
    sizes, between CR and LF, in the last chunk): each time it is stored and answered
    as when sent whole."""
    split_everywhere(daemon, chunked_put(value_path(channel, "split"), b'{"v":', b" 2}"), 1)
    assert stored(daemon, channel, "split") == {"v": 2}


def test_a_put_sent_one_byte_at_a_time_is_stored(daemon: DaemonProcess, channel: str) -> None:
    """A client sends a PUT one byte per write, with small pauses: it is answered 200 and
    the value is stored."""
    data = request("PUT", value_path(channel, "bytewise"), b'{"b": [1]}')
    with Wire(daemon.port) as wire:
        assert wire.send_in_pieces(data, list(range(1, len(data))), pause=0.005)
        assert wire.read_response().status == 200
    assert stored(daemon, channel, "bytewise") == {"b": [1]}


# -- request smuggling ------------------------------------------------------------------------


def smuggling_attempts(outer: str, hidden: bytes) -> dict[str, bytes]:
    """PUTs to ``outer`` whose body hides the request ``hidden``: a parser that frames
    the body differently from the RFC (or from a proxy in front) would run it."""
    zero = b"0\r\n\r\n"

    def put(headers: list[str], body: bytes) -> bytes:
        return request("PUT", outer, body, headers, length=False)

    inner_chunk = b"%x\r\n%s\r\n" % (len(hidden), hidden) + zero
    return {
        "cl-te": put(
            [f"Content-Length: {len(zero + hidden)}", "Transfer-Encoding: chunked"], zero + hidden
        ),
        "te-cl": put(["Transfer-Encoding: chunked", "Content-Length: 4"], inner_chunk),
        "te-xchunked-with-cl": put(
            ["Transfer-Encoding: xchunked", "Content-Length: 5"], zero + hidden
        ),
        "te-xchunked": put(["Transfer-Encoding: xchunked"], hidden),
        "te-chunked-twice": put(
            ["Transfer-Encoding: chunked", "Transfer-Encoding:  chunked"], inner_chunk
        ),
        "te-chunked-identity": put(["Transfer-Encoding: chunked, identity"], hidden),
        "te-space-before-colon": put(
            ["Transfer-Encoding : chunked", "Content-Length: 5"], zero + hidden
        ),
        "te-folded": put(["Transfer-Encoding:", " chunked", "Content-Length: 5"], zero + hidden),
        "cl-plus-sign": put([f"Content-Length: +{len(hidden)}"], hidden),
        "cl-two-values": put(["Content-Length: 0", f"Content-Length: {len(hidden)}"], hidden),
        "cl-list": put([f"Content-Length: 0, {len(hidden)}"], hidden),
    }


SMUGGLING = list(smuggling_attempts("/o", b"").keys())


@pytest.mark.parametrize("shape", SMUGGLING)
def test_no_request_hides_inside_a_body(daemon: DaemonProcess, channel: str, shape: str) -> None:
    """An attacker frames a PUT's body ambiguously (Content-Length beside
    Transfer-Encoding, an obfuscated or doubled Transfer-Encoding, a signed or listed
    Content-Length) with a second request inside it: the door answers 400
    ``bad_request`` and closes, and the hidden request is never run."""
    hidden = request("PUT", value_path(channel, "smuggled"), b'"pwned"')
    data = smuggling_attempts(value_path(channel, "outer"), hidden)[shape]
    with Wire(daemon.port) as wire:
        wire.send(data)
        assert_error(wire.read_response(), 400, "bad_request")
        assert wire.closed_within(TIMEOUT)
    assert stored(daemon, channel, "smuggled") is None
    assert stored(daemon, channel, "outer") is None


# -- real clients ------------------------------------------------------------------------------


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def curl_status(*args: str) -> str:
    """The status code curl reports for a request (its body thrown away)."""
    run = curl("--output", os.devnull, "--write-out", "%{http_code}", *args)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_curl(daemon: DaemonProcess, channel: str, tmp_path: Path) -> None:
    """Someone uses curl: PUT, GET, HEAD, a chunked upload, ``Expect: 100-continue``,
    HTTP/1.0, and three URLs on one kept-alive connection all work."""
    url = daemon.url + value_path(channel, "curl")
    assert curl_status("--request", "PUT", "--data-binary", '{"by": "curl"}', url) == "200"
    get = curl(url)
    assert json.loads(get.stdout) == {"by": "curl"}
    head = curl("--head", url)
    assert head.stdout.startswith("HTTP/1.1 200"), head.stdout
    length = re.search(r"(?im)^content-length: (\d+)\r?$", head.stdout)
    assert length and int(length.group(1)) == len(get.stdout.encode()), head.stdout

    body = tmp_path / "body.json"
    body.write_text(json.dumps({"chunked": list(range(2000))}))
    upload = ["--header", "Transfer-Encoding: chunked", "--data-binary", f"@{body}"]
    target = daemon.url + value_path(channel, "chunked")
    assert curl_status("--request", "PUT", *upload, target) == "200"
    assert stored(daemon, channel, "chunked") == {"chunked": list(range(2000))}

    expect = ["--header", "Expect: 100-continue", "--expect100-timeout", "10"]
    target = daemon.url + value_path(channel, "expect")
    run = curl("--verbose", "--request", "PUT", *expect, "--data-binary", "[3]", target)
    assert "HTTP/1.1 100 Continue" in run.stderr, run.stderr
    assert stored(daemon, channel, "expect") == [3]

    assert curl_status("--http1.0", url) == "200"

    three = [url, url, daemon.url + "/healthz"]
    run = curl("--write-out", "%{num_connects}\n", *["--output", os.devnull] * 3, *three)
    assert run.stdout.split() == ["1", "0", "0"], run.stdout


def test_httpx(daemon: DaemonProcess, channel: str) -> None:
    """Someone uses httpx, sync and async: writes, reads, a streamed (chunked) upload,
    HEAD, and 100 concurrent requests over a pool of 5 kept-alive connections."""
    path = value_path(channel, "httpx")
    with httpx.Client(base_url=daemon.url, timeout=TIMEOUT) as client:
        assert client.put(path, json={"by": "httpx"}).status_code == 200
        got = client.get(path)
        assert got.json() == {"by": "httpx"}
        head = client.head(path)
        assert (head.content, head.headers["content-length"]) == (b"", str(len(got.content)))
        streamed = client.put(value_path(channel, "streamed"), content=iter([b'{"s"', b": 1}"]))
        assert streamed.status_code == 200
        assert client.get(value_path(channel, "streamed")).json() == {"s": 1}
        assert client.delete(path).status_code == 200
        assert client.get(path).status_code == 404

    async def many() -> list[int]:
        limits = httpx.Limits(max_connections=5)
        async with httpx.AsyncClient(base_url=daemon.url, timeout=TIMEOUT, limits=limits) as client:
            await client.put(path, json=5)
            answers = await asyncio.gather(*(client.get(path) for _ in range(100)))
            return [answer.status_code for answer in answers if answer.json() == 5]

    assert asyncio.run(many()) == [200] * 100


def test_http_client(daemon: DaemonProcess, channel: str) -> None:
    """Someone uses Python's http.client on one connection: PUT, GET, HEAD (no body to
    read), a chunked PUT, and a 404, all on the same kept-alive socket."""
    path = value_path(channel, "stdlib")
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=TIMEOUT)
    try:

        def ask(method: str, target: str, body: Any = None, **options: Any) -> tuple[int, bytes]:
            connection.request(method, target, body=body, **options)
            response = connection.getresponse()
            return response.status, response.read()

        assert ask("PUT", path, b'{"by": "http.client"}')[0] == 200
        sock = connection.sock
        status, body = ask("GET", path)
        assert (status, json.loads(body)) == (200, {"by": "http.client"})
        assert ask("HEAD", path) == (200, b"")
        status, _ = ask(
            "PUT", value_path(channel, "chunked"), iter([b"[1,", b" 2]"]), encode_chunked=True
        )
        assert status == 200
        status, body = ask("GET", value_path(channel, "chunked"))
        assert (status, json.loads(body)) == (200, [1, 2])
        assert ask("GET", value_path(channel, "absent"))[0] == 404
        assert connection.sock is sock, "http.client had to reconnect"
    finally:
        connection.close()


def test_wrk_gets_only_2xx(daemon: DaemonProcess, channel: str) -> None:
    """Someone load-tests a cached GET with wrk for 2 s over 8 connections: it makes
    requests, and every answer is a 2xx."""
    if shutil.which("wrk") is None:
        message = "wrk is not installed (apt-get install wrk; scripts/test installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    path = value_path(channel, "bench")
    assert daemon.put(channel, "stats", "bench", {"hp": 10}).status_code == 200
    assert daemon.get(channel, "stats", "bench").status_code == 200
    run = subprocess.run(
        ["wrk", "-t", "2", "-c", "8", "-d", "2s", daemon.url + path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stderr
    requests = re.search(r"(\d+) requests in", run.stdout)
    assert requests and int(requests.group(1)) > 0, run.stdout
    assert "Non-2xx" not in run.stdout, run.stdout
