"""The HTTP layer's one error model: every answer other than success is an :class:`HttpError`.

Inside chanstore a failure is an exception carrying its ``kind``;
:func:`error_for` is the one place that words any of them as an HTTP answer
(status, a JSON body with a machine-readable ``code``, and headers).
"""

from __future__ import annotations

import json
from typing import Any

from chanstore.cache import UnreadableValue
from chanstore.engine import TooManyWatchers, UnknownContainer
from chanstore.errors import BackendError, ChanstoreError, CorruptValue, PreconditionFailed
from chanstore.history import HistoryExpired

__all__ = ["HttpError", "error_for", "shown"]

#: The code of each status when nothing more precise is known.
CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "no_route",
    405: "method_not_allowed",
    408: "request_timeout",
    410: "cursor_expired",
    412: "precondition_failed",
    413: "body_too_large",
    431: "header_too_large",
    500: "internal",
    503: "backend_unavailable",
}


class HttpError(Exception):
    """An answer other than success: status, message, a machine-readable code, headers."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None,
                 *, code: str | None = None,
                 details: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or CODES.get(status, "error")
        self.headers = headers or []
        #: More fields of the body, for a client to act on (a 412's ``conflicts``).
        self.details = details or {}

    def body(self) -> bytes:
        """The JSON error body: ``{"error": message, "code": code}`` and any details."""
        return json.dumps({"error": self.message, "code": self.code, **self.details},
                          separators=(",", ":"), ensure_ascii=False).encode()  # fmt: skip


def shown(value: bytes, limit: int = 60) -> str:
    """A client's words quoted back to it in an error message: short, and as text."""
    return repr(value[:limit].decode("latin-1"))


def error_for(exc: BaseException) -> HttpError:
    """The answer to a failed request. Anything chanstore did not raise on purpose is
    raised again: a crash, which the caller logs and answers with a 500."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, UnknownContainer):
        return HttpError(404, str(exc), code="unknown_container")
    if isinstance(exc, PreconditionFailed):
        return _precondition_failed(exc)
    if isinstance(exc, HistoryExpired):
        return HttpError(410, f"{exc}: re-read what you need, then watch without a cursor",
                         code="cursor_expired")  # fmt: skip
    if isinstance(exc, TooManyWatchers):
        return HttpError(503, str(exc), code="too_many_watchers")
    if getattr(exc, "kind", None) == "planted_link" and not isinstance(exc, UnreadableValue):
        # Where the link is (a path) is for the log, not for the answer.
        return HttpError(500, "a link planted in the data root stands where a stored file or "
                              "folder belongs; chanstore never follows links there (the log "
                              "says where)", code="planted_link")  # fmt: skip
    if isinstance(exc, UnreadableValue):
        return HttpError(500, str(exc), code="planted_link" if exc.kind == "planted_link"
                         else "corrupt")  # fmt: skip
    if isinstance(exc, CorruptValue):
        # The cache's UnreadableValue (above) names container and key; a backend's
        # own message may name a file, which the log has and an answer must not.
        return HttpError(500, "a stored value is damaged and cannot be read (the log says "
                         "which)", code="corrupt")  # fmt: skip
    if isinstance(exc, BackendError):
        return HttpError(503, f"backend failure ({exc.kind}): {exc}", code="backend_unavailable")
    if isinstance(exc, ChanstoreError) and isinstance(exc, ValueError):
        return HttpError(400, str(exc))
    if isinstance(exc, ChanstoreError):
        return HttpError(503, f"backend failure ({exc.kind}): {exc}", code="backend_unavailable")
    raise exc


def _precondition_failed(exc: PreconditionFailed) -> HttpError:
    """412 naming each key whose expectation failed and its current ETag (null: absent);
    for one key, its current ETag also as the ``ETag`` header."""
    conflicts = exc.conflicts
    headers = []
    if len(conflicts) == 1:
        (current,) = conflicts.values()
        if current is not None:
            headers.append((b"etag", b'"%s"' % current.encode()))
    return HttpError(412, str(exc), headers, code="precondition_failed",
                     details={"conflicts": conflicts})  # fmt: skip
