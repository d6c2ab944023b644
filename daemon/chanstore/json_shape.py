"""What a Python value or a JSON text holds that the codec must handle itself, found in C.

**Values.** Before a value is encoded, :func:`chanstore.codec.to_json_shape`
copies it with every part JSON cannot hold faithfully (a tuple, a set, a
dataclass, a dict shaped like a type mark) replaced by its type mark. Most
values hold no such part, and their shape is the value itself; building
that copy in Python was most of an encode (450 of 570 µs for 100 KB of chat
messages). :func:`plain` tells such a value without copying it, and
``to_json_shape`` gives the value itself (to the encoder, the bulk routes, the
json backend's long-key files).

**Texts.** Before a text is parsed by orjson, the codec asks whether it may
hold an integer orjson would read inexactly (:func:`long_integer`: beyond 64
bits it makes a float) and whether it may name a type mark to revive
(:func:`may_name`). Python's ``bytes.translate`` and ``in`` took half of a
100 KB decode for the two questions.

All three are the extension ``chanstore._json_shape`` (``_json_shape.c``,
built at install time). Where it was not built, or when the environment sets
``CHANSTORE_PURE_PYTHON=1``, :func:`plain` proves nothing (it answers False,
and every value is walked in Python, as before: a walk in Python that only
checks costs about what the copy costs) and the text questions are answered
in Python, the same way. :data:`COMPILED` says which is in use.
"""

from __future__ import annotations

from typing import Any

from chanstore.compiled import extension

__all__ = ["COMPILED", "LONG_INTEGER_DIGITS", "long_integer", "may_name", "plain"]

_compiled = extension("_json_shape")
#: Whether these are the extension's functions (else :func:`plain` proves nothing).
COMPILED = _compiled is not None
#: An integer of this many digits may be beyond 64 bits (2**63 has 19).
LONG_INTEGER_DIGITS = 19
#: Digits to 0, what continues a number to '.', the rest to ' ': a space, then
#: LONG_INTEGER_DIGITS zeros, is an integer long enough (or the text's start).
_NUMBERS = bytes(
    ord("0") if byte in b"0123456789" else ord(".") if byte in b".eE" else ord(" ")
    for byte in range(256)
)
_LONG_INTEGER = b"0" * LONG_INTEGER_DIGITS


def plain(value: Any, type_key: str, value_key: str) -> bool:
    """Whether ``value`` is proven its own JSON shape: dicts with str keys, lists, str,
    int, bool, None and finite floats, each of exactly that type, and no dict of just the
    two keys ``type_key`` and ``value_key`` (a type mark's). False means "not proven":
    walk it (values of 255 nested containers or more, which orjson refuses, never are)."""
    if _compiled is None:
        return False
    return _compiled.plain(value, type_key, value_key)


def long_integer(data: bytes) -> bool:
    """Whether ``data`` may hold an integer of :data:`LONG_INTEGER_DIGITS` digits or more:
    that many digits in a row, not after a digit, ``.``, ``e`` or ``E`` (a fraction or an
    exponent), wherever they are (in a string too: "may")."""
    if _compiled is not None:
        return _compiled.long_integer(data)
    mapped = data.translate(_NUMBERS)
    return b" " + _LONG_INTEGER in mapped or mapped.startswith(_LONG_INTEGER)


def may_name(data: bytes, name: bytes) -> bool:
    """Whether ``data`` holds ``name``, or a ``\\u00`` escape, which may spell part of it."""
    if _compiled is not None:
        return _compiled.may_name(data, name)
    return name in data or b"\\u00" in data
