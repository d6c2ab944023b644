"""Large files of a journaled batch are written directly: atomic, durable before the answer,
and never undone by a replay of an older record of the same file."""

from __future__ import annotations

import json
import os

import pytest

from chanstore.backends import files as files_module
from chanstore.backends import journal as journal_module
from chanstore.backends import journal_direct, spare_files
from chanstore.backends.files import TEMP_PREFIX
from chanstore.backends.journal import JOURNAL_NAME, decode_records
from chanstore.backends.jsonfiles import JSONDatabase
from support import crash_journal

LARGE = "x" * journal_direct.DIRECT_BYTES  # its file is larger than the threshold


def journal_paths(root) -> list[str]:
    return [path for path, _data in decode_records((root / JOURNAL_NAME).read_bytes())[0]]


def test_a_large_file_skips_the_journal_and_small_ones_of_its_batch_do_not(tmp_path):
    backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
    errors = JSONDatabase.set_many_together([(backend, {"big": LARGE, "small": 1})])
    assert errors == [None]
    assert journal_paths(tmp_path) == [os.path.join("d", "small.json")]
    assert (backend.path / "big.json").read_text() == json.dumps(LARGE, indent=2)
    assert sorted(os.listdir(backend.path)) == ["big.json", "small.json"]  # no temp file left
    crash_journal(backend)
    again = JSONDatabase(domain="d", root_dir=str(tmp_path))
    assert again.load_all() == {"big": LARGE, "small": 1}
    again.close()


def test_a_large_write_is_flushed_renamed_and_its_folder_flushed_before_the_answer(
    tmp_path, monkeypatch
):
    """The durability order, step by step (the Python form; the C extension takes the same
    steps in one call): the data, then the file in its place, then the folder."""
    events: list[str] = []
    real_fsync, real_fdatasync, real_rename = os.fsync, os.fdatasync, os.rename
    real_exchange = spare_files._exchange

    def kind(fd):
        return "folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"

    def fsync(fd):
        events.append(f"fsync {kind(fd)}")
        return real_fsync(fd)

    def fdatasync(fd):
        events.append(f"fdatasync {kind(fd)}")
        return real_fdatasync(fd)

    def rename(source, *args, **kwargs):
        what = "take spare" if source == spare_files.SPARE_NAME else "rename"
        try:
            real_rename(source, *args, **kwargs)
        except FileNotFoundError:
            events.append(f"{what}: none")
            raise
        events.append(what)

    def exchange(*args):
        events.append("exchange")
        return real_exchange(*args)

    backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
    backend.set_many({"warm": 1})  # the journal and the folder exist
    monkeypatch.setattr(spare_files, "_compiled", None)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(spare_files, "fdatasync", fdatasync)
    monkeypatch.setattr(spare_files, "_exchange", exchange)
    written = []
    for value in (LARGE, LARGE + "y", LARGE + "z"):
        events.clear()
        assert JSONDatabase.set_many_together([(backend, {"big": value})]) == [None]
        written.append(list(events))
    monkeypatch.undo()
    # A new file (no version to exchange: renamed), a new file again (no spare
    # yet: the version it replaces becomes it), then over the spare. The version
    # replaced becomes the spare only once the folder is flushed: before, a crash
    # could leave it the key's file on disk, and another write of the batch could
    # be writing over it.
    assert written == [
        ["take spare: none", "fsync file", "exchange", "rename", "fsync folder"],
        ["take spare: none", "fsync file", "exchange", "fsync folder", "rename"],
        ["take spare", "fdatasync file", "exchange", "fsync folder", "rename"],
    ]
    assert journal_paths(tmp_path) == [os.path.join("d", "warm.json")]
    assert backend.get_value("big") == (True, LARGE + "z")
    backend.close()


def test_a_large_write_replaces_atomically_when_it_fails(tmp_path, monkeypatch):
    """A failure before the file takes its place leaves the old value whole and no temporary
    file, whether the file was new or a spare written over (the Python form here;
    ``tests/test_spare_files.py`` makes both forms fail for real)."""
    backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
    for value in (LARGE, LARGE + "x"):  # the second leaves a spare
        assert JSONDatabase.set_many_together([(backend, {"big": value})]) == [None]
    real_write_all = files_module.write_all

    def torn(fd, data, *args):
        real_write_all(fd, data[: len(data) // 2], *args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spare_files, "_compiled", None)
    monkeypatch.setattr(files_module, "write_all", torn)
    monkeypatch.setattr(spare_files, "write_all", torn)
    (error,) = JSONDatabase.set_many_together([(backend, {"big": LARGE + "y"})])
    monkeypatch.undo()
    assert error is not None and "No space left" in str(error)
    assert backend.get_value("big") == (True, LARGE + "x")
    assert not [name for name in os.listdir(backend.path) if name.startswith(TEMP_PREFIX)]
    backend.close()


def test_a_journaled_record_of_the_same_file_is_checkpointed_first(tmp_path):
    """Small then large: the replay must not bring the small value back over the large one."""
    backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
    backend.set_many({"k": "small"})
    assert journal_paths(tmp_path) == [os.path.join("d", "k.json")]
    assert JSONDatabase.set_many_together([(backend, {"k": LARGE})]) == [None]
    assert journal_paths(tmp_path) == []  # checkpointed before the direct write
    crash_journal(backend)
    again = JSONDatabase(domain="d", root_dir=str(tmp_path))
    assert again.get_value("k") == (True, LARGE)
    again.close()


def test_a_large_value_in_a_new_folder_is_durable_with_its_folders(tmp_path, monkeypatch):
    """Folders made for a large file are flushed into their parents as they are made."""
    backend = JSONDatabase(domain="svc.chan.box", root_dir=str(tmp_path))
    backend.set_many({"warm": 1})
    other = JSONDatabase(domain="svc.other.box", root_dir=str(tmp_path))
    made: list[bool] = []
    real_folder = files_module.Root.folder

    def folder(self, parts, *, create=False, fsync=False, encoded=None):
        made.append(fsync)
        return real_folder(self, parts, create=create, fsync=fsync, encoded=encoded)

    monkeypatch.setattr(files_module.Root, "folder", folder)
    assert JSONDatabase.set_many_together([(other, {"big": LARGE})]) == [None]
    monkeypatch.undo()
    assert made and all(made)
    assert other.get_value("big") == (True, LARGE)
    backend.close()
    other.close()


@pytest.mark.parametrize("threshold", [0, 1 << 40])
def test_either_way_the_values_read_back(tmp_path, monkeypatch, threshold):
    monkeypatch.setattr(journal_module, "DIRECT_BYTES", threshold)
    backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
    values = {"a": LARGE, "b": [1, 2], "c": "héllo"}
    assert JSONDatabase.set_many_together([(backend, values)]) == [None]
    crash_journal(backend)
    again = JSONDatabase(domain="d", root_dir=str(tmp_path))
    assert again.load_all() == values
    again.close()
