"""Listing a container, a page of keys at a time.

The daemon answers at most :data:`MAX_PAGE_SIZE` keys per request, each page
naming the key after which the next one starts: :meth:`Client.iter_keys`
yields keys as their pages arrive, :meth:`Client.keys` collects them all.
"""

from __future__ import annotations

from typing import Any

from chanstore.client.errors import ClientError

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "check_page_size", "page_keys"]

#: Keys per listing request unless told otherwise (the daemon's own default).
DEFAULT_PAGE_SIZE = 1000
#: The most keys the daemon answers in one listing request.
MAX_PAGE_SIZE = 10_000


def page_keys(answer: Any, after: str | None) -> tuple[list[str], str | None]:
    """The keys of one listing page and the cursor of the next (None after the last)."""
    keys = answer.get("keys") if isinstance(answer, dict) else None
    following = answer.get("next") if isinstance(answer, dict) else None
    if not isinstance(keys, list) or not (following is None or isinstance(following, str)):
        raise ClientError(f'expected {{"keys": [...], "next": KEY or null}}, got {answer!r:.200}')
    if following is not None and following == after:
        # A daemon that ignores ``after`` would have this loop forever.
        raise ClientError(f"the daemon's listing did not advance past {after!r:.200}")
    return keys, following


def check_page_size(page_size: int) -> int:
    """``page_size``, once it is an int between 1 and MAX_PAGE_SIZE."""
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise TypeError(f"page_size must be an int, not {type(page_size).__name__}")
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}, not {page_size}")
    return page_size
