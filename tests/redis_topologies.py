"""Redis topologies that tests start as real processes: a Sentinel-managed primary, a Cluster.

:class:`SentinelSetup` is a primary, its replicas and three sentinels;
:class:`ClusterSetup` is three primaries with one replica each, built with
``redis-cli --cluster create``. Both run on free loopback ports with no
persistence, and every wait is bounded and polls what Redis itself says
(``SENTINEL get-master-addr-by-name``, ``INFO replication``, ``CLUSTER INFO``,
``CLUSTER NODES``): nothing is slept on blindly. Starting either takes
2-8 s here, so tests share one per module.

A primary is killed with SIGKILL (:meth:`SentinelSetup.kill_primary`,
:meth:`ClusterSetup.kill_primary_of`), and may be started again on its port
once the failover is done; without persistence it comes back empty, and
Sentinel or the Cluster makes it a replica of the new primary, which it then
copies. Starting it again before the failover would bring back an empty
primary, which is how data is lost: these helpers refuse.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from support import free_port, wait_until

__all__ = ["STEADY_DOWN_AFTER_MS", "ClusterSetup", "Measure", "SentinelSetup", "require_redis"]

MASTER_NAME = "chanstore-primary"
#: How long a primary may be silent before Sentinel / the Cluster calls it down.
DOWN_AFTER_MS = 1000
#: The same for a setup whose tests kill nothing: on a loaded machine a primary
#: can stall for a second, and a failover then is noise those tests need not ride out.
STEADY_DOWN_AFTER_MS = 10_000
#: How long a setup may take to settle. A sentinel setup takes 5 s here; a
#: failover the sentinels start on their own (a primary stalled past down-after)
#: takes 20 s more, most of it the old primary waiting to be made a replica.
SETTLE_TIMEOUT = 60


def require_redis() -> None:
    """Skip (fail in CI) when redis-server or redis-cli is missing."""
    for program in ("redis-server", "redis-cli"):
        if shutil.which(program) is None:
            message = f"{program} is not installed (scripts/test installs it as root)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)


def _client(port: int, **options: Any) -> redis.Redis:
    options.setdefault("socket_timeout", 2.0)
    options.setdefault("socket_connect_timeout", 0.5)
    options.setdefault("protocol", 2)  # flat replies, as redis-cli shows them
    return redis.Redis(host="127.0.0.1", port=port, **options)


def _fields(reply: Any) -> dict[bytes, Any]:
    """A ``SENTINEL MASTER``/``REPLICAS`` entry (field, value, field, value...) as a dict."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True)) if reply else {}


def _ask(port: int, *command: Any) -> Any:
    """One command to the server on ``port``; None when it cannot be reached."""
    client = _client(port)
    try:
        return client.execute_command(*command)
    except (redis.ConnectionError, redis.TimeoutError):
        return None
    finally:
        client.close()


def _wait_replicated(port: int, timeout: float) -> None:
    """Until every replica of the primary on ``port`` has acknowledged all the primary had
    written when this was called. Redis replicates asynchronously: a primary killed right
    after a write can take the write with it, which a test of what follows a failover does
    not mean to test (replicas acknowledge once a second, so this can take that long)."""
    written = (_ask(port, "INFO", "replication") or {}).get("master_repl_offset")
    if written is None:
        raise RuntimeError(f"the primary on {port} gave no replication offset")

    def acknowledged() -> bool:
        info = _ask(port, "INFO", "replication") or {}
        replicas = [value for name, value in info.items()
                    if name.startswith("slave") and isinstance(value, dict)]  # fmt: skip
        return bool(replicas) and all(r.get("offset", -1) >= written for r in replicas)

    wait_until(acknowledged, timeout, f"the replicas of {port} at offset {written}")


