"""Writing to Kafka without losing a record: the `continual produce` command, the demo, dead letters.

kafka-python already retries a send while the broker is briefly away. What it does not do is survive
a broker that is gone longer than its timeouts, or an idempotent producer that a refused batch left
failed: the record is then dropped with an error on its future. ``ReliableProducer`` keeps every
record until the broker acknowledges it, sends refused ones again on a fresh producer, and backs off
between tries, so a caller either gets every record acknowledged or an exception naming how many
were not.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata

from service.records import GenerativeRecord, Record

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]

#: Longest wait between two attempts to reach the broker.
MAX_BACKOFF_S = 10.0


class Unacknowledged(Exception):
    """Records the broker has not acknowledged within the time allowed."""

    def __init__(self, count: int, timeout_s: float) -> None:
        super().__init__(f"{count} record(s) not acknowledged by Kafka within {timeout_s:g}s")
        self.count = count


@dataclass(frozen=True)
class _Outgoing:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers


class ReliableProducer:
    """A producer that keeps each record until Kafka acknowledges it, and sends refused ones again.

    ``on_retry`` is told how many records are being sent again (for a metric). Records sent again may
    arrive twice (at-least-once) and after records sent later; they are never dropped.
    """

    def __init__(
        self,
        bootstrap: str,
        client_id: str,
        on_retry: Callable[[int], None] | None = None,
        linger_ms: int = 0,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """``options``: more kafka-python settings (security: ``service.kafka_access.client_options``)."""
        self._config = {
            **(options or {}),
            "bootstrap_servers": bootstrap,
            "client_id": client_id,
            "acks": "all",
            "retries": 5,
            "linger_ms": linger_ms,
            # One in-flight request per connection keeps each task's records in the order they were sent.
            "max_in_flight_requests_per_connection": 1,
        }
        self._on_retry = on_retry
        self._producer: KafkaProducer | None = None
        self._unacknowledged: list[tuple[FutureRecordMetadata | None, _Outgoing]] = []
        #: Records sent again so far (refused, timed out, or not accepted while the broker was away).
        self.retried = 0

    def send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        """Hand one record to Kafka; it is tracked until acknowledged (see ``flush``)."""
        if self._producer is None and not self._unacknowledged:
            self._connect()
        self._send(_Outgoing(topic, key, value, headers))
        if len(self._unacknowledged) % 1000 == 0:  # forget acknowledged ones as we go
            self._unacknowledged = [(f, o) for f, o in self._unacknowledged if f is None or not f.succeeded()]

    def _connect(self) -> None:
        try:
            self._producer = KafkaProducer(**self._config)
        except KafkaError as exc:  # the broker is unreachable: records wait, flush tries again
            log.warning("cannot reach Kafka (%s); records are kept and sent when it is back", exc)

    def _send(self, outgoing: _Outgoing) -> None:
        future: FutureRecordMetadata | None = None
        if self._producer is not None:
            try:
                future = self._producer.send(
                    outgoing.topic, key=outgoing.key, value=outgoing.value, headers=outgoing.headers
                )
            except KafkaError as exc:
                log.warning("Kafka did not take a record (%s); it will be sent again", exc)
        self._unacknowledged.append((future, outgoing))

    def flush(self, timeout_s: float) -> None:
        """Wait until every record is acknowledged, sending refused ones again with backoff.

        Raises Unacknowledged if some are still not acknowledged after ``timeout_s``; they stay tracked
        and a later flush sends them again.
        """
        deadline = time.monotonic() + timeout_s
        backoff = 0.5
        while self._unacknowledged:
            if self._producer is not None:
                try:
                    self._producer.flush(timeout=max(deadline - time.monotonic(), 0.0))
                except KafkaError as exc:  # a timeout, or kafka-python's "Future not done" race
                    log.debug("flush: %s", exc)
            self._unacknowledged = [(f, o) for f, o in self._unacknowledged if f is None or not f.succeeded()]
            failed = [(f, o) for f, o in self._unacknowledged if f is None or f.failed()]
            if failed:
                self._resend(failed)
            if not self._unacknowledged:
                return
            if time.monotonic() >= deadline:
                raise Unacknowledged(len(self._unacknowledged), timeout_s)
            if failed:
                time.sleep(min(backoff, max(deadline - time.monotonic(), 0.0)))
                backoff = min(2 * backoff, MAX_BACKOFF_S)

    def _resend(self, failed: list[tuple[FutureRecordMetadata | None, _Outgoing]]) -> None:
        # An idempotent producer stays failed after a refused batch: replace it, and send everything
        # not yet acknowledged again on the new one.
        reason = next((f.exception for f, _ in failed if f is not None), "broker unreachable")
        log.warning("%d record(s) not acknowledged (%s); sending them again", len(failed), reason)
        self.retried += len(failed)
        if self._on_retry is not None:
            self._on_retry(len(failed))
        outgoing = [o for _, o in self._unacknowledged]
        self._drop_producer()
        self._unacknowledged = []
        self._connect()
        for o in outgoing:
            self._send(o)

    def _drop_producer(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(KafkaError):
                self._producer.close(timeout=0)
            self._producer = None

    def close(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for what is in flight, then close; unacknowledged records are lost
        to this producer (callers that must not lose them flush first)."""
        if self._producer is not None:
            try:
                self._producer.close(timeout=timeout_s)
            except KafkaError as exc:
                log.warning("producer did not close cleanly: %s", exc)
            self._producer = None


def produce(
    bootstrap: str,
    topic: str,
    stream: Iterable[Record | GenerativeRecord],
    on_sent: Callable[[Record | GenerativeRecord], None] | None = None,
    timeout_s: float = 300.0,
    options: Mapping[str, Any] | None = None,
) -> Counter[tuple[str, str]]:
    """Send every record keyed by its task and wait until Kafka acknowledged all of them.

    Survives the broker going away for up to ``timeout_s`` (records are sent again when it is back);
    returns counts by (task, split), or raises Unacknowledged.
    """
    producer = ReliableProducer(bootstrap, "continual-producer", linger_ms=20, options=options)
    counts: Counter[tuple[str, str]] = Counter()
    try:
        for record in stream:
            producer.send(topic, record.task.encode("utf-8"), record.to_json(), [])
            counts[(record.task, record.split)] += 1
            if on_sent is not None:
                on_sent(record)
        producer.flush(timeout_s)
    finally:
        producer.close(timeout_s=5.0)
    if producer.retried:
        log.warning("all records acknowledged; %d were sent again after a broker failure", producer.retried)
    return counts
