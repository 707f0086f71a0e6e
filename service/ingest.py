"""Reading the training topic: consumer group, manual offsets, decoding, and the dead-letter topic.

The ingest never commits on its own. It reports, per partition, the offset after the last record it
handed over (or dead-lettered); the trainer stores those offsets in its checkpoint and asks the ingest
to commit them only once that checkpoint is durable.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from service.metrics import TrainerMetrics
from service.records import Record, Rejection, decode
from service.settings import Settings

log = logging.getLogger(__name__)

#: Headers on every dead-lettered record: why, and where it came from.
ERROR_HEADER = "continual.error"
REASON_HEADER = "continual.reason"
ORIGIN_TOPIC_HEADER = "continual.origin.topic"
ORIGIN_PARTITION_HEADER = "continual.origin.partition"
ORIGIN_OFFSET_HEADER = "continual.origin.offset"


@dataclass(frozen=True)
class Incoming:
    """A decoded record and where it sits in Kafka."""

    partition: int
    offset: int
    record: Record
    raw_key: bytes | None
    raw_value: bytes | None


def ensure_topics(settings: Settings) -> None:
    """Create the training and dead-letter topics if they do not exist yet."""
    assert settings.kafka_bootstrap is not None
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="continual-admin")
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(name, settings.kafka_partitions, 1)
            for name in (settings.kafka_topic, settings.kafka_dead_letter_topic)
            if name not in existing
        ]
        # Another process may create a topic between our list and our create.
        with contextlib.suppress(TopicAlreadyExistsError):
            if wanted:
                admin.create_topics(wanted)
    finally:
        admin.close()


class _SeekOnAssign(ConsumerRebalanceListener):
    """Seeks newly assigned partitions to the checkpoint's offsets, the source of truth on restart."""

    def __init__(self, ingest: Ingest) -> None:
        self._ingest = ingest

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Positions are kept: what was absorbed from a revoked partition is in the model and its
        # offset must reach the next checkpoint with it.
        pass

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # After a rebalance (a broker restart, say) the group may hand back partitions whose records
        # this trainer already absorbed but has not committed: continue after them, not at the commit.
        for tp in assigned:
            start = self._ingest.positions.get(tp.partition, self._ingest.start_offsets.get(tp.partition))
            if start is not None:
                self._ingest.consumer.seek(tp, start)
                log.info("partition %d: resuming at offset %d", tp.partition, start)


class Ingest:
    """Polls the training topic, hands valid records over, and dead-letters invalid ones."""

    def __init__(self, settings: Settings, metrics: TrainerMetrics, start_offsets: Mapping[int, int]) -> None:
        if settings.kafka_bootstrap is None:
            raise ValueError("kafka_bootstrap must be set to consume")
        self.settings = settings
        self.metrics = metrics
        #: Offsets from the trainer's checkpoint; assigned partitions start here.
        self.start_offsets = dict(start_offsets)
        #: Per partition: the offset after the last record handed over or dead-lettered.
        self.positions: dict[int, int] = {}
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.kafka_group_id,
            client_id="continual-trainer",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=500,
            # A round (training + evaluation of every task) runs between polls.
            max_poll_interval_ms=900_000,
        )
        self.consumer.subscribe([settings.kafka_topic], listener=_SeekOnAssign(self))
        self.dead_letters = KafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id="continual-dead-letter",
            acks="all",
            retries=5,
        )

    def poll(self, timeout_s: float) -> list[Incoming]:
        """Valid records that arrived within ``timeout_s``; invalid ones go to the dead-letter topic."""
        batches = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        accepted: list[Incoming] = []
        for tp, messages in batches.items():
            for message in messages:
                result = decode(message.key, message.value, self.settings.max_text_chars)
                if isinstance(result, Rejection):
                    self.dead_letter(tp.partition, message.offset, message.key, message.value, result)
                else:
                    self.metrics.records_consumed.labels(task=result.task, split=result.split).inc()
                    accepted.append(
                        Incoming(tp.partition, message.offset, result, message.key, message.value)
                    )
                self.positions[tp.partition] = message.offset + 1
        return accepted

    def lag(self) -> dict[int, int]:
        """Per assigned partition, how many records lie beyond what has been handed over.

        Empty while the broker cannot answer: a metric must never stop the trainer.
        """
        assigned = list(self.consumer.assignment())
        if not assigned:
            return {}
        try:
            ends = self.consumer.end_offsets(assigned)
            return {
                tp.partition: max(0, ends[tp] - self.positions.get(tp.partition, self.consumer.position(tp)))
                for tp in assigned
            }
        except KafkaError as exc:
            log.warning("consumer lag unknown: %s", exc)
            return {}

    def dead_letter(
        self,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        rejection: Rejection,
    ) -> None:
        """Send one record, unchanged, to the dead-letter topic with its reason and origin in headers."""
        headers = [
            (REASON_HEADER, rejection.reason.encode()),
            (ERROR_HEADER, rejection.detail.encode("utf-8")),
            (ORIGIN_TOPIC_HEADER, self.settings.kafka_topic.encode()),
            (ORIGIN_PARTITION_HEADER, str(partition).encode()),
            (ORIGIN_OFFSET_HEADER, str(offset).encode()),
        ]
        self.dead_letters.send(self.settings.kafka_dead_letter_topic, key=key, value=value, headers=headers)
        self.metrics.records_dead_lettered.labels(reason=rejection.reason).inc()
        log.warning("dead-lettered partition %d offset %d: %s", partition, offset, rejection.detail)

    def flush_dead_letters(self) -> None:
        """Block until every dead-lettered record is acknowledged, before its offset may be committed."""
        self.dead_letters.flush()

    def commit(self, offsets: Mapping[int, int]) -> bool:
        """Commit offsets that a durable checkpoint already records; False if Kafka refused.

        A failed commit loses nothing: the checkpoint holds the same offsets and a restarted trainer
        seeks to them, and the next round commits again. So it is logged and counted, not raised.
        """
        if not offsets:
            return True
        try:
            self.consumer.commit(
                {
                    TopicPartition(self.settings.kafka_topic, partition): OffsetAndMetadata(offset, "", -1)
                    for partition, offset in offsets.items()
                }
            )
        except KafkaError as exc:
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed (the checkpoint has them; retrying next round): %s", exc)
            return False
        return True

    def close(self) -> None:
        """Flush the dead letters and leave the group."""
        self.dead_letters.flush()
        self.dead_letters.close()
        self.consumer.close(autocommit=False)
