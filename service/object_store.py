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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from service.durable_files import fsync_dir, fsync_file, replace_atomically
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
            replace_atomically(path, _writer(data))
        elif expect is None:
            self._create(path, data)
        else:
            with self._locked(path):
                current = self.read(key)
                if current is None or current.tag != expect:
                    raise Conflict(f"{key} changed since it was read")
                replace_atomically(path, _writer(data))

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


def _writer(data: bytes) -> Callable[[Path], None]:
    def write(temporary: Path) -> None:
        temporary.write_bytes(data)

    return write


class S3Store:
    """Objects in an S3-compatible bucket under a prefix, through boto3.

    Needs a store that honours conditional writes (``If-None-Match``, ``If-Match`` on PutObject);
    ``check`` proves it at start, so a store that ignores them is refused rather than trusted.
    """

    #: How many times an append re-reads and retries when another writer appended first.
    APPEND_ATTEMPTS = 20

    def __init__(self, client: Any, bucket: str, prefix: str, url: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = url

    @classmethod
    def from_url(
        cls,
        url: str,
        endpoint: str | None = None,
        region: str | None = None,
        credentials_file: Path | None = None,
        profile: str | None = None,
    ) -> S3Store:
        """A store for ``s3://bucket/prefix``. Credentials come from boto3's usual chain (the
        ``AWS_*`` environment, an instance role, ``~/.aws``) or from ``credentials_file``."""
        import boto3
        import botocore.config
        import botocore.session
        from botocore.exceptions import BotoCoreError

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"{url!r} is not s3://bucket/prefix")
        core = botocore.session.Session(profile=profile)
        if credentials_file is not None:
            core.set_config_variable("credentials_file", str(credentials_file))
        try:
            client = boto3.session.Session(botocore_session=core).client(
                "s3",
                endpoint_url=endpoint,
                region_name=region or "us-east-1",
                config=botocore.config.Config(
                    s3={"addressing_style": "path"},
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=30,
                ),
            )
        except BotoCoreError as exc:  # e.g. a profile the credentials file lacks
            raise ValueError(f"{url}: {exc}") from None
        return cls(client, parsed.netloc, parsed.path, url)

    def read(self, key: str) -> Stored | None:
        with self._errors("read", key):
            try:
                reply = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            except self.client.exceptions.NoSuchKey:
                return None
            return Stored(reply["Body"].read(), reply["ETag"], reply["LastModified"].timestamp())

    def write(self, key: str, data: bytes, expect: object = ANY) -> None:
        condition: dict[str, str] = {}
        if expect is None:
            condition["IfNoneMatch"] = "*"
        elif expect is not ANY:
            condition["IfMatch"] = str(expect)
        with self._errors("write", key):
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, **condition)

    def append(self, key: str, data: bytes) -> None:
        # S3 has no append: read, add, write back only if no one wrote meanwhile (events are rare).
        for _ in range(self.APPEND_ATTEMPTS):
            current = self.read(key)
            try:
                if current is None:
                    self.write(key, data, expect=None)
                else:
                    self.write(key, current.data + data, expect=current.tag)
                return
            except Conflict:
                continue
        raise OSError(f"{self.url}: {key} changed under every one of {self.APPEND_ATTEMPTS} appends")

    def children(self, prefix: str) -> list[str]:
        names: set[str] = set()
        for page in self._pages(prefix, delimiter="/"):
            names.update(
                p["Prefix"][len(self.prefix + prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            )
            names.update(o["Key"][len(self.prefix + prefix) :] for o in page.get("Contents", []))
        return sorted(name for name in names if name)

    def children_holding(self, prefix: str, name: str) -> list[str]:
        # One listing of everything under the prefix, not a request per child.
        found = {key[: -len(name) - 1] for key in self.keys(prefix) if key.endswith("/" + name)}
        return sorted(key[len(prefix) :] for key in found if "/" not in key[len(prefix) :])

    def keys(self, prefix: str) -> list[str]:
        start = len(self.prefix)
        return sorted(o["Key"][start:] for page in self._pages(prefix) for o in page.get("Contents", []))

    def modified(self, key: str) -> float | None:
        with self._errors("read", key):
            try:
                reply = self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
            except self.client.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return float(reply["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def delete_under(self, prefix: str) -> None:
        keys = self.keys(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = [{"Key": self.prefix + key} for key in keys[start : start + 1000]]
            with self._errors("delete", prefix):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def describe(self) -> str:
        return self.url

    def check(self) -> None:
        """Raise ValueError saying what is wrong if the bucket cannot be used: unreachable, refused
        credentials, no such bucket, or a store that ignores conditional writes."""
        probe = f".probe/{uuid.uuid4().hex}"
        try:
            self.write(probe, b"1", expect=None)
            try:
                self.write(probe, b"2", expect=None)
            except Conflict:
                pass
            else:
                raise ValueError(f"{self.url}: the store ignores If-None-Match; two writers could both win")
            stored = self.read(probe)
            assert stored is not None
            try:
                self.write(probe, b"3", expect='"not-its-etag"')
            except Conflict:
                pass
            else:
                raise ValueError(f"{self.url}: the store ignores If-Match; two writers could both win")
        except OSError as exc:
            raise ValueError(str(exc)) from None
        finally:
            with suppress(OSError):
                self.delete(probe)

    def _pages(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        extra = {"Delimiter": delimiter} if delimiter else {}
        with self._errors("list", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            yield from paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix, **extra)

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Lost conditions become Conflict, everything else about reaching the store OSError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise Conflict(f"{key} changed since it was read") from None
            raise OSError(
                f"{self.url}: cannot {action} {key}: {code} {error.get('Message', '')}".rstrip()
            ) from None
        except BotoCoreError as exc:
            raise OSError(f"{self.url}: cannot {action} {key}: {exc}") from None


def open_store(settings: Settings) -> ObjectStore:
    """The store the settings name: ``registry_url`` (an S3 bucket) if set, else ``registry_dir``.

    A bucket is checked first (reachable, credentials accepted, conditional writes honoured), so a
    wrong URL, endpoint or key stops the service at start with a settings error naming the setting.
    """
    if settings.registry_url is None:
        return LocalStore(settings.registry_dir)
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
