"""Reading the training topic: consumer group, manual offsets, decoding, and the dead-letter topic.

The ingest never commits on its own. It reports, per partition, the offset after the last record it
handed over (or dead-lettered); the trainer stores those offsets in its checkpoint and asks the ingest
to commit them only once that checkpoint is durable.

The trainer pulls: it polls again only after it has absorbed the previous batch, so nothing queues up
in memory beyond kafka-python's bounded fetch buffer. During long work (closing a round, waiting for a
full disk) it calls ``keepalive``, a poll with every partition paused, so the group never drops it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from service.dead_letters import (
    ERROR_HEADER,
    ORIGIN_OFFSET_HEADER,
    ORIGIN_PARTITION_HEADER,
    ORIGIN_TOPIC_HEADER,
    REASON_HEADER,
    dead_lettered_since,
)
from service.kafka_access import client_options
from service.metrics import TrainerMetrics
from service.producer import ReliableProducer
from service.records import GenerativeRecord, Record, Rejection, decode
from service.settings import Settings

log = logging.getLogger(__name__)

#: How long the trainer waits before polling again after Kafka failed it.
BROKER_BACKOFF_S = 1.0
#: How often the consumer lag is measured (it asks the broker for the partitions' end offsets).
LAG_EVERY_S = 5.0


@dataclass(frozen=True)
class Incoming:
    """A decoded record and where it sits in Kafka."""

    partition: int
    offset: int
    record: Record | GenerativeRecord
    raw_key: bytes | None
    raw_value: bytes | None


def ensure_topics(settings: Settings) -> None:
    """Create the training and dead-letter topics if they do not exist yet."""
    assert settings.kafka_bootstrap is not None
    admin = KafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, client_id="continual-admin", **client_options(settings)
    )
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(name, settings.kafka_partitions, settings.kafka_replication_factor)
            for name in (settings.kafka_topic, settings.kafka_dead_letter_topic)
            if name not in existing
        ]
        # Another process may create a topic between our list and our create.
        with contextlib.suppress(TopicAlreadyExistsError):
            if wanted:
                admin.create_topics(wanted)
    finally:
        admin.close()


def committed_offsets(settings: Settings) -> dict[int, int]:
    """Per partition of the training topic, the offset the trainer's group has committed."""
    admin = KafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, client_id="continual-admin", **client_options(settings)
    )
    try:
        offsets = admin.list_group_offsets([settings.kafka_group_id])[settings.kafka_group_id]
    finally:
        admin.close()
    return {tp.partition: o.offset for tp, o in offsets.items() if tp.topic == settings.kafka_topic}


class _RebalanceListener(ConsumerRebalanceListener):
    """Flushes a checkpoint before partitions are revoked; seeks assigned ones to where learning stopped."""

    def __init__(self, ingest: Ingest) -> None:
        self._ingest = ingest

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Before another consumer may take these partitions, what was absorbed from them must be
        # durable and committed, or it would read them again.
        if not revoked:
            return  # the first join of the group: nothing was owned
        self._ingest.metrics.rebalances.inc()
        if self._ingest.before_revoke is None:
            return
        # This runs on kafka-python's network thread: the ingest must not poll or block on the
        # consumer meanwhile (see keepalive and commit).
        self._ingest.in_rebalance = True
        try:
            flushed = self._ingest.before_revoke()
        finally:
            self._ingest.in_rebalance = False
        if not flushed:
            return  # keep the positions: what was absorbed must reach the next checkpoint
        for tp in revoked:
            self._ingest.positions.pop(tp.partition, None)

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self._ingest.on_assign is not None:  # several trainers: learners for the partitions first
            self._ingest.on_assign({tp.partition for tp in assigned})
        # After a rebalance (a broker restart, say) the group may hand back partitions whose records
        # this trainer already absorbed but has not committed: continue after them, not at the commit.
        for tp in assigned:
            self._ingest.forget_peeked(tp)  # the seek below puts it where a rewind would
            start = self._ingest.positions.get(tp.partition, self._ingest.start_offsets.get(tp.partition))
            if start is not None:
                self._ingest.consumer.seek(tp, start)
                log.info("partition %d: resuming at offset %d", tp.partition, start)


