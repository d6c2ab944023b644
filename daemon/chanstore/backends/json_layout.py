"""Where a json root keeps a domain and a key: folder names of a domain, file names of a key.

A domain's folder is ``root/<its dot-separated parts>``, a key's file
``<encoded key>.json`` in it (the original SDK's layout). A part or a file
name longer than a file system allows (255 bytes) is named by its hash,
``%H<sha256>``: a hashed key file holds its key beside its value, a hashed
folder holds nothing that names its part. Apart from the backend so that
the backend and its listing (:mod:`chanstore.backends.json_listing`) share it.
"""

from __future__ import annotations

import hashlib
import json

__all__ = [
    "HASHED_PREFIX",
    "LONG_KEY_FIELD",
    "LONG_VALUE_FIELD",
    "NAME_MAX",
    "SUFFIX",
    "UNSAFE_IN_FOLDER",
    "domain_folders",
    "hashed_name",
    "is_hashed",
    "read_long_key",
]

SUFFIX = ".json"
NAME_MAX = 255
HASHED_PREFIX = "%H"
LONG_KEY_FIELD = "_chanstore_key"
LONG_VALUE_FIELD = "_chanstore_val"
# Domain parts are used as folder names as they are ('%' included: ids arrive
# percent-encoded), so these must never be in one.
UNSAFE_IN_FOLDER = frozenset("/\\") | frozenset(map(chr, range(0x20))) | {"\x7f"}


def hashed_name(text: str) -> str:
    return HASHED_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_hashed(stem: str) -> bool:
    return stem.startswith(HASHED_PREFIX) and len(stem) == len(HASHED_PREFIX) + 64


def read_long_key(data: bytes) -> str:
    key = json.loads(data)[LONG_KEY_FIELD]
    if not isinstance(key, str):
        raise TypeError("stored key is not a string")
    return key


def domain_folders(domain: str) -> list[str]:
    """The folder names of ``domain``: its dot-separated parts, checked to be safe.

    Parts are used as they are (that is the original layout), so they must
    already be safe names: :class:`~chanstore.storage.MoobiusStorage` encodes
    ids before they get here. A part too long for a file name is hashed.
    """
    if not domain:
        return []
    folders = []
    for part in domain.split("."):
        if not part or any(char in UNSAFE_IN_FOLDER for char in part) or is_hashed(part):
            raise ValueError(
                f"json domain {domain!r} has the part {part!r}, which is not a safe folder "
                "name: parts must be non-empty and free of '/', '\\' and control "
                "characters (MoobiusStorage encodes ids for you)"
            )
        too_long = len(part.encode("utf-8")) > NAME_MAX
        folders.append(hashed_name(part) if too_long else part)
    return folders
