"""One structlog configuration for the whole process.

chanstore logs events, not sentences: ``log.error("backend_failed",
backend="redis", container="stats", key="HP", error="...")``. On a terminal
they render for a person; elsewhere (journald, a log shipper) they are one
JSON object per line with ``timestamp``, ``level`` and ``event`` beside the
fields an operator filters on: container, channel, backend, operation,
duration, error, request_id.

The library never configures logging by itself. The daemon calls
:func:`configure`, which renders events to stderr. In an application that
embeds chanstore, where nobody configured structlog, events go through the
standard :mod:`logging` module instead, as the logger ``chanstore`` (see
:data:`LOGGER_NAME`): they obey the application's handlers and levels, and
never land on stdout, where structlog's unconfigured default would print
them into the output of a tool that prints JSON. An application that
configured structlog itself gets chanstore's events through its setup.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar, Token
from typing import Any, Literal

import structlog

__all__ = [
    "LEVELS",
    "LOGGER_NAME",
    "bind_request_id",
    "configure",
    "debug_enabled",
    "get_logger",
    "unbind_request_id",
]

LEVELS = ("debug", "info", "warning", "error", "critical")
#: The name of chanstore's standard-library logger, where a library's events go.
LOGGER_NAME = "chanstore"
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
    if _process_fields:
        for name, value in _process_fields.items():
            event_dict.setdefault(name, value)
    return event_dict


# Fields every event of this process names, whatever thread or context logs it
# (a worker's index, in a group of workers).
_process_fields: dict[str, Any] = {}


def bind_process(**fields: Any) -> None:
    """Name ``fields`` in every event this process logs from now on."""
    _process_fields.update(fields)


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
    """A logger for chanstore's events, with ``bound`` fields on every event.

    Modules make theirs when imported, before the daemon has called
    :func:`configure`, so where an event goes is settled when it is logged:
    through structlog's configuration once anyone configured structlog (the
    daemon, an application of its own, ``structlog.testing.capture_logs``),
    otherwise to the standard-library logger :data:`LOGGER_NAME`.
    """
    return _Logger(bound)


class _Logger:
    """``log.error("event", field=...)`` and the other levels, routed when called."""

    __slots__ = ("_bound",)

    def __init__(self, bound: dict[str, Any]) -> None:
        self._bound = bound

    def bind(self, **more: Any) -> _Logger:
        return _Logger({**self._bound, **more})

    def __getattr__(self, name: str) -> Any:
        # Only the level methods get here (debug, info, warning, error, exception, ...).
        if structlog.is_configured():
            target = structlog.get_logger(LOGGER_NAME, **self._bound)
        else:
            target = _standard_logger().bind(**self._bound)
        return getattr(target, name)


def _standard_logger() -> Any:
    """A structlog logger over ``logging.getLogger("chanstore")``, apart from structlog's
    global configuration (which belongs to the application, if anyone's)."""
    global _standard  # noqa: PLW0603 - made once, on the first event
    if _standard is None:
        _standard = structlog.wrap_logger(
            logging.getLogger(LOGGER_NAME),
            processors=[
                structlog.stdlib.filter_by_level,  # below the logger's level: dropped at once
                structlog.contextvars.merge_contextvars,
                _add_request_id,
                _as_standard_record,
            ],
            wrapper_class=structlog.stdlib.BoundLogger,
            context_class=dict,
            cache_logger_on_first_use=True,
        )
    return _standard


_standard: Any = None


def _as_standard_record(logger: Any, method_name: str, event_dict: Any) -> Any:
    """The event as arguments of a standard-library logging call.

    The message reads ``event key=value ...`` for any formatter; the fields
    are also on the record, as ``record.chanstore`` (a dict), for handlers
    that ship structured logs.
    """
    exc_info = event_dict.pop("exc_info", None)
    event = event_dict.pop("event", "")
    text = " ".join([str(event), *(f"{name}={value!r}" for name, value in event_dict.items())])
    extra = {"chanstore": {"event": event, **event_dict}}
    return (text,), {"exc_info": exc_info, "extra": extra}
