"""Connections as a client sees them on the wire: pipelining, keep-alive, cached reads.

A GET of a cached key is answered while the request is handed to the API,
with no task (see chanstore/http/protocol.py). These tests hold it to the
behaviour of every other answer: a key's path with a percent-encoded
character (decoded on the way) answers the same, responses keep request
order on a pipelined connection, ``Connection: close`` and HTTP/1.0 are
honoured, the bearer token is still required.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import BinaryIO

import pytest
from daemon_harness import JSON_CONTAINERS, DaemonProcess, Response, key_path, read_response

from chanstore.versions import etag_of

TIMEOUT = 10.0
TOKEN = "tok-connections-7Hq2"


@pytest.fixture
def wire(daemon: DaemonProcess) -> Iterator[socket.socket]:
    """A raw keep-alive connection to the module's daemon."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT) as sock:
        yield sock


def request(method: str, path: str, body: bytes = b"", *headers: str,
            version: str = "HTTP/1.1") -> bytes:  # fmt: skip
    head = [f"{method} {path} {version}", "Host: test", *headers]
    if body or method == "PUT":
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def exchange(sock: socket.socket, *requests: bytes) -> list[Response]:
    """Send ``requests`` in one write (pipelined) and read one response for each."""
    sock.sendall(b"".join(requests))
    stream = sock.makefile("rb")
    return [read_response(stream) for _ in requests]


def closed_by_server(sock: socket.socket) -> bool:
    return closed_by_server_within(sock, TIMEOUT)


def closed_by_server_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (it must send nothing)."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return False
    assert data == b"", f"unexpected bytes after the last response: {data!r}"
    return True


def test_pipelined_requests_are_answered_in_order(
    daemon: DaemonProcess, wire: socket.socket, channel: str
) -> None:
    path = key_path(channel, "stats", "HP")
    # Cached before the pipeline arrives: each GET below could be answered from
    # memory at once, so a wrong answer would show a cached answer jumping the queue.
    assert daemon.put(channel, "stats", "HP", 0).status_code == 200
    responses = exchange(
        wire,
        request("PUT", path, b"1"),
        request("GET", path),
        request("GET", key_path(channel, "stats", "absent")),
        request("PUT", path, b"2"),
        request("GET", path),
        request("GET", path, b"", "X-Request-Id: pipelined-6"),
        request("DELETE", path),
        request("GET", path),
    )
    assert [(r.status, r.body) for r in responses] == [
        (200, b'{"ok":true,"etag":"%s"}' % etag_of(1).encode()),
        (200, b"1"),
        (404, responses[2].body),
        (200, b'{"ok":true,"etag":"%s"}' % etag_of(2).encode()),
        (200, b"2"),
        (200, b"2"),
        (200, b'{"ok":true}'),
        (404, responses[7].body),
    ]
    assert b"not_found" in responses[2].body
    assert responses[5].headers["x-request-id"] == "pipelined-6"
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == len(ids), ids


def test_cached_gets_pipelined_alone_are_all_answered(
    daemon: DaemonProcess, wire: socket.socket, channel: str
) -> None:
    assert daemon.put(channel, "stats", "HP", 7).status_code == 200
    responses = exchange(wire, *[request("GET", key_path(channel, "stats", "HP"))] * 50)
    assert [(r.status, r.body) for r in responses] == [(200, b"7")] * 50
    assert not closed_by_server_within(wire, 0.2)


def test_cached_get_answers_like_an_encoded_path(
    daemon: DaemonProcess, wire: socket.socket, channel: str
) -> None:
    assert daemon.put(channel, "stats", "HP", {"hp": [1, 2]}).status_code == 200
    plain, decoded = exchange(
        wire,
        request("GET", key_path(channel, "stats", "HP")),
        # %48 is "H": the same key, through the path's percent-decoding.
        request("GET", key_path(channel, "stats", "HP").replace("/HP", "/%48P")),
    )
    assert plain.status == decoded.status == 200
    assert plain.body == decoded.body == b'{"hp":[1,2]}'
    del plain.headers["x-request-id"], decoded.headers["x-request-id"]
    assert plain.headers == decoded.headers


def test_cached_get_is_counted_under_its_route(daemon: DaemonProcess, channel: str) -> None:
    labels = {"method": "GET", "route": "/v1/channels/{channel}/{container}/{key}"}
    assert daemon.put(channel, "stats", "HP", 3).status_code == 200
    before = daemon.metric("chanstore_http_requests_total", status="200", **labels) or 0
    durations = daemon.metric("chanstore_http_request_duration_seconds_count", **labels) or 0
    for _ in range(5):
        assert daemon.get(channel, "stats", "HP").json() == 3
    assert daemon.metric("chanstore_http_requests_total", status="200", **labels) == before + 5
    assert daemon.metric("chanstore_http_request_duration_seconds_count", **labels) >= durations + 5


