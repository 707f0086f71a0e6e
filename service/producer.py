"""Streaming records into the training topic (the `continual produce` command and the demo)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from kafka import KafkaProducer

from service.records import Record


def produce(
    bootstrap: str,
    topic: str,
    stream: Iterable[Record],
    on_sent: Callable[[Record], None] | None = None,
) -> Counter[tuple[str, str]]:
    """Send every record keyed by its task, wait for all acknowledgements, return counts by (task, split)."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="continual-producer",
        acks="all",
        linger_ms=20,
        retries=10,
        # One in-flight request per connection keeps each task's records in the order they were sent.
        max_in_flight_requests_per_connection=1,
    )
    counts: Counter[tuple[str, str]] = Counter()
    try:
        for record in stream:
            producer.send(topic, key=record.task.encode("utf-8"), value=record.to_json())
            counts[(record.task, record.split)] += 1
            if on_sent is not None:
                on_sent(record)
        producer.flush()
    finally:
        producer.close()
    return counts
