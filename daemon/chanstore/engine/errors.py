"""The errors the daemon's storage side adds to the library's (see :mod:`chanstore.errors`).

Like every chanstore error each carries a ``kind``; the HTTP layer maps kinds
to answers in one place (:mod:`chanstore.http.errors`).
"""

from __future__ import annotations

from chanstore.errors import BackendError, ChanstoreError

__all__ = ["BackendTimeout", "UnknownContainer"]


class UnknownContainer(ChanstoreError, LookupError):
    """A request named a container that the running db_config does not have."""

    kind = "unknown_container"


class BackendTimeout(BackendError):
    """A backend did not answer within the daemon's ``backend_timeout``."""

    kind = "timeout"
