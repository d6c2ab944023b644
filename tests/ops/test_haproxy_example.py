"""examples/haproxy/haproxy.cfg, run by the real haproxy in front of two real daemons.

The shipped file is rendered for this machine by as few substitutions as
possible, each of which must match exactly what the file says (so an edit of
the file that the test would no longer follow fails here, loudly):

- the address of each ``bind`` line becomes a free loopback port;
- the address of each ``server`` line becomes the daemon of that name;
- the ``stats socket`` path moves into the test's folder;
- ``chroot``, ``user``, ``group`` and ``daemon`` go: haproxy runs in the
  foreground, as whoever runs the tests.

Everything else (checks, retries, timeouts, routing, logging) runs as shipped.
The daemons share one redis-server; each client thread writes and reads keys
of its own (no test here relies on one daemon's cache seeing another's writes).
haproxy is Debian's package (scripts/test installs it): missing, the tests
skip, or fail when CI is set.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chanstore.server.settings import DaemonSettings
from support import RedisServer, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "haproxy" / "haproxy.cfg"
IN_CI = bool(os.environ.get("CI"))

#: What the daemons are started with: SIGTERM leaves them serving, not ready, this long.
DRAIN_SECONDS = 3.0
#: Seconds a process may take to start serving, or to stop.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
#: Client threads sending requests through haproxy during the stop.
CLIENTS = 4
#: Requests that must succeed before the stop, and again once the stopped daemon is gone.
REQUESTS_BEFORE = 300
REQUESTS_AFTER = 300
#: Lines in a daemon's log that mean something crashed.
CRASH_MARKERS = ("request_crashed", "Traceback")


def _haproxy() -> str:
    path = shutil.which("haproxy")
    if path is None:
        message = "haproxy is not installed (Debian package haproxy; scripts/test installs it)"
        if IN_CI:
            pytest.fail(f"{message}, and CI is set")
        pytest.skip(message)
    return path


# -- the shipped file ---------------------------------------------------------------


def sections(text: str) -> dict[str, list[str]]:
    """The file's sections (``global``, ``frontend chanstore``...) and their lines, comments
    and blank lines left out."""
    found: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        if not line[0].isspace():
            current = line.strip()
            found[current] = []
        else:
            assert current is not None, f"a setting outside any section: {raw!r}"
            found[current].append(line.strip())
    return found


def seconds(value: str) -> float:
    """An HAProxy time (``500ms``, ``10s``, ``1m``, ``2h``; bare numbers are milliseconds)."""
    number, unit = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value).groups()  # type: ignore[union-attr]
    scale = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(number) * scale[unit]


def timeout(text: str, section: str, name: str) -> float:
    """``timeout <name>`` of ``section``, else of ``defaults``, in seconds."""
    parsed = sections(text)
    for where in (section, "defaults"):
        for line in parsed.get(where, []):
            words = line.split()
            if words[:2] == ["timeout", name]:
                return seconds(words[2])
    raise AssertionError(f"no timeout {name} for {section}")


def render(text: str, binds: dict[str, str], servers: dict[str, str], stats_socket: Path) -> str:
    """The shipped file for this machine (see the module's docstring)."""
    out: list[str] = []
    section = ""
    bound: list[str] = []
    served: list[str] = []
    sockets = 0
    for raw in text.splitlines():
        line = raw
        if raw and not raw[0].isspace() and not raw.startswith("#"):
            section = raw.split("#", 1)[0].strip()
        words = raw.split()
        if words and words[0] == "bind":
            name = section.removeprefix("frontend ")
            assert name in binds, f"{section} binds {words[1]}: which port in the test?"
            line = raw.replace(words[1], binds[name], 1)
            bound.append(name)
        elif words and words[0] == "server":
            assert words[1] in servers, f"{section}: server {words[1]} is not one the test runs"
            line = raw.replace(words[2], servers[words[1]], 1)
            served.append(words[1])
        elif words[:2] == ["stats", "socket"]:
            line = raw.replace(words[2], str(stats_socket), 1)
            sockets += 1
        elif words and words[0] in ("chroot", "user", "group", "daemon") and section == "global":
            continue
        out.append(line)
    assert sorted(bound) == sorted(binds), f"bind lines for {bound}, expected {sorted(binds)}"
    assert sorted(set(served)) == sorted(servers), f"server lines for {served}"
    assert sockets == 1, "the shipped file has one stats socket"
    return "\n".join(out) + "\n"


# -- processes ----------------------------------------------------------------------


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Daemon:
    """``chanstore serve`` on a free loopback port, in a folder of its own."""

    def __init__(self, name: str, folder: Path, entries: list[dict[str, Any]],
                 args: list[str]) -> None:  # fmt: skip
        self.name = name
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "db.json"
        self.config.write_text(json.dumps(entries, indent=1))
        self.log = folder / "daemon.log"
        self.args = args
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> Daemon:
        """Start the process on a free port; ready() waits for it."""
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHANSTORE_")}
        command = [sys.executable, "-m", "chanstore.cli", "serve", "--db-config",
                   str(self.config), "--listen", self.address, "--log-format", "json",
                   "--service-id", "haproxy-e2e", *self.args]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=self.folder, env=env, stdout=log,
                                            stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)  # fmt: skip
        return self

    def ready(self) -> Daemon:
        """Wait until /healthz answers (on another port if the one chosen was taken
        meanwhile), then until /readyz does."""
        for _attempt in range(5):
            with contextlib.suppress(TimeoutError):
                wait_until(self._healthy, START_TIMEOUT, f"{self.name} on {self.address}", 0.05)
                break
            self.close()
            self.spawn()
        else:
            raise AssertionError(f"{self.name} did not start:\n{_tail(self.log)}")
        wait_until(self.is_ready, START_TIMEOUT, f"{self.name} ready", 0.05)
        return self

    def is_ready(self) -> bool:
        return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise TimeoutError  # exited: a port taken meanwhile, try another
        try:
            answer = httpx.get(f"{self.url}/healthz", timeout=2)
            # Ours, not another test's process that took the port first.
            return answer.status_code == 200 and answer.json()["pid"] == self.process.pid
        except (httpx.TransportError, ValueError, KeyError):
            return False

    def watchers(self) -> float:
        """Change-feed streams open on this daemon now."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "chanstore_watchers" and not sample.labels:
                    return sample.value
        raise AssertionError("no chanstore_watchers in /metrics")

    def crashes(self) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if any(m in line for m in CRASH_MARKERS)]

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.send_signal(signal.SIGTERM)  # a second one: no draining now
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class HAProxy:
    """haproxy in the foreground with a rendered config; its log (stdout, stderr) in a file."""

    def __init__(self, binary: str, folder: Path, daemons: dict[str, Daemon]) -> None:
        self.binary = binary
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.stats_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats_url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        self.socket = folder / "admin.sock"
        self.shipped = EXAMPLE.read_text()
        self.text = render(self.shipped,
                           binds={"chanstore": f"127.0.0.1:{self.port}",
                                  "stats": f"127.0.0.1:{self.stats_port}"},
                           servers={name: d.address for name, d in daemons.items()},
                           stats_socket=self.socket)  # fmt: skip
        self.config = folder / "haproxy.cfg"
        self.config.write_text(self.text)
        self.log = folder / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    def check(self) -> str:
        """``haproxy -c``: valid, and not a warning."""
        done = subprocess.run([self.binary, "-c", "-f", str(self.config)], capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert "[WARNING]" not in output and "[ALERT]" not in output, output
        return output

    def start(self) -> HAProxy:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([self.binary, "-db", "-f", str(self.config)],
                                            cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)  # fmt: skip
        wait_until(self._answers, START_TIMEOUT, f"haproxy's stats on {self.stats_port}", 0.05)
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited {self.process.returncode}:\n{_tail(self.log)}")
        try:
            return httpx.get(self.stats_url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stats(self) -> dict[tuple[str, str], dict[str, str]]:
        """haproxy's view (the stats page as CSV), by (proxy, server)."""
        text = httpx.get(self.stats_url, timeout=5).text.removeprefix("# ")
        return {(row["pxname"], row["svname"]): row for row in csv.DictReader(io.StringIO(text))}

    def server(self, backend: str, name: str) -> dict[str, str]:
        return self.stats()[(backend, name)]

    def wait_status(self, backend: str, name: str, status: str, timeout: float) -> dict[str, str]:
        """Poll until haproxy shows ``backend/name`` with ``status`` (UP, DOWN...); its row."""

        def shows() -> dict[str, str] | None:
            row = self.server(backend, name)
            return row if row["status"] == status else None

        return wait_until(shows, timeout, f"haproxy showing {backend}/{name} {status}", 0.02)

    def healthy(self, backend: str, name: str) -> bool:
        """UP, and so by a check that passed (haproxy starts servers UP before any check)."""
        row = self.server(backend, name)
        return row["status"] == "UP" and row["check_status"].removeprefix("* ") == "L7OK"

    def runtime(self, command: str) -> str:
        """A command of the runtime API, on the stats socket."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@dataclass
class Stack:
    redis: RedisServer
    daemons: dict[str, Daemon]
    haproxy: HAProxy

    def wait_in_rotation(self) -> None:
        """Until haproxy shows every daemon UP, by a check that passed."""
        for name in self.daemons:
            wait_until(lambda n=name: self.haproxy.healthy("chanstore_api", n), 15,
                       f"haproxy checking {name} healthy")  # fmt: skip


@pytest.fixture
def start_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """``start_stack(args)``: a redis-server, the daemons the shipped file names (each with
    ``args``) and haproxy in front of them, once haproxy shows every server UP."""
    binary = _haproxy()
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (scripts/test installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    started: list[Any] = []

    def start(args: list[str]) -> Stack:
        redis = RedisServer(tmp_path / "redis").start()
        started.append(redis)
        entries = [{"implementation": "redis", "name": "scores", "load": False,
                    "settings": {**redis.settings, "socket_timeout": 5.0}}]  # fmt: skip
        names = sorted({line.split()[1] for lines in sections(EXAMPLE.read_text()).values()
                        for line in lines if line.startswith("server ")})  # fmt: skip
        daemons = {}
        for name in names:
            daemons[name] = Daemon(name, tmp_path / name, entries, args)
            started.append(daemons[name].spawn())
        for daemon in daemons.values():
            daemon.ready()
            # A daemon opens its invalidation link to Redis on first use, and is not ready
            # until it is up: use it once before haproxy checks it.
            answer = httpx.get(f"{daemon.url}/v1/channels/warm-up/scores/nothing", timeout=10)
            assert answer.status_code == 404, answer.text
            wait_until(daemon.is_ready, START_TIMEOUT, f"{daemon.name} ready", 0.05)
        haproxy = HAProxy(binary, tmp_path / "haproxy", daemons)
        started.append(haproxy)
        haproxy.check()
        haproxy.start()
        stack = Stack(redis, daemons, haproxy)
        stack.wait_in_rotation()
        # The shipped runtime API answers on its (moved) socket.
        assert "Name: HAProxy" in haproxy.runtime("show info")
        return stack

    yield start
    for thing in reversed(started):
        if isinstance(thing, RedisServer):
            thing.stop()
        else:
            thing.close()
    crashes = [f"{d.name}: {line}" for d in started if isinstance(d, Daemon)
               for line in d.crashes()]  # fmt: skip
    assert not crashes, "a daemon crashed:\n" + "\n".join(crashes)


# -- what clients do ----------------------------------------------------------------


@dataclass
class Clients:
    """Threads that each keep one keep-alive connection to haproxy and store, read and
    delete keys of their own, as fast as answers come; every answer is checked."""

    url: str
    channel: str
    count: int = CLIENTS
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    #: When each request was answered (time.monotonic()), in order per thread.
    answered: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Clients:
        for index in range(self.count):
            thread = threading.Thread(target=self._run, args=(index,), daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in self._threads), "a client hung"

    def done(self, since: float = 0.0) -> int:
        """Requests answered (or failed) after ``since``."""
        with self._lock:
            return sum(1 for at in self.answered if at > since)

    def _run(self, index: int) -> None:
        base = f"/v1/channels/{self.channel}/scores"
        with httpx.Client(base_url=self.url, timeout=15) as http:
            n = 0
            while not self._stop.is_set():
                key = f"{base}/client{index}-{n}"
                value = {"client": index, "n": n, "hp": [n, 100]}
                self._send(http, "PUT", key, 200, json=value)
                self._send(http, "GET", key, 200, expect=value)
                if n % 3 == 0:
                    self._send(http, "DELETE", key, 200)
                if n % 3 == 1:
                    self._send(http, "GET", f"{base}/never-{index}-{n}", 404)
                n += 1
                self._stop.wait(0.002)

    def _send(self, http: httpx.Client, method: str, path: str, status: int,
              expect: Any = None, **options: Any) -> None:  # fmt: skip
        try:
            response = http.request(method, path, **options)
            problem = None
            if response.status_code != status:
                problem = f"{response.status_code} {response.text[:200]}"
            elif expect is not None and response.json() != expect:
                problem = f"answered {response.text[:200]}, stored {expect}"
            outcome: int | str = response.status_code
        except httpx.HTTPError as exc:
            problem = outcome = f"{type(exc).__name__}: {exc}"
        at = time.monotonic()
        with self._lock:
            self.answered.append(at)
            if isinstance(outcome, int):
                self.statuses[outcome] += 1
            if problem is not None:
                self.failures.append(f"{at:.3f} {method} {path}: {problem}")


class Feed:
    """A change-feed stream through haproxy, read by a thread: its lines, timed."""

    def __init__(self, url: str, channel: str, last_event_id: str | None = None) -> None:
        self.url = f"{url}/v1/channels/{channel}/-/events"
        self.headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self.status: int | None = None
        self.lines: list[tuple[float, str]] = []
        self.error: BaseException | None = None
        self.ended = threading.Event()
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._client = httpx.Client(timeout=httpx.Timeout(10, read=120))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with self._client.stream("GET", self.url, headers=self.headers) as response:
                self.status = response.status_code
                # What close() shuts down, as closing the client does not wake the thread.
                self._socket = response.extensions["network_stream"].get_extra_info("socket")
                for line in response.iter_lines():
                    with self._lock:
                        self.lines.append((time.monotonic(), line))
        except Exception as exc:  # noqa: BLE001 - whatever ends the stream is shown
            self.error = exc
        finally:
            self.ended.set()

    def seen(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.lines)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """(event, data) of each event so far."""
        found, name = [], None
        for _at, line in self.seen():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name is not None:
                found.append((name, json.loads(line.removeprefix("data: "))))
                name = None
        return found

    def last_id(self) -> str:
        ids = [line.removeprefix("id: ") for _at, line in self.seen() if line.startswith("id: ")]
        assert ids, "no event with an id yet"
        return ids[-1]

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float = 10) -> Any:
        def check() -> Any:
            if self.ended.is_set() and not predicate():
                raise AssertionError(f"the stream ended ({self.error!r}) before {what}: "
                                     f"{self.seen()[-10:]}")  # fmt: skip
            return predicate()

        return wait_until(check, timeout, what)

    def wait_event(self, name: str, timeout: float = 10, **data: Any) -> dict[str, Any]:
        def found() -> list[dict[str, Any]]:  # a list, as the body may be {}
            wanted = data.items()
            return [body for event, body in self.events()
                    if event == name and all(body.get(k) == v for k, v in wanted)]  # fmt: skip

        return self.wait_for(f"event {name} {data}", found, timeout)[0]

    def heartbeats(self, since: float = 0.0) -> list[float]:
        return [at for at, line in self.seen() if line.startswith(":") and at > since]

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the stream's reader hung"
        self._client.close()


def _serving(stack: Stack) -> dict[str, float]:
    return {name: daemon.watchers() for name, daemon in stack.daemons.items()}


def _open_feed(stack: Stack, channel: str) -> tuple[Feed, str]:
    """A stream through haproxy, once open; and the name of the daemon that serves it."""
    before = _serving(stack)
    feed = Feed(stack.haproxy.url, channel)
    feed.wait_event("ready")
    assert feed.status == 200

    def which() -> str | None:
        grown = [name for name, n in _serving(stack).items() if n > before[name]]
        return grown[0] if len(grown) == 1 else None

    return feed, wait_until(which, 10, "the daemon serving the stream")


def _put(stack: Stack, channel: str, key: str, value: Any) -> None:
    answer = httpx.put(f"{stack.haproxy.url}/v1/channels/{channel}/scores/{key}", json=value,
                       timeout=10)  # fmt: skip
    assert answer.status_code == 200, answer.text


# -- the tests ----------------------------------------------------------------------


def test_the_shipped_file_is_valid_as_it_is() -> None:
    """`haproxy -c` on the file itself, paths and user as shipped (Debian's package
    creates the haproxy user and /var/lib/haproxy)."""
    binary = _haproxy()
    done = subprocess.run([binary, "-c", "-f", str(EXAMPLE)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "[WARNING]" not in output and "[ALERT]" not in output, output


def test_the_checks_notice_a_drain_before_it_ends() -> None:
    """The health checks take a draining daemon out of rotation well within the
    --drain-seconds the README recommends (5), and within the tests' 3."""
    text = EXAMPLE.read_text()
    defaults = " ".join(line for line in sections(text)["backend chanstore_api"]
                        if line.startswith("default-server"))  # fmt: skip
    words = defaults.split()
    setting = {words[i]: words[i + 1] for i in range(len(words) - 1)}
    inter, fastinter = seconds(setting["inter"]), seconds(setting["fastinter"])
    fall = int(setting["fall"])
    check = timeout(text, "backend chanstore_api", "check")
    worst = inter + (fall - 1) * fastinter + check
    assert worst < DRAIN_SECONDS, f"{worst}s to notice a drain, the test drains {DRAIN_SECONDS}s"


