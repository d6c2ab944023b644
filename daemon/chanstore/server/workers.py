"""``chanstore serve --workers N``: a supervisor and N worker processes behind one port.

The supervisor is the process ``chanstore serve`` started (systemd's main
pid). It checks the settings and the db_config, binds the listening socket
(one per worker with ``SO_REUSEPORT``, see :mod:`chanstore.server.sockets`),
makes the group's private folder (``$RUNTIME_DIRECTORY`` under systemd, else
a new 0700 folder under the temporary directory), and starts each worker: the
same command, with its :class:`~chanstore.server.group.WorkerRole` in the
environment and its socket inherited. Then it watches them:

* **systemd sees one service.** Workers send their notifications (``READY=1``,
  ``STATUS=``, ``RELOADING=1``, ``WATCHDOG=1``) to the supervisor's own notify
  socket, never to systemd's; the supervisor says ``READY=1`` once every
  worker is ready, passes reload states and status lines on, and pings
  systemd's watchdog itself. With a watchdog, a worker that stops pinging for
  the whole timeout is killed and started again.
* **Signals.** SIGTERM and SIGINT are passed to every worker (which drains for
  ``--drain-seconds`` and finishes in-flight requests within
  ``--shutdown-timeout``), and whatever has not exited after both and a margin
  is killed. SIGHUP is passed on: every worker reloads. Workers run in their
  own process group (a terminal's Ctrl-C reaches the supervisor alone) and
  die with the supervisor (``PR_SET_PDEATHSIG``).
* **A worker that dies** is logged and started again after a backoff (0.5 s,
  doubling to 10 s; back to 0.5 s once it served a minute). When workers
  die :data:`GIVE_UP_DEATHS` times within :data:`GIVE_UP_WINDOW` seconds, the
  supervisor stops the others and exits 1 (systemd's ``Restart=`` takes over).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import uvloop

from chanstore import logs
from chanstore.backends import json_serving
from chanstore.config import load_db_config
from chanstore.engine import check_not_served_elsewhere
from chanstore.errors import ConfigError
from chanstore.server import systemd
from chanstore.server.group import ROLE_VARIABLE, WorkerRole
from chanstore.server.settings import DaemonSettings
from chanstore.server.sockets import bind, bind_group

__all__ = ["GIVE_UP_DEATHS", "GIVE_UP_WINDOW", "join_supervisor", "supervise", "whole_lines"]

log = logs.get_logger()

#: Worker deaths within GIVE_UP_WINDOW seconds after which the supervisor gives up.
GIVE_UP_DEATHS = 5
GIVE_UP_WINDOW = 60.0
#: Seconds before a dead worker is started again: the first, and at most.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
#: Seconds a worker must serve for its backoff to start again from the first.
BACKOFF_RESET_AFTER = 60.0
#: Seconds, beyond --drain-seconds and --shutdown-timeout, workers get to exit.
STOP_MARGIN = 5.0
#: How the listening socket is shared: "reuseport" (one each, the kernel spreads
#: connections) or "shared" (one socket, every worker accepts from it); see the README.
ACCEPT_VARIABLE = "CHANSTORE_WORKER_ACCEPT"
_PR_SET_PDEATHSIG = 1
_UCRED = struct.Struct("3i")


class _Worker:
    """One worker slot: its index, socket, process and history."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.process: subprocess.Popen[bytes] | None = None
        self.pidfd = -1
        self.started = 0.0
        self.ready = False
        self.reloading = False
        self.pinged = 0.0
        self.backoff = BACKOFF_FIRST


