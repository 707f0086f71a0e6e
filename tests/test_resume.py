"""Restarting the trainer against the real broker: it resumes at its checkpoint, nothing lost or repeated."""

from __future__ import annotations

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from service.datasets import TaskData, records, synthetic
from service.ingest import ensure_topics
from service.producer import produce
from service.registry import Registry
from service.settings import Settings
from service.trainer import Trainer
from tests.helpers import eventually, running_trainer

pytestmark = pytest.mark.slow


def run_until_absorbed(settings: Settings, expected: dict[str, int]) -> Trainer:
    """Start a trainer, let it run until its checkpoint holds ``expected`` train counts, stop it."""

    def checkpointed() -> bool:
        checkpoint = Registry(settings.registry_dir).read_checkpoint() or {"tasks": {}}
        counts = {name: t["train_seen"] for name, t in checkpoint["tasks"].items()}
        return counts == expected

    with running_trainer(settings) as running:
        eventually(checkpointed, timeout_s=120, interval_s=0.3, what=f"checkpoint with {expected}")
    return running.trainer


def test_restart_resumes_at_the_checkpoint_even_when_the_commit_was_lost(
    settings: Settings, kafka_bootstrap: str
) -> None:
    settings = settings.model_copy(update={"kafka_bootstrap": kafka_bootstrap})
    ensure_topics(settings)
    first, second = synthetic(num_tasks=2, train_per_label=10, eval_per_label=2)
    produce(kafka_bootstrap, settings.kafka_topic, records([first]))
    run_until_absorbed(settings, {first.name: 40})

    # As if the trainer had died after writing its checkpoint but before committing to Kafka:
    # move the group's committed offsets back to the start.
    rewind = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=settings.kafka_group_id)
    partitions = rewind.partitions_for_topic(settings.kafka_topic)
    rewind.commit({TopicPartition(settings.kafka_topic, p): OffsetAndMetadata(0, "", -1) for p in partitions})
    rewind.close()

    more_of_first = TaskData(name=first.name, train=first.train[:8], eval=[])
    produce(kafka_bootstrap, settings.kafka_topic, records([more_of_first, second]))
    trainer = run_until_absorbed(settings, {first.name: 48, second.name: 40})

    # Every record counted exactly once: the 40 already in v1 were not read again.
    assert trainer.tasks[first.name].train_seen == 48
    assert len(trainer.tasks[first.name].eval_records) == 8
    assert trainer.tasks[second.name].train_seen == 40
    manifest = Registry(settings.registry_dir).manifest(first.name, 2)
    assert manifest["parent_version"] == 1
    assert manifest["metrics"]["train_records"] == 48
