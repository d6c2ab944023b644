"""Whether a Python value is already its own JSON shape, proven in C.

Before a value is encoded, :func:`chanstore.codec.to_json_shape` copies it
with every part JSON cannot hold faithfully (a tuple, a set, a dataclass, a
dict shaped like a type mark) replaced by its type mark. Most values hold no
such part, and their shape is the value itself; building that copy in Python
was most of an encode (450 of 570 µs for 100 KB of chat messages).
:func:`plain` tells such a value without copying it, in the extension
``chanstore._json_shape`` (``_json_shape.c``, built at install time), so that
the encoder takes the value as it is.

Where the extension was not built, or when the environment sets
``CHANSTORE_PURE_PYTHON=1``, :func:`plain` proves nothing (it answers False)
and every value is walked in Python, as before: a walk in Python that only
checks costs about what the copy costs. :data:`COMPILED` says which is in use.
"""

from __future__ import annotations

from typing import Any

from chanstore.compiled import extension

__all__ = ["COMPILED", "plain"]

_compiled = extension("_json_shape")
#: Whether :func:`plain` is the extension's (else it proves nothing).
COMPILED = _compiled is not None


def plain(value: Any, type_key: str, value_key: str) -> bool:
    """Whether ``value`` is proven its own JSON shape: dicts with str keys, lists, str,
    int, bool, None and finite floats, each of exactly that type, and no dict of just the
    two keys ``type_key`` and ``value_key`` (a type mark's). False means "not proven":
    walk it (values nested deeper than 255 containers are never proven)."""
    if _compiled is None:
        return False
    return _compiled.plain(value, type_key, value_key)
