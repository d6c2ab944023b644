"""The daemon's settings: each a flag of ``chanstore serve`` and a CHANSTORE_* variable.

A flag wins over its variable, which wins over the default, so that a systemd
``EnvironmentFile`` configures the service and a person can still override one
setting on the command line.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from chanstore.engine.settings import EngineSettings
from chanstore.errors import ConfigError
from chanstore.http.connections import Limits
from chanstore.logs import LEVELS

__all__ = ["DaemonSettings", "add_arguments", "parse_listen", "settings_from_arguments"]

DEFAULT_LISTEN = "127.0.0.1:8470"


@dataclass(frozen=True)
class DaemonSettings:
    """Everything ``chanstore serve`` is told, checked."""

    db_config: Path = Path("config/db.json")
    service_id: str = "chanstore"
    host: str = "127.0.0.1"
    port: int = 8470
    log_format: str | None = None
    log_level: str = "info"
    token_file: Path | None = None
    max_body_bytes: int = 1024 * 1024
    idle_timeout: float = 300.0
    max_channels: int = 100_000
    write_lanes: int = 1
    config_poll_interval: float = 5.0
    shutdown_timeout: float = 15.0
    backend_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    keep_alive_timeout: float = 30.0
    max_connections: int = 4096
    max_header_bytes: int = 32 * 1024
    max_watchers: int = 1024
    event_history: int = 1000
    event_history_bytes: int = 64 * 1024 * 1024
    watcher_buffer_bytes: int = 1024 * 1024
    heartbeat_interval: float = 15.0
    cache_max_age: float = 60.0
    drain_seconds: float = 0.0
    workers: int = 1

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def engine(self) -> EngineSettings:
        """What the storage side needs of these."""
        return EngineSettings(service_id=self.service_id, idle_timeout=self.idle_timeout,
                              max_channels=self.max_channels, write_lanes=self.write_lanes,
                              backend_timeout=self.backend_timeout,
                              max_watchers=self.max_watchers, event_history=self.event_history,
                              event_history_bytes=self.event_history_bytes,
                              watcher_buffer_bytes=self.watcher_buffer_bytes,
                              cache_max_age=self.cache_max_age)  # fmt: skip

    def limits(self) -> Limits:
        """What the HTTP door needs of these."""
        return Limits(max_connections=self.max_connections,
                      max_header_bytes=self.max_header_bytes, max_body_bytes=self.max_body_bytes,
                      header_timeout=self.header_timeout, body_timeout=self.body_timeout,
                      keep_alive_timeout=self.keep_alive_timeout,
                      heartbeat_interval=self.heartbeat_interval)  # fmt: skip

    def read_token(self) -> str | None:
        """The bearer token from ``token_file``, or None when auth is off."""
        if self.token_file is None:
            return None
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"token file {str(self.token_file)!r}: {exc.strerror}") from exc
        if not token:
            raise ConfigError(f"token file {str(self.token_file)!r} is empty")
        return token


# flag name -> (type, help); the help fits each command that takes the flag: serve,
# and the commands that ask a running daemon or read its db_config.
_OPTIONS: dict[str, tuple[type, str]] = {
    "db-config": (str, "the db_config file (default config/db.json)"),
    "service-id": (str, "service id: the service_<id> part of every domain (default chanstore)"),
    "listen": (str, f"HOST:PORT the daemon serves HTTP on (default {DEFAULT_LISTEN})"),
    "log-format": (str, "json or console (default: console on a terminal, json otherwise)"),
    "log-level": (str, f"one of {', '.join(LEVELS)} (default info)"),
    "token-file": (str, "file holding the bearer token that /v1 and /-/reload require"),
    "max-body-bytes": (int, "largest request body accepted, in bytes (default 1048576)"),
    "idle-timeout": (float, "seconds after which an unused channel leaves memory (default 300)"),
    "max-channels": (int, "channels kept in memory at most; the idlest leave first"),
    "write-lanes": (int, "write queues per container; each batches what queued up (default 1)"),
    "config-poll-interval": (float, "seconds between checksum polls of db_config (default 5)"),
    "shutdown-timeout": (float, "seconds to finish in-flight requests on SIGTERM (default 15)"),
    "backend-timeout": (float, "seconds a request waits for a backend before 503 (default 10)"),
    "header-timeout": (float, "seconds a connection may take to send a request head (default 10)"),
    "body-timeout": (float, "seconds a request may take to send its body (default 10)"),
    "keep-alive-timeout": (float, "seconds an idle keep-alive connection stays open (default 30)"),
    "max-connections": (int, "open connections at most; the idlest make room (default 4096)"),
    "max-header-bytes": (int, "largest request line and headers, in bytes (default 32768)"),
    "max-watchers": (int, "open change-feed streams at most; past it 503 (default 1024)"),
    "event-history": (
        int,
        "changes kept per channel's container for resuming feeds (default 1000)",
    ),
    "event-history-bytes": (
        int,
        "bytes of json containers' feed history held in memory, in all (default 67108864)",
    ),
    "watcher-buffer-bytes": (
        int,
        "bytes of events a feed stream may fall behind before it is dropped (default 1048576)",
    ),
    "heartbeat-interval": (
        float,
        "seconds between keep-alive comments on idle feed streams (default 15)",
    ),
    "cache-max-age": (
        float,
        "seconds a shared backend's cached container answers from memory before it is read "
        "again, behind the invalidation link (default 60)",
    ),
    "drain-seconds": (
        float,
        "on SIGTERM, seconds to keep serving while /readyz answers 503 draining, so that a "
        "load balancer stops sending first (default 0)",
    ),
    "workers": (
        int,
        "worker processes behind the one port (default 1: one process); json containers "
        "are served by worker 0, redis ones by every worker",
    ),
}


# numeric flag -> (type, least value accepted)
_NUMBERS: tuple[tuple[str, type, float], ...] = (
    ("max-body-bytes", int, 1),
    ("idle-timeout", float, 0.1),
    ("max-channels", int, 1),
    ("write-lanes", int, 1),
    ("config-poll-interval", float, 0.1),
    ("shutdown-timeout", float, 0),
    ("backend-timeout", float, 0.1),
    ("header-timeout", float, 0.1),
    ("body-timeout", float, 0.1),
    ("keep-alive-timeout", float, 0.1),
    ("max-connections", int, 1),
    ("max-header-bytes", int, 1024),
    ("max-watchers", int, 0),
    ("event-history", int, 1),
    ("event-history-bytes", int, 0),
    ("watcher-buffer-bytes", int, 4096),
    ("heartbeat-interval", float, 0.1),
    ("cache-max-age", float, 0.1),
    ("drain-seconds", float, 0),
    ("workers", int, 1),
)


def env_name(flag: str) -> str:
    """``db-config`` -> ``CHANSTORE_DB_CONFIG``."""
    return "CHANSTORE_" + flag.upper().replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Add the daemon's flags (or ``only`` some of them) to ``parser``."""
    for flag, (kind, text) in _OPTIONS.items():
        if only is None or flag in only:
            parser.add_argument(
                f"--{flag}", type=kind, default=None, help=f"{text} [{env_name(flag)}]"
            )


