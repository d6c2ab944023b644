"""Where a json root keeps a domain and a key: folder names of a domain, file names of a key.

A domain's folder is ``root/<its dot-separated parts>``, a key's file
``<encoded key>.json`` in it (the original SDK's layout). A part or a file
name longer than a file system allows (255 bytes) is named by its hash,
``%H<sha256>``: a hashed key file holds its key beside its value, a hashed
folder holds its part in a file of its own, :data:`NAME_FILE` (UTF-8, nothing
else). A backend writes it atomically before its first write into the domain
if it is not there (:func:`write_names`; so a write also names a folder that
an earlier release, which wrote none, made), and a listing reads it back and
checks it (:func:`read_name`). Apart from the backend so that the backend and
its listing (:mod:`chanstore.backends.json_listing`) share it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

from chanstore.backends.files import Root, named, read_file, replace_with

__all__ = [
    "HASHED_PREFIX",
    "LONG_KEY_FIELD",
    "LONG_VALUE_FIELD",
    "NAME_FILE",
    "NAME_MAX",
    "SUFFIX",
    "UNSAFE_IN_FOLDER",
    "domain_folders",
    "hashed_name",
    "hashed_parts",
    "is_hashed",
    "read_long_key",
    "read_name",
    "write_names",
]

SUFFIX = ".json"
NAME_MAX = 255
HASHED_PREFIX = "%H"
LONG_KEY_FIELD = "_chanstore_key"
LONG_VALUE_FIELD = "_chanstore_val"
#: In a hashed folder, the part it is named for. Never a key's file (no ``.json``), a temp
#: file (no TEMP_PREFIX) nor a domain part's folder (a part holds no '.').
NAME_FILE = "%name.txt"
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


def hashed_parts(domain: str, folders: Sequence[str]) -> tuple[tuple[int, str], ...]:
    """The depth and the text of each part of ``domain`` whose folder (of ``folders``, its
    :func:`domain_folders`) is named by its hash; ``()`` for the usual domain."""
    if not folders:
        return ()
    pairs = zip(domain.split("."), folders, strict=True)
    return tuple((depth, part) for depth, (part, folder) in enumerate(pairs) if part != folder)


def write_names(
    root: Root, folders: Sequence[str], hashed: Sequence[tuple[int, str]], fsync: bool
) -> None:
    """Make each hashed folder of a domain (``hashed``, from :func:`hashed_parts`), with its
    :data:`NAME_FILE` if it has none; what is there already is left as it is (a listing
    checks it). The file is written as a key's is: a flushed temp file renamed over it
    (with ``fsync``, the folder then flushed). Before a domain's first write, so that no
    key of it is ever below a folder that cannot be named."""
    for depth, part in hashed:
        where = os.path.join(root.path, *folders[: depth + 1])
        fd = root.folder(folders[: depth + 1], create=True, fsync=fsync)
        try:
            try:
                os.stat(NAME_FILE, dir_fd=fd, follow_symlinks=False)
                continue  # anything there, a link too, is left for a listing to judge
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise named(exc, fd, "", os.path.join(where, NAME_FILE)) from None
            replace_with(fd, NAME_FILE, part.encode("utf-8"), fsync, where)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)


def read_name(fd: int, folder: str, where: str) -> str:
    """The domain part the hashed folder ``fd`` (named ``folder``, at ``where``) is named for,
    as its :data:`NAME_FILE` says.

    ``FileNotFoundError`` if it has none; :class:`~chanstore.backends.files.PlantedLink`
    if it is a link; another ``OSError`` if it cannot be read; ``ValueError`` if what it
    says is not one part whose hash is ``folder`` (never trusted otherwise).
    """
    text = read_file(fd, NAME_FILE, where).decode("utf-8")  # UnicodeDecodeError: a ValueError
    try:
        matches = domain_folders(text) == [folder]
    except ValueError:
        matches = False
    if not matches:
        raise ValueError(f"it says {text[:80]!r}, not a domain part whose hash names the folder")
    return text
