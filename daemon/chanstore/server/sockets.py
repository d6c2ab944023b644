"""The listening socket: bound once, before anything else starts, so that an address in
use is a clear error at once.

A daemon on its own, and a group of workers sharing one socket, bind one;
with ``reuse_port`` a group binds one per worker on the same address
(``SO_REUSEPORT``: the kernel spreads new connections over them by a hash of
the client's address and port). The supervisor holds every socket for the
life of the group, so a worker that is restarted takes up its own again and
the connections queued on it meanwhile are not lost.

``SO_REUSEPORT`` would also let another process of the same user (a second
chanstore started on the same port by mistake) bind the port and silently
take a share of the connections, where a plain bind fails with "address in
use". :func:`bind_group` therefore counts the listening sockets on the
address once its own are bound (in ``/proc/self/net``) and refuses to start
when there are more than its own.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from chanstore.errors import ConfigError
from chanstore.server.settings import DaemonSettings

__all__ = ["LISTEN_BACKLOG", "bind", "bind_group"]

#: Connections the kernel queues before they are accepted.
LISTEN_BACKLOG = 2048


def bind(settings: DaemonSettings, *, reuse_port: bool = False) -> socket.socket:
    """The listening socket; ConfigError names the address when it cannot be had."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((settings.host, settings.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {settings.listen}: {exc.strerror}") from exc
    sock.set_inheritable(True)
    return sock


def bind_group(settings: DaemonSettings, count: int) -> list[socket.socket]:
    """``count`` sockets on the address with ``SO_REUSEPORT``; ConfigError when the
    address cannot be had or another process listens on it too."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(bind(settings, reuse_port=True))
        if _listeners_beside(sockets):
            raise ConfigError(f"cannot listen on {settings.listen}: another process listens "
                              "there too (sharing it with SO_REUSEPORT)")  # fmt: skip
    except ConfigError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _listeners_beside(sockets: list[socket.socket]) -> int:
    """Listening sockets on the same address as ``sockets`` that are not among them
    (0 when /proc/self/net cannot be read)."""
    ours = {str(os.fstat(sock.fileno()).st_ino) for sock in sockets}
    rows = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/self/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        rows += [(name, fields[1], fields[9]) for line in lines
                 if len(fields := line.split()) > 9 and fields[3] == "0A"]  # fmt: skip
    addresses = {(table, address) for table, address, inode in rows if inode in ours}
    return sum(1 for table, address, inode in rows
               if (table, address) in addresses and inode not in ours)  # fmt: skip
