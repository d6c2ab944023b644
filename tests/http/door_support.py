"""Raw HTTP/1.1 on a socket, for the tests of the daemon's HTTP door.

(conftest.py puts tests/daemon on sys.path, for daemon_harness.)

:class:`Wire` is one client connection that sends exactly the bytes a test
gives it and parses what comes back: status line, headers and body of each
response (by Content-Length, chunked, or up to the close), several pipelined
responses in a row, HEAD answers without a body, and a close (FIN or reset)
told apart from silence. Every read has a deadline; nothing here sleeps
blindly. Helpers build requests byte by byte, so that a test can send what no
well-behaved client would.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon_harness import DaemonProcess, metric, wait_until

#: Seconds any single read waits before a test fails: generous, the machines are noisy.
TIMEOUT = 15.0
#: The address every daemon of these tests listens on.
HOST = "127.0.0.1"
#: The route template under which the door counts requests the parser rejected.
UNMATCHED = "unmatched"
#: What every error body holds, and nothing else.
ERROR_FIELDS = {"error", "code"}


class ConnectionClosed(Exception):
    """The server closed (or reset) the connection before a complete response arrived."""


@dataclass
class Response:
    """One HTTP response as it came over the wire."""

    version: str
    status: int
    reason: str
    #: Header names lowercased; a repeated header's values joined with ", ".
    headers: dict[str, str]
    #: Every header line in order, names lowercased, repeats kept.
    header_lines: list[tuple[str, str]] = field(repr=False)
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        """The ``code`` of a JSON error body, if the body is one."""
        try:
            value = self.json()
        except ValueError:
            return None
        return value.get("code") if isinstance(value, dict) else None

    def describe(self) -> str:
        return f"{self.version} {self.status} {self.reason} {self.headers} {self.body[:300]!r}"


class Wire:
    """A raw client connection to the daemon: send bytes, read responses, see closes."""

    def __init__(self, port: int, timeout: float = TIMEOUT) -> None:
        self.port = port
        self.timeout = timeout
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        # Each send leaves at once: split requests arrive split.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()
        #: Whether the server closed its side (FIN or reset).
        self.eof = False
        #: Whether the close was a reset (RST) rather than a FIN.
        self.reset = False

    # -- life -------------------------------------------------------------------

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- sending ----------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Send ``data``; False when the server had already closed or reset the connection."""
        self.sock.settimeout(self.timeout)
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def push(self, data: bytes | memoryview, seconds: float) -> int | None:
        """Send what of ``data`` the kernel takes within ``seconds``: how many bytes (0 when
        the server is not reading), or None once the server closed or reset the connection."""
        self.sock.settimeout(seconds)
        try:
            return self.sock.send(data)
        except TimeoutError:
            return 0
        except (BrokenPipeError, ConnectionResetError):
            return None

    def send_in_pieces(self, data: bytes, cuts: list[int], pause: float = 0.01) -> bool:
        """Send ``data`` cut at the offsets ``cuts``, pausing between the pieces."""
        bounds = [0, *cuts, len(data)]
        for index, (start, end) in enumerate(itertools.pairwise(bounds)):
            if index:
                time.sleep(pause)  # lets each piece leave as a segment of its own
            if not self.send(data[start:end]):
                return False
        return True

    # -- reading ----------------------------------------------------------------

    def _fill(self, deadline: float) -> bool:
        """Receive more bytes into the buffer; False at the server's close.

        TimeoutError once ``deadline`` (a time.monotonic() value) passes.
        """
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no more bytes from the server before the deadline")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(262144)
        except ConnectionResetError:
            data = b""
            self.reset = True
        if not data:
            self.eof = True
            return False
        self._buffer += data
        return True

    def _take(self, count: int, deadline: float, what: str) -> bytes:
        while len(self._buffer) < count:
            if not self._fill(deadline):
                raise ConnectionClosed(
                    f"closed in the middle of {what}: {len(self._buffer)} of {count} bytes came"
                )
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def _line(self, deadline: float, what: str) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if not self._fill(deadline):
                raise ConnectionClosed(f"closed in the middle of {what}")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def read_response(self, *, head: bool = False, timeout: float | None = None) -> Response:
        """The next response (a 1xx too); ``head``: the answer to a HEAD, so no body."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if not self._fill(deadline):
                raise ConnectionClosed(
                    "the server closed the connection without a (complete) response; "
                    f"received: {bytes(self._buffer[:300])!r}"
                )
        lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        del self._buffer[: end + 4]
        version, _, rest = lines[0].partition(" ")
        status_text, _, reason = rest.partition(" ")
        assert version in ("HTTP/1.1", "HTTP/1.0") and status_text.isdigit(), lines[0]
        status = int(status_text)
        header_lines: list[tuple[str, str]] = []
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon, f"a response header line without a colon: {line!r}"
            name, value = name.strip().lower(), value.strip()
            header_lines.append((name, value))
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if head or status < 200 or status in (204, 304):
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._chunked_body(deadline)
        elif "content-length" in headers:
            body = self._take(int(headers["content-length"]), deadline, "a response body")
        else:  # delimited by the close
            while self._fill(deadline):
                pass
            body = bytes(self._buffer)
            self._buffer.clear()
        return Response(version, status, reason, headers, header_lines, body)

    def _chunked_body(self, deadline: float) -> bytes:
        parts = []
        while True:
            size = int(self._line(deadline, "a chunk size").split(b";")[0], 16)
            if size == 0:
                while self._line(deadline, "the trailers"):
                    pass
                return b"".join(parts)
            parts.append(self._take(size, deadline, "a chunk"))
            assert self._line(deadline, "a chunk's end") == b""

    def read_final(self, timeout: float | None = None) -> tuple[list[Response], Response]:
        """The interim (1xx) responses, then the final one."""
        interim = []
        while (response := self.read_response(timeout=timeout)).status < 200:
            interim.append(response)
        return interim, response

    def exchange(self, *requests: bytes, timeout: float | None = None) -> list[Response]:
        """Send ``requests`` in one write (pipelined) and read one response for each."""
        assert self.send(b"".join(requests)), "the server closed before the requests were sent"
        return [
            self.read_response(head=request.startswith(b"HEAD "), timeout=timeout)
            for request in requests
        ]

    def closed_within(self, seconds: float) -> bool:
        """Whether the server closes the connection within ``seconds``, sending nothing more."""
        assert not self._buffer, f"unread bytes from the server: {bytes(self._buffer[:300])!r}"
        try:
            more = self._fill(time.monotonic() + seconds)
        except TimeoutError:
            return False
        assert not more, f"unexpected bytes instead of a close: {bytes(self._buffer[:300])!r}"
        return True

    def bytes_until_close(self, timeout: float | None = None) -> bytes:
        """Everything that arrives until the server closes (TimeoutError past ``timeout``)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self._fill(deadline):
            pass
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def readable(self) -> bool:
        """Whether bytes (or a close) wait to be read, without blocking."""
        return bool(self._buffer) or bool(select.select([self.sock], [], [], 0)[0])


