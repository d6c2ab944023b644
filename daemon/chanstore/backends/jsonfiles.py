"""The json backend: one file per key, in the original SDK's layout.

A value lives at ``root_dir/<domain, '.' as path separator>/<key>.json``,
written as type-marked JSON with an indent of 2, as the original wrote it, so
the original's data directories load as they are and a person can read them.

Writes are atomic: the value goes to a temporary file in the same folder,
which is flushed to disk (``fsync``), renamed over the key's file, and the
folder is flushed so the rename itself survives a crash. A reader, or a crash,
sees the old value or the new one, never a torn file.

Keys become file names by :func:`chanstore.keys.encode_filename`. A name
longer than the file system allows (255 bytes) is stored as ``%H<sha256>.json``
holding the key beside the value.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from chanstore import codec
from chanstore.backends.base import DatabaseInterface
from chanstore.errors import BackendUnavailable, BulkWriteError, CorruptValue
from chanstore.keys import check_key, decode_filename, encode_filename

__all__ = ["JSONDatabase"]

SUFFIX = ".json"
NAME_MAX = 255
TEMP_PREFIX = ".chanstore-tmp-"
HASHED_PREFIX = "%H"
LONG_KEY_FIELD = "_chanstore_key"
LONG_VALUE_FIELD = "_chanstore_val"
# Domain parts are used as folder names as they are ('%' included: ids arrive
# percent-encoded), so these must never be in one.
UNSAFE_IN_FOLDER = frozenset("/\\") | frozenset(map(chr, range(0x20))) | {"\x7f"}


class JSONDatabase(DatabaseInterface):
    """Values as JSON files under ``root_dir``.

    Settings: ``root_dir`` (default: the working directory, as in the
    original) and ``fsync`` (default true; false trades durability across a
    power loss for speed, and keeps atomicity).
    """

    engine_name = "json"
    SETTINGS = {"root_dir": (str,), "fsync": (bool,)}

    def __init__(self, domain: str = "", root_dir: str = "", fsync: bool = True, **kwargs: Any):
        super().__init__(domain, **kwargs)
        self.root_dir = root_dir
        self.fsync = fsync
        self.path = Path(root_dir or ".").joinpath(*_domain_folders(domain))
        self.path.mkdir(parents=True, exist_ok=True)

    # -- the four ------------------------------------------------------------

    def get_value(self, key: str) -> tuple[bool, Any]:
        return True, self._read(check_key(key))

    def set_value(self, key: str, value: Any) -> tuple[bool, Any]:
        self._write_files({check_key(key): value})
        return True, key

    def delete_key(self, key: str) -> tuple[bool, Any]:
        try:
            self._file_of(check_key(key)).unlink()
        except FileNotFoundError:
            raise KeyError(key) from None
        self._sync_folder()
        return True, key

    def all_keys(self) -> list[str]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return [key for name in names if (key := self._key_of_file(name)) is not None]

    # -- bulk ----------------------------------------------------------------

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for key in keys:
            try:
                found[key] = self._read(check_key(key))
            except KeyError:
                continue
            except CorruptValue as exc:
                found[key] = exc
        return found

    def set_many(self, items: Mapping[str, Any]) -> None:
        for key in items:
            check_key(key)
        self._write_files(items)

    def delete_many(self, keys: Iterable[str]) -> list[str]:
        deleted: list[str] = []
        try:
            for key in keys:
                with contextlib.suppress(FileNotFoundError):
                    self._file_of(check_key(key)).unlink()
                    deleted.append(key)
        except OSError as exc:
            raise BulkWriteError(f"deleting from {self.path} failed: {exc}", done=deleted,
                                 cause=exc) from exc  # fmt: skip
        finally:
            if deleted:
                self._sync_folder()
        return deleted

    # -- life cycle ------------------------------------------------------------

    def check_available(self) -> None:
        if not self.path.is_dir():
            raise BackendUnavailable(f"json folder {self.path} does not exist")
        # The process writes with its effective ids; os.access checks the real ones unless told.
        effective = os.access in os.supports_effective_ids
        if not os.access(self.path, os.W_OK | os.X_OK, effective_ids=effective):
            raise BackendUnavailable(f"json folder {self.path} is not writable")

    def __repr__(self) -> str:
        return f"JSONDatabase(path={str(self.path.resolve())!r})"

    # -- files -----------------------------------------------------------------

    def _file_of(self, key: str) -> Path:
        name = encode_filename(key) + SUFFIX
        if len(name.encode("utf-8")) > NAME_MAX:
            name = _hashed_name(key) + SUFFIX
        return self.path / name

    def _key_of_file(self, name: str) -> str | None:
        # Temp files have no suffix, so they are never keys; a key may start
        # like one (".chanstore-tmp-x" is stored as ".chanstore-tmp-x.json").
        if not name.endswith(SUFFIX):
            return None
        stem = name[: -len(SUFFIX)]
        if _is_hashed(stem):
            try:
                return _read_long_key(self.path / name)
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return decode_filename(stem)

    def _read(self, key: str) -> Any:
        path = self._file_of(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None
        try:
            value = codec.decode(data)
        except (ValueError, TypeError) as exc:
            raise CorruptValue(f"{path} does not hold a readable value: {exc}") from exc
        if _is_hashed(path.name[: -len(SUFFIX)]):
            if not isinstance(value, dict) or value.get(LONG_KEY_FIELD) != key:
                raise CorruptValue(f"{path} does not hold the value of key {key[:80]!r}")
            return value[LONG_VALUE_FIELD]
        return value

    def _encode_file(self, key: str, value: Any, path: Path) -> bytes:
        if _is_hashed(path.name[: -len(SUFFIX)]):
            shaped = {LONG_KEY_FIELD: key, LONG_VALUE_FIELD: codec.to_json_shape(value)}
            return json.dumps(shaped, indent=2, allow_nan=False).encode("ascii")
        return codec.encode(value, indent=2).encode("ascii")

    def _write_files(self, items: Mapping[str, Any]) -> None:
        """Write every item atomically, flushing the folder once for all of them."""
        temps: dict[str, Path] = {}  # key -> its temp file, until renamed
        done: list[str] = []
        try:
            # Encode everything first: an unstorable value must leave no file behind.
            paths = {key: self._file_of(key) for key in items}
            encoded = {
                key: self._encode_file(key, value, paths[key]) for key, value in items.items()
            }
            self._write_temps(encoded, temps)
            for key in encoded:
                os.replace(temps[key], paths[key])
                del temps[key]
                done.append(key)
        except BaseException as exc:
            for temp in temps.values():
                with contextlib.suppress(OSError):
                    temp.unlink()
            if len(items) == 1 or not isinstance(exc, OSError):
                raise
            raise BulkWriteError(f"writing to {self.path} failed: {exc}", done=done,
                                 cause=exc) from exc  # fmt: skip
        finally:
            if done:
                self._sync_folder()

    def _write_temps(self, encoded: Mapping[str, bytes], into: dict[str, Path]) -> None:
        """Write each key's temp file (flushed to disk), recording each in ``into`` as written.

        With fsync on, several files are written at the same time: each fsync
        waits for a journal commit, and file systems (ext4, xfs) let
        concurrent fsyncs share one, so a batch costs about one commit, not
        one per file. Raises the first failure once every file is settled.
        """

        def write(key: str) -> None:
            into[key] = self._write_temp(encoded[key])

        if self.fsync and len(encoded) > 1:
            _call_each(write, list(encoded))
        else:
            for key in encoded:
                write(key)

    def _write_temp(self, data: bytes) -> Path:
        temp = self.path / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        os.close(fd)
        return temp

    def _sync_folder(self) -> None:
        if not self.fsync:
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: Threads that write and fsync the files of one batch at the same time.
_SYNC_WRITERS = ThreadPoolExecutor(16, thread_name_prefix="chanstore-json-write")


def _call_each(function: Callable[[str], None], keys: list[str]) -> None:
    """``function(key)`` for every key at once; the first error once all are done."""
    others = [_SYNC_WRITERS.submit(function, key) for key in keys[1:]]
    errors: list[BaseException] = []
    try:
        function(keys[0])  # this thread writes one of them itself
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others
        errors.append(exc)
    for other in others:
        error = other.exception()  # waits for it
        if error is not None:
            errors.append(error)
    if errors:
        raise errors[0]


def _hashed_name(text: str) -> str:
    return HASHED_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_hashed(stem: str) -> bool:
    return stem.startswith(HASHED_PREFIX) and len(stem) == len(HASHED_PREFIX) + 64


def _read_long_key(path: Path) -> str:
    key = json.loads(path.read_bytes())[LONG_KEY_FIELD]
    if not isinstance(key, str):
        raise TypeError("stored key is not a string")
    return key


def _domain_folders(domain: str) -> list[str]:
    """The folder names of ``domain``: its dot-separated parts, checked to be safe.

    Parts are used as they are (that is the original layout), so they must
    already be safe names: :class:`~chanstore.storage.MoobiusStorage` encodes
    ids before they get here. A part too long for a file name is hashed.
    """
    if not domain:
        return []
    folders = []
    for part in domain.split("."):
        if not part or any(char in UNSAFE_IN_FOLDER for char in part) or _is_hashed(part):
            raise ValueError(
                f"json domain {domain!r} has the part {part!r}, which is not a safe folder "
                "name: parts must be non-empty and free of '/', '\\' and control "
                "characters (MoobiusStorage encodes ids for you)"
            )
        too_long = len(part.encode("utf-8")) > NAME_MAX
        folders.append(_hashed_name(part) if too_long else part)
    return folders
