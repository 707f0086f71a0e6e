"""Ingest against the real broker: good records pass, bad ones land in the dead-letter topic with reasons."""

from __future__ import annotations

import json

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from service.ingest import (
    ERROR_HEADER,
    ORIGIN_OFFSET_HEADER,
    ORIGIN_TOPIC_HEADER,
    REASON_HEADER,
    Ingest,
    ensure_topics,
)
from service.metrics import TrainerMetrics
from service.settings import Settings
from tests.helpers import eventually

GOOD = {"id": "1", "task": "banking", "text": "what is my balance", "label": "balance", "split": "train"}
BAD = [
    (b"banking", b"\xc3\x28 broken utf-8", "not_utf8"),
    (b"banking", b"{oops", "not_json"),
    (b"banking", json.dumps({**GOOD, "label": None}).encode(), "missing_label"),
    (b"travel", json.dumps(GOOD).encode(), "key_mismatch"),
]


def test_bad_records_are_dead_lettered_and_good_ones_delivered(
    settings: Settings, kafka_bootstrap: str
) -> None:
    settings = settings.model_copy(update={"kafka_bootstrap": kafka_bootstrap})
    ensure_topics(settings)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    producer.send(settings.kafka_topic, key=b"banking", value=json.dumps(GOOD).encode())
    for key, value, _ in BAD:
        producer.send(settings.kafka_topic, key=key, value=value)
    producer.send(settings.kafka_topic, key=b"banking", value=json.dumps({**GOOD, "id": "2"}).encode())
    producer.flush()

    metrics = TrainerMetrics(CollectorRegistry(), "lora-per-task")
    ingest = Ingest(settings, metrics, start_offsets={})
    received = []

    def all_read() -> bool:
        received.extend(ingest.poll(timeout_s=0.5))
        return sum(ingest.positions.values()) == 2 + len(BAD)

    eventually(all_read, timeout_s=60, what="every record to be read")
    assert [r.record.id for r in received] == ["1", "2"]
    ingest.flush_dead_letters()
    handled = dict(ingest.positions)
    ingest.commit(handled)
    ingest.close()

    dead = KafkaConsumer(
        settings.kafka_dead_letter_topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    letters = []
    eventually(
        lambda: letters.extend(m for ms in dead.poll(500).values() for m in ms) or len(letters) >= len(BAD),
        60,
    )
    dead.close()
    by_value = {m.value: dict(m.headers) for m in letters}
    for _key, value, reason in BAD:
        headers = by_value[value]
        assert headers[REASON_HEADER].decode() == reason
        assert headers[ERROR_HEADER]  # the human-readable reason
        assert headers[ORIGIN_TOPIC_HEADER].decode() == settings.kafka_topic
        assert int(headers[ORIGIN_OFFSET_HEADER]) in range(2 + len(BAD))
    assert (
        metrics.registry.get_sample_value("continual_records_dead_lettered_total", {"reason": "not_json"})
        == 1
    )

    # The committed offsets are where a restarted consumer group picks up: past everything handled.
    check = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=settings.kafka_group_id)
    partition = received[0].partition
    assert check.committed(TopicPartition(settings.kafka_topic, partition)) == handled[partition]
    check.close()
