"""The null backend: keeps nothing, and answers every key with ``None``.

For containers whose data nobody needs kept (scratch state), and the default
backend of a CachedDict built without one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from chanstore.backends.base import DatabaseInterface

__all__ = ["NullDatabase"]


class NullDatabase(DatabaseInterface):
    """Stores nothing: like ``/dev/null``, a write is acknowledged and forgotten.

    As in the original SDK, every key reads as ``(True, None)``: there is no
    "absent" here, because nothing is ever known to be absent, and no key is
    ever listed. A CachedDict over it keeps nothing in memory either
    (:class:`~chanstore.cache_memory.NullMemory`), so a null container reads
    every key as None, in-process and over HTTP, whatever was written to it.
    """

    engine_name = "null"
    SETTINGS = {}  # none: any setting but the original's root_dir is a mistake

    def get_value(self, key: str) -> tuple[bool, Any]:
        return True, None

    def set_value(self, key: str, value: Any) -> tuple[bool, Any]:
        return True, key

    def delete_key(self, key: str) -> tuple[bool, Any]:
        return True, key

    def all_keys(self) -> list[str]:
        return []

    @classmethod
    def list_domains(cls, prefix: str = "", **settings: Any) -> Iterator[str]:
        """None: no domain ever holds a key here."""
        return iter(())

    def scan_items(self, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """None: nothing is stored."""
        return iter(())
