"""Listing a json root, for export, import and migrate: its domains, found by a walk of its
folders, and what reading a domain's files a batch at a time reports.

:func:`domains_under` walks the folders below the root that a prefix allows,
depth-first and lazily, with one open folder per level (:func:`walk`), never
a list of names. It enters no folder through a link, as nothing in a json
root is followed (see :mod:`chanstore.backends.files`): a link where a
domain's folder could be is reported as planted and not followed, and a
planted ``<key>.json`` counts as a key (as ``all_keys`` lists it; reading it
is the error). A folder holding a key file makes its domain listed once.

A domain part too long for a folder name is stored under its hash
(:mod:`chanstore.backends.json_layout`), which cannot be turned back into
the part: the folder's name file says it, believed only if it hashes back to
the folder's name. A folder of keys below a hashed folder whose name
file is missing (releases before it wrote none), unreadable, a link, or not
its part, is reported (``unlistable_domain``, logged at error and kept as an
integrity problem, with how to move it all the same) instead of listed. So
are the hashed key files whose key cannot be read, which a scan cannot put
under any key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from chanstore import logs
from chanstore.backends.files import PlantedLink, Root, open_folder
from chanstore.backends.integrity import problems, report_planted
from chanstore.backends.json_layout import (
    NAME_FILE,
    NAME_MAX,
    SUFFIX,
    UNSAFE_IN_FOLDER,
    domain_folders,
    is_hashed,
    read_name,
)
from chanstore.errors import BackendError, IntegrityProblem, error_kind

__all__ = ["Level", "domains_under", "entries_of", "listing_failed", "report_keyless", "walk"]

log = logs.get_logger(backend="json")


def domains_under(root: Root, prefix: str) -> Iterator[str]:
    """Every domain of ``root`` that starts with ``prefix`` and whose folder holds a key file.

    The walk starts at the deepest folder the prefix names whole
    (``"service_a.channel_"``: ``root/service_a``), its folders then filtered
    by the whole prefix. The caller replays the root's journal first.
    """
    *whole, partial = prefix.split(".")
    if any(not part for part in whole):
        return  # an empty part: no domain has one
    try:
        start = domain_folders(".".join(whole))
    except ValueError:
        return  # a part no domain can have
    where = os.path.join(root.path, *start)
    found_by = f"listing the domains in {where}"
    try:
        fd = root.folder(start)
    except (FileNotFoundError, NotADirectoryError):
        return
    except PlantedLink as exc:
        report_planted(root.path, exc.path, found_by)
        return
    except OSError as exc:
        raise listing_failed(exc, found_by) from exc

    def may_hold_domains(level: Level, entry: os.DirEntry[str]) -> bool:
        """Whether ``entry`` can be the folder of a domain part that the prefix allows.
        (The journal's files and copies, and temp files, hold a '.': never one.)"""
        name = entry.name
        if "." in name or any(char in UNSAFE_IN_FOLDER for char in name):
            return False
        return bool(level.names) or is_hashed(name) or name.startswith(partial)

    entries = walk(fd, where, may_hold_domains,
                   lambda path: report_planted(root.path, path, found_by))  # fmt: skip
    names = _Names(root, start, found_by)
    try:
        for level, entry in entries:
            name = entry.name
            if entry.is_symlink():
                if name.endswith(SUFFIX) or may_hold_domains(level, entry):
                    report_planted(root.path, os.path.join(level.where, name), found_by)
                if not name.endswith(SUFFIX):
                    continue
            if level.mark or not name.endswith(SUFFIX):
                continue
            level.mark = True  # the folder holds a key: listed (or reported) once
            parts = names.parts(level)
            if parts is None:
                continue
            domain = ".".join((*whole, *parts))
            if domain.startswith(prefix):
                yield domain
    except OSError as exc:
        raise listing_failed(exc, found_by) from exc
    finally:
        entries.close()


# -- the walk --------------------------------------------------------------------------


class Level:
    """A folder a :func:`walk` is in: its names below the walk's start, its path, its
    descriptor, and ``mark``, which is the caller's (whether it counted the folder yet)."""

    __slots__ = ("entries", "fd", "mark", "names", "where")

    def __init__(self, fd: int, names: tuple[str, ...], where: str) -> None:
        try:
            self.entries = os.scandir(fd)
        except OSError as exc:
            os.close(fd)
            raise OSError(exc.errno, exc.strerror, where) from None
        self.fd = fd
        self.names = names
        self.where = where
        self.mark = False

    def close(self) -> None:
        self.entries.close()
        os.close(self.fd)


def walk(
    start: int,
    where: str,
    enter: Callable[[Level, os.DirEntry[str]], bool],
    planted: Callable[[str], None],
) -> Iterator[tuple[Level, os.DirEntry[str]]]:
    """Every entry below the folder ``start`` (path ``where``) that is not a folder, with the
    folder it is in: depth-first, lazily, one open folder per level.

    The walk takes ``start`` (a descriptor) over and closes it, and every folder it
    opened, when it ends or is closed. It enters a folder entry when ``enter(level,
    entry)`` says so, never through a link: a link is an entry like a file (the caller
    decides what it is); a folder that became a link between listing and opening is
    given to ``planted(path)``, and one gone meanwhile is passed over. Any other failure
    is an ``OSError`` naming the path.
    """
    stack = [Level(start, (), where)]
    try:
        while stack:
            level = stack[-1]
            try:
                entry = next(level.entries, None)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, level.where) from None
            if entry is None:
                stack.pop().close()
                continue
            if not entry.is_dir(follow_symlinks=False):
                yield level, entry
                continue
            if not enter(level, entry):
                continue
            path = os.path.join(level.where, entry.name)
            try:
                fd = open_folder(level.fd, entry.name, path)
            except PlantedLink:
                planted(path)
                continue
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed, or no longer a folder, since it was listed
            stack.append(Level(fd, (*level.names, entry.name), path))
    finally:
        for level in stack:
            level.close()


