"""What a web page may have a browser ask of the daemon: reads by address, and no writes from
another origin.

The daemon listens on loopback with no token by default, so any web page
its operator opens could have the browser ask it things. Browsers say when
they send a request for a page (``Sec-Fetch-Site``, and ``Origin`` on every
write), and :func:`refusal` refuses two kinds, each a 403 before the body is
read:

**Writes from another origin** (``cross_origin``). A page may send a ``POST``
with a ``text/plain`` body anywhere without asking first, and ``/-/set``
reads that body as JSON. The rules are those of Go's
``net/http.CrossOriginProtection``:

* ``GET``, ``HEAD`` and ``OPTIONS`` change nothing and pass; a page of
  another origin cannot read what they answer, as the daemon sends no CORS
  headers.
* ``Sec-Fetch-Site``, which every current browser sends: ``same-origin`` and
  ``none`` (the user typed the address) pass; ``same-site`` and
  ``cross-site`` are refused.
* Without it (an older browser), an ``Origin`` whose host is not the
  request's ``Host`` is refused, and so is ``Origin: null``.

**Pages that reached the daemon by a name** (``browser_by_name``). A site
can point a name of its own at 127.0.0.1 once its page has loaded (DNS
rebinding): the page and the daemon then share an origin, and the rules
above let it read and write everything. So a request a browser sends for a
page (``Sec-Fetch-Site`` other than ``none``, or an ``Origin``) must name
the daemon by an address (``127.0.0.1``, ``[::1]``, any IP) or by
``localhost``, which browsers never ask DNS for. A name typed by the user
(``Sec-Fetch-Site: none``) is the user's own and passes.

Programs send neither header, so curl, scripts, Prometheus, reverse proxies
and chanstore's own clients are never refused, whatever ``Host`` they name.
``--token-file`` protects from everything else that can reach the port: a
page cannot learn the token, and no browser adds it for one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from chanstore.http.errors import HttpError, shown

__all__ = ["HEADERS", "refusal"]

#: The (lower-case) headers :func:`refusal` reads: the door collects them for it.
HEADERS = frozenset({b"sec-fetch-site", b"origin"})
#: Methods that change nothing; every other one is a write.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The ``Sec-Fetch-Site`` values of a request that no other site made.
_OWN_SITE = frozenset({b"same-origin", b"none"})
#: The ``Sec-Fetch-Site`` of a request the user made by typing or from a bookmark.
_TYPED = b"none"


def refusal(method: str, headers: Sequence[tuple[bytes, bytes]],
            host: bytes | None) -> HttpError | None:  # fmt: skip
    """The 403 answering a request a browser sent for a page that may not send it, or None.

    ``headers`` are (lower-case name, value) pairs, any others among them
    ignored; ``host`` is the request's ``Host``."""
    sites = [value.lower() for name, value in headers if name == b"sec-fetch-site"]
    origins = [value for name, value in headers if name == b"origin"]
    for_a_page = any(site != _TYPED for site in sites) or (not sites and origins)
    if for_a_page and host is not None and not _by_address(host):
        return HttpError(403, f"a browser sent this {method[:20]} for a page that reached the "
                              f"daemon by the name {shown(host, 80)}; pages may reach chanstore "
                              "only by an address (127.0.0.1, [::1]) or as localhost, since any "
                              "site can point a name at it (DNS rebinding); programs, which "
                              "send no Origin or Sec-Fetch-Site header, may use any name",
                         code="browser_by_name")  # fmt: skip
    if method in SAFE_METHODS:
        return None
    if sites:
        if all(site in _OWN_SITE for site in sites):
            return None
        return _cross_origin(method, f"Sec-Fetch-Site: {shown(sites[0], 80)}")
    if all(_host_of(origin) == (host or b"").lower() for origin in origins):
        return None
    return _cross_origin(method, f"Origin: {shown(origins[0], 80)}")


def _cross_origin(method: str, evidence: str) -> HttpError:
    return HttpError(403, f"a browser sent this {method[:20]} for a page of another origin "
                          f"({evidence}); chanstore takes writes from programs (no Origin or "
                          "Sec-Fetch-Site header) and from pages of its own origin",
                     code="cross_origin")  # fmt: skip


def _by_address(host: bytes) -> bool:
    """Whether a ``Host`` names the daemon by an IP address or as localhost (any port)."""
    name = host.lower()
    if name.startswith(b"["):  # an IPv6 address, as a Host must write one: [::1]:8470
        return _is_address(name[1:].partition(b"]")[0], ipaddress.IPv6Address)
    name = name.partition(b":")[0]
    if name == b"localhost" or name.endswith(b".localhost"):
        return True
    return _is_address(name, ipaddress.IPv4Address)


def _is_address(text: bytes, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def _host_of(origin: bytes) -> bytes | None:
    """The ``host[:port]`` of an ``Origin`` value, lower case; None for ``null`` or anything
    that is not ``scheme://host``."""
    scheme, separator, host = origin.partition(b"://")
    if not separator or not scheme or not host or b"/" in host:
        return None
    return host.lower()
