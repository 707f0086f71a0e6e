"""Files written so that a crash leaves the old content or the new, never half of it, and a reader
on the same disk sees the same: write to a temporary name, fsync, rename, fsync the folder."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, atomically and durably."""

    def write(temporary: Path) -> None:
        temporary.write_bytes(data)

    replace_atomically(path, write)


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write-then-rename, with fsyncs, so readers see the old file or the new one, never half.

    ``write`` writes the new content to the temporary path it is given.
    """
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        write(temporary)
        fsync_file(temporary)
        os.replace(temporary, path)
    finally:
        # A full disk fails the write halfway: leave no partial file behind to fill it further.
        temporary.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flush the file's content to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush the folder's entries (a rename into it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
