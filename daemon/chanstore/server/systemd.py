"""systemd's notify protocol, without a dependency.

:func:`notify` sends ``READY=1``, ``RELOADING=1``, ``STATUS=...`` and the rest
as one datagram to the socket named by ``$NOTIFY_SOCKET`` (a path, or an
abstract socket when it starts with ``@``). Outside systemd the variable is
unset and every call does nothing, so the daemon calls it unconditionally.

:func:`watchdog_interval` reads ``$WATCHDOG_USEC``: the daemon pings at half
of it from its event loop, so a loop that stops turning stops the pings and
systemd restarts the service.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["monotonic_usec", "notify", "watchdog_interval"]


def notify(*assignments: str) -> bool:
    """Send ``assignments`` (``"READY=1"``, ...) to systemd; False when not under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(assignments).encode("utf-8", "replace")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message)
        except OSError:
            # systemd went away (or never listened): nothing to tell, nothing to fail.
            return False
    return True


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``RELOADING=1`` wants it in ``MONOTONIC_USEC``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None when not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        timeout = int(usec) / 1_000_000
    except ValueError:
        return None
    return timeout / 2 if timeout > 0 else None
