"""Writes a web browser sends for a page of another site: refused before they change anything.

The daemon listens on loopback with no token by default, so any web page
its operator opens could have the browser write into it: a page may send a
``POST`` with a ``text/plain`` body anywhere without asking first, and
``/-/set`` reads that body as JSON. Browsers say where a request comes
from; :func:`refusal` refuses the writes that come from another origin, by
the rules of Go's ``net/http.CrossOriginProtection``:

* ``GET``, ``HEAD`` and ``OPTIONS`` change nothing and pass; a page cannot
  read what they answer, as the daemon sends no CORS headers.
* ``Sec-Fetch-Site``, which every current browser sends: ``same-origin``
  and ``none`` (the user typed the address) pass; ``same-site`` and
  ``cross-site`` are refused.
* Without it (an older browser), an ``Origin`` whose host is not the
  request's ``Host`` is refused, and so is ``Origin: null``.
* Neither header: a program, or a browser on the daemon's own origin. It
  passes.

Programs send neither header, so curl, scripts and chanstore's own clients
are never refused. A page that DNS rebinding puts on the daemon's own
origin is same-origin to its browser and passes: ``--token-file`` is the
protection from that, as from everything else that can reach the port (a
page cannot learn the token, and a browser does not add it for it).
"""

from __future__ import annotations

from collections.abc import Sequence

from chanstore.http.errors import HttpError, shown

__all__ = ["CODE", "HEADERS", "refusal"]

CODE = "cross_origin"
#: The (lower-case) headers :func:`refusal` reads: the door collects them for it.
HEADERS = frozenset({b"sec-fetch-site", b"origin"})
#: Methods that change nothing; every other one is a write.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The ``Sec-Fetch-Site`` values of a request that no other site made.
_OWN_SITE = frozenset({b"same-origin", b"none"})


def refusal(method: str, headers: Sequence[tuple[bytes, bytes]],
            host: bytes | None) -> HttpError | None:  # fmt: skip
    """The 403 answering a write that a browser sent for another origin, or None.

    ``headers`` are (lower-case name, value) pairs, any others among them
    ignored; ``host`` is the request's ``Host``."""
    if method in SAFE_METHODS:
        return None
    sites = [value.lower() for name, value in headers if name == b"sec-fetch-site"]
    if sites:
        if all(site in _OWN_SITE for site in sites):
            return None
        return _refused(method, f"Sec-Fetch-Site: {shown(sites[0], 80)}")
    origins = [value for name, value in headers if name == b"origin"]
    if all(_host_of(origin) == (host or b"").lower() for origin in origins):
        return None
    return _refused(method, f"Origin: {shown(origins[0], 80)}")


def _refused(method: str, evidence: str) -> HttpError:
    return HttpError(403, f"a browser sent this {method[:20]} for a page of another origin "
                          f"({evidence}); chanstore takes writes from programs (no Origin or "
                          "Sec-Fetch-Site header) and from pages of its own origin",
                     code=CODE)  # fmt: skip


def _host_of(origin: bytes) -> bytes | None:
    """The ``host[:port]`` of an ``Origin`` value, lower case; None for ``null`` or anything
    that is not ``scheme://host``."""
    scheme, separator, host = origin.partition(b"://")
    if not separator or not scheme or not host or b"/" in host:
        return None
    return host.lower()
