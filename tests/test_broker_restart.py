"""The broker restarts mid-stream: the trainer recovers by itself, and every record is absorbed once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service.datasets import records, synthetic
from service.ingest import ensure_topics
from service.local_kafka import LocalKafka
from service.producer import produce
from service.settings import Settings
from tests.helpers import checkpointed_counts, eventually, running_trainer

pytestmark = pytest.mark.slow


def test_a_broker_restart_mid_stream_loses_and_repeats_nothing(settings: Settings, tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path / "kafka").start()
    try:
        settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap, "epochs": 1})
        ensure_topics(settings)
        first, second = synthetic(num_tasks=2, train_per_label=30, eval_per_label=5)
        produce(broker.bootstrap, settings.kafka_topic, records([first]))

        with running_trainer(settings) as running:
            eventually(
                lambda: checkpointed_counts(settings) == {first.name: (120, 20)}, 120, 0.3, "first task"
            )

            broker.stop()
            time.sleep(3)  # the trainer keeps polling a dead broker
            assert running.thread.is_alive()
            broker.start()

            produce(broker.bootstrap, settings.kafka_topic, records([second]))
            expected = {first.name: (120, 20), second.name: (120, 20)}
            eventually(
                lambda: checkpointed_counts(settings) == expected, 180, 0.5, "both tasks after restart"
            )
            time.sleep(3)  # nothing more arrives: no record was read twice
            assert checkpointed_counts(settings) == expected
            assert running.thread.is_alive()
    finally:
        broker.stop()
