"""A local S3-compatible server for the tests and the demo: Versity's S3 gateway on its POSIX backend.

Versity S3 Gateway (``versitygw``, Apache-2.0) is a real S3 server, not a mock: it speaks the S3 REST
API over HTTP with SigV4 signatures and keeps objects as files. It honours the conditional writes the
registry relies on (``If-None-Match: *``, ``If-Match``), which S3Proxy 3.1 (on Maven Central) refuses
as not implemented. ``make tools`` builds it from its Go module into ``.tools/bin`` (about two minutes
once per clone); ``CONTINUAL_VERSITYGW`` names another binary.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType

from service.local_kafka import free_port

VERSITYGW = Path(__file__).resolve().parents[1] / ".tools" / "bin" / "versitygw"


def versitygw_binary() -> Path:
    """The gateway binary to run (``CONTINUAL_VERSITYGW``, else the one ``make tools`` builds)."""
    binary = Path(os.environ.get("CONTINUAL_VERSITYGW", VERSITYGW))
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} is missing: run `make tools` (it builds versitygw)")
    return binary


class LocalS3:
    """An S3 server on a free loopback port, objects under ``data_dir``; a context manager.

    ``access_key`` and ``secret_key`` are its root credentials; ``create_bucket`` makes a bucket.
    """

    def __init__(self, data_dir: Path, ready_timeout_s: float = 30.0) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.access_key = "continual-" + uuid.uuid4().hex[:8]
        self.secret_key = uuid.uuid4().hex
        self.ready_timeout_s = ready_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The URL clients send requests to."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalS3:
        """Start the server and wait until it takes connections."""
        shutil.rmtree(self.data_dir, ignore_errors=True)
        (self.data_dir / "buckets").mkdir(parents=True)
        env = {**os.environ, "ROOT_ACCESS_KEY": self.access_key, "ROOT_SECRET_KEY": self.secret_key}
        with open(self.data_dir / "versitygw.log", "wb") as log:
            self._process = subprocess.Popen(
                [
                    str(versitygw_binary()),
                    "--port",
                    f"127.0.0.1:{self.port}",
                    "posix",
                    str(self.data_dir / "buckets"),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"versitygw exited: see {self.data_dir / 'versitygw.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"versitygw did not listen on {self.port} in {self.ready_timeout_s} s")

    def create_bucket(self, name: str) -> None:
        """Create a bucket (the server's data folder gains a folder of that name)."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=name)

    def credentials_file(self, path: Path) -> Path:
        """Write an AWS shared credentials file with the root credentials (``default`` profile)."""
        path.write_text(
            f"[default]\naws_access_key_id = {self.access_key}\naws_secret_access_key = {self.secret_key}\n"
        )
        path.chmod(0o600)
        return path

    def stop(self) -> None:
        """Stop the server."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
