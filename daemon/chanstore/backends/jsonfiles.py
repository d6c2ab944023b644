"""The json backend: one file per key, in the original SDK's layout.

A value lives at ``root_dir/<domain, '.' as path separator>/<key>.json``,
written as type-marked JSON with an indent of 2, as the original wrote it, so
the original's data directories load as they are and a person can read them.

Writes are atomic: the value goes to a temporary file in the same folder,
which is flushed to disk (``fsync``), renamed over the key's file, and the
folder is flushed so the rename itself survives a crash. A reader, or a crash,
sees the old value or the new one, never a torn file.

Bulk sets with fsync on (``set_many``, and ``set_many_together`` for the
daemon's write lanes, which store the keys of many domains of one root at
once) are made durable by one flush of a write-ahead journal in the root
instead of a flush per file: see :mod:`chanstore.backends.journal`. Their
files are renamed into place at once, unflushed; after a machine crash the
journal is replayed when the root is first opened, before anything is read,
so chanstore too sees the old value or the new one. (Another program reading
the folders between the crash and that replay may find such a file empty or
old.)

Reads never create anything on disk: a domain's folders are made by its first
write, so that looking up channels that were never written (a scan of random
channel ids) does not grow the tree.

Nothing inside the root is followed (see :mod:`chanstore.backends.files`): a
domain's folder is reached from the root's descriptor through no link, and
its files are read, written, renamed and removed relative to the folder's
descriptor. A symbolic link where a folder or a key's file should be fails the
operation with the kind ``planted_link``, naming the path; a listing lists a
planted ``<key>.json`` (reading it is that error) and reports it as an
integrity problem. The root may be a link, resolved once, by its first backend.

Keys become file names by :func:`chanstore.keys.encode_filename`. A name
longer than the file system allows (255 bytes) is stored as ``%H<sha256>.json``
holding the key beside the value; a domain part that long as a folder
``%H<sha256>``, whose ``%name.txt`` holds the part for a listing.

Listing (for export, import and migrate) walks the folders below the root
once its journal was replayed (see :mod:`chanstore.backends.json_listing`);
a domain is read a batch of files at a time. The layout itself is in
:mod:`chanstore.backends.json_layout`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from chanstore import codec
from chanstore.backends import json_serving
from chanstore.backends.base import DatabaseInterface, check_batch_size
from chanstore.backends.files import (
    TEMP_PREFIX,
    PlantedLink,
    call_each,
    named,
    read_file,
    release_replaced,
    remove_file,
    rename_over,
    write_temp,
)
from chanstore.backends.integrity import problems, report_planted
from chanstore.backends.journal import NotJournaling, journals
from chanstore.backends.json_layout import (
    LONG_KEY_FIELD,
    LONG_VALUE_FIELD,
    NAME_MAX,
    SUFFIX,
    domain_folders,
    hashed_name,
    hashed_parts,
    is_hashed,
    read_long_key,
    write_names,
)
from chanstore.backends.json_listing import (
    domains_under,
    entries_of,
    listing_failed,
    report_keyless,
)
from chanstore.errors import (
    BackendUnavailable,
    BulkWriteError,
    CorruptValue,
    IntegrityProblem,
    InvalidKey,
    UnstorableValue,
)
from chanstore.keys import check_key, decode_filename, encode_filename

__all__ = ["TEMP_PREFIX", "JSONDatabase", "PlantedLink"]

#: What a write or a delete may fail with, file by file.
WRITE_ERRORS = (OSError, PlantedLink)

#: An encoded item: its file's name in the domain's folder, and the file's contents.
Encoded = Mapping[str, tuple[str, bytes]]


class JSONDatabase(DatabaseInterface):
    """Values as JSON files under ``root_dir``.

    Settings: ``root_dir`` (default: the working directory, as in the original) and ``fsync``
    (default true; false trades durability across a power loss for speed, keeps atomicity).
    """

    engine_name = "json"
    SETTINGS = {"root_dir": (str,), "fsync": (bool,)}
    sees_every_write = False  # nothing records each change here: the daemon keeps the history
    writes_file_form = True
    INTEGRITY_KINDS = ("corrupt_value", "journal_damaged", "planted_link", "unlistable_domain")

    def __init__(self, domain: str = "", root_dir: str = "", fsync: bool = True, **kwargs: Any):
        super().__init__(domain, **kwargs)
        self.root_dir = root_dir
        self.fsync = fsync
        folders = domain_folders(domain)
        # Shared by every backend of the root in this process; the first one
        # replays what a crash left in it, before anything of the root is read.
        self._journal = journals.acquire(os.path.abspath(root_dir or "."))
        self._closed = False
        #: The root, resolved once, and its descriptor: every file is reached from it.
        self._root = self._journal.folder
        self._parts = tuple(folders)
        #: The parts named by their hash whose folders this backend has not named yet.
        self._unnamed = hashed_parts(domain, folders)
        # The domain's folder, for messages. A str, not a Path: pathlib interns the
        # parts of every path it parses, and a channel's folder name in the
        # interpreter's table of interned strings outlived the channel (about
        # 3.5 MiB kept after 10,000 channels left, tests/reliability/test_memory).
        self._where = os.path.join(self._root.path, *folders)
        #: The domain's folder relative to the root ("" for the root's own domain "").
        self._folder = os.path.join(*folders) if folders else ""
        self._encoded = os.fsencode(self._folder)

    # -- the four ------------------------------------------------------------

    def get_value(self, key: str) -> tuple[bool, Any]:
        return True, self._read(check_key(key))

    def set_value(self, key: str, value: Any) -> tuple[bool, Any]:
        # One key: the usual durable write (the journal is for batches).
        self._write_files(self._encode_items({key: value}))
        return True, key

    def delete_key(self, key: str) -> tuple[bool, Any]:
        name = self._name_of(check_key(key))
        with self._journal.bypassing([self._relative(name)]):
            try:
                folder = self._open_folder()
            except FileNotFoundError:
                raise KeyError(key) from None
            try:
                remove_file(folder, name, self._where)
                if self.fsync:
                    os.fsync(folder)
            except FileNotFoundError:
                raise KeyError(key) from None
            finally:
                os.close(folder)
        return True, key

    def all_keys(self) -> list[str]:
        """Every key; a planted ``<key>.json`` link is listed (reading it fails) and reported."""
        try:
            folder = self._open_folder()
        except FileNotFoundError:
            return []
        keys: list[str] = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = entry.name
                    # Temp files have no suffix, so they are never keys; a key may
                    # start like one (".chanstore-tmp-x" is stored as
                    # ".chanstore-tmp-x.json"). Nor is the journal, which lives in
                    # the root (the domain "" too).
                    if not name.endswith(SUFFIX):
                        continue
                    if entry.is_symlink():
                        where = os.path.join(self._where, name)
                        report_planted(self._root.path, where, f"listing {self._where}")
                    key = self._key_of_file(folder, name)
                    if key is not None:
                        keys.append(key)
        finally:
            os.close(folder)
        return keys

    # -- bulk ----------------------------------------------------------------

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        try:
            folder = self._open_folder()
        except FileNotFoundError:
            for key in keys:
                check_key(key)
            return {}
        try:
            return self._read_many(folder, keys)
        finally:
            os.close(folder)

    def _read_many(self, folder: int, keys: Iterable[str]) -> dict[str, Any]:
        """The values of those ``keys`` that exist in ``folder``, the domain's (see get_many)."""
        found: dict[str, Any] = {}
        for key in keys:
            try:
                found[key] = self._read(check_key(key), folder)
            except KeyError:
                continue
            except CorruptValue as exc:
                found[key] = exc
        return found

    def set_many(self, items: Mapping[str, Any]) -> None:
        # With fsync on, through the root's journal: one flush for all of them.
        encoded = self._encode_items(items)
        if self.fsync and encoded:
            try:
                self._name_folders(encoded)
                errors = self._journal.write(self._journal_files(encoded))
            except NotJournaling:
                pass  # another process journals this root: write the usual way
            except WRITE_ERRORS as exc:
                raise self._failed(exc, list(encoded), []) from exc
            else:
                error = self._outcome(list(encoded), errors)
                if error is not None:
                    raise error
                return
        self._write_files(encoded)

    @property
    def together_key(self) -> tuple[str, bool]:
        """Backends of one root (and fsync setting) share a journal: see set_many_together."""
        return (self._journal.root, self.fsync)

    @classmethod
    def set_many_together(
        cls, parts: Sequence[tuple[JSONDatabase, Mapping[str, Any]]]
    ) -> list[BaseException | None]:
        """``set_many`` for several domains of one root, made durable by one journal flush.

        For the daemon's write lanes, whose batches span many channels. Every
        value is encoded first: a key or value that cannot be stored fails its
        own part, which writes nothing. The rest is appended to the root's
        journal and flushed once, then each file is written and renamed over
        its key's file (see :mod:`chanstore.backends.journal`). Returns each
        part's error, or None. Parts are independent (distinct domains, as the
        lanes make them), so a part that cannot be journaled here (fsync off,
        or another process journals the root) is written alone, after the rest.
        """
        errors: list[BaseException | None] = [None] * len(parts)
        encoded: list[dict[str, tuple[str, bytes]]] = [{} for _part in parts]
        for index, (backend, items) in enumerate(parts):
            try:
                encoded[index] = backend._encode_items(items)
                backend._name_folders(encoded[index])
            except Exception as exc:  # noqa: BLE001 - that part's answer; the others go on
                errors[index] = exc
        journal = parts[0][0]._journal
        alone = [  # written the usual way, one part at a time
            index
            for index, (backend, _items) in enumerate(parts)
            if errors[index] is None and (not backend.fsync or backend._journal is not journal)
        ]
        shared = [index for index in range(len(parts)) if errors[index] is None
                  and index not in alone and encoded[index]]  # fmt: skip
        files = [file for index in shared
                 for file in parts[index][0]._journal_files(encoded[index])]  # fmt: skip
        try:
            outcomes = journal.write(files)
        except NotJournaling:
            alone += shared  # another process journals this root
        except WRITE_ERRORS as exc:
            for index in shared:
                errors[index] = parts[index][0]._failed(exc, list(encoded[index]), [])
        else:
            position = 0
            for index in shared:
                keys = list(encoded[index])
                mine = outcomes[position : position + len(keys)]
                position += len(keys)
                errors[index] = parts[index][0]._outcome(keys, mine)
        for index in alone:
            try:
                parts[index][0]._write_files(encoded[index])
            except Exception as exc:  # noqa: BLE001 - that part's answer
                errors[index] = exc
        return errors

    def delete_many(self, keys: Iterable[str]) -> list[str]:
        keys = list(keys)
        deleted: list[str] = []
        with self._journal.bypassing(self._relatives(keys)):
            try:
                folder = self._open_folder()
            except FileNotFoundError:
                for key in keys:
                    check_key(key)
                return deleted
            except WRITE_ERRORS as exc:
                raise self._failed(exc, keys, deleted, verb="deleting from", bulk=True) from exc
            try:
                for key in keys:
                    with contextlib.suppress(FileNotFoundError):
                        remove_file(folder, self._name_of(check_key(key)), self._where)
                        deleted.append(key)
            except WRITE_ERRORS as exc:
                raise self._failed(exc, keys, deleted, verb="deleting from", bulk=True) from exc
            finally:
                if deleted and self.fsync:
                    os.fsync(folder)
                os.close(folder)
        return deleted

    # -- serving: see json_serving ------------------------------------------------

    @classmethod
    def mark_served(cls, settings: Mapping[str, Any]) -> Callable[[], None]:
        return json_serving.mark_served(json_serving.root_of(settings))

    @classmethod
    def served_elsewhere(cls, settings: Mapping[str, Any]) -> str | None:
        return json_serving.served_by_daemon(json_serving.root_of(settings))

    # -- listing ---------------------------------------------------------------

    @classmethod
    def list_domains(cls, prefix: str = "", **settings: Any) -> Iterator[str]:
        """Every domain below ``root_dir`` whose name starts with ``prefix`` and whose folder
        holds a key file; each once, in no set order, lazily.

        The root is opened as a backend opens it, so a journal a crash left is
        replayed first; then its folders are walked, none through a link (see
        :func:`~chanstore.backends.json_listing.domains_under` for what is
        reported: planted links, domains below a hashed folder).
        """
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        lister = cls(domain="", **settings)  # the root's journal: replayed if a crash left it
        try:
            yield from domains_under(lister._root, prefix)
        finally:
            lister.close()

    def scan_items(self, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """The domain's items, ``batch_size`` files at a time, read as the folder is
        listed: neither every key nor every value is held at once.

        A planted ``<key>.json`` link is that key's
        :class:`~chanstore.errors.CorruptValue` (and reported); a file whose
        name is not a key chanstore can store is a CorruptValue too. A hashed
        file (``%H<sha256>.json``) whose key cannot be read is reported, as
        ``corrupt_value``, since it has no key to be put under.
        """
        check_batch_size(batch_size)
        try:
            folder = self._open_folder()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise listing_failed(exc, f"reading {self._where}") from exc
        try:
            with os.scandir(folder) as entries:
                keys: list[str] = []
                bad: dict[str, CorruptValue] = {}
                for entry in entries_of(entries, self._where):
                    name = entry.name
                    if not name.endswith(SUFFIX):
                        continue  # temp files, and anything else that is not a key's file
                    if entry.is_symlink():
                        where = os.path.join(self._where, name)
                        report_planted(self._root.path, where, f"reading {self._where}")
                    key = self._key_of_file(folder, name, report=True)
                    if key is None:
                        continue
                    try:
                        keys.append(check_key(key))
                    except InvalidKey as exc:
                        path = os.path.join(self._where, name)
                        bad[key] = CorruptValue(f"{path} is not the file of a key chanstore "
                                                f"can store: {exc}")  # fmt: skip
                    if len(keys) + len(bad) >= batch_size:
                        batch = self._read_batch(folder, keys, bad)
                        keys, bad = [], {}
                        if batch:
                            yield batch
                batch = self._read_batch(folder, keys, bad)
                if batch:
                    yield batch
        finally:
            os.close(folder)

    def _read_batch(
        self, folder: int, keys: list[str], bad: dict[str, CorruptValue]
    ) -> dict[str, Any]:
        try:
            found = self._read_many(folder, keys)
        except OSError as exc:
            raise listing_failed(exc, f"reading {self._where}") from exc
        found.update(bad)
        return found

    # -- life cycle ------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The domain's folder (made when asked: see ``_where``)."""
        return Path(self._where)

    def check_available(self) -> None:
        # The domain's folder, or the folder its first write would be made in.
        found = self._deepest_folder()
        if found is None:
            folder = Path(self._root.path)
            while not os.path.lexists(folder) and folder != folder.parent:
                folder = folder.parent
            if not folder.is_dir():
                raise BackendUnavailable(f"json folder {folder} is not a folder")
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            found = (fd, str(folder))
        fd, path = found
        try:
            json_serving.check_writable(fd, path)
        finally:
            os.close(fd)

    def _deepest_folder(self) -> tuple[int, str] | None:
        """The domain's folder or its deepest existing parent in the root, and its path.

        None if the root does not exist. Raises :class:`PlantedLink` for a
        link on the way, and ``BackendUnavailable`` for a file in a folder's place.
        """
        for depth in range(len(self._parts), -1, -1):
            try:
                fd = self._root.folder(self._parts[:depth])
            except FileNotFoundError:
                if self._root.fd() is None:
                    return None
                continue
            except NotADirectoryError as exc:
                raise BackendUnavailable(f"json folder {exc.filename} is not a folder") from None
            return fd, os.path.join(self._root.path, *self._parts[:depth])
        return None

    def integrity_problems(self) -> list[IntegrityProblem]:
        """What this root's journal replay or listings found (any backend of the root tells it)."""
        return problems.take(self._journal.root)

    def close(self) -> None:
        """Let go of the root's journal; the last backend of a root checkpoints it."""
        if not self._closed:
            self._closed = True
            journals.release(self._journal)

    def __repr__(self) -> str:
        return f"JSONDatabase(path={self._where!r})"

    # -- files -----------------------------------------------------------------

    def _open_folder(self, create: bool = False) -> int:
        """A descriptor of the domain's folder, reached through no link (see ``Root.folder``)."""
        root = self._root
        return root.folder(self._parts, create=create, fsync=self.fsync, encoded=self._encoded)

    def _name_folders(self, encoded: Encoded) -> None:
        """Before this backend's first write: each hashed folder holds the part it names."""
        if self._unnamed and encoded:
            write_names(self._root, self._parts, self._unnamed, self.fsync)
            self._unnamed = ()

    def _name_of(self, key: str) -> str:
        """The name of ``key``'s file in the domain's folder."""
        name = encode_filename(key) + SUFFIX
        if len(name.encode("utf-8")) > NAME_MAX:
            name = hashed_name(key) + SUFFIX
        return name

    def _relative(self, name: str) -> str:
        """``name``, a file of this domain, relative to the root: how the journal names it."""
        return os.path.join(self._folder, name) if self._folder else name

    def _relatives(self, keys: Iterable[str]) -> list[str]:
        found = []
        for key in keys:
            with contextlib.suppress(Exception):  # an invalid key fails in its own turn
                found.append(self._relative(self._name_of(check_key(key))))
        return found

    def _key_of_file(self, folder: int, name: str, *, report: bool = False) -> str | None:
        """The key of the file ``name``; None if it has none to be read (with ``report``,
        damage is reported: a caller that reads values must not skip it quietly)."""
        stem = name[: -len(SUFFIX)]
        if not is_hashed(stem):
            return decode_filename(stem)
        try:
            return read_long_key(read_file(folder, name, self._where))
        except PlantedLink as exc:
            # Its key cannot be known without following the link: reported, not listed.
            report_planted(self._root.path, exc.path, f"listing {self._where}")
        except FileNotFoundError:
            pass  # deleted since it was listed
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if report:
                report_keyless(self._root.path, os.path.join(self._where, name), exc)
        return None

    def _read(self, key: str, folder: int | None = None) -> Any:
        name = self._name_of(key)
        try:
            if folder is None:
                folder = self._open_folder()
                try:
                    data = read_file(folder, name, self._where)
                finally:
                    os.close(folder)
            else:
                data = read_file(folder, name, self._where)
        except FileNotFoundError:
            raise KeyError(key) from None
        try:
            value = codec.decode(data, revive=self.revive_values)
        except (ValueError, TypeError) as exc:
            path = os.path.join(self._where, name)
            raise CorruptValue(f"{path} does not hold a readable value: {exc}") from exc
        if is_hashed(name[: -len(SUFFIX)]):
            document = value.doc if isinstance(value, codec.Document) else value
            if not isinstance(document, dict) or document.get(LONG_KEY_FIELD) != key:
                path = os.path.join(self._where, name)
                raise CorruptValue(f"{path} does not hold the value of key {key[:80]!r}")
            inner = document[LONG_VALUE_FIELD]
            return codec.Document(inner) if isinstance(value, codec.Document) else inner
        return value

    def _encode_file(self, key: str, value: Any, name: str) -> bytes:
        if is_hashed(name[: -len(SUFFIX)]):
            shaped = {LONG_KEY_FIELD: key, LONG_VALUE_FIELD: codec.to_json_shape(value)}
            try:
                return json.dumps(shaped, indent=2, allow_nan=False).encode("ascii")
            except (TypeError, ValueError) as exc:  # a Document's contents, unchecked till now
                raise UnstorableValue(f"the value cannot be stored as JSON: {exc}") from exc
        return codec.encode_bytes(value, indent=2)

    def _encode_items(self, items: Mapping[str, Any]) -> dict[str, tuple[str, bytes]]:
        """Each key's file name and contents. Raises if any key or value cannot be stored:
        everything is encoded before anything is written, so that an unstorable
        value leaves no file behind."""
        encoded = {}
        for key, value in items.items():
            name = self._name_of(check_key(key))
            encoded[key] = (name, self._encode_file(key, value, name))
        return encoded

    def _journal_files(self, encoded: Encoded) -> list[tuple[str, bytes]]:
        return [(self._relative(name), data) for name, data in encoded.values()]

    def _outcome(self, keys: list[str], errors: Sequence[Exception | None]) -> Exception | None:
        """The error of a journaled write of ``keys`` whose files met ``errors``, or None."""
        failed = next((error for error in errors if error is not None), None)
        if failed is None:
            return None
        done = [key for key, error in zip(keys, errors, strict=True) if error is None]
        return self._failed(failed, keys, done)

    def _failed(self, exc: Exception, keys: list[str], done: list[str], *,
                verb: str = "writing to", bulk: bool = False) -> Exception:  # fmt: skip
        """``exc`` as a write raises it: itself for one key, else a BulkWriteError."""
        if len(keys) == 1 and not bulk:
            return exc
        error = BulkWriteError(f"{verb} {self._where} failed: {exc}", done=done, cause=exc)
        error.__cause__ = exc
        return error

    def _write_files(self, encoded: Encoded) -> None:
        """Write every encoded item atomically, flushing the folder once for all of them.

        The usual durable way, without the journal (see ``Journal.bypassing``).
        """
        if not encoded:
            return
        names = [self._relative(name) for name, _data in encoded.values()]
        with self._journal.bypassing(names):
            try:
                self._name_folders(encoded)
                folder = self._open_folder(create=True)
            except WRITE_ERRORS as exc:
                raise self._failed(exc, list(encoded), []) from exc
            try:
                self._write_files_now(folder, encoded)
            finally:
                os.close(folder)

    def _write_files_now(self, folder: int, encoded: Encoded) -> None:
        temps: dict[str, str] = {}  # key -> its temp file, until renamed
        done: list[str] = []
        held: list[int] = []  # the replaced versions, let go of off this thread
        try:
            self._write_temps(folder, {key: data for key, (_name, data) in encoded.items()}, temps)
            for key, (name, _data) in encoded.items():
                rename_over(folder, temps.pop(key), name, self._where, held)
                done.append(key)
        except BaseException as exc:
            for temp in temps.values():
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=folder)
            if len(encoded) == 1 or not isinstance(exc, WRITE_ERRORS):
                raise
            raise self._failed(exc, list(encoded), done) from exc
        finally:
            release_replaced(held)
            if done and self.fsync:
                os.fsync(folder)

    def _write_temps(self, folder: int, encoded: Mapping[str, bytes], into: dict[str, str]) -> None:
        """Write each key's temp file (flushed to disk), recording each in ``into`` as written.

        With fsync on, several files are written at the same time: each fsync
        waits for a journal commit, and file systems (ext4, xfs) let
        concurrent fsyncs share one, so a batch costs about one commit, not
        one per file. Raises the first failure once every file is settled.
        """

        def write(key: str) -> None:
            try:
                into[key] = write_temp(folder, encoded[key], self.fsync)
            except OSError as exc:
                raise named(exc, folder, "", self._where) from None

        if self.fsync and len(encoded) > 1:
            call_each(write, list(encoded))
        else:
            for key in encoded:
                write(key)
