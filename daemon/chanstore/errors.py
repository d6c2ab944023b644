"""The exceptions chanstore raises, and the short kinds its metrics count them by.

Every error carries a ``kind``: a short, stable word that becomes the ``error``
label of ``chanstore_backend_operation_errors_total``. Kinds form a small closed
set so that label sets stay bounded whatever a backend's messages say.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BulkWriteError",
    "ChanstoreError",
    "ConfigError",
    "CorruptValue",
    "IntegrityProblem",
    "InvalidKey",
    "ListingUnsupported",
    "PreconditionFailed",
    "UnknownEngine",
    "UnstorableValue",
    "WriteRefused",
    "error_kind",
]


class ChanstoreError(Exception):
    """Base class of every error chanstore raises on purpose."""

    kind = "error"


class ConfigError(ChanstoreError, ValueError):
    """A db_config (or a daemon setting) is not what chanstore expects.

    ``problems`` lists every reason, one sentence each, so that a validator can
    report them all at once rather than one per run.
    """

    kind = "config"

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class UnknownEngine(ConfigError):
    """``get_engine`` was asked for a backend name that nobody registered."""


class InvalidKey(ChanstoreError, ValueError):
    """A key (or channel id) is not a string chanstore can store under."""

    kind = "invalid_key"


class UnstorableValue(ChanstoreError, ValueError):
    """A value cannot be encoded as (type-marked) JSON."""

    kind = "invalid_value"


class BackendError(ChanstoreError):
    """A backend failed to do what it was asked."""

    kind = "backend"


class BackendUnavailable(BackendError):
    """The backend's server or storage cannot be reached at all."""

    kind = "unavailable"


@dataclass(frozen=True)
class IntegrityProblem:
    """Damaged, foreign or lost data that a backend found by itself.

    ``kind`` is a short word from a small closed set (``journal_damaged``,
    ``planted_link``, ``data_lost``, ...), the ``kind`` label of
    ``chanstore_integrity_problems_total``; ``message`` says what and where,
    for the logs.
    """

    kind: str
    message: str


class CorruptValue(BackendError):
    """A stored value exists but cannot be decoded (a torn or foreign file)."""

    kind = "corrupt"


class ListingUnsupported(BackendError, NotImplementedError):
    """A backend cannot list its domains (see ``DatabaseInterface.list_domains``).

    Listing cannot be built from the four methods every backend has, so it is
    the one operation without a working default: export, import and migrate
    need it. Also a ``NotImplementedError``, which is what it is.
    """

    kind = "unsupported"

    def __init__(self, backend: str) -> None:
        super().__init__(
            f"backend {backend} cannot list its domains (export, import and migrate need to): "
            "a backend that can implements the classmethod list_domains(prefix, **settings), "
            "yielding each domain of the store those settings name that starts with prefix "
            "and holds at least one key"
        )
        self.backend = backend


class WriteRefused(BackendError):
    """A strict CachedDict's backend refused a write or a delete."""

    kind = "refused"

    def __init__(self, message: str, *, error_kind: str = "refused") -> None:
        super().__init__(message)
        self.kind = error_kind


class BulkWriteError(BackendError):
    """A bulk write stopped part-way; ``done`` lists the keys it did write."""

    def __init__(self, message: str, *, done: list[str], cause: BaseException) -> None:
        super().__init__(message)
        self.done = done
        self.kind = error_kind(cause)


class PreconditionFailed(ChanstoreError):
    """A conditional write found a key not as expected, and changed nothing.

    ``conflicts`` maps each key whose expectation failed to its current ETag,
    or to None when it is absent. It is an answer, not a failure: it is not
    counted as a backend error.
    """

    kind = "precondition_failed"

    def __init__(self, conflicts: dict[str, str | None]) -> None:
        shown = ", ".join(repr(key[:100]) for key in list(conflicts)[:5])
        more = f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
        super().__init__(f"precondition failed for {shown}{more}: nothing was changed")
        self.conflicts = conflicts


_ERRNO_KINDS = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "disk_full",
    errno.EROFS: "read_only",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.ENAMETOOLONG: "invalid_key",
}


def error_kind(exc: BaseException) -> str:
    """The bounded ``error`` label for ``exc``.

    chanstore's own errors name their kind; timeouts, refused connections and
    the common disk errors get a kind of their own; anything else is
    ``internal``, so that an unexpected message can never mint a new label.
    """
    if isinstance(exc, ChanstoreError):
        return exc.kind
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    # redis-py's errors do not derive from the builtins, so they are matched by name.
    name = type(exc).__name__
    if name == "TimeoutError":
        return "timeout"
    if isinstance(exc, ConnectionError) or name in {"ConnectionError", "BusyLoadingError"}:
        return "unavailable"
    if name in {"AuthenticationError", "AuthorizationError", "NoPermissionError"}:
        return "permission"
    if isinstance(exc, OSError):
        return _ERRNO_KINDS.get(exc.errno or 0, "io")
    return "internal"
