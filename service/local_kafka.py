"""A local Apache Kafka broker for the demo and the tests, on free loopback ports.

It drives ``deploy/kafka/kafka.sh`` (the official jars fetched by Maven), the same script behind
``make kafka-up``, so there is one way to run the broker.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from types import TracebackType

KAFKA_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "kafka.sh"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalKafka:
    """A single-node KRaft broker in ``data_dir``; use as a context manager or start()/stop().

    ``fresh`` empties ``data_dir`` before the first start; a later start() (a restart) keeps the data
    and the ports, as a real broker coming back would.
    """

    def __init__(self, data_dir: Path, fresh: bool = True) -> None:
        self.data_dir = data_dir
        self.fresh = fresh
        self.port = free_port()
        self.controller_port = free_port()

    @property
    def bootstrap(self) -> str:
        """The bootstrap address clients connect to."""
        return f"127.0.0.1:{self.port}"

    def _run(self, command: str) -> None:
        env = {
            **os.environ,
            "KAFKA_PORT": str(self.port),
            "KAFKA_CONTROLLER_PORT": str(self.controller_port),
            "KAFKA_DATA_DIR": str(self.data_dir),
        }
        result = subprocess.run(
            ["bash", str(KAFKA_SCRIPT), command], env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"kafka.sh {command} failed:\n{result.stdout}\n{result.stderr}")

    def start(self) -> LocalKafka:
        """Start the broker and wait until it takes clients."""
        if self.fresh and self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.fresh = False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._run("start")
        return self

    def stop(self) -> None:
        """Stop the broker (its data stays in data_dir)."""
        self._run("stop")

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