def cluster_port() -> int:
    """A free port for a cluster node, with its bus port (+10000) free too.

    Below the kernel's ephemeral ports (32768 and up here), so that no outgoing
    connection takes either between this check and the server's bind; Redis
    wants the port below 55536 anyway.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(12000, max(12001, min(low, 55536) - 10000))
        if all(_free(candidate) for candidate in (port, port + 10000)):
            return port
    raise RuntimeError("no free pair of ports for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_settled(
    check: Callable[[], tuple[Any, str]],
    timeout: float,
    what: str,
    servers: dict[str, list[_Server]],
) -> Any:
    """Poll ``check`` (a result or None, and what is still awaited) until it gives a
    result; on timeout, the error says what was still awaited and shows the tail of
    every server's log, headed by its role and port."""
    awaited = ["nothing yet"]

    def settled() -> Any:
        result, awaited[0] = check()
        return result

    try:
        return wait_until(settled, timeout, what, interval=0.05)
    except TimeoutError as error:
        tails = "\n".join(f"--- {role} {server.port} ---\n{server.log_tail()}"
                          for role, group in servers.items() for server in group)  # fmt: skip
        raise TimeoutError(f"{error}; still awaited: {awaited[0]}\n{tails}") from None


class _Server:
    """One redis-server (or sentinel) process on a free port, in a folder of its own."""

    def __init__(self, folder: Path, *options: str, sentinel_config: str | None = None,
                 port: int | None = None) -> None:  # fmt: skip
        self.port = port or free_port()
        self.folder = folder / str(self.port)
        self.options = options
        self.sentinel_config = sentinel_config
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> _Server:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "log", "ab")  # noqa: SIM115 - the process holds it
        if self.sentinel_config is not None:
            config = self.folder / "sentinel.conf"
            if not config.exists():  # a restarted sentinel keeps what it learnt
                config.write_text(f"port {self.port}\nbind 127.0.0.1\n"
                                  f"dir {self.folder}\n{self.sentinel_config}")  # fmt: skip
            command = ["redis-server", str(config), "--sentinel"]
        else:
            command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                       "--save", "", "--appendonly", "no", "--dir", str(self.folder),
                       *self.options]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                tail = (self.folder / "log").read_text(errors="replace")[-600:]
                raise RuntimeError(f"redis on port {self.port} exited: {tail}")
            return bool(_ask(self.port, "PING"))

        wait_until(up, 10, f"redis on port {self.port}")
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye, as when a machine dies."""
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, size: int = 1500) -> str:
        log = self.folder / "log"
        return log.read_text(errors="replace")[-size:] if log.exists() else "(no log)"

    def client(self, **options: Any) -> redis.Redis:
        """A plain client of this server, for looking behind a backend's back."""
        return _client(self.port, protocol=3, **options)