def test_stopping_a_daemon_fails_no_request(start_stack: Callable[..., Stack]) -> None:
    """SIGTERM one daemon under load: haproxy marks it DOWN while it still drains, no
    client request fails, and once it is gone everything goes to the other one."""
    stack = start_stack(["--drain-seconds", str(DRAIN_SECONDS), "--heartbeat-interval", "1"])
    haproxy = stack.haproxy
    channel = f"ch-{uuid.uuid4().hex[:12]}"
    # A change-feed stream on each daemon (leastconn spreads them).
    first, victim = _open_feed(stack, channel)
    second, survivor = _open_feed(stack, channel)
    assert {victim, survivor} == set(stack.daemons), "leastconn put both streams on one daemon"
    daemon = stack.daemons[victim]
    try:
        with Clients(haproxy.url, channel) as clients:
            wait_until(lambda: clients.done() >= REQUESTS_BEFORE, 30, "traffic before the stop")
            sessions = {n: int(haproxy.server("chanstore_api", n)["stot"]) for n in stack.daemons}
            assert all(sessions.values()), f"a daemon got no request: {sessions}"

            # Both in rotation, by checks that passed under this traffic.
            stack.wait_in_rotation()
            killed = time.monotonic()
            daemon.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            down = haproxy.wait_status("chanstore_api", victim, "DOWN", 10)
            marked = time.monotonic()
            assert daemon.running, "the daemon stopped before haproxy marked it DOWN"
            assert haproxy.server("chanstore_events", victim)["status"] == "DOWN"
            assert daemon.process.wait(timeout=DRAIN_SECONDS + STOP_TIMEOUT) == 0  # type: ignore[union-attr]
            exited = time.monotonic()
            wait_until(lambda: clients.done(since=exited) >= REQUESTS_AFTER, 30,
                       "traffic after the stop")  # fmt: skip
        # Nothing was sent to the stopped daemon once haproxy had marked it DOWN.
        assert haproxy.server("chanstore_api", victim)["stot"] == down["stot"]
        assert int(haproxy.server("chanstore_api", survivor)["stot"]) > sessions[survivor]
        assert clients.failures == [], (
            f"{len(clients.failures)} of {clients.done()} requests failed "
            f"(SIGTERM at {killed:.3f}):\n" + "\n".join(clients.failures[:30])
        )
        assert set(clients.statuses) <= {200, 404}, clients.statuses
        assert exited - killed >= DRAIN_SECONDS, "the daemon did not drain"
        assert re.search(rf"Server chanstore_api/{victim} is DOWN", haproxy.log_text())

        # The stream on the stopped daemon ended as the contract says, through haproxy;
        # the other one goes on, and a client resuming the first one gets its next event.
        first.wait_event("end", reason="shutdown")
        first.ended.wait(10)
        assert first.error is None, first.error
        resumed = Feed(haproxy.url, channel, last_event_id=first.last_id())
        resumed.wait_event("ready")
        _put(stack, channel, "after-the-stop", 1)
        resumed.wait_event("set", key="after-the-stop")
        second.wait_event("set", key="after-the-stop")
        assert not second.ended.is_set()
        resumed.close()
    finally:
        first.close()
        second.close()
    retries = {n: (row["wretr"], row["wredis"]) for (px, n), row in haproxy.stats().items()
               if px == "chanstore_api" and n in stack.daemons}  # fmt: skip
    print(
        f"\n{clients.done()} requests through haproxy, {len(clients.failures)} failed, "
        f"statuses {dict(clients.statuses)}; DOWN {marked - killed:.2f}s after SIGTERM, "
        f"daemon gone after {exited - killed:.2f}s; retries/redispatches {retries}"
    )


