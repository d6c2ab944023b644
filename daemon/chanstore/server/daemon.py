"""The composition root: the daemon's parts built, wired and run from start to stop.

:func:`serve` is what ``chanstore serve`` runs. It binds the listening socket
itself (so an address in use is a clear error before anything else starts),
then :class:`Daemon` builds each part with only what it needs: the storage
side (:class:`~chanstore.engine.Engine`), the API over it
(:func:`~chanstore.http.build_api`), the connections' door
(:class:`~chanstore.http.protocol.HttpProtocol`) and the config
:class:`~chanstore.server.reload.Reloader`. It owns the signals, systemd's
notifications, the periodic chores (idle channels, readiness, the watchdog)
and the order of shutdown: stop accepting, answer what is in flight, write
out every queued write, close the backends.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import socket
import time
from typing import Any

import prometheus_client
import uvloop
from prometheus_client import CollectorRegistry

import chanstore
from chanstore import codec, logs
from chanstore.config import DbConfig, load_db_config
from chanstore.engine import Engine, check_not_served_elsewhere
from chanstore.errors import ConfigError
from chanstore.http import Api, BearerToken, build_api
from chanstore.http.connections import Connections
from chanstore.http.listener import Listener
from chanstore.http.protocol import HttpProtocol
from chanstore.metrics import Metrics, default_metrics, install_process_collector
from chanstore.server import systemd
from chanstore.server.collector import tune_collector
from chanstore.server.group import Group, WorkerRole, served_here
from chanstore.server.memory import ReleaseSchedule, release_free_memory
from chanstore.server.reload import Applied, Reloader
from chanstore.server.settings import DaemonSettings
from chanstore.server.sockets import bind
from chanstore.server.workers import join_supervisor, supervise, whole_lines

__all__ = ["Daemon", "bind", "serve"]

log = logs.get_logger()

#: Seconds a readiness answer is reused, so probes cannot hammer the backends.
READINESS_TTL = 1.0
#: Seconds between the readiness checks that keep chanstore_ready and
#: chanstore_backend_up fresh when nobody calls /readyz.
READINESS_INTERVAL = 5.0


class Daemon:
    """One running chanstore."""

    def __init__(self, settings: DaemonSettings, metrics: Metrics | None = None,
                 role: WorkerRole | None = None) -> None:  # fmt: skip
        self.settings = settings
        #: Which worker of a group this is (``--workers N``), or None: a daemon on its own.
        self.role = role
        self.group: Group | None = None
        self.metrics = metrics if metrics is not None else default_metrics()
        # Checked before anything starts, so that a bad file is a clear error at once.
        self.token = BearerToken(settings.read_token())
        self._config: DbConfig = load_db_config(settings.db_config)
        if role is None:  # a group's supervisor asked before it started its workers
            check_not_served_elsewhere(self._config)
        self.engine: Engine
        self._readiness: tuple[float, dict[str, str]] = (0.0, {})
        self._stop = asyncio.Event()
        self._connections: Connections | None = None
        #: Set on SIGTERM with --drain-seconds: not ready, still serving.
        self.draining = False

    def status_line(self, event: str = "serving") -> str:
        """What ``systemctl status`` shows on the STATUS= line."""
        names = ", ".join(spec.name for spec in self._config) or "no containers"
        return (
            f"{event} at {time.strftime('%H:%M:%S')}; listening on {self.settings.listen}; "
            f"{len(self.engine.channels)} channels in memory; containers: {names}"
        )

    async def readiness(self) -> dict[str, str]:
        """Why the daemon cannot serve every container now (empty when ready)."""
        if self.draining:
            self.metrics.ready.set(0)
            return {"daemon": "draining"}
        checked, problems = self._readiness
        if time.monotonic() - checked > READINESS_TTL:
            problems = await self.engine.readiness.check()
            self._readiness = (time.monotonic(), problems)
        return problems

    def containers(self) -> list[dict[str, Any]]:
        """The running db_config's containers, for ``GET /v1/containers``."""
        return [{"name": spec.name, "implementation": spec.implementation, "load": spec.load}
                for spec in self._config]  # fmt: skip

    async def apply(self, config: DbConfig) -> Applied:
        """Serve a reloaded ``config``, and the token file as it reads now."""
        token = self.settings.read_token()  # ConfigError rejects the reload before any change
        check_not_served_elsewhere(config)  # a group's workers ask as the one daemon they are
        changes = self.engine.apply_config(served_here(self.role, config))
        self._config = config
        if self.group is not None:
            self.group.serve(config)
        self.token.set(token)
        warnings = list(config.warnings)
        for name, failure in (await self.engine.check_containers(changes.new_backends)).items():
            warnings.append(f"container {name!r}: its backend does not answer now ({failure})")
        return Applied(changes, warnings)

    def request_stop(self) -> None:
        """SIGTERM or SIGINT: drain first if --drain-seconds says so, then stop; a second
        signal stops at once (a third stops waiting for requests in flight)."""
        drain = self.settings.drain_seconds
        if drain > 0 and not self.draining and not self._stop.is_set():
            # Not ready from now on, so that load balancers stop sending here, while
            # everything still works for whoever they already sent.
            self.draining = True
            self.metrics.ready.set(0)
            log.info("draining", seconds=drain)
            systemd.notify(f"STATUS=draining for {drain:g}s: not ready, still serving")
            asyncio.get_running_loop().call_later(drain, self._stop.set)
            return
        if self._stop.is_set() and self._connections is not None:
            self._connections.cut()  # a second signal: stop waiting for stragglers
        self._stop.set()

    async def run(self, sock: socket.socket) -> None:
        """Serve on ``sock`` until asked to stop."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        self.engine = Engine(settings.engine(), served_here(self.role, self._config), self.metrics)
        reloader = Reloader(settings.db_config, self.apply, self.metrics,
                            poll_interval=settings.config_poll_interval,
                            status=self.status_line)  # fmt: skip
        if self.role is None:
            api = build_api(self.engine.store, self.engine.feed, self.token, self.metrics,
                            readiness=self.readiness, reload=reloader.reload,
                            containers=self.containers, service_id=settings.service_id)  # fmt: skip
        else:
            api = await self._join_group(reloader)
        connections = self._connections = Connections(settings.limits(), self.metrics)
        listener = Listener(sock, lambda: HttpProtocol(api, connections))
        listener.start()
        connections.start()
        self.metrics.build_info.labels(chanstore.__version__).set(1)
        self.metrics.reload_successful.set(1)
        self.metrics.reload_success_timestamp.set(time.time())
        for warning in self._config.warnings:
            log.warning("config_warning", warning=warning)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, reloader.trigger, "signal")
        reloader.start()
        chores = [
            loop.create_task(self._sweep_idle_channels(), name="idle sweeper"),
            loop.create_task(self._check_readiness(), name="readiness checks"),
        ]
        if (interval := systemd.watchdog_interval()) is not None:
            chores.append(loop.create_task(_ping_watchdog(interval), name="watchdog"))
        log.info("serving", listen=settings.listen, db_config=str(settings.db_config),
                 containers=self.engine.containers.names(),
                 version=chanstore.__version__)  # fmt: skip
        systemd.notify("READY=1", f"STATUS={self.status_line()}")
        try:
            await self._stop.wait()
        finally:
            log.info("stopping", queued_writes=self.engine.containers.queued_writes)
            systemd.notify("STOPPING=1", "STATUS=stopping: finishing requests in flight")
            reloader.stop()
            for task in chores:
                task.cancel()
            listener.close()  # no new connections
            await asyncio.gather(
                connections.shutdown(settings.shutdown_timeout),
                *([self.group.close(settings.shutdown_timeout)] if self.group else []),
            )
            await self.engine.close()
            log.info("stopped")

    async def _join_group(self, reloader: Reloader) -> Api:
        """Serve this worker's own API on the group's private socket (without the token:
        the socket's 0700 folder is the door; uncounted: the worker that relayed a request
        counted it); the API it returns answers for the group (see
        :mod:`chanstore.server.group`)."""
        assert self.role is not None
        settings = self.settings
        group = self.group = Group(self.role, self.metrics, timeout=settings.backend_timeout,
                                   readiness=self.readiness, reload=reloader.reload)  # fmt: skip
        group.serve(self._config)
        own = build_api(self.engine.store, self.engine.feed, BearerToken(None), self.metrics,
                        readiness=self.readiness, reload=reloader.reload,
                        containers=self.containers, service_id=settings.service_id,
                        count_in=Metrics(CollectorRegistry()))  # fmt: skip
        await group.start(own, settings.limits())
        api = build_api(self.engine.store, self.engine.feed, self.token, self.metrics,
                        readiness=group.readiness, reload=group.reload,
                        containers=self.containers, service_id=settings.service_id)  # fmt: skip
        api.divert = group.divert
        return api

    async def _sweep_idle_channels(self) -> None:
        interval = min(max(self.settings.idle_timeout / 4, 0.05), 30.0)
        # What channels that left freed stays resident until it is given back.
        schedule = ReleaseSchedule()
        while True:
            await asyncio.sleep(interval)
            dropped = self.engine.sweep_idle()
            if dropped:
                log.debug("idle_channels_dropped", count=dropped,
                          remaining=len(self.engine.channels))  # fmt: skip
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


async def _ping_watchdog(interval: float) -> None:
    # Pinging from the event loop means a loop stuck for a whole timeout stops the pings.
    while True:
        systemd.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def raise_file_limit(connections: int) -> None:
    """Raise the soft limit on open files toward the hard one, so that
    ``--max-connections`` (and not EMFILE) is what bounds connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256  # backends, journal, log, watches
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("file_limit_low", limit=new, max_connections=connections,
                        hint="raise LimitNOFILE or lower --max-connections")  # fmt: skip


def serve(settings: DaemonSettings) -> int:
    """Run the daemon until SIGTERM or SIGINT; the process's exit status."""
    role = WorkerRole.from_environment()
    if role is not None or settings.workers > 1:
        whole_lines()  # several processes, one stderr
    logs.configure(settings.log_format, settings.log_level)  # type: ignore[arg-type]
    # One series per metric: the *_created twins double the scrape and no query here uses them.
    prometheus_client.disable_created_metrics()
    # process_* metrics that survive systemd's ProcSubset=pid.
    install_process_collector()
    # The daemon carries values in their stored form and revives no application's
    # classes: a mark of a type it does not know is expected, not a forgotten
    # register_type worth a warning.
    codec.warn_unregistered(False)
    tune_collector()
    if role is None and settings.workers > 1:
        return supervise(settings)
    if role is not None:
        join_supervisor(role)
    try:
        daemon = Daemon(settings, role=role)
        sock = bind(settings) if role is None else socket.socket(fileno=role.listen_fd)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("cannot_start", problem=problem)
        systemd.notify(f"STATUS=cannot start: {exc.problems[0]}")
        return 2
    raise_file_limit(settings.max_connections)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(daemon.run(sock))
    return 0
