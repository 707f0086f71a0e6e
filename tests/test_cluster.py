"""A three-node Kafka cluster (replication 3, min.insync.replicas 2): kill -9 one node mid-stream and
nothing is lost or learned twice."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from service.datasets import records, synthetic
from service.ingest import ensure_topics
from service.local_kafka import LocalKafkaCluster, _cluster_id
from service.producer import produce
from service.settings import Settings
from tests.helpers import checkpointed_counts, eventually, running_trainer

pytestmark = pytest.mark.slow


def partition_leaders(bootstrap: str, topic: str) -> list[int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        (description,) = admin.describe_topics([topic])
    finally:
        admin.close()
    return [p["leader_id"] for p in description["partitions"]]


def test_killing_one_broker_of_three_mid_stream_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    with LocalKafkaCluster(tmp_path / "cluster", size=3) as cluster:
        settings = settings.model_copy(
            update={"kafka_bootstrap": cluster.bootstrap, "kafka_replication_factor": 3, "epochs": 1}
        )
        ensure_topics(settings)
        first, second, third = synthetic(num_tasks=3, train_per_label=25, eval_per_label=5)
        with running_trainer(settings) as running:
            produce(cluster.bootstrap, settings.kafka_topic, records([first]))
            eventually(lambda: checkpointed_counts(settings) == {first.name: (100, 20)}, 120, 0.3, "first")

            # Kill the node that leads the most partitions of the training topic: its leadership,
            # and perhaps the group coordinator, must move to the survivors.
            leaders = partition_leaders(cluster.bootstrap, settings.kafka_topic)
            victim = max(set(leaders), key=leaders.count)
            produce(cluster.bootstrap, settings.kafka_topic, records([second]))
            cluster.nodes[victim - 1].kill()

            produce(cluster.bootstrap, settings.kafka_topic, records([third]))
            expected = {task.name: (100, 20) for task in (first, second, third)}
            eventually(lambda: checkpointed_counts(settings) == expected, 240, 0.5, "every task, once")
            assert victim not in partition_leaders(cluster.bootstrap, settings.kafka_topic)
            time.sleep(3)  # nothing more arrives: no record was read twice
            assert checkpointed_counts(settings) == expected
            assert running.thread.is_alive()


def test_a_cluster_id_never_reads_as_an_option() -> None:
    # URL-safe base64 starts with "-" once in 64 draws; kafka-storage then took the id for an option.
    ids = [_cluster_id() for _ in range(2000)]
    assert not any(i.startswith("-") for i in ids)
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)