def test_a_daemon_killed_outright_costs_no_request(start_stack: Callable[..., Stack]) -> None:
    """SIGKILL, so no draining: until the checks notice, haproxy sends what the dead daemon
    refuses to the other one (retries, redispatch) and replays there what it left
    unanswered (retry-on empty-response). A replayed DELETE whose first try was applied
    answers 404 (the key is gone either way); nothing else fails."""
    stack = start_stack(["--heartbeat-interval", "1"])
    haproxy = stack.haproxy
    victim, daemon = next(iter(stack.daemons.items()))
    with Clients(haproxy.url, f"ch-{uuid.uuid4().hex[:12]}") as clients:
        wait_until(lambda: clients.done() >= REQUESTS_BEFORE, 30, "traffic before the kill")
        # Both in rotation, by checks that passed under this traffic.
        stack.wait_in_rotation()
        killed = time.monotonic()
        daemon.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        assert daemon.process.wait(timeout=10) == -signal.SIGKILL  # type: ignore[union-attr]
        haproxy.wait_status("chanstore_api", victim, "DOWN", 10)
        marked = time.monotonic()
        wait_until(lambda: clients.done(since=marked) >= REQUESTS_AFTER, 30,
                   "traffic after the kill")  # fmt: skip
    backend = haproxy.server("chanstore_api", "BACKEND")
    replayed_deletes = [f for f in clients.failures if " DELETE " in f and ": 404 " in f]
    others = [f for f in clients.failures if f not in replayed_deletes]
    shown = "\n".join(others[:30])
    assert others == [], f"{len(others)} of {clients.done()} requests failed:\n{shown}"
    assert int(backend["wredis"]) > 0, "nothing was redispatched: did the kill hit no request?"
    print(
        f"\n{clients.done()} requests through haproxy, {len(others)} failed, "
        f"{len(replayed_deletes)} replayed DELETEs answered 404; DOWN {marked - killed:.2f}s "
        f"after SIGKILL; retries {backend['wretr']}, redispatches {backend['wredis']}"
    )


