"""The listening socket: bound once, before anything else starts, so that an address in
use is a clear error at once.

A daemon on its own, and a group of workers sharing one socket, bind one;
with ``reuse_port`` a group binds one per worker on the same address
(``SO_REUSEPORT``: the kernel spreads new connections over them by a hash of
the client's address and port). The supervisor holds every socket for the
life of the group, so a worker that is restarted takes up its own again and
the connections queued on it meanwhile are not lost.
"""

from __future__ import annotations

import socket

from chanstore.errors import ConfigError
from chanstore.server.settings import DaemonSettings

__all__ = ["LISTEN_BACKLOG", "bind"]

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
