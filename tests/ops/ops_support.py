"""Helpers of the ops tests: the shipped files, the real tools, a daemon and a Prometheus.

Every process started here runs on a free loopback port in a folder of the
test's own, is waited for with a timeout, and is stopped (SIGTERM, then
SIGKILL past a timeout) by whoever started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from support import RedisServer, wait_until

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
GRAFANA_DIR = ROOT / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))

IN_CI = bool(os.environ.get("CI"))
#: Seconds a real tool (promtool) may take for one command.
TOOL_TIMEOUT = 120
#: Seconds a process may take to start serving, or to stop.
START_TIMEOUT = 30
STOP_TIMEOUT = 15


def require_tool(name: str, package: str = "prometheus") -> str:
    """The path of the executable ``name`` (of Debian's ``package``): missing, the test fails
    in CI and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = (
            f"{name} is not installed (Debian package {package}; scripts/test installs it as root)"
        )
        if IN_CI:
            pytest.fail(f"{message}, and CI is set: the ops tests need the real tool")
        pytest.skip(message)
    return path


def run_tool(*args: str | Path, stdin: bytes | None = None, cwd: Path | None = None) -> str:
    """Run a real tool; assert it exits 0 and return its output (shown in full on failure)."""
    command = [str(arg) for arg in args]
    try:
        done = subprocess.run(
            command, input=stdin, cwd=cwd, capture_output=True, timeout=TOOL_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(command)} did not finish in {TOOL_TIMEOUT}s") from exc
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output}"
    return output


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rules(kind: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every rule of the shipped rule files that has the key ``kind`` (alert or record)."""
    for path in RULE_FILES:
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                if kind in rule:
                    yield path, rule


def ops_db_config(unreachable_port: int) -> list[dict[str, Any]]:
    """Two json containers, and a redis one whose server does not exist (its requests 503)."""
    redis = {"host": "127.0.0.1", "port": unreachable_port,
             "socket_timeout": 0.5, "socket_connect_timeout": 0.5}  # fmt: skip
    return [
        {"implementation": "json", "name": "profiles", "load": True,
         "settings": {"root_dir": "data"}},
        {"implementation": "json", "name": "health_bars", "load": False,
         "settings": {"root_dir": "data", "fsync": False}},
        {"implementation": "redis", "name": "scores", "load": False, "settings": redis},
    ]  # fmt: skip


def shared_redis_entry(redis: RedisServer, name: str = "shared") -> dict[str, Any]:
    """A redis container on ``redis``, which several daemons can serve together."""
    return {"implementation": "redis", "name": name, "load": False, "settings": redis.settings}


@contextlib.contextmanager
def running_redis(folder: Path, *options: str) -> Iterator[RedisServer]:
    """A redis-server of the test's own in ``folder``, on a free port, stopped afterwards."""
    require_tool("redis-server", package="redis-server")
    server = RedisServer(folder, *options)
    try:
        yield server.start()
    finally:
        server.stop()


def _stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM, then SIGKILL past ``timeout``; the exit status, None when it had to be killed."""
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
        return None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class _ServedProcess:
    """A process these tests started that serves HTTP: polled until it answers, stopped."""

    name = "process"
    process: subprocess.Popen[bytes] | None
    http: httpx.Client
    log: Path

    def _answers(self, path: str) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"{self.name} exited {self.process.returncode}:\n{_tail(self.log)}"
            )
        try:
            return self.http.get(path).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        self.http.close()
        if self.process is not None:
            status = _stop(self.process)
            assert status == 0, f"{self.name} exited {status}:\n{_tail(self.log)}"


class Daemon(_ServedProcess):
    """A real ``chanstore serve`` process in ``folder`` on a free port."""

    name = "chanstore serve"

    def __init__(self, folder: Path, entries: list[dict[str, Any]]) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "db.json"
        self.log = folder / "daemon.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.write_config(entries)
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_config(self, entries: Any) -> None:
        text = entries if isinstance(entries, str) else json.dumps(entries, indent=2)
        self.config.write_text(text, encoding="utf-8")

    def start(self) -> Daemon:
        # CHANSTORE_* variables of whoever runs the tests must not reach the daemon.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHANSTORE_")}
        chanstore = shutil.which("chanstore")
        if chanstore is None:
            pytest.fail("the chanstore console script is not installed (pip install -e .)")
        command = [
            chanstore, "serve", "--db-config", str(self.config), "--listen", self.target,
            "--log-format", "json",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self._healthy, START_TIMEOUT, f"chanstore serve on {self.target}")
        return self

    def _healthy(self) -> bool:
        return self._answers("/healthz")

    def log_text(self) -> str:
        return _tail(self.log, 200)

    def metrics_text(self) -> str:
        response = self.http.get("/metrics")
        assert response.status_code == 200, response.text
        return response.text


class Traffic:
    """Requests against a daemon from a thread, until stopped: rates that are not zero.

    Each round stores and reads values in each of ``json_containers`` (cache
    hits and misses, 404s for absent keys, a 400 for a body that is not JSON,
    a 412 for a conditional write that loses) and stores into
    ``failing_container``, whose backend cannot be reached (503). Every tenth
    round also uses the change feed: a stream that opens (200) and gets the
    event of a write, a resume from a cursor that does not cover a container
    (410), and a stream of ``failing_container`` (503 backend_unavailable).
    Given a ``peer`` daemon that serves ``shared_container`` (a redis container)
    with this one, each round also reads a key of it here and then writes it
    through the peer: this daemon hears of the write (an invalidation).
    """

    def __init__(self, daemon: Daemon, json_containers: list[str], failing_container: str,
                 *, peer: Daemon | None = None, shared_container: str = "") -> None:  # fmt: skip
        self.json_containers = json_containers
        self.failing_container = failing_container
        self.shared_container = shared_container
        self._peer = httpx.Client(base_url=peer.url, timeout=10) if peer is not None else None
        self.statuses: dict[int, int] = {}
        self.peer_statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._client = httpx.Client(base_url=daemon.url, timeout=10)

    def round(self, n: int) -> None:
        """One round of requests (also usable without the thread)."""
        channel = f"/v1/channels/channel-{n % 5}"
        for container in self.json_containers:
            key = f"{channel}/{container}/key-{n % 7}"
            self._send("PUT", key, json={"n": n, "hp": [n, 100]})
            self._send("GET", key)
            self._send("GET", f"{channel}/{container}/absent-{n}")
            self._send("GET", f"{channel}/{container}")
            self._send("POST", f"{channel}/{container}/-/get",
                       json={"keys": [f"key-{i}" for i in range(3)]})  # fmt: skip
            self._send("PUT", key, json=n, headers={"If-Match": '"0"'})  # nobody's ETag: 412
            if n % 10 == 0:
                self._send("DELETE", key)
                self._send("PUT", key, content=b"{not json")
        self._send("PUT", f"{channel}/{self.failing_container}/score", json=n)
        if self._peer is not None:
            key = f"{channel}/{self.shared_container}/key-{n % 7}"
            self._send("GET", key)  # the channel, and this key if present, in memory here
            status = self._peer.put(key, json={"n": n}).status_code
            self.peer_statuses[status] = self.peer_statuses.get(status, 0) + 1
        if n % 10 == 0:
            self._send("GET", "/readyz")
            self.feed(channel, n)

    def feed(self, channel: str, n: int) -> None:
        """A change-feed stream that sees one write; a 410 and a 503 on the feed's route."""
        container = self.json_containers[0]
        cursor = self._watch(channel, {"containers": container},
                             then=(f"{channel}/{container}/watched", n))  # fmt: skip
        assert cursor is not None, "the change feed did not open"
        # The cursor names a position in ``container`` only: resuming the failing
        # container from it is cursor_expired, before its backend is asked.
        self._watch(channel, {"containers": self.failing_container, "since": cursor})
        self._watch(channel, {"containers": self.failing_container})

    def _watch(self, channel: str, params: dict[str, str],
               then: tuple[str, Any] | None = None) -> str | None:  # fmt: skip
        """Ask for a feed stream; once open, store ``then`` (path, value) and read up to its
        event, then close. The stream's first cursor, or None when it did not open."""
        with self._client.stream("GET", f"{channel}/-/events", params=params) as response:
            status = response.status_code
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status != 200:
                response.read()
                return None
            cursor = None
            for line in response.iter_lines():
                if cursor is None and line.startswith("id: "):
                    cursor = line.removeprefix("id: ")
                    if then is None:
                        break
                    path, value = then
                    self._send("PUT", path, json=value)
                elif line == "event: set":
                    break
            return cursor

    def _send(self, method: str, path: str, **options: Any) -> None:
        response = self._client.request(method, path, **options)
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            with contextlib.suppress(httpx.TransportError):  # the test sees the daemon's state
                self.round(n)
            n += 1
            self._stop.wait(0.05)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=STOP_TIMEOUT)
        self._client.close()
        if self._peer is not None:
            self._peer.close()