@pytest.mark.parametrize(
    ("version", "connection"),
    [("HTTP/1.1", "Connection: close"), ("HTTP/1.0", "X-Nothing: 1")],
    ids=["connection-close", "http-1.0"],
)
def test_cached_get_honours_a_closing_connection(
    daemon: DaemonProcess, wire: socket.socket, channel: str, version: str, connection: str
) -> None:
    assert daemon.put(channel, "stats", "HP", 4).status_code == 200
    wire.sendall(request("GET", key_path(channel, "stats", "HP"), b"", connection,
                         version=version))  # fmt: skip
    response = read_response(wire.makefile("rb"))
    assert (response.status, response.body) == (200, b"4")
    assert closed_by_server(wire)


def test_cached_get_needs_the_token(start_daemon: Callable[..., DaemonProcess]) -> None:
    # Warning level: debug logging would send every request the decoded way.
    daemon = start_daemon(JSON_CONTAINERS, token=TOKEN, log_level="warning")
    assert daemon.put("c1", "stats", "HP", 5).status_code == 200  # cached from here on
    path = key_path("c1", "stats", "HP")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT) as sock:
        missing, wrong, right = exchange(
            sock,
            request("GET", path),
            request("GET", path, b"", f"Authorization: Bearer {TOKEN}x"),
            request("GET", path, b"", f"Authorization: Bearer {TOKEN}"),
        )
    assert (missing.status, wrong.status) == (401, 401)
    assert b"unauthorized" in missing.body
    assert (right.status, right.body) == (200, b"5")


def encoded(path: str) -> str:
    """``path`` with its last segment's first character percent-encoded: the same
    address, through the path's percent-decoding."""
    head, _, last = path.rpartition("/")
    return f"{head}/%{ord(last[0]):02X}{last[1:]}"


@pytest.mark.parametrize(
    ("method", "body", "status"),
    [
        ("PUT", b'{"hp": [1, 2]}', 200),
        ("PUT", b"{not json", 400),
        ("PUT", b'"\xff"', 400),
        ("PUT", b"", 400),
        ("DELETE", b"", 404),
    ],
    ids=["put", "put-bad-json", "put-bad-utf8", "put-empty", "delete-absent"],
)
def test_single_key_writes_answer_like_an_encoded_path(
    wire: socket.socket, channel: str, method: str, body: bytes, status: int
) -> None:
    plain = key_path(channel, "stats", "Key")
    plain, decoded = exchange(wire, request(method, plain, body),
                               request(method, encoded(plain), body))  # fmt: skip
    assert plain.status == decoded.status == status
    assert plain.body == decoded.body
    del plain.headers["x-request-id"], decoded.headers["x-request-id"]
    assert plain.headers == decoded.headers


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/channels/{channel}/no-such-container/k", 404, b"unknown_container"),
        ("/v1/channels/" + "c" * 1000 + "/stats/k", 400, b"bad_request"),
        ("/v1/channels/{channel}/stats/" + "k" * 5000, 400, b"bad_request"),
    ],
    ids=["unknown-container", "long-channel-id", "long-key"],
)
def test_single_key_writes_refuse_bad_addresses(
    daemon: DaemonProcess, wire: socket.socket, channel: str, path: str, status: int, code: bytes
) -> None:
    path = path.format(channel=channel)
    put, delete = exchange(wire, request("PUT", path, b"1"), request("DELETE", path))
    assert (put.status, delete.status) == (status, status)
    assert code in put.body and code in delete.body


def test_a_put_whose_body_comes_later_is_stored(
    daemon: DaemonProcess, wire: socket.socket, channel: str
) -> None:
    path = key_path(channel, "stats", "late")
    head = request("PUT", path, b'{"late": true}')
    wire.sendall(head[:-5])
    wire.settimeout(0.3)
    with pytest.raises(TimeoutError):  # nothing is answered before the body is complete
        wire.recv(1)
    wire.settimeout(TIMEOUT)
    wire.sendall(head[-5:])
    assert read_response(wire.makefile("rb")).status == 200
    assert daemon.get(channel, "stats", "late").json() == {"late": True}


@pytest.mark.parametrize(
    "extra",
    [["Expect: 100-continue"], ["Transfer-Encoding: chunked"]],
    ids=["expect-100-continue", "chunked"],
)
def test_puts_with_100_continue_or_a_chunked_body_are_stored(
    daemon: DaemonProcess, wire: socket.socket, channel: str, extra: list[str]
) -> None:
    path = key_path(channel, "stats", "decoded")
    body = b'{"n": 1}'
    if extra == ["Transfer-Encoding: chunked"]:
        message = f"PUT {path} HTTP/1.1\r\nHost: t\r\n{extra[0]}\r\n\r\n".encode()
        message += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        wire.sendall(message)
    else:
        wire.sendall(request("PUT", path, body, *extra))
    stream = wire.makefile("rb")
    first = read_response_allowing_continue(stream)
    assert first.status == 200, first
    assert daemon.get(channel, "stats", "decoded").json() == {"n": 1}


def read_response_allowing_continue(stream: BinaryIO) -> Response:
    response = read_response(stream)
    return read_response(stream) if response.status == 100 else response
