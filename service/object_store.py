"""Where the registry keeps its objects: a local directory or any S3-compatible bucket, one interface.

The registry (``service.registry``) needs little of its storage, and needs it the same way from both:
objects under ``/``-separated keys, written whole or not at all, a write that happens only if the
object is absent or unchanged since it was read (so two writers can never both win a version number
or an alias move), listing, deletion, and an append for the event history. ``LocalStore`` does it
with write-then-rename, ``link`` and ``flock`` on one machine's disk (or a shared volume);
``S3Store`` with S3's conditional writes (``If-None-Match: *``, ``If-Match: <ETag>``), which Amazon
S3, MinIO, Cloudflare R2, Google Cloud Storage and Versity's gateway honour.

Every failure to reach the storage is an ``OSError`` (as a failing disk is), so the trainer's and the
servers' retry paths treat a bucket that is away like a disk that is: they wait and try again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from service.durable_files import fsync_dir, fsync_file, write_bytes
from service.settings import Settings, SettingsError


class Conflict(Exception):
    """A conditional write lost: the object was created or changed since the writer looked."""


@dataclass(frozen=True)
class Stored:
    """An object's content, the tag a conditional write must name to replace it, and when it was
    written (seconds since the epoch)."""

    data: bytes
    tag: str
    modified: float


#: ``write``'s default precondition: none (replace whatever is there).
ANY = object()


class ObjectStore(Protocol):
    """The registry's storage. Keys are relative, ``/``-separated, and never start with a dot."""

    def read(self, key: str) -> Stored | None:
        """The object, or None if there is none."""

    def write(self, key: str, data: bytes, expect: object = ANY) -> None:
        """Replace the object whole. ``expect`` None: only if it does not exist yet; a tag (from
        ``read``): only if it is still that version. Raises Conflict when the condition fails."""

    def append(self, key: str, data: bytes) -> None:
        """Add ``data`` at the end of the object (creating it), never losing a concurrent append."""

    def children(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (a key ending in ``/``): objects and folders alike."""

    def children_holding(self, prefix: str, name: str) -> list[str]:
        """Names directly under ``prefix`` whose folder holds an object called ``name``."""

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, at any depth."""

    def fingerprints(self, prefix: str, names: frozenset[str]) -> dict[str, str]:
        """Every key under ``prefix`` whose last part is one of ``names``, with a string that changes
        whenever its object is written: one listing, so a watcher re-reads only what changed."""

    def modified(self, key: str) -> float | None:
        """When the object was last written, or None if there is none."""

    def delete(self, key: str) -> None:
        """Remove the object (nothing if there is none)."""

    def delete_under(self, prefix: str) -> None:
        """Remove every object under ``prefix``."""

    def describe(self) -> str:
        """Where the objects are, for messages (no credentials)."""


class LocalStore:
    """Objects as files under one directory, written durably (fsync, then rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def read(self, key: str) -> Stored | None:
        path = self.root / key
        try:
            data = path.read_bytes()
            modified = path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Stored(data, hashlib.sha256(data).hexdigest(), modified)

    def write(self, key: str, data: bytes, expect: object = ANY) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        if expect is ANY:
            write_bytes(path, data)
        elif expect is None:
            self._create(path, data)
        else:
            with self._locked(path):
                current = self.read(key)
                if current is None or current.tag != expect:
                    raise Conflict(f"{key} changed since it was read")
                write_bytes(path, data)

    def _create(self, path: Path, data: bytes) -> None:
        # link() fails if the name exists: create-if-absent in one step, and whole (written first).
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        try:
            temporary.write_bytes(data)
            fsync_file(temporary)
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise Conflict(f"{path.relative_to(self.root)} already exists") from None
        finally:
            temporary.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def append(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(path), open(path, "ab") as f:  # lines from several processes never interleave
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def children(self, prefix: str) -> list[str]:
        directory = self.root / prefix
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))

    def children_holding(self, prefix: str, name: str) -> list[str]:
        return [child for child in self.children(prefix) if (self.root / prefix / child / name).is_file()]

    def keys(self, prefix: str) -> list[str]:
        directory = self.root / prefix
        if not directory.is_dir():
            return []
        found = (p.relative_to(self.root).as_posix() for p in directory.rglob("*") if p.is_file())
        return sorted(key for key in found if not any(part.startswith(".") for part in key.split("/")))

    def fingerprints(self, prefix: str, names: frozenset[str]) -> dict[str, str]:
        found = {}
        for folder, directories, files in os.walk(self.root / prefix):
            directories[:] = [d for d in directories if not d.startswith(".")]
            for name in names.intersection(files):
                path = Path(folder) / name
                try:
                    status = path.stat()
                except FileNotFoundError:
                    continue  # deleted since it was listed
                key = path.relative_to(self.root).as_posix()
                found[key] = f"{status.st_mtime_ns}:{status.st_size}:{status.st_ino}"  # rename: new inode
        return found

    def modified(self, key: str) -> float | None:
        try:
            return (self.root / key).stat().st_mtime
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def delete_under(self, prefix: str) -> None:
        directory = self.root / prefix
        if not directory.exists():
            return
        # One rename takes the folder out of sight; the slow removal happens where no one looks.
        trash = self.root / ".tmp" / f"deleted-{uuid.uuid4().hex}"
        trash.parent.mkdir(exist_ok=True)
        os.rename(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def describe(self) -> str:
        return str(self.root)

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        # Serialises conditional writes and appends to one key between processes on this machine.
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def open_store(settings: Settings) -> ObjectStore:
    """The store the settings name: ``registry_url`` (an S3 bucket) if set, else ``registry_dir``.

    A bucket is checked first (reachable, credentials accepted, conditional writes honoured), so a
    wrong URL, endpoint or key stops the service at start with a settings error naming the setting.
    """
    if settings.registry_url is None:
        return LocalStore(settings.registry_dir)
    from service.s3_store import S3Store  # boto3 loads only for a bucket

    try:
        store = S3Store.from_url(
            settings.registry_url,
            endpoint=settings.registry_s3_endpoint,
            region=settings.registry_s3_region,
            credentials_file=settings.registry_s3_credentials_file,
            profile=settings.registry_s3_profile,
        )
        store.check()
    except ValueError as exc:
        raise SettingsError(f"registry_url: {exc}") from None
    return store
