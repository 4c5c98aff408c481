"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every write goes to a temporary file in the same folder (same file system, so the final
``os.replace`` is atomic), is flushed to disk, and only then renamed over the target.

Temporary files and folders are created private (``mkstemp`` uses 0600, ``mkdtemp`` 0700); what is
finally installed gets the mode a plain ``open`` / ``mkdir`` would give under the user's umask, so
a shared results folder stays readable by the people it is shared with.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_PROBE_PREFIX = ".d2ora-write-probe."


class OutputDirError(ValueError):
    """An output folder that cannot be created or written to."""


# ----------------------------------------------------------------------------------------- modes
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read afresh on every call (a caller may change it at any time).

    Linux (4.7+) reports it in /proc/self/status, which reads it without touching it. Elsewhere
    the only way is ``os.umask`` (set, then restore). The umask is process-global, so a file
    another thread creates between the two calls gets the stand-in: 0o077 errs on the private
    side rather than 0's world-writable. The lock keeps d2ora's own readers from interleaving
    (two of them could otherwise restore each other's stand-in). Read per call, not once at
    import: a program (or a test) may set its umask after importing d2ora.
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:
        old = os.umask(0o077)  # the most restrictive stand-in while it is swapped out
        os.umask(old)
    return old


def default_file_mode() -> int:
    """What ``open(path, "w")`` would create: 0o666 less the umask."""
    return 0o666 & ~current_umask()


# ------------------------------------------------------------------------------------------ files
@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``, on error it vanishes.

    The installed file gets the umask's default mode, whatever mode the writer left on the
    temporary file (mkstemp's 0600, or safetensors' 0600 when it rewrites the path).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode())  # before the rename: the target is never seen as 0600
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | os.PathLike[str], data: Any) -> Path:
    return write_text(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------- folders
def install_folder(staged: Path, target: Path) -> None:
    """Move every file of a fully written ``staged`` folder into ``target``, one atomic rename each.

    Files already in ``target`` that the new set does not contain are kept; same-named ones are
    replaced whole. ``staged`` is removed afterwards.

    Every installed file gets the umask's default mode: the writers of a staged folder do not all
    give one (safetensors 0.8 writes through its own temporary file and leaves 0600, so a merged
    model.safetensors would be private). Only files move; ``target`` and its subfolders are made
    here by ``mkdir``, so they get the umask's mode, never the staging folder's 0700.
    """
    target.mkdir(parents=True, exist_ok=True)
    file_mode = default_file_mode()
    for src in sorted(staged.rglob("*")):
        if src.is_dir():
            continue
        dest = target / src.relative_to(staged)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(src, file_mode)
        os.replace(src, dest)
    shutil.rmtree(staged, ignore_errors=True)


@contextlib.contextmanager
def staging_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; on success its files are installed into ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    try:
        yield staged
        install_folder(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and its parents) and prove it writable by creating and removing a probe file.

    Raises :class:`OutputDirError` naming the folder and the reason (permission denied, a file in
    the way, read-only file system ...), so a run fails before it spends minutes training.
    """
    path = Path(path)
    # A file where the folder (or one of its parents) should be: mkdir would only say "Not a
    # directory" about the folder itself, so name the file that is in the way.
    try:  # exists() itself raises PermissionError below a folder one may not enter
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            what = "it is" if blocker == path else f"'{blocker}' is"
            raise OutputDirError(f"cannot write to output_dir '{path}': {what} a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:  # permission denied, read-only file system, disk full ...
        raise OutputDirError(f"cannot write to output_dir '{path}': {exc.strerror or type(exc).__name__}") from None
    return path