class SentinelSetup:
    """A primary, ``replicas`` replicas and three sentinels (quorum 2), all on loopback.

    The sentinels call a primary down after ``down_after_ms`` of silence.
    """

    def __init__(self, folder: Path, replicas: int = 1, down_after_ms: int = DOWN_AFTER_MS) -> None:
        self.folder = folder
        self.primary = _Server(folder)
        self.replicas = [_Server(folder) for _ in range(replicas)]
        config = (f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary.port} 2\n"
                  f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
                  f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                  f"sentinel parallel-syncs {MASTER_NAME} 1\n")  # fmt: skip
        self.sentinels = [_Server(folder, sentinel_config=config) for _ in range(3)]

    @property
    def servers(self) -> list[_Server]:
        return [self.primary, *self.replicas]

    def settings(self, **more: Any) -> dict[str, Any]:
        """A redis entry's settings for this setup, in sentinel mode."""
        return {"mode": "sentinel", "master_name": MASTER_NAME,
                "sentinels": [s.address for s in self.sentinels],
                "socket_timeout": 1.0, "socket_connect_timeout": 0.5, **more}  # fmt: skip

    def start(self, timeout: float = SETTLE_TIMEOUT) -> SentinelSetup:
        self.primary.start()
        for replica in self.replicas:
            replica.start()
            _ask(replica.port, "REPLICAOF", "127.0.0.1", self.primary.port)
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_settled(timeout)
        return self

    def primary_port(self) -> int | None:
        """The primary's port as every sentinel names it, or None while they disagree."""
        answers = set()
        for sentinel in self.sentinels:
            if sentinel.running:
                answer = _ask(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                answers.add(int(answer[1]) if answer else None)
        if len(answers) != 1 or None in answers:
            return None
        return answers.pop()

    def server_on(self, port: int) -> _Server:
        return next(server for server in self.servers if server.port == port)

    def wait_settled(self, timeout: float = SETTLE_TIMEOUT) -> int:
        """Until every sentinel names one running primary, knows the two other sentinels
        and every running replica, and every running replica is in sync with it.
        Returns the primary's port."""
        return _wait_settled(self._settled, timeout, "the sentinels to agree on a primary in sync",
                             {"server": self.servers, "sentinel": self.sentinels})  # fmt: skip

    def _settled(self) -> tuple[int | None, str]:
        """The settled primary's port, or None and what is not settled yet."""
        port = self.primary_port()
        if port is None:
            return None, "every sentinel to name the same primary"
        if not self.server_on(port).running:
            return None, f"the named primary ({port}) to be running"
        replicas = [s for s in self.servers if s.running and s.port != port]
        for sentinel in self.sentinels:
            info = _fields(_ask(sentinel.port, "SENTINEL", "MASTER", MASTER_NAME))
            flags = info.get(b"flags", b"")
            if info.get(b"num-other-sentinels") != b"2" or b"s_down" in flags:
                return None, (f"sentinel {sentinel.port} to know 2 others and see the primary "
                              f"up (it knows {info.get(b'num-other-sentinels')}, "
                              f"flags {flags!r})")  # fmt: skip
            known = _ask(sentinel.port, "SENTINEL", "REPLICAS", MASTER_NAME) or []
            up = set()
            for entry in known:
                fields = _fields(entry)
                if b"s_down" not in fields[b"flags"] and b"disconnected" not in fields[b"flags"]:
                    up.add(int(fields[b"port"]))
            wanted = {r.port for r in replicas}
            if not wanted <= up:
                return None, (f"sentinel {sentinel.port} to see replicas {sorted(wanted)} up "
                              f"(it sees {sorted(up)})")  # fmt: skip
        for replica in replicas:
            info = _ask(replica.port, "INFO", "replication")
            seen = (info.get("master_port"), info.get("master_link_status"),
                    info.get("master_sync_in_progress")) if info else None  # fmt: skip
            if seen != (port, "up", 0):
                return None, (f"replica {replica.port} in sync with {port} "
                              f"(master_port, link, sync in progress: {seen})")  # fmt: skip
        return port, "nothing"

    def wait_replicated(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Until the replicas have all the primary has written (see
        :func:`_wait_replicated`)."""
        port = self.primary_port()
        if port is None:
            raise RuntimeError("no primary to wait for")
        _wait_replicated(port, timeout)

    def kill_primary(self) -> _Server:
        """SIGKILL the current primary; returns it (stopped)."""
        port = self.primary_port()
        assert port is not None, "the sentinels do not agree on a primary"
        server = self.server_on(port)
        server.kill()
        return server

    def wait_failover(self, old_port: int, timeout: float = 30) -> int:
        """Until every sentinel names a running primary other than ``old_port``; its port."""

        def moved() -> int | None:
            port = self.primary_port()
            return port if port not in (None, old_port) and self.server_on(port).running else None

        return wait_until(moved, timeout, f"a failover away from port {old_port}", interval=0.05)

    def restart(self, server: _Server) -> None:
        """Start a killed server again (empty): only once another primary took over."""
        port = self.primary_port()
        assert port is not None and port != server.port, "restarting the primary would lose data"
        server.start()

    def stop(self) -> None:
        for server in (*self.sentinels, *self.servers):
            server.stop()


class ClusterSetup:
    """Three primaries with one replica each (``redis-cli --cluster create``), on loopback."""

    def __init__(self, folder: Path, primaries: int = 3, replicas_each: int = 1) -> None:
        self.folder = folder
        self.replicas_each = replicas_each
        #: The view just before ``kill_primary_of`` killed a primary (see ``wait_failover``).
        self.before_kill: dict[int, dict[str, Any]] | None = None
        options = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                   "--cluster-node-timeout", str(DOWN_AFTER_MS))  # fmt: skip
        self.nodes = [_Server(folder, *options, port=cluster_port())
                      for _ in range(primaries * (1 + replicas_each))]  # fmt: skip
        self.primaries = primaries

    def settings(self, how_many: int = 2, **more: Any) -> dict[str, Any]:
        """A redis entry's settings in cluster mode, naming only ``how_many`` nodes."""
        return {"mode": "cluster", "nodes": [n.address for n in self.nodes[:how_many]],
                "socket_timeout": 1.0, "socket_connect_timeout": 0.5, **more}  # fmt: skip

    def start(self, timeout: float = SETTLE_TIMEOUT) -> ClusterSetup:
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(n.address for n in self.nodes),
             "--cluster-replicas", str(self.replicas_each), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=60,
        )  # fmt: skip
        self.wait_settled(timeout)
        return self

    def node_on(self, port: int) -> _Server:
        return next(node for node in self.nodes if node.port == port)

    def view(self) -> dict[int, dict[str, Any]] | None:
        """``CLUSTER NODES`` as one running node sees it: port -> role, id, primary's id,
        flags, slots; None when no running node answers."""
        for node in self.nodes:
            if not node.running:
                continue
            text = _ask(node.port, "CLUSTER", "NODES")
            if text is None:
                continue
            if isinstance(text, bytes):
                text = text.decode()
            view: dict[int, dict[str, Any]] = {}
            for line in text.splitlines():
                parts = line.split()
                port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
                flags = set(parts[2].split(","))
                view[port] = {"id": parts[0], "flags": flags, "primary": parts[3],
                              "role": "primary" if "master" in flags else "replica",
                              "connected": parts[7] == "connected", "slots": parts[8:]}  # fmt: skip
            return view
        return None

    def primary_ports(self) -> list[int]:
        view = self.view() or {}
        return sorted(port for port, node in view.items()
                      if node["role"] == "primary" and node["slots"] and "fail" not in node["flags"]
                      and self.node_on(port).running)  # fmt: skip

    def wait_settled(self, timeout: float = SETTLE_TIMEOUT) -> list[int]:
        """Until every running node says ``cluster_state:ok`` and agrees on the nodes: the
        configured number of primaries with slots, every running node connected and
        none failing, every running replica in sync. Returns the primaries' ports."""
        return _wait_settled(self._settled, timeout, "the cluster to be ok and in sync",
                             {"node": self.nodes})  # fmt: skip

    def _settled(self) -> tuple[list[int] | None, str]:
        """The settled primaries' ports, or None and what is not settled yet."""
        for node in self.nodes:
            if node.running:
                info = _ask(node.port, "CLUSTER", "INFO")
                if info is None or b"cluster_state:ok" not in info:
                    return None, f"node {node.port} to say cluster_state:ok"
        view = self.view()
        if view is None:
            return None, "a running node to answer CLUSTER NODES"
        running = {n.port for n in self.nodes if n.running}
        primaries = [p for p, n in view.items() if n["role"] == "primary" and n["slots"]]
        if len(primaries) != self.primaries or not set(primaries) <= running:
            return None, (f"{self.primaries} running primaries with slots (the view has "
                          f"{sorted(primaries)}, running {sorted(running)})")  # fmt: skip
        for port, node in view.items():
            if port in running and (not node["connected"] or node["flags"] & {"fail", "fail?"}):
                return None, f"node {port} connected and not failing (flags {node['flags']})"
        for port in running - set(primaries):
            info = _ask(port, "INFO", "replication")
            seen = (info.get("role"), info.get("master_link_status")) if info else None
            if seen != ("slave", "up"):
                return None, f"replica {port} in sync (role, link: {seen})"
        return sorted(primaries), "nothing"

    def primary_of_slot(self, slot: int) -> int:
        client = _client(self.primary_ports()[0])
        try:
            for start, end, primary, *_replicas in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        finally:
            client.close()
        raise LookupError(slot)

    def wait_replicated(self, slot: int, timeout: float = SETTLE_TIMEOUT) -> None:
        """Until the replicas of the primary that holds ``slot`` have all it has written
        (see :func:`_wait_replicated`)."""
        _wait_replicated(self.primary_of_slot(slot), timeout)

    def kill_primary_of(self, slot: int) -> _Server:
        """SIGKILL the primary that holds ``slot``; returns it (stopped)."""
        node = self.node_on(self.primary_of_slot(slot))
        self.before_kill = self.view()
        node.kill()
        return node

    def wait_failover(self, old_port: int, timeout: float = 30) -> int:
        """Until a replica took over ``old_port``'s slots and the cluster is ok again
        (on every running node); the new primary's port.

        Which nodes were ``old_port``'s replicas is read from the view before the kill
        (``kill_primary_of`` keeps it): a failover that ended before this is called has
        made the replica a primary of no one's already."""
        view = self.before_kill or self.view() or {}
        old_id = view[old_port]["id"] if old_port in view else None

        def taken_over() -> int | None:
            now = self.view()
            if now is None:
                return None
            for port, node in now.items():
                if port == old_port or not self.node_on(port).running:
                    continue
                if node["role"] == "primary" and node["slots"] and old_id and any(
                        n["primary"] == old_id for p, n in view.items() if p == port):  # fmt: skip
                    break
            else:
                return None
            for node in self.nodes:
                if node.running:
                    info = _ask(node.port, "CLUSTER", "INFO")
                    if info is None or b"cluster_state:ok" not in info:
                        return None
            return port

        return wait_until(taken_over, timeout, f"a replica to take over from port {old_port}",
                          interval=0.05)  # fmt: skip

    def restart(self, node: _Server) -> None:
        """Start a killed node again (empty, with its nodes.conf): only once its slots
        are served by another primary, so that it comes back as a replica."""
        view = self.view() or {}
        assert node.port in view and (view[node.port]["role"] == "replica"
                                      or not view[node.port]["slots"]
                                      or "fail" in view[node.port]["flags"]), (
            "restarting a primary that still holds slots would lose data")  # fmt: skip
        node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class Measure:
    """Failover figures of a write loop: when writes stopped and resumed, what was lost.

    ``acknowledged`` holds every write that was acknowledged (its key and
    value: each write has a key of its own), ``errors`` the kinds of error
    the others met (each must be BackendUnavailable).
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.killed_at: float | None = None
        self.first_failure: float | None = None
        self.last_failure: float | None = None
        self.resumed_at: float | None = None
        self.acknowledged: dict[str, int] = {}
        self.after_resume = 0
        self.failures = 0
        self.not_acknowledged = 0
        self.errors: dict[str, int] = {}

    def ok(self, key: str, value: int) -> None:
        self.acknowledged[key] = value
        if self.killed_at is not None and self.first_failure is not None:
            if self.resumed_at is None or self.resumed_at < self.last_failure:  # type: ignore[operator]
                self.resumed_at = time.monotonic()
                self.after_resume = 0
            self.after_resume += 1

    def failed(self, error: BaseException) -> None:
        now = time.monotonic()
        self.failures += 1
        self.last_failure = now
        if "not acknowledged" in str(error):
            self.not_acknowledged += 1
        name = type(error).__name__
        self.errors[name] = self.errors.get(name, 0) + 1
        if self.first_failure is None and self.killed_at is not None:
            self.first_failure = now

    @property
    def seconds_to_resume(self) -> float | None:
        """From the kill to the first acknowledged write after the last failure."""
        if self.killed_at is None or self.resumed_at is None:
            return None
        return self.resumed_at - self.killed_at

    def lost(self, held: dict[str, Any]) -> list[str]:
        """The acknowledged writes that ``held`` (key -> value read back) does not hold."""
        return sorted(key for key, value in self.acknowledged.items() if held.get(key) != value)

    def report(self, what: str, lost: list[str]) -> str:
        resume = self.seconds_to_resume
        return (f"FAILOVER {what}: writes resumed {resume:.2f} s after the kill "
                f"(first failure {self.first_failure - self.killed_at:.2f} s after it), "
                f"{self.failures} writes failed ({self.not_acknowledged} not acknowledged; "
                f"{self.errors}), {len(self.acknowledged)} acknowledged, "
                f"{len(lost)} acknowledged writes lost")  # type: ignore[operator]  # fmt: skip


def write_loop(
    write: Callable[[str, int], None],
    kill: Callable[[], None],
    *,
    step: Callable[[Measure], None] = lambda measure: None,
    before: int = 200,
    after: int = 200,
    deadline: float = 60,
) -> Measure:
    """Write (``write(key, value)``, each key once) until ``before`` writes were
    acknowledged, ``kill()``, then go on until ``after`` writes in a row were
    acknowledged after the last failure. ``step(measure)`` runs every 0.1 s (a
    test restarts a server there once the failover is done). Every failure must
    be a BackendUnavailable. Bounded by ``deadline`` seconds."""
    from chanstore.errors import BackendUnavailable  # noqa: PLC0415 - tests' own import path

    measure = Measure()
    last_step = time.monotonic()
    for number in itertools.count():
        now = time.monotonic()
        if now - measure.started > deadline:
            raise TimeoutError(f"writes did not resume within {deadline} s: {vars(measure)}")
        if measure.killed_at is None and len(measure.acknowledged) >= before:
            kill()
            measure.killed_at = time.monotonic()
        if now - last_step > 0.1:
            step(measure)
            last_step = now
        key = f"w{number}"
        try:
            write(key, number)
        except BackendUnavailable as exc:
            measure.failed(exc)
            time.sleep(0.005)  # pace: a refused connection fails at once
            continue
        measure.ok(key, number)
        if measure.resumed_at is not None and measure.after_resume >= after:
            return measure
    raise AssertionError("unreachable")


class Heard:
    """An invalidation listener that keeps what it hears: ``"up"``/``"down"`` and
    ``(domain, keys)``; and a follower's ``deliver`` that keeps its events."""

    def __init__(self) -> None:
        self.heard: list[Any] = []
        self.events: list[Any] = []

    def invalidated(self, domain: str, keys: list[str]) -> None:
        self.heard.append((domain, keys))

    def link_changed(self, up: bool) -> None:
        self.heard.append("up" if up else "down")

    def deliver(self, event: Any) -> None:
        self.events.append(event)


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` on the event loop until it is true, at most ``timeout`` seconds."""
    import asyncio  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return result


def other_link(backend: Any) -> Any:
    """The invalidation link of ``backend``'s Redis, as another process would hold it (so
    it hears this process's writes), made through the pool's topology-aware connector."""
    from chanstore.backends.redis_invalidations import (  # noqa: PLC0415
        RedisInvalidations,
        link_connection,
    )
    from chanstore.backends.redis_pools import pools  # noqa: PLC0415

    return RedisInvalidations(
        pools.link_connector(backend._pool_key, link_connection),
        key_prefix=backend.key_prefix, name=backend.where, origin="someone-else",
        hash_tagged=backend.mode == "cluster",
    )  # fmt: skip


async def until_async(attempt: Callable[[], Any], timeout: float, what: str) -> Any:
    """Await ``attempt()`` until it returns a true value, at most ``timeout`` seconds."""
    import asyncio  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while not (result := await attempt()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return result
