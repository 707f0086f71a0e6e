"""Several trainers in one consumer group: each learns the tasks of the partitions Kafka gives it.

Records are keyed by their task, so all of a task's records land on one partition. With
``kafka_group_trainers: several`` a trainer process runs one learner (a ``Trainer``) per partition it
owns, over one shared base model, each with its own checkpoint and learner file under
``trainer/partition-<p>/`` in the registry: two trainers never write the same file, and a partition
changes hands with its state. Kafka's group protocol decides who owns what:

- before partitions are revoked, every learner makes its round durable (versions, checkpoint, offsets
  committed), as one trainer does before a rebalance;
- a partition assigned restores its learner from that partition's last durable checkpoint, whoever
  wrote it, and is read from its offsets on; the dead letters the previous owner sent after that
  checkpoint are read back first, so none is sent twice;
- a partition no longer assigned is dropped with its adapters.

A trainer killed with ``kill -9`` keeps its partitions until the group's session timeout; then the
others take them over from their checkpoints: what it had absorbed since is read again, what it had
published since keeps its number (versions are claimed), nothing is learned twice. The task router
is fitted over every partition's memories by the owner of partition 0 (``service.group_router``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from service.evaluation import summarize
from service.group_router import GroupRouter
from service.ingest import Incoming, Ingest
from service.metrics import TrainerMetrics
from service.model import AdapterModel, build_model
from service.registry import Registry
from service.rounds import RoundReport
from service.settings import Settings, SettingsError
from service.trainer import Trainer
from service.trainer_files import merged_checkpoint

log = logging.getLogger(__name__)


class PartitionTrainers:
    """The learners of the partitions this trainer owns in a group of several trainers."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        metrics: TrainerMetrics,
        model: AdapterModel | None = None,
    ) -> None:
        if registry.store.read("trainer/checkpoint.json") is not None:
            raise SettingsError(
                "kafka_group_trainers: the registry's trainer checkpoint was written by one trainer for "
                "every partition; keep kafka_group_trainers: one, or use another registry_dir"
            )
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.model = model or build_model(settings)
        #: One learner per partition owned, created when Kafka assigns the partition.
        self.learners: dict[int, Trainer] = {}
        self.router = GroupRouter(settings, registry, metrics, self.model.hidden_size)
        self._ingest: Ingest | None = None
        self._last_arrival: dict[int, float] = {}
        #: The partitions Kafka assigned this trainer last.
        self._assignment: set[int] = set()
        #: The partition whose learner is absorbing or closing a round (its keep-alive polls can see
        #: a rebalance: that learner must not be dropped or flushed from inside its own work).
        self._busy: int | None = None
        #: Partitions no longer assigned whose learner was busy: dropped once it is done.
        self._leaving: set[int] = set()

    # --- ownership ----------------------------------------------------------------------------------

    def _assigned(self, partitions: set[int]) -> None:
        """Kafka's new assignment: drop the learners of partitions gone, restore those of new ones."""
        ingest = self._ingest
        assert ingest is not None
        self._assignment = set(partitions)
        for partition in sorted(set(self.learners) - partitions):
            if partition == self._busy:
                self._leaving.add(partition)  # its work ends first (the rebalance came inside it)
            else:
                self._drop(partition)
        new = sorted(partitions - set(self.learners))
        if new:
            # Records the previous owner dead-lettered after its checkpoint are read again: not twice.
            times = [self.registry.for_partition(p).checkpoint_written_at() for p in new]
            ingest.read_back_dead_letters(None if None in times else min(t for t in times if t is not None))
        for partition in new:
            self._learner(partition)
        log.info("learning partitions %s", sorted(self.learners))

    def _learner(self, partition: int) -> Trainer:
        """The partition's learner, restored from its durable checkpoint if it has none yet."""
        learner = self.learners.get(partition)
        if learner is None:
            registry = self.registry.for_partition(partition)
            learner = Trainer(self.settings, registry, self.metrics, self.model, partition=partition)
            learner.follow(self._ingest)
            self.learners[partition] = learner
            self._last_arrival[partition] = time.monotonic()
            if self._ingest is not None and partition in learner.durability.offsets:
                self._ingest.start_offsets[partition] = learner.durability.offsets[partition]
            log.info("partition %d: %d task(s) restored", partition, len(learner.tasks))
        return learner

    def _drop(self, partition: int) -> None:
        self._leaving.discard(partition)
        learner = self.learners.pop(partition)
        learner.follow(None)
        learner.release()
        self._last_arrival.pop(partition, None)
        if self._ingest is not None:
            self._ingest.start_offsets.pop(partition, None)
            self._ingest.positions.pop(partition, None)
        log.info("partition %d handed over (%d task(s))", partition, len(learner.tasks))

    def _flush_before_revoke(self) -> bool:
        """Every learner's round durable and committed before the group reassigns partitions.

        Not while one learner closes a round (the rebalance came through its keep-alive polls): the
        others' rounds would run inside it, on the model it is training. Then nothing is flushed and
        the next owner of a partition reads again from its last durable offsets.
        """
        if self._busy is not None:
            return False
        return all([learner.flush_before_revoke() for learner in self.learners.values()])

    # --- the loop -----------------------------------------------------------------------------------

    def run(
        self,
        ingest: Ingest,
        stop: threading.Event,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        """Poll, hand each partition's records to its learner and close its rounds until ``stop``; a
        graceful stop makes every learner's open round durable."""
        self._ingest = ingest
        ingest.before_revoke = self._flush_before_revoke
        ingest.on_assign = self._assigned
        try:
            while not stop.is_set():
                ingest.export_lag()
                waiting = [learner for learner in self.learners.values() if learner.durability.pending]
                if waiting:
                    # A round is not durable: read nothing more until it is (as one trainer does).
                    ingest.keepalive()
                    for learner in waiting:
                        if time.monotonic() >= learner.durability.retry_at:
                            learner.durability.persist(learner.tasks, ingest)
                    stop.wait(0.2)
                    continue
                batch = ingest.poll_or_back_off(stop)
                if batch is None:
                    continue
                self._absorb(batch, ingest)
                self._close_due_rounds(ingest, on_round)
                for partition in sorted(self._leaving):
                    self._drop(partition)
                self.router.refresh(self.learners, self._keep_group)
            for partition, learner in list(self.learners.items()):
                if self.learners.get(partition) is not learner:
                    continue
                with self._working(partition):
                    if learner.durability.pending is not None:
                        learner.durability.persist(learner.tasks, ingest)
                    elif learner.unsaved(ingest.positions):
                        learner.close_round(dict(ingest.positions), ingest)
        finally:
            ingest.before_revoke = None
            ingest.on_assign = None
            for learner in self.learners.values():
                learner.follow(None)
            self._ingest = None
            ingest.close()

    def _absorb(self, batch: list[Incoming], ingest: Ingest) -> None:
        by_partition: dict[int, list[Incoming]] = {}
        for incoming in batch:
            by_partition.setdefault(incoming.partition, []).append(incoming)
        for partition, records in by_partition.items():
            if partition not in self._assignment:
                continue  # handed over during another learner's work: its new owner reads them
            learner = self._learner(partition)
            durable = learner.durability.offsets.get(partition, 0)
            # Absorbed and durable already (read again only if the consumer was not positioned).
            records = [incoming for incoming in records if incoming.offset >= durable]
            if records:
                with self._working(partition):
                    learner.absorb(records, ingest)
                self._last_arrival[partition] = time.monotonic()

    def _close_due_rounds(self, ingest: Ingest, on_round: Callable[[RoundReport], None] | None) -> None:
        for partition, learner in list(self.learners.items()):
            if partition in self._leaving or self.learners.get(partition) is not learner:
                continue  # handed over meanwhile
            idle_s = time.monotonic() - self._last_arrival.get(partition, 0.0)
            if learner.round_due(idle_s, ingest.positions):
                with self._working(partition):
                    report = learner.close_round(dict(ingest.positions), ingest)
                self.router.changed()
                self._export_summary()
                if on_round is not None:
                    on_round(report)

    @contextmanager
    def _working(self, partition: int) -> Iterator[None]:
        self._busy = partition
        try:
            yield
        finally:
            self._busy = None

    def _export_summary(self) -> None:
        """ACC and BWT over every partition learned here (each learner exported its own partition's)."""
        parts = {
            p: {"round": learner.rounds.number, "tasks": {}, "offsets": {}, **learner.assessment.saved()}
            for p, learner in sorted(self.learners.items())
        }
        summary = summarize(dict(merged_checkpoint(parts)["accuracy_matrix"]))
        if summary.acc is not None:
            self.metrics.mean_accuracy.set(summary.acc)
        if summary.bwt is not None:
            self.metrics.bwt.set(summary.bwt)

    def _keep_group(self) -> None:
        if self._ingest is not None:
            self._ingest.keepalive()