def test_a_change_feed_stream_through_haproxy(start_stack: Callable[..., Stack]) -> None:
    """Events arrive through haproxy, and a stream with nothing to say stays open on the
    daemon's keep-alive comments (--heartbeat-interval 1 here)."""
    stack = start_stack(["--heartbeat-interval", "1"])
    channel = f"ch-{uuid.uuid4().hex[:12]}"
    feed, _daemon = _open_feed(stack, channel)
    try:
        _put(stack, channel, "hp", 10)
        assert feed.wait_event("set", key="hp")["value"] == 10
        quiet = time.monotonic()
        feed.wait_for("4 s of keep-alive comments",
                      lambda: len(feed.heartbeats(since=quiet)) >= 4, 15)  # fmt: skip
        assert not feed.ended.is_set()
        assert [body["value"] for event, body in feed.events() if event == "set"] == [10]
        _put(stack, channel, "hp", 20)
        feed.wait_event("set", key="hp", value=20)
    finally:
        feed.close()
    # haproxy logs the stream once it ends: it went through the feed's backend, and the
    # request id haproxy gave it is the one the daemon logged.
    line = wait_until(
        lambda: re.search(r"chanstore_events/(\S+) .*/-/events.*\" (\S+)$",
                          stack.haproxy.log_text(), re.MULTILINE),
        10, "haproxy's log line of the stream")  # fmt: skip
    daemon, request_id = line.groups()
    assert f'"request_id": "{request_id}"' in stack.daemons[daemon].log.read_text()


@pytest.mark.slow
def test_an_idle_stream_outlives_the_api_timeout(start_stack: Callable[..., Stack]) -> None:
    """A stream silent for longer than the API's `timeout server` (so it would be cut on the
    API backend) stays open: the feed's backend waits for the daemon's comments."""
    text = EXAMPLE.read_text()
    api = timeout(text, "backend chanstore_api", "server")
    events = timeout(text, "backend chanstore_events", "server")
    default_heartbeat = DaemonSettings.heartbeat_interval
    assert events >= 3 * default_heartbeat, "the feed's timeout should outlast missed comments"
    heartbeat = api + 2
    assert heartbeat < events
    stack = start_stack(["--heartbeat-interval", str(heartbeat)])
    channel = f"ch-{uuid.uuid4().hex[:12]}"
    feed, _daemon = _open_feed(stack, channel)
    try:
        opened = feed.seen()[-1][0]
        first = feed.wait_for("a keep-alive comment", feed.heartbeats, heartbeat + 10)
        assert first[0] - opened > api, "the stream was not silent for long"
        _put(stack, channel, "late", 1)
        feed.wait_event("set", key="late")
        assert not feed.ended.is_set()
    finally:
        feed.close()
