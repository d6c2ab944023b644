"""The daemon's life: start, serve, reload, ping systemd, sweep idle channels, stop.

:func:`serve` is what ``chanstore serve`` runs. It binds the listening socket
itself (so an address in use is a clear error before anything else starts),
serves the :class:`~chanstore.server.app.App` with uvicorn on uvloop, and on
SIGTERM or SIGINT stops accepting connections, lets the requests in flight
finish, writes out every queued write and closes the backends.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from typing import Any

import prometheus_client
import uvicorn
import uvloop

import chanstore
from chanstore import logs
from chanstore.config import DbConfig, load_db_config
from chanstore.errors import ConfigError
from chanstore.metrics import Metrics, default_metrics, install_process_collector
from chanstore.server import systemd
from chanstore.server.app import App
from chanstore.server.channels import ChannelRegistry
from chanstore.server.memory import ReleaseSchedule, release_free_memory
from chanstore.server.protocol import CoalescingProtocol
from chanstore.server.reload import Reloader, checksum
from chanstore.server.settings import DaemonSettings

__all__ = ["Daemon", "serve"]

log = logs.get_logger()

#: Seconds a readiness answer is reused, so probes cannot hammer the backends.
READINESS_TTL = 1.0
#: Seconds between the readiness checks that keep chanstore_ready and
#: chanstore_backend_up fresh when nobody calls /readyz.
READINESS_INTERVAL = 5.0


class Daemon:
    """One running chanstore: its settings, metrics, channels and config watch."""

    def __init__(self, settings: DaemonSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else default_metrics()
        self.token = settings.read_token()
        self.config: DbConfig = load_db_config(settings.db_config)
        self.registry: ChannelRegistry
        self.reloader: Reloader
        self.started = time.time()
        self._readiness: tuple[float, dict[str, str]] = (0.0, {})
        self._stop = asyncio.Event()
        self._server: uvicorn.Server | None = None

    def status_line(self, event: str = "serving") -> str:
        """What ``systemctl status`` shows on the STATUS= line."""
        names = ", ".join(self.registry.runtimes) or "no containers"
        return (
            f"{event} at {time.strftime('%H:%M:%S')}; listening on {self.settings.listen}; "
            f"{self.registry.channel_count} channels in memory; containers: {names}"
        )

    async def readiness(self) -> dict[str, str]:
        """Why the daemon cannot serve every container now (empty when ready)."""
        checked, problems = self._readiness
        if time.monotonic() - checked > READINESS_TTL:
            problems = await self.registry.readiness()
            self._readiness = (time.monotonic(), problems)
        return problems

    def request_stop(self) -> None:
        if self._stop.is_set() and self._server is not None:
            self._server.force_exit = True  # a second signal: stop waiting for stragglers
        self._stop.set()

    async def run(self, sock: socket.socket) -> None:
        """Serve on ``sock`` until asked to stop."""
        settings = self.settings
        self.registry = ChannelRegistry(settings, self.config, self.metrics)
        self.reloader = Reloader(self, settings.db_config, checksum(settings.db_config))
        self.metrics.build_info.labels(chanstore.__version__).set(1)
        self.metrics.reload_successful.set(1)
        self.metrics.reload_success_timestamp.set(time.time())
        for warning in self.config.warnings:
            log.warning("config_warning", warning=warning)

        # httptools with one write per response (see protocol.py); no proxy-header
        # rewriting, which nothing here reads (the daemon never logs client addresses).
        server = self._server = _Server(uvicorn.Config(
            App(self), loop="none", http=CoalescingProtocol, lifespan="off", access_log=False,
            log_config=None, server_header=False, date_header=False, proxy_headers=False,
            timeout_graceful_shutdown=settings.shutdown_timeout, timeout_keep_alive=30,
        ))  # fmt: skip
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reloader._spawn, "signal")
        serving = loop.create_task(server.serve(sockets=[sock]), name="http server")
        helpers: list[asyncio.Task[Any]] = []
        try:
            await self._until_started(server, serving)
            self.reloader.start()
            helpers = [
                loop.create_task(self._sweep_idle_channels(), name="idle sweeper"),
                loop.create_task(self._check_readiness(), name="readiness checks"),
            ]
            if (interval := systemd.watchdog_interval()) is not None:
                helpers.append(loop.create_task(_ping_watchdog(interval), name="watchdog"))
            log.info(
                "serving",
                listen=settings.listen,
                db_config=str(settings.db_config),
                containers=list(self.registry.runtimes),
                version=chanstore.__version__,
            )
            systemd.notify("READY=1", f"STATUS={self.status_line()}")
            stop = loop.create_task(self._stop.wait())
            await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
        finally:
            await self._shut_down(server, serving, helpers)

    async def _until_started(self, server: uvicorn.Server, serving: asyncio.Task[None]) -> None:
        while not server.started:
            if serving.done():
                serving.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def _shut_down(self, server: uvicorn.Server, serving: asyncio.Task[None],
                         helpers: list[asyncio.Task[Any]]) -> None:  # fmt: skip
        queued = sum(runtime.lanes.queued for runtime in self.registry.runtimes.values())
        log.info("stopping", queued_writes=queued)
        systemd.notify("STOPPING=1", "STATUS=stopping: finishing requests in flight")
        self.reloader.stop()
        for task in helpers:
            task.cancel()
        server.should_exit = True
        await serving  # uvicorn stops accepting, then waits for the requests in flight
        await self.registry.close()
        log.info("stopped")

    async def _sweep_idle_channels(self) -> None:
        interval = min(max(self.settings.idle_timeout / 4, 0.05), 30.0)
        # What channels that left freed stays resident until it is given back.
        schedule = ReleaseSchedule()
        while True:
            await asyncio.sleep(interval)
            dropped = self.registry.sweep_idle()
            if dropped:
                log.debug("idle_channels_dropped", count=dropped,
                          remaining=self.registry.channel_count)  # fmt: skip
            if schedule.swept(dropped):
                release_free_memory()

    async def _check_readiness(self) -> None:
        # /readyz answers from the same checks; this keeps the metrics fresh between calls.
        while True:
            try:
                await self.readiness()
            except Exception:
                log.exception("readiness_check_crashed")
            await asyncio.sleep(READINESS_INTERVAL)


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling: the daemon owns the signals."""

    def install_signal_handlers(self) -> None:  # older uvicorn
        return None

    def capture_signals(self) -> Any:  # newer uvicorn
        import contextlib  # noqa: PLC0415

        return contextlib.nullcontext()


async def _ping_watchdog(interval: float) -> None:
    # Pinging from the event loop means a loop stuck for a whole timeout stops the pings.
    while True:
        systemd.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def bind(settings: DaemonSettings) -> socket.socket:
    """The listening socket; ConfigError names the address when it cannot be had."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {settings.listen}: {exc.strerror}") from exc
    sock.set_inheritable(True)
    return sock


def serve(settings: DaemonSettings) -> int:
    """Run the daemon until SIGTERM or SIGINT; the process's exit status."""
    logs.configure(settings.log_format, settings.log_level)  # type: ignore[arg-type]
    # One series per metric: the *_created twins double the scrape and no query here uses them.
    prometheus_client.disable_created_metrics()
    # process_* metrics that survive systemd's ProcSubset=pid.
    install_process_collector()
    try:
        daemon = Daemon(settings)
        sock = bind(settings)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("cannot_start", problem=problem)
        systemd.notify(f"STATUS=cannot start: {exc.problems[0]}")
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(daemon.run(sock))
    return 0