class _Names:
    """The domain parts of the folders a walk of ``root`` from ``start`` is in: the hashed
    ones read back from their name files, each once while the walk is below it."""

    def __init__(self, root: Root, start: list[str], found_by: str) -> None:
        self.root = root
        self.start = start
        self.found_by = found_by
        #: The hashed folders on the walk's way down: their part, or None and why not.
        self.known: dict[tuple[str, ...], tuple[str | None, str]] = {}

    def parts(self, level: Level) -> list[str] | None:
        """The parts of ``level``'s names; None if a hashed one cannot be read back (then
        reported, unless its folder is gone)."""
        known = self.known
        for names in [names for names in known if level.names[: len(names)] != names]:
            del known[names]  # the walk left it
        parts = []
        for depth, name in enumerate(level.names):
            if not is_hashed(name):
                parts.append(name)
                continue
            names = level.names[: depth + 1]
            if names not in known:
                known[names] = _name_of(self.root, [*self.start, *names], self.found_by)
            part, why = known[names]
            if part is None:
                if why:
                    _report_unlistable(self.root.path, level.where, why)
                return None
            parts.append(part)
        return parts


# -- what a listing or a scan meets ------------------------------------------------------


def entries_of(entries: Iterator[os.DirEntry[str]], where: str) -> Iterator[os.DirEntry[str]]:
    """``entries`` of the folder ``where``; a failure to read it is a BackendError."""
    while True:
        try:
            entry = next(entries, None)
        except OSError as exc:
            raise listing_failed(exc, f"reading {where}") from exc
        if entry is None:
            return
        yield entry


def listing_failed(exc: OSError, doing: str) -> BackendError:
    """``exc``, met while ``doing``, as a listing raises it: a BackendError of its kind."""
    error = BackendError(f"json {doing} failed: {exc}")
    error.kind = error_kind(exc)
    return error


def _name_of(root: Root, folders: list[str], found_by: str) -> tuple[str | None, str]:
    """The part the hashed folder ``folders`` (below the root) is named for, as its name file
    says, and ``""``; else None and why not (``""`` if the folder is gone, or a link, which
    is reported here)."""
    where = os.path.join(root.path, *folders)
    head = (f"{where} is named by the hash of a domain part too long for a file name (more "
            f"than {NAME_MAX} bytes), and its {NAME_FILE}, which names that part,")  # fmt: skip
    try:
        fd = root.folder(folders)
    except (FileNotFoundError, NotADirectoryError):
        return None, ""  # removed, or no longer a folder, since it was listed
    except PlantedLink as exc:
        report_planted(root.path, exc.path, found_by)
        return None, ""
    except OSError as exc:
        return None, f"{where} cannot be opened ({exc})"
    try:
        return read_name(fd, folders[-1], where), ""
    except FileNotFoundError:
        return None, (f"{head} is missing (earlier releases of chanstore wrote none; "
                      "the next write to the domain adds it)")  # fmt: skip
    except PlantedLink as exc:
        report_planted(root.path, exc.path, found_by)
        return None, f"{head} is a symbolic link, which is never followed"
    except OSError as exc:
        return None, f"{head} cannot be read ({exc})"
    except ValueError as exc:
        return None, f"{head} does not match the folder: {exc}; it is not trusted"
    finally:
        os.close(fd)


def _report_unlistable(root: str, where: str, why: str) -> None:
    """The folder ``where`` holds keys of a domain that a listing cannot name (``why``):
    logged at error and kept as an integrity problem, once."""
    message = (f"{where} holds keys, but its domain cannot be listed: {why}. Export and "
               "migrate leave it out unless its channel is named: --channel <id> builds "
               "the domain from the id, with no listing")  # fmt: skip
    if problems.add(root, IntegrityProblem(kind="unlistable_domain", message=message)):
        log.error("json_unlistable_domain", root=root, path=where, why=why)


def report_keyless(root: str, path: str, exc: BaseException) -> None:
    """The hashed key file ``path`` does not say its key, so a scan cannot give its value:
    logged at error and kept as an integrity problem (``corrupt_value``), once."""
    message = f"{path} does not hold a readable key ({exc}); its value is left out of the scan"
    if problems.add(root, IntegrityProblem(kind="corrupt_value", message=message)):
        log.error("json_keyless_file", root=root, path=path, error=str(exc))
