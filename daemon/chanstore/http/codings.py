"""The codings a request body may come in: chunked framing, and nothing the door would have
to undo.

A body in a coding the door does not undo (gzip, say) would only be called
invalid JSON if it were read as it came; :func:`refusal` says what it is
instead. A content coding other than ``identity`` is a 415 with
``Accept-Encoding: identity`` (RFC 9110 15.5.16); a transfer coding before
the final ``chunked`` is a 400. RFC 9112 6.1 suggests 501 there, but a 5xx
from chanstore means the daemon, its backend or its capacity failed a
request, which dashboards and alerts rely on: what a client asks that is
not supported is a 4xx. A ``Transfer-Encoding`` that does not end in
``chunked`` leaves the body without a frame: that is the parser's to refuse
(400, RFC 9112 6.3), as it refuses every attempt to smuggle a request
inside a body.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from chanstore.http.errors import HttpError, shown

__all__ = ["refusal"]

CODE = "unsupported_encoding"


def refusal(headers: Sequence[tuple[bytes, bytes]], declared_length: int) -> HttpError | None:
    """Why a request with these (lower-case) headers cannot have its body read, or None.

    ``declared_length`` is the body's Content-Length (0 when none): a coding
    named on a request with no body is no reason to refuse it."""
    transfer = _listed(headers, b"transfer-encoding")
    framed = transfer is not None and transfer[-1:] == [b"chunked"]
    if framed and (other := [coding for coding in transfer or () if coding != b"chunked"]):
        return HttpError(400, f"Transfer-Encoding {shown(other[0])} is not supported; send "
                              "the body chunked or with a Content-Length", code=CODE)  # fmt: skip
    has_body = transfer is not None or declared_length > 0
    content = _listed(headers, b"content-encoding") if has_body else None
    if other := [coding for coding in content or () if coding != b"identity"]:
        return HttpError(415, f"Content-Encoding {shown(other[0])} is not supported; send the "
                              "body uncompressed", [(b"accept-encoding", b"identity")],
                         code=CODE)  # fmt: skip
    return None


def _listed(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes] | None:
    """The codings that every ``name`` header lists, in order, lower case; None when no
    header has that name."""
    values = [value for header, value in headers if header == name]
    if not values:
        return None
    return [coding.strip().lower() for value in values for coding in value.split(b",")
            if coding.strip()]  # fmt: skip