def _value(args: argparse.Namespace, flag: str) -> str | None:
    given = getattr(args, flag.replace("-", "_"), None)
    if given is not None:
        return str(given)
    return os.environ.get(env_name(flag)) or None


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as a pair; ConfigError says what was wrong."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen address {text!r} is not HOST:PORT with a port of 1-65535")
    return host, int(port)


def settings_from_arguments(args: argparse.Namespace) -> DaemonSettings:
    """DaemonSettings from parsed flags, then CHANSTORE_* variables, then defaults."""
    defaults = DaemonSettings()
    problems: list[str] = []
    values: dict[str, object] = {}

    def number(flag: str, kind: type, minimum: float) -> None:
        text = _value(args, flag)
        if text is None:
            return
        try:
            value = kind(text)
        except ValueError:
            problems.append(f"--{flag} ({env_name(flag)}) must be a {kind.__name__}, not {text!r}")
            return
        if value < minimum:
            problems.append(f"--{flag} ({env_name(flag)}) must be at least {minimum}, not {text}")
            return
        values[flag.replace("-", "_")] = value

    if (text := _value(args, "db-config")) is not None:
        values["db_config"] = Path(text)
    if (text := _value(args, "service-id")) is not None:
        values["service_id"] = text
    if (text := _value(args, "listen")) is not None:
        try:
            values["host"], values["port"] = parse_listen(text)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if (text := _value(args, "log-format")) is not None:
        if text not in ("json", "console"):
            problems.append(f"--log-format must be json or console, not {text!r}")
        values["log_format"] = text
    if (text := _value(args, "log-level")) is not None:
        if text.lower() not in LEVELS:
            problems.append(f"--log-level must be one of {', '.join(LEVELS)}, not {text!r}")
        values["log_level"] = text.lower()
    if (text := _value(args, "token-file")) is not None:
        values["token_file"] = Path(text)
    for flag, kind, minimum in _NUMBERS:
        number(flag, kind, minimum)
    if problems:
        raise ConfigError(problems)
    return DaemonSettings(**{**defaults.__dict__, **values})
