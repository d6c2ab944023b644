"""Bearer-token authorization of the data and control routes.

The token can change while the daemon runs (it is re-read on every reload),
so the API holds a :class:`BearerToken` and asks it, rather than a copy.
"""

from __future__ import annotations

import hmac

__all__ = ["BearerToken"]


class BearerToken:
    """The token ``/v1`` and ``/-/`` routes require; None turns authorization off."""

    def __init__(self, token: str | None) -> None:
        self.set(token)

    def set(self, token: str | None) -> None:
        """Require ``token`` from now on."""
        self._token = token.encode() if token else None

    @property
    def required(self) -> bool:
        return self._token is not None

    def allows(self, authorization: bytes | None) -> bool:
        """Whether a request with this ``Authorization`` header value may pass."""
        if self._token is None:
            return True
        scheme, _, token = (authorization or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)
