"""Ingest against the real broker: good records pass, bad ones land in the dead-letter topic with reasons."""

from __future__ import annotations

import json
import time
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from service.ingest import (
    ERROR_HEADER,
    ORIGIN_OFFSET_HEADER,
    ORIGIN_PARTITION_HEADER,
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


def test_a_restarted_trainer_dead_letters_each_record_once(settings: Settings, kafka_bootstrap: str) -> None:
    settings = settings.model_copy(update={"kafka_bootstrap": kafka_bootstrap})
    ensure_topics(settings)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")

    def produce(values: list[tuple[bytes, bytes]]) -> None:
        for key, value in values:
            producer.send(settings.kafka_topic, key=key, value=value)
        producer.flush()

    def read(ingest: Ingest, records: int) -> None:
        eventually(
            lambda: ingest.poll(timeout_s=0.5) is not None and sum(ingest.positions.values()) == records,
            timeout_s=60,
            what=f"{records} records read",
        )

    produce([(b"banking", json.dumps(GOOD).encode()), *[(key, value) for key, value, _ in BAD]])
    first = Ingest(settings, TrainerMetrics(CollectorRegistry(), "lora-per-task"), start_offsets={})
    assert first.dead_lettered == set()
    read(first, 1 + len(BAD))
    first.flush_dead_letters()
    first.close()  # killed before its checkpoint: nothing committed, the records will be read again

    # A checkpoint written long after these dead letters bounds the read-back: none is in its stretch.
    assert (
        Ingest(settings, TrainerMetrics(CollectorRegistry(), "x"), {}, time.time() + 3600).dead_lettered
        == set()
    )
    restarted = Ingest(settings, TrainerMetrics(CollectorRegistry(), "lora-per-task"), {}, time.time())
    assert len(restarted.dead_lettered) == len(BAD)
    produce([(b"banking", b"{a new bad record")])
    read(restarted, 2 + len(BAD))
    restarted.flush_dead_letters()
    restarted.close()

    dead = KafkaConsumer(
        settings.kafka_dead_letter_topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    letters: list[Any] = []
    eventually(
        lambda: (
            letters.extend(m for ms in dead.poll(500).values() for m in ms) or len(letters) >= len(BAD) + 1
        ),
        60,
    )
    time.sleep(1)  # a duplicate, if any, would arrive now
    letters.extend(m for ms in dead.poll(1000).values() for m in ms)
    dead.close()
    origins = [
        (dict(m.headers)[ORIGIN_PARTITION_HEADER], dict(m.headers)[ORIGIN_OFFSET_HEADER]) for m in letters
    ]
    assert len(origins) == len(set(origins)) == len(BAD) + 1  # each bad record once, the new one too


def test_with_several_trainers_a_record_without_its_task_as_key_is_dead_lettered(
    settings: Settings, kafka_bootstrap: str
) -> None:
    # Trainers split the tasks by partition, and a key-less record lands on any partition.
    settings = settings.model_copy(
        update={"kafka_bootstrap": kafka_bootstrap, "kafka_group_trainers": "several"}
    )
    ensure_topics(settings)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    producer.send(settings.kafka_topic, key=None, value=json.dumps(GOOD).encode())
    producer.send(settings.kafka_topic, key=b"banking", value=json.dumps({**GOOD, "id": "2"}).encode())
    producer.flush()
    ingest = Ingest(settings, TrainerMetrics(CollectorRegistry(), "lora-per-task"), start_offsets={})
    received = []

    def all_read() -> bool:
        received.extend(ingest.poll(timeout_s=0.5))
        return sum(ingest.positions.values()) == 2

    eventually(all_read, timeout_s=60, what="both records to be read")
    ingest.flush_dead_letters()
    ingest.close()
    assert [r.record.id for r in received] == ["2"]
    dead = KafkaConsumer(
        settings.kafka_dead_letter_topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    letters: list[Any] = []
    eventually(lambda: letters.extend(m for ms in dead.poll(500).values() for m in ms) or letters, 60)
    dead.close()
    assert [dict(m.headers)[REASON_HEADER].decode() for m in letters] == ["key_mismatch"]
    assert b"no key" in dict(letters[0].headers)[ERROR_HEADER]
