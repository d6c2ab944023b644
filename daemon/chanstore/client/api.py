"""Where a client's requests go: the daemon's URL, the API's paths, the headers they carry.

A channel, container or key is always one percent-encoded path segment
(``.`` and ``..`` included), so that every name reaches the daemon as itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote

__all__ = [
    "DEFAULT_URL",
    "JSON_HEADERS",
    "auth_headers",
    "daemon_url",
    "feed_path",
    "key_path",
    "page_path",
    "segment",
]

#: Where a client looks for the daemon unless told otherwise (``chanstore serve``'s default).
DEFAULT_URL = "http://127.0.0.1:8470"
#: The content type of every request that has a body.
JSON_HEADERS = {"content-type": "application/json"}


def daemon_url(url: str) -> str:
    """``url`` as a client's base URL (no trailing ``/``); ValueError unless it is the
    daemon's ``http://`` or ``https://`` address, which a bare ``HOST:PORT`` is not."""
    if not (isinstance(url, str) and url.startswith(("http://", "https://")) and len(url) > 8):
        raise ValueError(f"the daemon's URL must be its http:// or https:// address (its "
                         f"--listen), such as {DEFAULT_URL!r}, not {url!r}")  # fmt: skip
    return url.rstrip("/")


def auth_headers(token: str | None) -> dict[str, str]:
    """The headers that carry ``token`` on every request of a client (none without one)."""
    return {"authorization": f"Bearer {token}"} if token else {}


def segment(text: str) -> str:
    """``text`` as one percent-encoded path segment; ``.`` and ``..`` encoded too."""
    encoded = quote(str(text), safe="")
    if encoded in (".", ".."):
        encoded = encoded.replace(".", "%2E")
    return encoded


def key_path(channel: str, container: str, key: str | None = None) -> str:
    """The API path of a container, or of one key in it."""
    path = f"/v1/channels/{segment(channel)}/{segment(container)}"
    return path if key is None else f"{path}/{segment(key)}"


def page_path(channel: str, container: str, limit: int, after: str | None = None) -> str:
    """The API path of one page of a container's keys: ``limit`` keys after ``after``.

    ``after`` is percent-encoded whole (``&``, ``=``, ``+``, ``/``, ``%`` and
    non-ASCII included), so any key reads back as itself on the daemon's side.
    """
    query = f"limit={limit}" if after is None else f"limit={limit}&after={quote(after, safe='')}"
    return f"{key_path(channel, container)}?{query}"


def feed_path(channel: str, containers: Iterable[str] | str | None) -> str:
    """The API path of ``channel``'s change feed, narrowed to ``containers`` when given."""
    path = f"/v1/channels/{segment(channel)}/-/events"
    if containers is None:
        return path
    names = [containers] if isinstance(containers, str) else list(containers)
    if not names:
        raise ValueError("containers: name at least one, or give None for every container")
    for name in names:
        if not isinstance(name, str) or not name or "," in name:
            raise ValueError(f"containers: {name!r:.100} is not a container name")
    return f"{path}?containers={','.join(quote(name, safe='') for name in names)}"
