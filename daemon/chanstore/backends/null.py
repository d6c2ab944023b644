"""The null backend: keeps nothing, and answers every key with ``None``."""

from __future__ import annotations

from typing import Any

from chanstore.backends.base import DatabaseInterface

__all__ = ["NullDatabase"]


class NullDatabase(DatabaseInterface):
    """Stores nothing. A CachedDict over it is a plain in-memory dict.

    As in the original SDK, every key reads as ``(True, None)``: there is no
    "absent" here, because nothing is ever known to be absent.
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
