"""A new task is served within seconds even while another task's long round trains (no head-of-line
blocking), and the records read ahead for it are still absorbed exactly once."""

from __future__ import annotations

import time

import pytest

from service.datasets import records, synthetic
from service.ingest import ensure_topics
from service.producer import produce
from service.registry import Registry
from service.settings import Settings
from tests.helpers import checkpointed_counts, committed_records, eventually, running_trainer

pytestmark = pytest.mark.slow


def test_a_new_task_is_served_while_another_tasks_long_round_trains(
    settings: Settings, kafka_bootstrap: str
) -> None:
    # 50 epochs of 240 records on the tiny model: the busy task's round takes many seconds wherever it
    # runs; the new task's (40 records) a few.
    settings = settings.model_copy(
        update={"kafka_bootstrap": kafka_bootstrap, "epochs": 50, "first_version_records": 20}
    )
    ensure_topics(settings)
    (busy,) = synthetic(num_tasks=1, train_per_label=60, eval_per_label=5)
    _, new = synthetic(num_tasks=2, train_per_label=10, eval_per_label=5)
    registry = Registry(settings.registry_dir)
    with running_trainer(settings):
        produce(kafka_bootstrap, settings.kafka_topic, records([busy]))
        # Its first version goes out untrained; then the rest of its records make the long round.
        eventually(lambda: registry.versions(busy.name) == [1], 60, 0.1, "the busy task's first version")
        time.sleep(2)
        started = time.monotonic()
        produce(kafka_bootstrap, settings.kafka_topic, records([new]))
        eventually(lambda: registry.versions(new.name), 30, 0.1, "the new task's first version")
        waited = time.monotonic() - started
        assert registry.versions(busy.name) == [1], "the long round ended first: the test proves nothing"
        assert waited < 10, waited
        assert registry.alias(new.name) is not None
        manifest = registry.manifest(new.name, 1)
        assert sorted(manifest["labels"]) == sorted({label for _, label in new.train})

        # Read ahead, then read again: every record is absorbed once, and the new task is trained.
        total = sum(len(t.train) + len(t.eval) for t in (busy, new))
        eventually(lambda: committed_records(settings) == total, 300, 0.5, "everything committed")
        assert checkpointed_counts(settings) == {
            busy.name: (len(busy.train), len(busy.eval)),
            new.name: (len(new.train), len(new.eval)),
        }
        trained = registry.manifest(new.name, registry.versions(new.name)[-1])
        assert trained["metrics"]["accuracy"] is not None
