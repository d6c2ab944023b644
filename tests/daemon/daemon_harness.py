"""Runs ``chanstore serve`` as a real process for the end-to-end tests, and reads what it says.

A :class:`DaemonProcess` owns one working directory: the daemon's db_config
(``db.json``), its log (``daemon.log``, stdout and stderr together), its token
file when auth is on, and the json backends' data under ``data/`` (db_config
``root_dir`` values are relative to the daemon's working directory).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from prometheus_client.parser import text_string_to_metric_families

from chanstore.backends.journal import JOURNAL_NAME
from chanstore.backends.json_serving import MARK_NAME
from chanstore.client import Client, key_path, segment


def _shared_helpers() -> Any:
    """tests/conftest.py, loaded as a module of its own so its helpers can be imported."""
    name = "chanstore_tests_shared_conftest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_shared = _shared_helpers()
free_port = _shared.free_port
wait_until = _shared.wait_until
RedisServer = _shared.RedisServer
IN_CI = _shared.IN_CI

__all__ = [
    "IN_CI",
    "JSON_CONTAINERS",
    "MODULE_MAX_BODY",
    "DaemonProcess",
    "NotifyListener",
    "RedisServer",
    "Response",
    "free_port",
    "json_entry",
    "key_path",
    "metric",
    "read_response",
    "run_cli",
    "segment",
    "wait_until",
]

#: Seconds the daemon gets to answer /healthz after it was started.
START_TIMEOUT = 30.0
#: Seconds the daemon gets to exit after SIGTERM.
STOP_TIMEOUT = 20.0
#: The body limit of the daemon a test module shares, small so that the 413 tests send little.
MODULE_MAX_BODY = 4096
#: What, in a daemon's log, means something crashed.
CRASH_MARKERS = ("request_crashed", "Traceback", "config_reload_crashed")
#: ``CHANSTORE_TEST_WORKERS=2`` runs every daemon of the end-to-end tests as
#: ``chanstore serve --workers 2`` (unless a test names its own ``--workers``).
TEST_WORKERS = os.environ.get("CHANSTORE_TEST_WORKERS", "")
#: Events each worker of a group logs for the same happening (each one starts, stops
#: and reloads): asked for by name, worker 0's stand for the daemon's.
PER_WORKER_EVENTS = frozenset({"serving", "stopping", "stopped", "config_reloaded",
                               "config_reload_rejected", "config_restored",
                               "config_warning"})  # fmt: skip


def json_entry(name: str, root_dir: str = "data", **fields: Any) -> dict[str, Any]:
    """A db_config entry for a json container."""
    settings = {"root_dir": root_dir, **fields.pop("settings", {})}
    return {"implementation": "json", "name": name, "load": True, "clear": False,
            "settings": settings, **fields}  # fmt: skip


JSON_CONTAINERS = [json_entry("stats"), json_entry("profiles")]


class DaemonProcess:
    """One ``chanstore serve`` process and its working directory."""

    def __init__(
        self,
        workdir: Path,
        config: list[dict[str, Any]] | None = None,
        *,
        args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        token: str | None = None,
        log_level: str = "info",
        config_path: Path | None = None,
        settings_in_environment: bool = False,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = config_path or workdir / "db.json"
        if config is not None:
            self.write_config(config)
        self.data_dir = workdir / "data"
        self.log_path = workdir / "daemon.log"
        self.args = list(args)
        self.settings_in_environment = settings_in_environment
        self.env = dict(env or {})
        self.log_level = log_level
        self.token = token
        self.token_file: Path | None = None
        if token is not None:
            self.token_file = workdir / "token"
            self.token_file.write_text(token + "\n")
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._http: httpx.Client | None = None

    # -- life ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.port}"

    def settings(self) -> dict[str, str]:
        """The daemon's settings, by flag name."""
        settings = {
            "db-config": str(self.config_path),
            "listen": self.listen,
            "log-format": "json",
            "log-level": self.log_level,
            "service-id": "e2e",
        }
        if self.token_file is not None:
            settings["token-file"] = str(self.token_file)
        return settings

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "chanstore.cli", "serve"]
        if not self.settings_in_environment:
            for flag, value in self.settings().items():
                command += [f"--{flag}", value]
        if TEST_WORKERS and "--workers" not in self.args:
            command += ["--workers", TEST_WORKERS]
        return command + self.args

    def environment(self) -> dict[str, str]:
        env = _clean_environment()
        if self.settings_in_environment:  # as a systemd EnvironmentFile would set them
            for flag, value in self.settings().items():
                env["CHANSTORE_" + flag.upper().replace("-", "_")] = value
        return {**env, **self.env}

    def start(self, *, same_port: bool = False) -> DaemonProcess:
        """Start the daemon and wait until /healthz answers; retries a port taken meanwhile."""
        assert self.process is None or self.process.poll() is not None, "already running"
        for attempt in range(5):
            if not (same_port and self.port is not None):
                self.port = free_port()
            log_start = self.log_size()
            env = self.environment()
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=env,
                )  # fmt: skip
            if self._wait_healthy():
                self._wait_for_every_worker(log_start)
                self._reconnect()
                return self
            new_log = self.log_text()[log_start:]
            if "cannot listen" in new_log and attempt < 4:
                same_port = False  # another process took the port first: try another one
                continue
            raise RuntimeError(f"chanstore serve did not start; its log:\n{new_log}")
        raise AssertionError("unreachable")

    def _wait_healthy(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(base_url=self.url, timeout=2) as probe:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                try:
                    answer = probe.get("/healthz")
                    # Ours, not another test's daemon that took the port between our
                    # choosing it and binding it (chanstore serve re-executes itself
                    # in place, so the PID is the one we started).
                    if answer.status_code == 200 and answer.json()["pid"] == self.process.pid:
                        return True
                except (httpx.TransportError, ValueError, KeyError):
                    pass
                time.sleep(0.05)
        self.process.kill()
        self.process.wait(timeout=10)
        return False

    def _wait_for_every_worker(self, log_start: int) -> None:
        """In a group, /healthz answers once any worker serves: wait for all of them, so
        that a test's next step (an edit of db_config, say) finds every worker started.
        Read from each worker's ``serving`` event, which a log level above info hides."""
        if self.workers == 1 or self.log_level not in ("debug", "info"):
            return
        expected = set(range(self.workers))

        def serving() -> set[int]:
            records = self.events("serving", log_start, every_worker=True)
            return {record.get("worker", 0) for record in records}

        wait_until(lambda: serving() >= expected, START_TIMEOUT, f"{self.workers} workers serving")

    def _reconnect(self) -> None:
        if self._http is not None:
            self._http.close()
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=15)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``signum`` and wait for the exit; its status. SIGKILL and fail past ``timeout``."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                raise AssertionError(
                    f"chanstore did not exit within {timeout}s of signal {signum}; killed it"
                ) from None
        if self._http is not None:
            self._http.close()
            self._http = None
        return self.process.returncode

    def restart(self) -> DaemonProcess:
        """Stop (asserting a clean exit) and start again on the same port."""
        assert self.stop() == 0, self.log_text()[-3000:]
        return self.start(same_port=True)

    def close(self) -> list[str]:
        """Stop the daemon if it runs; the crash reports and problems found in its log."""
        problems: list[str] = []
        if self.running:
            try:
                self.stop()
            except AssertionError as exc:
                problems.append(str(exc))
        if self._http is not None:
            self._http.close()
            self._http = None
        problems.extend(self.crashes())
        return problems

    # -- talking to it ---------------------------------------------------------

    @property
    def http(self) -> httpx.Client:
        """A keep-alive HTTP client of the running daemon (with the token, if any)."""
        assert self._http is not None, "the daemon is not running"
        return self._http

    def client(self, **options: Any) -> Client:
        """chanstore's own sync client of this daemon."""
        options.setdefault("token", self.token)
        return Client(self.url, **options)

    def put(self, channel: str, container: str, key: str, value: Any) -> httpx.Response:
        return self.http.put(key_path(channel, container, key), json=value)

    def get(self, channel: str, container: str, key: str) -> httpx.Response:
        return self.http.get(key_path(channel, container, key))

    def keys(self, channel: str, container: str) -> list[str]:
        response = self.http.get(key_path(channel, container))
        assert response.status_code == 200, response.text
        return response.json()["keys"]

    def metrics_text(self) -> str:
        response = self.http.get("/metrics")
        assert response.status_code == 200
        return response.text

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one sample of /metrics, or None when it is not there."""
        return metric(self.metrics_text(), name, **labels)

    def containers(self) -> list[str]:
        response = self.http.get("/v1/containers")
        assert response.status_code == 200, response.text
        return [entry["name"] for entry in response.json()["containers"]]

    def serves(self, container: str) -> bool:
        """Whether the daemon answers for ``container`` (not 404 unknown_container)."""
        response = self.http.get(key_path("probe", container))
        return response.status_code == 200

    # -- config ----------------------------------------------------------------

    def write_config(self, entries: Any, path: Path | None = None) -> None:
        """Write db_config in place, the way ``echo ... > db.json`` does."""
        text = entries if isinstance(entries, str) else json.dumps(entries, indent=1)
        with (path or self.config_path).open("w", encoding="utf-8") as file:
            file.write(text)

    # -- its log -------------------------------------------------------------------

    def log_size(self) -> int:
        return len(self.log_text())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, since: int = 0) -> list[str]:
        return self.log_text()[since:].splitlines()

    def events(self, event: str | None = None, since: int = 0, *,
               every_worker: bool = False) -> list[dict[str, Any]]:  # fmt: skip
        """The JSON log events (those named ``event``, when given). Of the events every
        worker logs, worker 0's stand for the daemon's, unless ``every_worker``."""
        found = []
        for line in self.log_lines(since):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (event is None or record.get("event") == event):
                if event in PER_WORKER_EVENTS and record.get("worker", 0) != 0 \
                        and not every_worker:  # fmt: skip
                    continue  # another worker's word for the same thing
                found.append(record)
        return found

    def lifecycle(self, *names: str, since: int = 0) -> list[str]:
        """The daemon's events among ``names``, in the order logged: of the events every
        worker logs (starting, stopping, reloading), worker 0's stand for the daemon's."""
        return [
            record["event"]
            for record in self.events(since=since)
            if record.get("event") in names
            and (record["event"] not in PER_WORKER_EVENTS or record.get("worker", 0) == 0)
        ]

    @property
    def workers(self) -> int:
        """How many serving processes this daemon runs (``--workers``; 1 when not given)."""
        if "--workers" in self.args:
            return int(self.args[self.args.index("--workers") + 1])
        return int(TEST_WORKERS or 1)

    def crashes(self, since: int = 0) -> list[str]:
        return [
            line for line in self.log_lines(since) if any(mark in line for mark in CRASH_MARKERS)
        ]

    def files(self) -> dict[str, bytes]:
        """Every file under the working directory, by relative path, with its bytes."""
        return {
            str(path.relative_to(self.workdir)): path.read_bytes()
            for path in sorted(self.workdir.rglob("*"))
            if path.is_file() and not path.is_symlink()
        }

    def data_files(self) -> dict[str, bytes]:
        """The json backends' value files (under the data root ``data/``), with their bytes.

        The root's write-ahead journal (and any damaged journal kept aside for
        inspection) and the mark of a served root are the backend's own
        bookkeeping, not values.
        """
        return {
            name: data
            for name, data in self.files().items()
            if name.startswith("data/")
            and not Path(name).name.startswith(JOURNAL_NAME)
            and Path(name).name != MARK_NAME
        }


@dataclass
class Response:
    """One HTTP answer as read off a raw socket (header names in lower case)."""

    status: int
    headers: dict[str, str]
    body: bytes


def read_response(stream: BinaryIO) -> Response:
    """The next answer on ``stream`` (a raw socket's ``makefile("rb")``)."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", "0")))
    return Response(int(status_line.split()[1]), headers, body)


def _clean_environment() -> dict[str, str]:
    """This process's environment without what would configure the daemon behind a test's back."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CHANSTORE_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with exactly ``labels`` in exposition ``text``."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run the ``chanstore`` command with ``args``, as a person would in a shell."""
    return subprocess.run(
        [sys.executable, "-m", "chanstore.cli", *args],
        cwd=cwd, env={**_clean_environment(), **(env or {})}, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket; collects what arrives."""

    def __init__(self, address: str | Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        text = str(address)
        # "@name" is Linux's abstract namespace, as systemd writes it in NOTIFY_SOCKET.
        self.sock.bind("\0" + text[1:] if text.startswith("@") else text)
        self.sock.settimeout(0.1)
        self.address = text
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            lines = data.decode("utf-8", "replace").split("\n")
            fields = dict(line.partition("=")[::2] for line in lines if line)
            with self._lock:
                self.messages.append(fields)

    def received(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, predicate: Any, what: str, timeout: float = 10.0,
                 after: int = 0) -> tuple[int, dict[str, str]]:  # fmt: skip
        """The first message from index ``after`` on that satisfies ``predicate``."""

        def find() -> tuple[int, dict[str, str]] | None:
            for index, message in enumerate(self.received()[after:], start=after):
                if predicate(message):
                    return index, message
            return None

        try:
            return wait_until(find, timeout, what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; received: {self.received()}") from None

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self.sock.close()
