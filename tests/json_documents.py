"""JSON documents for the tests of the stored form: generated ones, and their stored form.

The stored form is what ``json.dumps(value, separators=(",", ":"))`` writes
(:mod:`chanstore.codec`); the tests of its proof (``test_stored_form.py``) and
of bodies re-spelt into it (``test_stored_form_compacted.py``) draw documents
from :data:`documents`.
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

__all__ = ["documents", "stored"]


def stored(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("ascii")


# Strings of every kind the stdlib escapes: controls, quotes, DEL, non-ASCII,
# characters beyond the BMP (written as surrogate pairs); no lone surrogates.
text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12) | st.sampled_from(
    ["", '"', "\\", "/", "\x7f", "\b\f\n\r\t", "\x00\x1f", "é", "😀", "\u2028", "_moobius_type"]
)
numbers = (
    st.integers(min_value=-(10**18) + 1, max_value=10**18 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.0, -0.0, 1e16, 1e-5, 0.0001, 5e-324, 1.7e9 + 0.123456789])
)
scalars = st.none() | st.booleans() | numbers | text
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(text, children, max_size=6),
    max_leaves=40,
)