@contextlib.contextmanager
def sending(wire: Wire, data: bytes) -> Iterator[None]:
    """Send ``data`` on ``wire`` from a thread of its own while the test reads (or not)
    on the same connection. On leaving, the thread has finished: when the test failed,
    the connection is shut down first, so a send the daemon never takes cannot hang."""
    sock = wire.sock.dup()
    sock.settimeout(TIMEOUT)

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)

    thread = threading.Thread(target=send, name="sender", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        raise
    finally:
        thread.join(TIMEOUT)
        sock.close()


# -- requests -----------------------------------------------------------------------


def request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: tuple[str, ...] | list[str] = (),
    *,
    version: str = "HTTP/1.1",
    host: str | None = "test",
    length: bool = True,
) -> bytes:
    """One request's bytes. ``Host`` unless ``host`` is None; ``Content-Length`` for a body
    (and for every PUT and POST) unless ``length`` is false; ``headers`` as "Name: value"."""
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(headers)
    if length and (body or method in ("PUT", "POST")):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*pieces: bytes) -> bytes:
    """``pieces`` as a chunked body, with the last (empty) chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces if piece) + (
        b"0\r\n\r\n"
    )


def chunked_put(path: str, *pieces: bytes, headers: tuple[str, ...] = ()) -> bytes:
    """A PUT of ``pieces`` with ``Transfer-Encoding: chunked``."""
    head = request("PUT", path, headers=("Transfer-Encoding: chunked", *headers), length=False)
    return head + chunked(*pieces)


# -- what must hold of responses ---------------------------------------------------------


def assert_error(response: Response, status: int, code: str | None = None) -> dict[str, Any]:
    """``response`` is a JSON error ``{"error": sentence, "code": word}`` with ``status``."""
    assert response.status == status, response.describe()
    content_type = response.headers.get("content-type", "")
    assert content_type.split(";")[0].strip() == "application/json", response.describe()
    body = response.json()
    assert isinstance(body, dict) and set(body) == ERROR_FIELDS, response.describe()
    assert isinstance(body["error"], str) and body["error"].strip(), response.describe()
    assert isinstance(body["code"], str) and body["code"].replace("_", "").isalpha(), body
    if code is not None:
        assert body["code"] == code, response.describe()
    return body


# -- the daemon process, seen from outside ------------------------------------------------


def count(daemon: DaemonProcess, name: str, **labels: str) -> float:
    """A sample of the daemon's /metrics; 0 when the series does not exist yet."""
    return daemon.metric(name, **labels) or 0.0


def wait_for_count(daemon: DaemonProcess, name: str, target: float, **labels: str) -> float:
    """Poll /metrics until the sample reaches ``target``; its value. On failure, the
    message shows every sample of ``name`` (a count under other labels, say)."""
    try:
        return wait_until(lambda: (value := count(daemon, name, **labels)) >= target and value,
                          TIMEOUT, f"{name}{labels} to reach {target}")  # fmt: skip
    except TimeoutError as exc:
        samples = [line for line in daemon.metrics_text().splitlines() if line.startswith(name)]
        raise AssertionError(f"{exc}; the samples of {name}:\n" + "\n".join(samples)) from None


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid``, in KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def unread_by_server(wire: Wire) -> int | None:
    """How many bytes ``wire`` sent that the server has not read yet (the receive queue of
    the server's end in /proc/net/tcp); None when the server's end is gone."""
    client_port = wire.sock.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rpartition(":")[2], 16)
        remote_port = int(fields[2].rpartition(":")[2], 16)
        if (local_port, remote_port) == (wire.port, client_port):
            return int(fields[4].partition(":")[2], 16)
    return None


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` has open."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def metric_on_wire(wire: Wire, name: str, **labels: str) -> float | None:
    """A sample of /metrics read over ``wire`` (a connection the test already holds)."""
    [response] = wire.exchange(request("GET", "/metrics"))
    assert response.status == 200, response.describe()
    return metric(response.body.decode(), name, **labels)
