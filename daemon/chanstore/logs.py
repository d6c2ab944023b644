"""One structlog configuration for the whole process.

chanstore logs events, not sentences: ``log.error("backend_failed",
backend="redis", container="stats", key="HP", error="...")``. On a terminal
they render for a person; elsewhere (journald, a log shipper) they are one
JSON object per line with ``timestamp``, ``level`` and ``event`` beside the
fields an operator filters on: container, channel, backend, operation,
duration, error, request_id.

The library never configures logging by itself: an application that embeds
chanstore keeps its own structlog setup. The daemon calls :func:`configure`.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar, Token
from typing import Any, Literal

import structlog

__all__ = [
    "LEVELS",
    "bind_request_id",
    "configure",
    "debug_enabled",
    "get_logger",
    "unbind_request_id",
]

LEVELS = ("debug", "info", "warning", "error", "critical")
LogFormat = Literal["json", "console"]

# Hot paths ask this before building a debug event, which saves the
# event-building cost when debug is off (the usual case in production).
_debug = False

# The id of the HTTP request being answered. A ContextVar of its own, added to
# events by a processor, because structlog's bind_contextvars and
# clear_contextvars cost several times as much, and the daemon binds it on
# every request.
_request_id: ContextVar[str | None] = ContextVar("chanstore_request_id", default=None)


def bind_request_id(request_id: str) -> Token[str | None]:
    """Name ``request_id`` in every event logged in this context until the token is reset."""
    return _request_id.set(request_id)


def unbind_request_id(token: Token[str | None]) -> None:
    """Undo the :func:`bind_request_id` that returned ``token``."""
    _request_id.reset(token)


def _add_request_id(logger: Any, method_name: str, event_dict: Any) -> Any:
    request_id = _request_id.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
    return event_dict


def configure(
    log_format: LogFormat | None = None,
    level: str = "info",
    stream: Any = None,
) -> None:
    """Route every chanstore event to ``stream`` (stderr) in ``log_format``.

    ``log_format`` defaults to console on a terminal and JSON otherwise.
    """
    global _debug  # noqa: PLW0603 - process-wide by design, like structlog's own config
    level = level.lower()
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    stream = stream if stream is not None else sys.stderr
    if log_format is None:
        log_format = "console" if stream.isatty() else "json"
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    elif log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        raise ValueError(f"log format {log_format!r} is not one of json, console")
    shared = [
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    _route_standard_logging(shared, renderer, stream, level)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _debug = level == "debug"


def _route_standard_logging(shared: list[Any], renderer: Any, stream: Any, level: str) -> None:
    """Render the libraries' stdlib logging (watchdog, asyncio) as chanstore's events."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    # Libraries chatter at debug; their warnings are what an operator needs.
    root.setLevel(max(getattr(logging, level.upper()), logging.INFO))


def debug_enabled() -> bool:
    """Whether debug events are being emitted (see :func:`configure`)."""
    return _debug


def get_logger(**bound: Any) -> Any:
    """A structlog logger for chanstore's events, with ``bound`` fields on every event."""
    return structlog.get_logger("chanstore", **bound)
