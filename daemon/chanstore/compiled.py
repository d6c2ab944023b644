"""chanstore's optional C extensions, and the switch that turns them off.

Each extension (``_cache_hits``, ``_stored_form``, ``_spare_files``,
``_redis_commands``, ``_json_shape``) is built at install time where a C compiler is, and
each module that uses one has the same behaviour in Python to fall back on.
``CHANSTORE_PURE_PYTHON=1`` in the environment turns every extension off, so
that the Python forms can be tested and compared on a machine that built them.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["extension"]


def extension(name: str) -> ModuleType | None:
    """The extension ``chanstore.<name>``; None where it was not built, or where the
    environment asks for pure Python."""
    if os.environ.get("CHANSTORE_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        return importlib.import_module(f"chanstore.{name}")
    except ImportError:  # not built here
        return None
