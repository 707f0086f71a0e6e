"""A local Apache Kafka broker for the demo and the tests, on free loopback ports.

It drives ``deploy/kafka/kafka.sh`` (the official jars fetched by Maven), the same script behind
``make kafka-up``, so there is one way to run the broker.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

KAFKA_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "kafka.sh"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ClusterMembership:
    """What a node of a multi-node cluster shares with the others."""

    node_id: int
    voters: str
    cluster_id: str
    replication: int


@dataclass(frozen=True)
class SecureListeners:
    """Two more listeners for a node: SASL_SSL (SCRAM-SHA-512, ``scram_user``'s name and password) and
    SSL requiring a client certificate; ``tls_dir`` holds ca.pem and broker.pem (key and certificate)."""

    tls_dir: Path
    scram_user: tuple[str, str]
    sasl_ssl_port: int
    ssl_port: int


class LocalKafka:
    """A KRaft node in ``data_dir`` (alone: a single-node cluster); a context manager or start()/stop().

    ``fresh`` empties ``data_dir`` before the first start; a later start() (a restart) keeps the data
    and the ports, as a real broker coming back would.
    """

    def __init__(
        self,
        data_dir: Path,
        fresh: bool = True,
        ports: tuple[int, int] | None = None,
        membership: ClusterMembership | None = None,
        secure: SecureListeners | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.secure = secure
        self.fresh = fresh
        self.port, self.controller_port = ports or (free_port(), free_port())
        self.membership = membership

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
        if self.secure is not None:
            env.update(
                KAFKA_TLS_DIR=str(self.secure.tls_dir),
                KAFKA_SCRAM_USER="=".join(self.secure.scram_user),
                KAFKA_SASL_SSL_PORT=str(self.secure.sasl_ssl_port),
                KAFKA_SSL_PORT=str(self.secure.ssl_port),
            )
        if self.membership is not None:
            env.update(
                KAFKA_NODE_ID=str(self.membership.node_id),
                KAFKA_VOTERS=self.membership.voters,
                KAFKA_CLUSTER_ID=self.membership.cluster_id,
                KAFKA_REPLICATION=str(self.membership.replication),
            )
        result = subprocess.run(
            ["bash", str(KAFKA_SCRIPT), command], env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"kafka.sh {command} failed:\n{result.stdout}\n{result.stderr}")

    def start(self) -> LocalKafka:
        """Start the broker and wait until it takes clients."""
        self.launch()
        self.wait()
        return self

    def launch(self) -> None:
        """Start the broker without waiting (cluster nodes wait for each other's quorum)."""
        if self.fresh and self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.fresh = False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._run("launch")

    def wait(self) -> None:
        """Wait until the broker takes clients."""
        self._run("wait")

    def stop(self) -> None:
        """Stop the broker (its data stays in data_dir)."""
        self._run("stop")

    def kill(self) -> None:
        """kill -9 the broker: a crash, with no chance to hand over leadership."""
        self._run("kill")

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class LocalKafkaCluster:
    """``size`` KRaft nodes on loopback, each broker and controller, replicating topics ``size`` times
    (min.insync.replicas 2 from three nodes up). Nodes can be stopped, killed and started one by one."""

    def __init__(self, data_dir: Path, size: int = 3) -> None:
        ports = [(free_port(), free_port()) for _ in range(size)]
        voters = ",".join(f"{i + 1}@127.0.0.1:{controller}" for i, (_, controller) in enumerate(ports))
        cluster_id = _cluster_id()
        self.nodes = [
            LocalKafka(
                data_dir / f"node-{i + 1}",
                ports=ports[i],
                membership=ClusterMembership(i + 1, voters, cluster_id, replication=size),
            )
            for i in range(size)
        ]

    @property
    def bootstrap(self) -> str:
        """Every node's address: clients find the cluster through whichever is up."""
        return ",".join(node.bootstrap for node in self.nodes)

    def start(self) -> LocalKafkaCluster:
        """Start every node, then wait for all of them (a node is ready only once a quorum is up)."""
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait()
        return self

    def stop(self) -> None:
        """Stop every node that runs, all at once (one by one, the last would wait for a lost quorum)."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(LocalKafka.stop, self.nodes))

    def __enter__(self) -> LocalKafkaCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (what StorageTool makes),
    never starting with "-" (Kafka's own ``Uuid.randomUuid`` draws again then: the storage tool would
    read such an id as an option, and did, once in 64 clusters)."""
    while (cluster_id := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
        pass
    return cluster_id
