"""Small helpers the tests share (no fakes: they feed our real code real inputs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry

from service.checkpoint import checkpointed_counts as trainer_checkpointed_counts
from service.datasets import TaskData, records
from service.ingest import Incoming, Ingest, committed_offsets
from service.metrics import TrainerMetrics
from service.registry import open_registry
from service.settings import Settings
from service.trainer import Trainer

T = TypeVar("T")


def new_trainer(settings: Settings) -> Trainer:
    """A trainer on the settings' registry, restored from its checkpoint if it has one."""
    return Trainer(settings, open_registry(settings), TrainerMetrics(CollectorRegistry(), settings.strategy))


def incoming(tasks: Iterable[TaskData]) -> list[Incoming]:
    """The records of ``tasks`` as if polled from one partition, offsets counting from 0."""
    return [
        Incoming(partition=0, offset=i, record=r, raw_key=r.task.encode(), raw_value=r.to_json())
        for i, r in enumerate(records(list(tasks)))
    ]


def train_in_process(settings: Settings, tasks: list[TaskData]) -> Trainer:
    """Absorb ``tasks`` and close one round: every task gets a published, promoted version."""
    trainer = new_trainer(settings)
    batch = incoming(tasks)
    trainer.absorb(batch)
    trainer.close_round({0: len(batch)})
    return trainer


def checkpointed_counts(settings: Settings) -> dict[str, tuple[int, int]]:
    """Per task, (train, eval) records the trainer's durable checkpoint has absorbed."""
    return trainer_checkpointed_counts(open_registry(settings))


def committed_records(settings: Settings) -> int:
    """How many records of the training topic the trainer's group has committed, over all partitions."""
    return sum(offset for offset in committed_offsets(settings).values() if offset > 0)


def eventually(check: Callable[[], T | None], timeout_s: float, interval_s: float = 0.2, what: str = "") -> T:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or check}")
        time.sleep(interval_s)


@dataclass
class RunningTrainer:
    """A real trainer consuming from Kafka on a background thread."""

    trainer: Trainer
    thread: threading.Thread


@contextmanager
def running_trainer(settings: Settings) -> Iterator[RunningTrainer]:
    """Run ``Trainer.run`` against the settings' broker until the block ends, then stop it gracefully."""
    trainer = new_trainer(settings)
    ingest = Ingest(
        settings,
        trainer.metrics,
        trainer.durability.offsets,
        open_registry(settings).checkpoint_written_at(),
    )
    stop = threading.Event()
    thread = threading.Thread(target=trainer.run, args=(ingest, stop), name="trainer")
    thread.start()
    try:
        yield RunningTrainer(trainer, thread)
    finally:
        stop.set()
        thread.join(timeout=120)
