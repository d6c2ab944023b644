"""A large file's replaced version kept as its folder's spare and written over by the next
write: atomic and durable as a rename, and never written over where anyone can see it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from chanstore.backends import spare_files
from chanstore.backends.files import TEMP_PREFIX, PlantedLink
from chanstore.backends.spare_files import SPARE_NAME, replace_keeping_spare

FIRST, SECOND, THIRD = (bytes([byte]) * 200_000 for byte in b"abc")


@pytest.fixture(params=["compiled", "python"])
def form(request, monkeypatch):
    """Each test runs on the C extension's form and on the Python form."""
    if request.param == "compiled":
        if spare_files._compiled is None:
            pytest.skip("the _spare_files extension is not in use here")
    else:
        monkeypatch.setattr(spare_files, "_compiled", None)
    return request.param


@pytest.fixture
def folder(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def write(folder: int, tmp_path, data: bytes, name: str = "k.json") -> bool:
    return replace_keeping_spare(folder, name, data, str(tmp_path))


def leftovers(tmp_path) -> list[str]:
    return [name for name in os.listdir(tmp_path) if name.startswith(TEMP_PREFIX)]


def test_the_version_replaced_becomes_the_spare_and_the_next_write_goes_over_it(
    form, folder, tmp_path
):
    assert write(folder, tmp_path, FIRST) is False  # no spare yet: a new file
    assert not (tmp_path / SPARE_NAME).exists()  # nothing was replaced
    assert write(folder, tmp_path, SECOND) is False
    spare = (tmp_path / SPARE_NAME).stat()
    assert (tmp_path / SPARE_NAME).read_bytes() == FIRST
    assert write(folder, tmp_path, THIRD[:1000]) is True  # over the spare, shortened
    assert (tmp_path / "k.json").read_bytes() == THIRD[:1000]
    assert (tmp_path / "k.json").stat().st_ino == spare.st_ino  # the same blocks, written over
    assert (tmp_path / SPARE_NAME).read_bytes() == SECOND
    assert sorted(os.listdir(tmp_path)) == [SPARE_NAME, "k.json"]


def test_a_reader_of_the_replaced_version_goes_on_reading_it_whole(form, folder, tmp_path):
    write(folder, tmp_path, FIRST)
    with open(tmp_path / "k.json", "rb") as reader:  # opened before it is replaced
        head = reader.read(10)
        write(folder, tmp_path, SECOND)  # FIRST is the spare now, and still open here
        assert write(folder, tmp_path, THIRD) is False  # so it is not written over
        assert head + reader.read() == FIRST
    assert (tmp_path / "k.json").read_bytes() == THIRD
    assert (tmp_path / SPARE_NAME).read_bytes() == SECOND
    assert not leftovers(tmp_path)


def test_a_spare_with_another_link_is_not_written_over(form, folder, tmp_path):
    write(folder, tmp_path, FIRST)
    write(folder, tmp_path, SECOND)
    os.link(tmp_path / SPARE_NAME, tmp_path / "backup")  # as `cp -al` would
    assert write(folder, tmp_path, THIRD) is False
    assert (tmp_path / "backup").read_bytes() == FIRST
    assert (tmp_path / "k.json").read_bytes() == THIRD


def test_a_link_planted_as_the_spare_is_not_followed(form, folder, tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_bytes(FIRST)
    write(folder, tmp_path, FIRST)
    (tmp_path / SPARE_NAME).symlink_to(outside)
    assert write(folder, tmp_path, SECOND) is False
    assert outside.read_bytes() == FIRST
    assert (tmp_path / "k.json").read_bytes() == SECOND
    assert not (tmp_path / SPARE_NAME).is_symlink()


def test_a_folder_in_the_spares_place_is_left_alone(form, folder, tmp_path):
    (tmp_path / SPARE_NAME).mkdir()
    (tmp_path / SPARE_NAME / "notes").write_text("mine")
    assert write(folder, tmp_path, FIRST) is False
    assert (tmp_path / SPARE_NAME / "notes").read_text() == "mine"
    assert (tmp_path / "k.json").read_bytes() == FIRST
    assert not leftovers(tmp_path)


def test_a_link_at_the_key_is_reported_and_left(form, folder, tmp_path):
    target = tmp_path.parent / f"{tmp_path.name}-target"
    target.write_bytes(FIRST)
    (tmp_path / "k.json").symlink_to(target)
    with pytest.raises(PlantedLink, match=r"k\.json"):
        write(folder, tmp_path, SECOND)
    assert (tmp_path / "k.json").is_symlink()
    assert target.read_bytes() == FIRST
    assert not leftovers(tmp_path)


def test_a_folder_at_the_key_is_an_error_and_left(form, folder, tmp_path):
    """A rename over a folder fails; an exchange would move it aside, out of sight."""
    write(folder, tmp_path, FIRST, "other.json")
    write(folder, tmp_path, SECOND, "other.json")  # a spare to be taken
    (tmp_path / "k.json").mkdir()
    (tmp_path / "k.json" / "notes").write_text("mine")
    with pytest.raises(IsADirectoryError, match=r"k\.json"):
        write(folder, tmp_path, THIRD)
    assert (tmp_path / "k.json" / "notes").read_text() == "mine"
    assert (tmp_path / "other.json").read_bytes() == SECOND
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("spare", [False, True], ids=["new file", "over the spare"])
def test_a_write_that_fails_leaves_the_old_version_whole(form, tmp_path, spare):
    """A file size limit makes the write fail halfway (EFBIG), in a process of its own."""
    code = textwrap.dedent(f"""
        import os, resource, signal, sys
        from chanstore.backends import spare_files
        if {form == "python"!r}:
            spare_files._compiled = None
        folder = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
        spare_files.replace_keeping_spare(folder, "k.json", {FIRST[:100]!r} * 2000, sys.argv[1])
        if {spare!r}:
            spare_files.replace_keeping_spare(folder, "k.json", {FIRST[:100]!r} * 2000, sys.argv[1])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))
        try:
            spare_files.replace_keeping_spare(folder, "k.json", b"z" * 400_000, sys.argv[1])
        except OSError as exc:
            print(exc)
        else:
            print("written")
    """)
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                            text=True, timeout=60, check=True)  # fmt: skip
    assert "File too large" in result.stdout and str(tmp_path) in result.stdout, result.stdout
    assert (tmp_path / "k.json").read_bytes() == FIRST[:100] * 2000
    assert not leftovers(tmp_path)
