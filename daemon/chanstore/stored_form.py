"""A value's stored form, proven and indented without parsing it into Python objects.

chanstore stores a value as the compact text the standard library's
``json.dumps`` writes (see :mod:`chanstore.codec`). A large PUT body usually
*is* that text already: parsing it into Python objects only to prove so, and
freeing them again, was most of what a large PUT cost. The extension
``chanstore._stored_form`` (``_stored_form.c``, built at install time) reads
the bytes once instead:

- :func:`proves` says whether a body is exactly the stored form of the JSON
  document it holds, nested no deeper than a limit. It never says so wrongly;
  it may decline what it does not reason about (lone surrogates, integers of
  more than 18 digits, any invalid JSON), and the caller then parses as before.
- :func:`compacted` re-spells a body the way its stored form would be spelt:
  no whitespace between tokens, every string escaped as ``json.dumps``
  escapes it. What Python's ``json.dumps`` (a space after each ``,`` and
  ``:``), JavaScript's ``JSON.stringify`` (non-ASCII as it is) and pretty
  printers send differs from the stored form only so; :func:`stored_text`
  proves the re-spelt body in their place, and such a body is not parsed
  either. It declines what needs a parser (invalid UTF-8, a raw control
  character or a lone surrogate in a string, whitespace between two tokens
  it would join).
- :func:`indented` writes a stored form with an indent of 2, byte for byte as
  ``json.dumps(..., indent=2)`` does: the json backend's file form.

Each lets other threads run while it reads a text of 4 KiB or more, as
:mod:`hashlib` does: a file writer's thread re-spaces a file while the event
loop goes on. :data:`Beside` does what :func:`stored_text` does, and hashes
what it proved, for large bodies on threads of the extension's own, which
never take the GIL (see :mod:`chanstore.http.beside`).

Where the extension was not built, or when the environment sets
``CHANSTORE_PURE_PYTHON=1``, :func:`proves` proves nothing and
:func:`compacted` re-spells nothing (every body is parsed, as before the
extension), and :func:`indented` parses and writes with the standard
library. :data:`COMPILED` says which is in use.
"""

from __future__ import annotations

import json
from typing import Any

from chanstore.compiled import extension

__all__ = ["COMPILED", "Beside", "compacted", "indented", "proves", "stored_text"]


def proves(data: bytes, max_depth: int) -> bool:
    """Whether ``data`` is the stored form of a JSON document no deeper than ``max_depth``
    containers; False when that is not proven (here: always, without the extension)."""
    return False


def compacted(data: bytes) -> bytes | None:
    """``data`` without whitespace between its tokens and with every string escaped as
    ``json.dumps`` escapes it; None where that needs a parser or changes nothing (here:
    always, without the extension)."""
    return None


def stored_text(data: bytes, max_depth: int) -> bytes | None:
    """The stored form of the document ``data`` holds, had without parsing it: ``data``
    itself when :func:`proves` says so, else its :func:`compacted` form when that is
    proven; None when neither is, and ``data`` must be parsed (here: always, without the
    extension)."""
    return None


def indented(data: bytes) -> bytes:
    """The stored form ``data`` as ``json.dumps(..., indent=2)`` writes its document."""
    return json.dumps(json.loads(data), indent=2).encode("ascii")


_compiled = extension("_stored_form")

COMPILED = _compiled is not None
"""Whether the C extension's forms are in use."""

if _compiled is not None:  # else the forms above serve
    proves, compacted, indented = _compiled.proves, _compiled.compacted, _compiled.indented
    stored_text = _compiled.stored_text

Beside: Any = getattr(_compiled, "Beside", None)
"""``Beside(threads)``: bodies proven and hashed on threads of the extension that never take
the GIL (``_stored_form_beside.c``); None where the extension is not in use, or not on
Linux."""
