"""Atomic writes end with the modes a plain write would give; unwritable output folders fail early."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from d2ora import atomic
from d2ora.atomic import OutputDirError, ensure_writable_dir


@pytest.fixture
def umask(request) -> Iterator[int]:
    """Run the test under the umask given as its parameter; the process's umask is restored after."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_file_mode(folder: Path) -> int:
    """The reference: what a plain ``open(..., "w")`` gives under the current umask."""
    probe = folder / "plain-write-reference"
    probe.write_text("x", encoding="utf-8")
    try:
        return mode(probe)
    finally:
        probe.unlink()


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o027, 0o640)], indirect=["umask"])
def test_atomic_files_get_the_umask_mode(umask: int, expected: int, tmp_path: Path) -> None:
    assert plain_file_mode(tmp_path) == expected  # the hand computation 0o666 & ~umask, as the OS applies it
    assert atomic.current_umask() == umask
    text = atomic.write_text(tmp_path / "a" / "notes.txt", "hello\n")
    data = atomic.write_json(tmp_path / "a" / "data.json", {"x": 1})
    assert (mode(text), mode(data)) == (expected, expected)
    # Rewriting a file that has another mode gives the new file the umask's mode too.
    os.chmod(text, 0o600)
    atomic.write_text(text, "again\n")
    assert mode(text) == expected and text.read_text(encoding="utf-8") == "again\n"


@pytest.mark.parametrize("umask", [0o022], indirect=True)
def test_staged_folders_install_with_the_umask_modes(umask: int, tmp_path: Path) -> None:
    target = tmp_path / "out" / "model"
    with atomic.staging_folder(target) as staged:
        assert mode(staged) == 0o700  # private while being written (mkdtemp)
        (staged / "sub").mkdir()
        # Written private, as safetensors 0.8 leaves its files: installing opens it up to the umask's mode.
        fd = os.open(staged / "sub" / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"\0" * 8)
        os.close(fd)
        assert mode(staged / "sub" / "weights.bin") == 0o600
        (staged / "config.json").write_text("{}", encoding="utf-8")
    assert mode(target) == mode(target / "sub") == 0o755
    assert mode(target / "config.json") == mode(target / "sub" / "weights.bin") == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # the staging folder is gone


def test_ensure_writable_dir_creates_and_leaves_no_probe(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    assert ensure_writable_dir(folder) == folder
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_ensure_writable_dir_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder", encoding="utf-8")
    with pytest.raises(OutputDirError, match=f"^cannot write to output_dir '{re.escape(str(blocker))}': "
                       "it is a file, not a folder$"):
        ensure_writable_dir(blocker)
    # A file higher up: the message names the file that blocks the folder.
    below = blocker / "run" / "x"
    with pytest.raises(OutputDirError, match=f"^cannot write to output_dir '{re.escape(str(below))}': "
                       f"'{re.escape(str(blocker))}' is a file, not a folder$"):
        ensure_writable_dir(below)
    assert isinstance(OutputDirError("x"), ValueError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_ensure_writable_dir_refuses_a_read_only_parent(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        below = re.escape(str(locked / "run"))
        with pytest.raises(OutputDirError, match=f"^cannot write to output_dir '{below}': Permission denied$"):
            ensure_writable_dir(locked / "run")
        with pytest.raises(OutputDirError, match=f"^cannot write to output_dir '{re.escape(str(locked))}': Permission denied$"):
            ensure_writable_dir(locked)  # exists, but the probe file cannot be created
    finally:
        locked.chmod(0o700)  # let pytest clean up