class Supervisor:
    """Starts, watches and stops the workers of one group."""

    def __init__(self, settings: DaemonSettings, sockets: list[socket.socket],
                 folder: Path) -> None:  # fmt: skip
        self.settings = settings
        self.folder = folder
        self.daemon_key = json_serving.new_daemon_key()
        self.workers = [_Worker(index, sockets[index % len(sockets)])
                        for index in range(settings.workers)]  # fmt: skip
        self.stopping = False
        self.status = 0
        self.announced = False
        self._deaths: deque[float] = deque()
        self._done = asyncio.Event()
        self._notify: socket.socket | None = None
        self._watchdog = systemd.watchdog_interval()
        self._reload_status: str | None = None

    # -- life ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._notify = self._notify_socket()
        loop.add_reader(self._notify.fileno(), self._notified)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._pass_on, signal.SIGHUP)
        for worker in self.workers:
            self._start(worker)
        chores = [loop.create_task(self._watch_pings())] if self._watchdog else []
        log.info("supervising", workers=len(self.workers), listen=self.settings.listen,
                 accept=self._accept_mode())  # fmt: skip
        await self._done.wait()
        for chore in chores:
            chore.cancel()
        loop.remove_reader(self._notify.fileno())
        self._notify.close()
        return self.status

    def _accept_mode(self) -> str:
        return "shared" if len({id(w.sock) for w in self.workers}) == 1 else "reuseport"

    def _start(self, worker: _Worker) -> None:
        role = WorkerRole(worker.index, len(self.workers), self.folder, os.getpid(),
                          worker.sock.fileno(), self.daemon_key)  # fmt: skip
        env = {name: value for name, value in os.environ.items()
               if name not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}  # fmt: skip
        env[ROLE_VARIABLE] = role.encode()
        env["NOTIFY_SOCKET"] = str(self.folder / "notify")
        if self._watchdog:
            env["WATCHDOG_USEC"] = str(int(self._watchdog * 2 * 1_000_000))
        command = [sys.executable, *sys.orig_argv[1:]]
        worker.process = subprocess.Popen(command, env=env, pass_fds=(worker.sock.fileno(),),
                                          stdin=subprocess.DEVNULL, process_group=0)  # fmt: skip
        worker.started = worker.pinged = time.monotonic()
        worker.ready = worker.reloading = False
        worker.pidfd = os.pidfd_open(worker.process.pid)
        asyncio.get_running_loop().add_reader(worker.pidfd, self._exited, worker)
        log.info("worker_started", worker=worker.index, worker_pid=worker.process.pid)

    def _exited(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.pidfd)
        os.close(worker.pidfd)
        assert worker.process is not None
        code = worker.process.wait()
        worker.process = None
        if self.stopping:
            # Ended by the signal passed on: before its handlers were installed (it was
            # starting) or after its loop closed (a second signal): nothing in flight.
            if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                log.warning("worker_stopped", worker=worker.index, status=_status(code))
                self.status = self.status or 1
            if all(w.process is None for w in self.workers):
                self._finish()
            return
        now = time.monotonic()
        served = now - worker.started
        log.error("worker_died", worker=worker.index, status=_status(code),
                  served_seconds=round(served, 3))  # fmt: skip
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > GIVE_UP_WINDOW:
            self._deaths.popleft()
        if len(self._deaths) >= GIVE_UP_DEATHS:
            log.error("workers_keep_dying", deaths=len(self._deaths), seconds=GIVE_UP_WINDOW)
            systemd.notify(f"STATUS=giving up: workers died {len(self._deaths)} times "
                           f"within {GIVE_UP_WINDOW:g}s")  # fmt: skip
            self.status = 1
            self.stop()
            return
        if served > BACKOFF_RESET_AFTER:
            worker.backoff = BACKOFF_FIRST
        delay, worker.backoff = worker.backoff, min(worker.backoff * 2, BACKOFF_MAX)
        systemd.notify(f"STATUS=worker {worker.index} died ({_status(code)}); "
                       f"starting it again in {delay:g}s")  # fmt: skip
        loop.call_later(delay, self._restart, worker)

    def _restart(self, worker: _Worker) -> None:
        if not self.stopping and worker.process is None:
            self._start(worker)

    def stop(self) -> None:
        """SIGTERM or SIGINT (a second one is passed on too: workers then stop at once)."""
        first = not self.stopping
        self.stopping = True
        if first:
            systemd.notify("STOPPING=1", "STATUS=stopping: the workers finish what is in flight")
            log.info("supervisor_stopping", workers=len(self.workers))
            wait = self.settings.drain_seconds + self.settings.shutdown_timeout + STOP_MARGIN
            asyncio.get_running_loop().call_later(wait, self._kill_stragglers)
        self._pass_on(signal.SIGTERM)
        if all(w.process is None for w in self.workers):
            self._finish()

    def _pass_on(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    def _kill_stragglers(self) -> None:
        for worker in self.workers:
            if worker.process is not None:
                log.error("worker_killed", worker=worker.index, reason="did not stop in time")
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()

    def _finish(self) -> None:
        log.info("supervisor_stopped", status=self.status)
        self._done.set()

    # -- what workers tell systemd ------------------------------------------------------

    def _notify_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(str(self.folder / "notify"))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        return sock

    def _notified(self) -> None:
        assert self._notify is not None
        while True:
            try:
                data, ancillary, _, _ = self._notify.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            pid = next((_UCRED.unpack(cred[:12])[0] for level, kind, cred in ancillary
                        if kind == socket.SCM_CREDENTIALS), 0)  # fmt: skip
            worker = next((w for w in self.workers
                           if w.process is not None and w.process.pid == pid), None)  # fmt: skip
            if worker is not None:
                self._heard(worker, dict(line.partition("=")[::2]
                                         for line in data.decode("utf-8", "replace").split("\n")
                                         if line))  # fmt: skip

    def _heard(self, worker: _Worker, fields: dict[str, str]) -> None:
        """A worker's notification, passed on as one service's: READY=1 once all are
        ready (and again once all finished a reload), status lines as they come."""
        worker.pinged = time.monotonic()
        status = fields.get("STATUS")
        if status and len(self.workers) > 1:
            status = f"worker {worker.index}: {status}"
        if fields.get("RELOADING") == "1":
            first = not any(w.reloading for w in self.workers)
            worker.reloading = True
            if first and self.announced:
                usec = fields.get("MONOTONIC_USEC") or str(systemd.monotonic_usec())
                systemd.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")
            return
        if fields.get("READY") == "1":
            worker.ready = True
            was_reloading, worker.reloading = worker.reloading, False
            if not self.announced:
                if all(w.ready for w in self.workers):
                    self.announced = True
                    systemd.notify("READY=1", f"STATUS={len(self.workers)} workers serving; "
                                              f"{fields.get('STATUS', '')}")  # fmt: skip
                    log.info("workers_ready", workers=len(self.workers))
                return
            if was_reloading:
                # A rejected reload's words win over another worker's "reloaded".
                if status and (self._reload_status is None or "rejected" in status):
                    self._reload_status = status
                if not any(w.reloading for w in self.workers):
                    said, self._reload_status = self._reload_status, None
                    systemd.notify("READY=1", *([f"STATUS={said}"] if said else []))
                return
        if status and self.announced and not self.stopping \
                and not any(w.reloading for w in self.workers):  # fmt: skip
            systemd.notify(f"STATUS={status}")

    async def _watch_pings(self) -> None:
        """Ping systemd's watchdog; kill a worker whose own pings stopped for a timeout."""
        assert self._watchdog is not None
        timeout = self._watchdog * 2
        while True:
            systemd.notify("WATCHDOG=1")
            now = time.monotonic()
            for worker in self.workers:
                # From its READY=1 on: starting is bounded by TimeoutStartSec.
                if worker.process is not None and worker.ready and not self.stopping \
                        and now - worker.pinged > timeout:  # fmt: skip
                    log.error(
                        "worker_hung", worker=worker.index, seconds=round(now - worker.pinged)
                    )
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.send_signal(signal.SIGABRT)
                    worker.pinged = now  # its exit restarts it; SIGKILL if it ignores this
                    asyncio.get_running_loop().call_later(5.0, _kill, worker.process)
            await asyncio.sleep(self._watchdog)


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def _group_folder() -> Path:
    """The group's private folder: in systemd's RuntimeDirectory when there is one."""
    base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    folder = Path(tempfile.mkdtemp(prefix="chanstore-workers-", dir=base))
    folder.chmod(0o700)
    return folder


def supervise(settings: DaemonSettings) -> int:
    """Run ``settings.workers`` workers until SIGTERM or SIGINT; the exit status."""
    try:
        settings.read_token()
        check_not_served_elsewhere(load_db_config(settings.db_config))
        if os.environ.get(ACCEPT_VARIABLE, "reuseport") == "shared":
            sockets = [bind(settings)]
        else:
            sockets = bind_group(settings, settings.workers)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("cannot_start", problem=problem)
        systemd.notify(f"STATUS=cannot start: {exc.problems[0]}")
        return 2
    folder = _group_folder()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(Supervisor(settings, sockets, folder).run())
    finally:
        for sock in sockets:
            sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def whole_lines() -> None:
    """Make stderr write each log line with one system call.

    The supervisor and its workers share one stderr (journald's stream, a log
    file): Python writes an event and its newline with two calls, and two
    processes' events then interleave into lines that are no JSON. Call it
    before the logs are configured.
    """
    sys.stderr.flush()
    binary = io.BufferedWriter(io.FileIO(sys.stderr.fileno(), "w", closefd=False), 1 << 16)
    sys.stderr = io.TextIOWrapper(binary, encoding="utf-8", errors="backslashreplace",
                                  line_buffering=True)  # fmt: skip


def join_supervisor(role: WorkerRole) -> None:
    """In a worker, first thing: die with the supervisor, name the worker in every log
    event, and mark json roots as the group's."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != role.supervisor_pid:
        os._exit(1)  # the supervisor died before the line above
    logs.bind_process(worker=role.index)
    if role.daemon_key is not None:
        json_serving.serve_for(role.daemon_key)