class Prometheus(_ServedProcess):
    """A real Prometheus on a free port, with a configuration written for the test."""

    name = "prometheus"

    def __init__(self, binary: str, folder: Path, config: dict[str, Any]) -> None:
        self.binary = binary
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.log = folder / "prometheus.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def start(self) -> Prometheus:
        command = [
            self.binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self._ready, START_TIMEOUT, f"prometheus on port {self.port}")
        return self

    def _ready(self) -> bool:
        return self._answers("/-/ready")

    def api(self, path: str, **params: Any) -> dict[str, Any]:
        """A GET of the HTTP API; the decoded answer, whatever its status."""
        response = self.http.get(f"/api/v1/{path}", params=params)
        try:
            return response.json()
        except ValueError as exc:
            raise AssertionError(f"/api/v1/{path}: {response.status_code} {response.text}") from exc

    def query(self, expr: str) -> dict[str, Any]:
        """The answer to an instant query: {"status": ..., "data": ...} or an error."""
        response = self.http.post("/api/v1/query", data={"query": expr})
        return response.json()

    def log_text(self) -> str:
        return _tail(self.log, 100)


# -- Grafana dashboards --------------------------------------------------------------

#: What the e2e test puts in place of Grafana's variables: every value of each
#: template variable (they are all used as regex matchers), and intervals that
#: fit a 1 s scrape interval.
SUBSTITUTIONS = {
    "$__rate_interval": "10s",
    "$__interval": "2s",
    "$__range": "1m",
    "$__range_s": "60",
    "$__range_ms": "60000",
}
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows included, rows themselves not."""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query", "")
    return query["query"] if isinstance(query, dict) else query


def substitute(expr: str, dashboard: dict[str, Any]) -> str:
    """``expr`` as Grafana would send it with "All" chosen for every variable."""
    for name, value in SUBSTITUTIONS.items():
        expr = expr.replace(name, value)
    names = {v["name"] for v in dashboard["templating"]["list"]}

    def value_of(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in names, f"{expr!r} uses ${name}, which is not a variable of the dashboard"
        return ".*"

    return _VARIABLE.sub(value_of, expr)
