"""What the dead-letter topic already holds, so that a restarted trainer dead-letters a record once.

A record is dead-lettered when it is read, and its offset becomes durable with the next checkpoint.
A trainer killed in between reads the record again after its restart (from the checkpoint's offsets)
and would send a second copy. So on start the ingest reads back the dead letters sent since the
checkpoint was written (their origin headers say which records they were) and skips those records.

Only that stretch of the topic is read (``offsets_for_times`` from the checkpoint's time, less a
margin): a record the restarted trainer can read again was first read after the checkpoint's offsets
were taken. Without a checkpoint the whole topic is read (a new group, or one started over).
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from service.kafka_access import client_options
from service.settings import Settings

log = logging.getLogger(__name__)

#: Read from this long before the checkpoint was written (clock skew between hosts, a slow write).
MARGIN_S = 600.0

#: Headers on every dead-lettered record: why, and where it came from.
ERROR_HEADER = "continual.error"
REASON_HEADER = "continual.reason"
ORIGIN_TOPIC_HEADER = "continual.origin.topic"
ORIGIN_PARTITION_HEADER = "continual.origin.partition"
ORIGIN_OFFSET_HEADER = "continual.origin.offset"


def dead_lettered_since(settings: Settings, since_s: float | None, timeout_s: float) -> set[tuple[int, int]]:
    """(partition, offset) of the training topic's records in the dead-letter topic, among the dead
    letters sent since ``since_s`` (seconds since the epoch, less ``MARGIN_S``; None: all of them).

    Empty (with a warning) if the broker cannot answer within ``timeout_s``: the trainer then starts
    as before this check existed, at worst sending a dead letter twice, never losing one.
    """
    try:
        return _read(settings, since_s, timeout_s)
    except (KafkaError, TimeoutError) as exc:
        log.warning("could not read the dead-letter topic back (a restart may send a copy): %s", exc)
        return set()


def _read(settings: Settings, since_s: float | None, timeout_s: float) -> set[tuple[int, int]]:
    deadline = time.monotonic() + timeout_s
    topic = settings.kafka_dead_letter_topic
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id="continual-dead-letter-reader",
        enable_auto_commit=False,
        request_timeout_ms=int(timeout_s * 1000),
        **client_options(settings),
    )
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return set()
        consumer.assign(partitions)
        ends = consumer.end_offsets(partitions)
        if since_s is None:
            consumer.seek_to_beginning(*partitions)
        else:
            found = consumer.offsets_for_times({tp: int((since_s - MARGIN_S) * 1000) for tp in partitions})
            for tp in partitions:
                at = found.get(tp)
                consumer.seek(tp, at.offset if at is not None else ends[tp])
        seen: set[tuple[int, int]] = set()
        left = {tp for tp in partitions if consumer.position(tp) < ends[tp]}
        while left:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic} not read back within {timeout_s:.0f} s")
            for tp, messages in consumer.poll(timeout_ms=500).items():
                for message in messages:
                    origin = _origin(dict(message.headers or []), settings.kafka_topic)
                    if message.offset < ends[tp] and origin is not None:
                        seen.add(origin)
            left = {tp for tp in left if consumer.position(tp) < ends[tp]}
        return seen
    finally:
        consumer.close()


def _origin(headers: dict[str, bytes], training_topic: str) -> tuple[int, int] | None:
    """The (partition, offset) a dead letter came from, if from ``training_topic`` and readable."""
    try:
        if headers[ORIGIN_TOPIC_HEADER].decode() != training_topic:
            return None
        return int(headers[ORIGIN_PARTITION_HEADER]), int(headers[ORIGIN_OFFSET_HEADER])
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
