"""The registry's objects in any S3-compatible bucket (``registry_url: s3://bucket/prefix``), through
boto3: ``service.object_store``'s interface on S3's conditional writes (``If-None-Match: *`` to
create only if absent, ``If-Match: <ETag>`` to replace only if unchanged), which Amazon S3, MinIO,
Cloudflare R2, Google Cloud Storage and Versity's gateway honour.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from service.object_store import ANY, Conflict, Stored


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

    def fingerprints(self, prefix: str, names: frozenset[str]) -> dict[str, str]:
        start = len(self.prefix)
        listed = (o for page in self._pages(prefix) for o in page.get("Contents", []))
        return {o["Key"][start:]: o["ETag"] for o in listed if o["Key"].rsplit("/", 1)[-1] in names}

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
