"""Versions (DESIGN.md section 5): ETags, the expectations of conditional writes, update's pace.

Every stored key has an ETag, a strong validator that changes whenever the
value does. :meth:`Client.get_versioned` reads a value with it; ``set``,
``set_document`` and ``delete`` take ``expect=``, which makes the write
conditional (``expect=etag``: the key must hold exactly that version, sent as
``If-Match``; ``expect=ANY``: it must exist; ``expect=ABSENT``: it must be
absent, sent as ``If-None-Match: *``), and ``set_many(..., expect={key: ...})``
stores every value or none. A failed expectation is a
:class:`~chanstore.client.errors.PreconditionFailed`, and nothing was changed.
``update(key, fn)`` is the read-modify-write loop built on them::

    stats = client.channel("c1").stats
    stats.update("HP", lambda hp: hp + 1, default=0)   # never loses an increment

Here are what ``expect=`` takes, :class:`Versioned`, the ETag's two forms (a
header's, quoted; a JSON body's, bare), and how often and how fast ``update``
tries again.
"""

from __future__ import annotations

import enum
import random
from typing import Any, NamedTuple

import httpx

__all__ = [
    "ABSENT",
    "ANY",
    "DEFAULT_UPDATE_ATTEMPTS",
    "UNCONDITIONAL",
    "UPDATE_FIRST_DELAY",
    "UPDATE_MAX_DELAY",
    "Condition",
    "Expectation",
    "Unconditional",
    "Versioned",
    "bare",
    "bare_expectation",
    "check_attempts",
    "etag_header",
    "precondition",
    "update_delay",
]

#: ``expect=ANY``: the key must exist, whatever its version (``If-Match: *``).
ANY = "*"
#: ``expect=ABSENT``: the key must be absent, a create-only write (``If-None-Match: *``).
ABSENT = None


#: Attempts :meth:`Client.update` makes before it gives up with PreconditionFailed.
DEFAULT_UPDATE_ATTEMPTS = 10
#: The delay after the first conflict of an update; it doubles after each, up to the cap.
UPDATE_FIRST_DELAY = 0.005
UPDATE_MAX_DELAY = 0.2


class Versioned(NamedTuple):
    """A value and its ETag, as :meth:`Client.get_versioned` reads them."""

    value: Any
    etag: str


class Unconditional(enum.Enum):
    """The default of ``expect=``: the write is made whatever the key holds."""

    UNCONDITIONAL = "unconditional"

    def __repr__(self) -> str:
        return "UNCONDITIONAL"


UNCONDITIONAL = Unconditional.UNCONDITIONAL
#: What ``expect=`` takes: an ETag, :data:`ANY`, or :data:`ABSENT` (None).
Expectation = str | None
#: ``expect=`` of a single write: an Expectation, or none at all (the default).
Condition = Expectation | Unconditional


def bare(etag: str) -> str:
    """An ETag as the daemon's JSON bodies carry it: without the quotes of its header form."""
    if not isinstance(etag, str):
        raise TypeError(f"an ETag is a str, not {type(etag).__name__}")
    if len(etag) >= 2 and etag.startswith('"') and etag.endswith('"'):
        etag = etag[1:-1]
    if not etag or any(char == '"' or not " " < char < "\x7f" for char in etag):
        raise ValueError(f"{etag!r:.80} is not an ETag")
    return etag


def bare_expectation(expected: Expectation, key: str) -> Expectation:
    """One expectation of a bulk set: an ETag (unquoted), ``"*"``, or None."""
    if expected is None or expected == ANY:
        return expected
    try:
        return bare(expected)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"expect[{key!r:.100}]: {exc}") from None


def precondition(expect: Condition) -> dict[str, str] | None:
    """The request headers that make a PUT or DELETE conditional on ``expect``."""
    if expect is UNCONDITIONAL:
        return None
    if expect is None:
        return {"if-none-match": "*"}
    if expect == ANY:
        return {"if-match": "*"}
    return {"if-match": f'"{bare(expect)}"'}


def etag_header(response: httpx.Response) -> str | None:
    """The answer's ``ETag`` header without its quotes; None when there is none."""
    header = response.headers.get("etag")
    if header is None:
        return None
    header = header.strip()
    if len(header) >= 2 and header.startswith('"') and header.endswith('"'):
        return header[1:-1]
    return header


def check_attempts(attempts: int) -> None:
    """Refuse an ``attempts=`` of ``update`` that is not an int of 1 or more."""
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        raise TypeError(f"attempts must be an int, not {type(attempts).__name__}")
    if attempts < 1:
        raise ValueError(f"attempts must be 1 or more, not {attempts}")


def update_delay(conflicts: int) -> float:
    """Seconds to wait after the ``conflicts + 1``-th conflict in a row: 5 ms doubling
    to 200 ms, each drawn from its upper half, so that writers that collided part."""
    ceiling = min(UPDATE_MAX_DELAY, UPDATE_FIRST_DELAY * 2**conflicts)
    return ceiling * random.uniform(0.5, 1.0)
