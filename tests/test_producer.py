"""The producer (behind `continual produce` and the dead-letter topic) survives a broker that is away."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from service.datasets import records, synthetic
from service.ingest import ensure_topics
from service.local_kafka import LocalKafka
from service.producer import produce
from service.settings import Settings

pytestmark = pytest.mark.slow


def test_records_sent_while_the_broker_is_down_arrive_once_it_is_back(
    settings: Settings, tmp_path: Path
) -> None:
    broker = LocalKafka(tmp_path / "kafka").start()
    try:
        settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
        ensure_topics(settings)
        stream = list(records(synthetic(num_tasks=2, train_per_label=30, eval_per_label=5)))
        broker.stop()

        outcome: dict[str, object] = {}

        def send() -> None:
            try:
                outcome["counts"] = produce(broker.bootstrap, settings.kafka_topic, stream, timeout_s=120)
            except Exception as exc:  # the assertion below reports it
                outcome["error"] = exc

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(5)  # the producer meets a dead broker
        assert sender.is_alive(), f"produce gave up while the broker was down: {outcome}"
        broker.start()
        sender.join(timeout=150)
        assert "error" not in outcome, outcome["error"]
        assert sum(outcome["counts"].values()) == len(stream)  # type: ignore[union-attr]

        consumer = KafkaConsumer(
            settings.kafka_topic,
            bootstrap_servers=broker.bootstrap,
            auto_offset_reset="earliest",
            consumer_timeout_ms=5000,
        )
        arrived = Counter(m.value for m in consumer)
        consumer.close()
        # Every record arrived; none was dropped (a resent one could arrive twice, never zero times).
        assert set(arrived) == {r.to_json() for r in stream}
    finally:
        broker.stop()
