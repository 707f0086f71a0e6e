"""Files written so that a crash leaves the old content or the new, never half of it, and a reader
on the same disk sees the same: write to a temporary name, fsync, rename, fsync the folder."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


def sha256_of(path: Path) -> str:
    """The file's sha256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, body: dict[str, Any]) -> None:
    """Replace ``path`` with ``body`` as JSON, atomically and durably."""

    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=2, sort_keys=True)

    replace_atomically(path, write)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically; a full or failing disk is an OSError like any other."""

    def write(temporary: Path) -> None:
        try:
            save_file(tensors, str(temporary))
        except SafetensorError as exc:
            raise OSError(f"cannot write {path.name}: {exc}") from exc

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
