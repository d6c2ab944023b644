"""Bad input over the HTTP API of a real daemon: fuzzed and hand-picked nasty requests.

Whatever arrives, the daemon answers below 500 (it serves json containers only,
so there is no real backend failure to report), keeps serving (/healthz), and
writes no file outside its data root.
"""

from __future__ import annotations

import json
import re
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parents[1] / "daemon"))
from daemon_harness import JSON_CONTAINERS, DaemonProcess, key_path

from chanstore.http.connections import Limits

BODY_TIMEOUT = Limits().body_timeout

MAX_BODY = 64 * 1024
FUZZ_EXAMPLES = 300
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


# -- raw HTTP ----------------------------------------------------------------------


def raw_request(
    port: int, data: bytes, *, half_close: bool = False, timeout: float = 15.0
) -> bytes:
    """Send ``data`` on a fresh connection; what arrives until the server closes or ``timeout``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer (413) and close before taking everything
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            received += chunk
        return received


def read_answer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """What arrives on ``sock`` until the server closes it, resets it or ``timeout`` passes."""
    sock.settimeout(timeout)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:  # a reset after the answer, or nothing more within the timeout
            return received
        if not chunk:
            return received
        received += chunk


def statuses(response: bytes) -> list[int]:
    """The status codes of the HTTP responses in ``response``."""
    return [int(code) for code in _STATUS.findall(response)]


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                  *, length: int | None = None) -> bytes:  # fmt: skip
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: relative path -> (size, mtime in ns)."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def assert_written_only_in_data(root: Path, before: dict[str, tuple[int, int]]) -> None:
    """Every file created or changed under ``root`` since ``before`` is in the data root."""
    after = files_under(root)
    changed = [name for name, stat in after.items() if before.get(name) != stat]
    outside = [
        name for name in changed
        if not name.startswith("daemon/data/") and name != "daemon/daemon.log"
    ]  # fmt: skip
    assert not outside, f"files written outside the data root: {outside}"


# -- the daemon --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, Path]]:
    """A daemon whose working directory is ``root/daemon``; ``root`` holds nothing else."""
    root = tmp_path_factory.mktemp("badinput")
    (root / "bystander").mkdir()
    (root / "bystander" / "passwd").write_text("do not touch\n")
    daemon = DaemonProcess(root / "daemon", JSON_CONTAINERS,
                           args=["--max-body-bytes", str(MAX_BODY)])  # fmt: skip
    daemon.start()
    yield daemon, root
    problems = daemon.close()
    assert not problems, "the daemon crashed or hung:\n" + "\n".join(problems)


@pytest.fixture
def daemon(sandbox: tuple[DaemonProcess, Path]) -> Iterator[DaemonProcess]:
    process, root = sandbox
    before = files_under(root)
    mark = process.log_size()
    yield process
    assert process.running, "the daemon died:\n" + process.log_text()[-3000:]
    assert process.http.get("/healthz").status_code == 200
    assert not process.crashes(since=mark), process.crashes(since=mark)
    assert_written_only_in_data(root, before)


# -- fuzz --------------------------------------------------------------------------

NASTY_SEGMENTS = ["%2E%2E", "%2e%2e%2F%2E%2E", "..%2F..%2Fetc", "%2F", "%00", "a%00b", "%FF",
                  "%C0%AE", "%E2%80%AE", ".", "..", "%", "%zz", "%2", "~", "-", "%252E%252E",
                  "%5C..%5C", "CON", "a" * 1100, "%F0%9F%8E%89"]  # fmt: skip
segment_text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"),
    max_size=20,
)
percent_bytes = st.binary(min_size=1, max_size=12).map(lambda b: "".join(f"%{x:02X}" for x in b))
segment = st.one_of(st.sampled_from(NASTY_SEGMENTS), segment_text, percent_bytes)
container = st.one_of(st.sampled_from(["stats", "profiles", "nope", "-", "%2E%2E"]), segment)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "huge", "deep", "bulk", "empty"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "huge":
        return json.dumps("x" * draw(st.integers(MAX_BODY - 100, MAX_BODY + 100))).encode()
    if kind == "deep":
        depth = draw(st.integers(30, 3000))
        return b"[" * depth + b"]" * depth
    if kind == "bulk":
        keys = draw(st.lists(st.one_of(st.text(max_size=10), json_values), max_size=5))
        field = draw(st.sampled_from(["keys", "values"]))
        value = keys if field == "keys" else {str(k): k for k in keys}
        return json.dumps({field: value}).encode()
    return b""


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    method = draw(st.sampled_from(["GET", "PUT", "DELETE", "POST", "HEAD", "PATCH", "OPTIONS",
                                   "FOO", "TRACE"]))  # fmt: skip
    shape = draw(st.sampled_from(["key", "container", "bulk", "other"]))
    channel = draw(segment)
    if shape == "key":
        path = f"/v1/channels/{channel}/{draw(container)}/{draw(segment)}"
    elif shape == "container":
        path = f"/v1/channels/{channel}/{draw(container)}"
    elif shape == "bulk":
        operation = draw(st.sampled_from(["get", "set", "delete", "nope"]))
        path = f"/v1/channels/{channel}/{draw(container)}/-/{operation}"
    else:
        path = "/" + "/".join(draw(st.lists(segment, max_size=4)))
    if draw(st.booleans()):
        path += "?" + draw(segment_text)
    body = draw(bodies())
    # Content-Length: true, smaller than the body, larger than it (the client then
    # half-closes, as one that gave up would), or not a number.
    lie = draw(st.sampled_from(["true", "true", "short", "long", "junk"]))
    headers = draw(st.dictionaries(
        st.sampled_from(["X-Request-Id", "Content-Type", "Authorization", "Expect", "X-Junk"]),
        st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
        max_size=2,
    ))  # fmt: skip
    if lie == "short":
        data = request_bytes(method, path, body, headers, length=len(body) // 2)
    elif lie == "long":
        data = request_bytes(method, path, body, headers, length=len(body) + 10)
    elif lie == "junk":
        data = request_bytes(method, path, body, {**headers, "Content-Length": "12abc"})
        data = data.replace(f"Content-Length: {len(body)}\r\n".encode(), b"", 1)
    else:
        data = request_bytes(method, path, body, headers)
    return data, lie == "long"


def test_fuzzed_requests_get_no_5xx_and_write_only_in_the_data_root(daemon: DaemonProcess) -> None:
    seen: dict[int, int] = {}
    answered = sent = 0

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(requests())
    def check(request: tuple[bytes, bool]) -> None:
        nonlocal answered, sent
        data, half_close = request
        sent += 1
        response = raw_request(daemon.port, data, half_close=half_close)
        codes = statuses(response)
        for code in codes:
            seen[code] = seen.get(code, 0) + 1
        answered += bool(codes)
        assert all(code < 500 for code in codes), (data[:300], response[:500])
        assert daemon.running, daemon.log_text()[-3000:]

    check()
    print(f"\nfuzz: {sent} requests sent; responses by status: {dict(sorted(seen.items()))}")
    assert answered >= sent // 2, f"only {answered} requests got an answer: {seen}"
    assert {400, 404, 405} <= set(seen), f"the fuzz missed whole kinds of bad input: {seen}"


# -- hand-written nasty cases ------------------------------------------------------

NASTY_PATHS = [
    "/v1/channels/%2E%2E/stats/%2E%2E",
    "/v1/channels/c1/stats/%2E%2E%2F%2E%2E%2F%2E%2E%2Fbystander%2Fpasswd",
    "/v1/channels/%2E%2E%2F%2E%2E/stats/passwd",
    "/v1/channels/c1/%2E%2E/key",
    "/v1/channels/c1/stats/..%5C..%5Cwin",
    "/v1/channels/c1/stats/a%00b",
    "/v1/channels/%00/stats/k",
    "/v1/channels/c1/stats/%FF%FE",
    "/v1/channels/%C0%AE%C0%AE/stats/k",
    "/v1/channels/c1/stats/" + "%41" * 2000,
    "/v1/channels/c1/stats/%2F",
    "/v1/channels/c1/stats/%2Fetc%2Fpasswd",
]


@pytest.mark.parametrize("path", NASTY_PATHS)
def test_nasty_paths(daemon: DaemonProcess, path: str) -> None:
    for method, body in (("PUT", b'"owned"'), ("GET", b""), ("DELETE", b"")):
        response = raw_request(daemon.port, request_bytes(method, path, body))
        codes = statuses(response)
        assert codes and all(code < 500 for code in codes), (method, path, response[:400])
    assert (daemon.workdir.parent / "bystander" / "passwd").read_text() == "do not touch\n"


def test_a_stored_traversal_key_is_a_key_not_a_path(daemon: DaemonProcess) -> None:
    key = "../../bystander/passwd"
    response = daemon.http.put(key_path("c2", "stats", key), json="value")
    assert response.status_code == 200, response.text
    assert daemon.get("c2", "stats", key).json() == "value"
    assert key in daemon.keys("c2", "stats")
    assert (daemon.workdir.parent / "bystander" / "passwd").read_text() == "do not touch\n"


def test_body_of_50_mb_is_refused_without_being_read(daemon: DaemonProcess) -> None:
    size = 50 * 1024 * 1024
    head = request_bytes("PUT", "/v1/channels/c3/stats/big", b"", length=size)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as sock:
        sock.sendall(head + b'"' + b"x" * 65536)
        answer = sock.recv(65536)
    assert statuses(answer) == [413], answer[:300]
    assert b"body_too_large" in answer
    # Chunked, no Content-Length: the daemon stops at the limit too.
    chunked = (b"PUT /v1/channels/c3/stats/big HTTP/1.1\r\nHost: x\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"x" * (1 << 20))
    sent = 0
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as sock:
        sock.sendall(chunked)
        # Send whole chunks until the daemon answers, stops reading or closes.
        sock.settimeout(2.0)
        while sent < size and time.monotonic() - started < 60:
            if select.select([sock], [], [], 0)[0]:
                break  # an answer (or the close) is there to read
            try:
                sock.sendall(chunk)
            except OSError:  # a timeout (the daemon stopped reading), EPIPE or a reset
                break
            sent += len(chunk)
        answer = read_answer(sock)
    assert statuses(answer) == [413], answer[:300]
    assert b"body_too_large" in answer, answer[:300]
    assert sent < size, "the daemon took the whole 50 MB chunked body"
    assert daemon.get("c3", "stats", "big").status_code == 404


@pytest.mark.parametrize("depth", [65, 10_000, 200_000])
def test_deep_nesting_is_a_400(daemon: DaemonProcess, depth: int) -> None:
    for opening, closing in ((b"[", b"]"), (b'{"a":', b"}")):
        body = opening * depth + b"1" + closing * depth
        if len(body) > MAX_BODY:
            body = opening * depth  # the size limit answers first; still no 5xx
        response = daemon.http.put(key_path("c4", "stats", "deep"), content=body)
        assert response.status_code in (400, 413), response.text
        assert "error" in response.json()
    assert daemon.get("c4", "stats", "deep").status_code == 404
    for bulk in (b'{"values": {"k": ' + b"[" * depth + b"]" * depth + b"}}",
                 b'{"keys": ' + b"[" * depth + b"]" * depth + b"}"):  # fmt: skip
        for operation in ("set", "get", "delete"):
            response = daemon.http.post(key_path("c4", "stats") + f"/-/{operation}", content=bulk)
            assert 400 <= response.status_code < 500, response.text


def test_a_slow_client_times_out_without_holding_the_server(daemon: DaemonProcess) -> None:
    """Headers say 100 bytes, then one byte a second: 408 (or a close) within the body timeout."""
    head = request_bytes("PUT", "/v1/channels/c5/stats/slow", b"", length=100)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=BODY_TIMEOUT + 10) as sock:
        sock.sendall(head)
        sock.settimeout(0.05)
        started = time.monotonic()
        answer = b""
        closed = False
        served = 0
        while time.monotonic() - started < BODY_TIMEOUT + 8:
            try:
                sock.sendall(b" ")
            except OSError:
                closed = True
                break
            # Other clients are served meanwhile.
            response = daemon.http.get("/healthz")
            assert response.status_code == 200
            assert daemon.put("c5", "stats", f"k{served}", served).status_code == 200
            assert daemon.get("c5", "stats", f"k{served}").json() == served
            served += 1
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                answer += chunk
                if statuses(answer):
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.95)
        waited = time.monotonic() - started
    assert statuses(answer) == [408] or closed, f"no timeout after {waited:.1f}s: {answer[:200]!r}"
    assert waited < BODY_TIMEOUT + 8
    assert served >= 3, f"only {served} requests were served during the dribble"
    assert daemon.get("c5", "stats", "slow").status_code == 404


def test_many_idle_connections_do_not_stop_others(daemon: DaemonProcess) -> None:
    idle: list[socket.socket] = []
    try:
        for number in range(200):
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            if number % 4 == 0:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            idle.append(sock)
        results: list[int] = []

        def client(number: int) -> None:
            with httpx.Client(base_url=daemon.url, timeout=10) as http:
                for index in range(10):
                    key = key_path("c6", "stats", f"t{number}-{index}")
                    results.append(http.put(key, json=index).status_code)
                    results.append(http.get(key).status_code)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads), "clients hung"
        assert results == [200] * 80, results
    finally:
        for sock in idle:
            sock.close()
