"""The broker restarts mid-stream: the trainer recovers by itself, and every record is absorbed once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.datasets import records, synthetic
from service.ingest import Ingest, ensure_topics
from service.local_kafka import LocalKafka
from service.metrics import TrainerMetrics
from service.producer import produce
from service.registry import Registry
from service.settings import Settings
from service.trainer import Trainer
from tests.helpers import eventually

pytestmark = pytest.mark.slow


def checkpointed_counts(settings: Settings) -> dict[str, tuple[int, int]]:
    checkpoint = Registry(settings.registry_dir).read_checkpoint() or {"tasks": {}}
    return {name: (t["train_seen"], t["eval_seen"]) for name, t in checkpoint["tasks"].items()}


def test_a_broker_restart_mid_stream_loses_and_repeats_nothing(settings: Settings, tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path / "kafka").start()
    try:
        settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap, "epochs": 1})
        ensure_topics(settings)
        first, second = synthetic(num_tasks=2, train_per_label=30, eval_per_label=5)
        produce(broker.bootstrap, settings.kafka_topic, records([first]))

        trainer = Trainer(
            settings, Registry(settings.registry_dir), TrainerMetrics(CollectorRegistry(), settings.strategy)
        )
        ingest = Ingest(settings, trainer.metrics, trainer.offsets)
        stop = threading.Event()
        thread = threading.Thread(target=trainer.run, args=(ingest, stop))
        thread.start()
        try:
            eventually(
                lambda: checkpointed_counts(settings) == {first.name: (120, 20)}, 120, 0.3, "first task"
            )

            broker.stop()
            time.sleep(3)  # the trainer keeps polling a dead broker
            assert thread.is_alive()
            broker.start()

            produce(broker.bootstrap, settings.kafka_topic, records([second]))
            expected = {first.name: (120, 20), second.name: (120, 20)}
            eventually(
                lambda: checkpointed_counts(settings) == expected, 180, 0.5, "both tasks after restart"
            )
            time.sleep(3)  # nothing more arrives: no record was read twice
            assert checkpointed_counts(settings) == expected
            assert thread.is_alive()
        finally:
            stop.set()
            thread.join(timeout=120)
    finally:
        broker.stop()
