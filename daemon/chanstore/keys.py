"""What a key may be, and how keys and ids become safe names.

Keys are non-empty strings of at most :data:`MAX_KEY_BYTES` bytes of UTF-8,
without NUL. Two encodings turn them into names:

* :func:`encode_filename` makes a key a single file-name component. Characters
  that could leave the folder or confuse a shell or a terminal (``/``, ``\\``,
  control characters) and the escape character ``%`` itself are
  percent-encoded; everything else, Unicode included, is kept, so the keys the
  original SDK wrote keep their file names. The encoding is injective and
  :func:`decode_filename` reverses it.
* :func:`encode_domain_part` does the same for a service id, a channel id or a
  container name, and also encodes ``.``, the domain's separator, so that an
  id cannot add a level to the domain (and so a folder to the json layout);
  :func:`decode_domain_part` reverses it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from chanstore.errors import InvalidKey

__all__ = [
    "MAX_CHANNEL_ID_BYTES",
    "MAX_KEY_BYTES",
    "check_channel_id",
    "check_key",
    "decode_domain_part",
    "decode_filename",
    "encode_domain_part",
    "encode_filename",
]

MAX_KEY_BYTES = 1024
MAX_CHANNEL_ID_BYTES = 256

_ALWAYS_ESCAPED = frozenset("%/\\") | frozenset(map(chr, range(0x20))) | {"\x7f"}
_DOMAIN_ESCAPED = _ALWAYS_ESCAPED | {"."}


def check_key(key: Any, *, what: str = "key", max_bytes: int = MAX_KEY_BYTES) -> str:
    """``key`` itself when it is a valid key; :class:`InvalidKey` saying why otherwise."""
    if type(key) is not str:
        if isinstance(key, str):
            return check_key(str(key), what=what, max_bytes=max_bytes)
        raise InvalidKey(f"{what} must be a str, not {type(key).__name__} ({key!r})")
    if not key:
        raise InvalidKey(f"{what} must not be empty")
    if "\x00" in key:
        raise InvalidKey(f"{what} {key[:80]!r} contains NUL, which no backend can store")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidKey(f"{what} {key[:80]!r} is not valid Unicode text: {exc.reason}") from exc
    if size > max_bytes:
        raise InvalidKey(f"{what} is {size} bytes of UTF-8; the limit is {max_bytes}")
    return key


def check_channel_id(channel_id: Any) -> str:
    """``channel_id`` as a str when valid (ints are accepted, as the SDK used them)."""
    if isinstance(channel_id, int) and not isinstance(channel_id, bool):
        channel_id = str(channel_id)
    return check_key(channel_id, what="channel id", max_bytes=MAX_CHANNEL_ID_BYTES)


def _percent_encode(text: str, escaped: frozenset[str]) -> str:
    if not any(char in escaped for char in text):
        return text
    return "".join(
        "".join(f"%{byte:02X}" for byte in char.encode("utf-8")) if char in escaped else char
        for char in text
    )


def encode_filename(key: str) -> str:
    """``key`` as one file-name component (without the ``.json`` suffix)."""
    return _percent_encode(key, _ALWAYS_ESCAPED)


def decode_filename(name: str) -> str:
    """The key :func:`encode_filename` turned into ``name``."""
    return unquote(name, errors="surrogateescape") if "%" in name else name


def encode_domain_part(part: Any) -> str:
    """A service id, channel id or name as one part of a dotted domain."""
    return _percent_encode(str(part), _DOMAIN_ESCAPED)


def decode_domain_part(encoded: str) -> str:
    """The service id, channel id or name that :func:`encode_domain_part` made ``encoded``.

    Ids come back as strings (an int id was encoded as its digits).
    """
    return unquote(encoded, errors="surrogateescape") if "%" in encoded else encoded