class Ingest:
    """Polls the training topic, hands valid records over, and dead-letters invalid ones."""

    def __init__(
        self,
        settings: Settings,
        metrics: TrainerMetrics,
        start_offsets: Mapping[int, int],
        checkpoint_written_at: float | None = None,
        read_back: bool = True,
    ) -> None:
        """``start_offsets`` and ``checkpoint_written_at`` (seconds since the epoch) are the durable
        checkpoint's offsets and time; records dead-lettered since it are not dead-lettered again
        (``read_back`` False: nothing is read back now; ``read_back_dead_letters`` does it later)."""
        if settings.kafka_bootstrap is None:
            raise ValueError("kafka_bootstrap must be set to consume")
        self.settings = settings
        self.metrics = metrics
        #: Offsets from the trainer's checkpoint; assigned partitions start here.
        self.start_offsets = dict(start_offsets)
        #: Per partition: the offset after the last record handed over or dead-lettered.
        self.positions: dict[int, int] = {}
        #: Called (inside a poll) before partitions are revoked; True once what was absorbed is durable
        #: and committed. The trainer sets it.
        self.before_revoke: Callable[[], bool] | None = None
        #: True while before_revoke runs inside the rebalance callback.
        self.in_rebalance = False
        #: Called (inside a poll) with the partitions now assigned, before they are positioned at
        #: ``start_offsets``: several trainers in a group restore those partitions' learners there.
        self.on_assign: Callable[[set[int]], None] | None = None
        self._last_poll = time.monotonic()
        self._next_lag = 0.0
        self._keepalive_s = settings.kafka_max_poll_interval_s / 4
        #: Per partition read ahead by ``peek``: the first offset read ahead (where ``rewind`` goes).
        self._peeked_from: dict[TopicPartition, int] = {}
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.kafka_group_id,
            client_id="continual-trainer",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=500,
            max_poll_interval_ms=int(settings.kafka_max_poll_interval_s * 1000),
            session_timeout_ms=int(settings.kafka_session_timeout_s * 1000),
            group_instance_id=settings.kafka_group_instance_id,
            **client_options(settings),
        )
        self.consumer.subscribe([settings.kafka_topic], listener=_RebalanceListener(self))
        #: Records of the training topic already in the dead-letter topic: (partition, offset).
        self.dead_lettered: set[tuple[int, int]] = set()
        if read_back:
            self.read_back_dead_letters(checkpoint_written_at)
        self.dead_letters = ReliableProducer(
            settings.kafka_bootstrap,
            "continual-dead-letter",
            on_retry=metrics.dead_letter_failures.inc,
            options=client_options(settings),
        )

    def read_back_dead_letters(self, since_s: float | None) -> None:
        """Learn which records were dead-lettered since ``since_s`` (a checkpoint's time; None: ever)."""
        self.dead_lettered |= dead_lettered_since(self.settings, since_s, self.settings.dead_letter_timeout_s)

    def export_lag(self) -> None:
        """Export the consumer lag, at most every ``LAG_EVERY_S`` (it asks the broker)."""
        if time.monotonic() >= self._next_lag:
            for partition, lag in self.lag().items():
                self.metrics.consumer_lag.labels(partition=str(partition)).set(lag)
            self._next_lag = time.monotonic() + LAG_EVERY_S

    def poll_or_back_off(self, stop: threading.Event, timeout_s: float = 0.5) -> list[Incoming] | None:
        """``poll``; None while the broker is away (restarting, partitioned): the failure is counted
        and the call returns after a backoff (the caller keeps its state and does nothing else)."""
        try:
            return self.poll(timeout_s)
        except KafkaError as exc:
            self.metrics.broker_errors.inc()
            log.warning("Kafka unavailable, retrying in %.0fs: %s", BROKER_BACKOFF_S, exc)
            stop.wait(BROKER_BACKOFF_S)
            return None

    def poll(self, timeout_s: float) -> list[Incoming]:
        """Valid records that arrived within ``timeout_s``; invalid ones go to the dead-letter topic."""
        batches = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        self._last_poll = time.monotonic()
        accepted: list[Incoming] = []
        for tp, messages in batches.items():
            for message in messages:
                result = decode(message.key, message.value, self.settings.max_text_chars)
                several = self.settings.kafka_group_trainers == "several"
                if several and message.key is None and not isinstance(result, Rejection):
                    # Trainers split the tasks by partition: a task's records must all land on one.
                    result = Rejection("key_mismatch", "no key: several trainers need the task as key")
                if isinstance(result, Rejection):
                    self.dead_letter(tp.partition, message.offset, message.key, message.value, result)
                else:
                    self.metrics.records_consumed.labels(task=result.task, split=result.split).inc()
                    accepted.append(
                        Incoming(tp.partition, message.offset, result, message.key, message.value)
                    )
                self.positions[tp.partition] = message.offset + 1
        return accepted

    def peek(self, timeout_s: float, partitions: Container[int] | None = None) -> list[Record]:
        """Valid records read ahead, without handing them over: nothing is dead-lettered and no
        position moves. ``rewind`` then puts the consumer back, so the next ``poll`` reads them again.
        Also keeps the group membership alive, like any poll. Reads nothing inside a rebalance.
        ``partitions``: only the records of these (default: all assigned)."""
        if self.in_rebalance:
            return []
        batches = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        self._last_poll = time.monotonic()
        valid: list[Record] = []
        for tp, messages in batches.items():
            if messages:
                self._peeked_from.setdefault(tp, messages[0].offset)
            if partitions is not None and tp.partition not in partitions:
                continue
            for message in messages:
                result = decode(message.key, message.value, self.settings.max_text_chars)
                if isinstance(result, Record):  # a generative task's first version waits for its round
                    valid.append(result)
        return valid

    def rewind(self) -> None:
        """Back to where ``poll`` left off, on the partitions ``peek`` read ahead (still assigned)."""
        assigned = self.consumer.assignment()
        for tp, offset in self._peeked_from.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)
        self._peeked_from = {}

    def forget_peeked(self, tp: TopicPartition) -> None:
        """A partition's read-ahead no longer needs rewinding (it was just positioned anew)."""
        self._peeked_from.pop(tp, None)

    def keepalive(self) -> None:
        """Poll with every partition paused, if a quarter of the poll interval has passed.

        The group sees a live member and nothing is fetched into memory; records the broker sent before
        the pause wait in kafka-python's buffer and come out of the next real poll.
        """
        if self.in_rebalance or time.monotonic() - self._last_poll < self._keepalive_s:
            return
        assigned = self.consumer.assignment()
        self.consumer.pause(*assigned)
        try:
            unexpected = self.consumer.poll(timeout_ms=0)
        except KafkaError as exc:
            log.warning("keep-alive poll failed (the broker is away): %s", exc)
            unexpected = {}
        finally:
            still = self.consumer.assignment()
            self.consumer.resume(*[tp for tp in assigned if tp in still])
        self._last_poll = time.monotonic()
        # Paused partitions return nothing; if a client version ever did, read them again later.
        for tp, messages in unexpected.items():
            if messages:
                self.consumer.seek(tp, messages[0].offset)

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
        """Send one record, unchanged, to the dead-letter topic with its reason and origin in headers
        (unless the topic holds it already: read before a restart, dead-lettered, not yet durable)."""
        if (partition, offset) in self.dead_lettered:
            log.info("partition %d offset %d is in the dead-letter topic already", partition, offset)
            return
        headers = [
            (REASON_HEADER, rejection.reason.encode()),
            (ERROR_HEADER, rejection.detail.encode("utf-8")),
            (ORIGIN_TOPIC_HEADER, self.settings.kafka_topic.encode()),
            (ORIGIN_PARTITION_HEADER, str(partition).encode()),
            (ORIGIN_OFFSET_HEADER, str(offset).encode()),
        ]
        self.dead_letters.send(self.settings.kafka_dead_letter_topic, key, value, headers)
        self.metrics.records_dead_lettered.labels(reason=rejection.reason).inc()
        log.warning("dead-lettered partition %d offset %d: %s", partition, offset, rejection.detail)

    def flush_dead_letters(self) -> None:
        """Block until every dead letter is acknowledged, before its offset may be committed.

        Refused ones are sent again; if some are still unacknowledged after ``dead_letter_timeout_s``,
        raise Unacknowledged: the caller must not commit past them (they stay queued for the next try).
        """
        self.dead_letters.flush(self.settings.dead_letter_timeout_s)

    def commit(self, offsets: Mapping[int, int]) -> bool:
        """Commit offsets that a durable checkpoint already records; False if Kafka refused.

        A failed commit loses nothing: the checkpoint holds the same offsets and a restarted trainer
        seeks to them, and the next round commits again. So it is logged and counted, not raised.
        """
        if not offsets:
            return True
        request = {
            TopicPartition(self.settings.kafka_topic, partition): OffsetAndMetadata(offset, "", -1)
            for partition, offset in offsets.items()
        }
        try:
            if self.in_rebalance:
                # The callback runs on the consumer's network thread, which a blocking commit would
                # wait on; the queued commit is sent before the group's JoinGroup, still as the owner.
                self.consumer.commit_async(request, callback=self._commit_done)
            else:
                self.consumer.commit(request)
        except KafkaError as exc:
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed (the checkpoint has them; retrying next round): %s", exc)
            return False
        return True

    def _commit_done(self, offsets: object, response: object) -> None:
        if isinstance(response, Exception):
            self.metrics.commit_failures.inc()
            log.warning("offset commit before the rebalance failed (the checkpoint has them): %s", response)

    def close(self) -> None:
        """Leave the group; unacknowledged dead letters are re-read from Kafka by the next trainer."""
        self.dead_letters.close(timeout_s=self.settings.dead_letter_timeout_s)
        self.consumer.close(autocommit=False)
