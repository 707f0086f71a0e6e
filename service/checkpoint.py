"""Durability: a closed round made durable in the one order that loses nothing, and the last durable
round restored after a restart.

Order: dead letters acknowledged → every task's version published → the learner file (with the
feature memory) → the task router → the trainer checkpoint (versions + Kafka offsets), replaced
atomically → aliases moved → offsets committed to Kafka. A crash anywhere loses nothing: the restarted
trainer reads again from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from service.assessment import Assessment
from service.data_health import DataHealth
from service.duplicates import DuplicateIndex
from service.feature_memory import FeatureMemory
from service.generative_learning import GenerativeLearning
from service.ingest import Ingest
from service.metrics import TrainerMetrics
from service.producer import Unacknowledged
from service.promotion import Decision
from service.publishing import Publisher
from service.registry import Registry
from service.router import Router
from service.settings import Settings
from service.task_inference import write_router
from service.tasks import Examples, TaskState, stored_prototypes
from service.training import Training

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
#: The first wait before a round that could not be made durable is tried again (it doubles).
FIRST_BACKOFF_S = 1.0


@dataclass
class PendingRound:
    """A closed round on its way to durability; steps done before a failure are not redone on retry."""

    number: int
    tasks: list[TaskState]
    offsets: dict[int, int]
    #: Training examples of tasks published before training (their offsets are in this round's).
    untrained: dict[str, Examples] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)
    published: dict[str, int] = field(default_factory=dict)
    applied: set[str] = field(default_factory=set)
    #: The router refit this round (None: the last one written still holds).
    router: Router | None = None


class Durability:
    """Owns the durable offsets, the round waiting for durability, and the retry backoff."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        metrics: TrainerMetrics,
        training: Training,
        publisher: Publisher,
        assessment: Assessment,
        memory: FeatureMemory,
        duplicates: DuplicateIndex,
        scope_memory: FeatureMemory,
        scope_outside: FeatureMemory,
        generative: GenerativeLearning,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.training = training
        self.publisher = publisher
        self.assessment = assessment
        self.memory = memory
        self.duplicates = duplicates
        self.scope_memory = scope_memory
        self.scope_outside = scope_outside
        self.generative = generative
        #: The Kafka offsets of the last durable checkpoint.
        self.offsets: dict[int, int] = {}
        #: The latest closed round while it is not yet durable.
        self.pending: PendingRound | None = None
        self.retry_at = 0.0
        self._backoff_s = FIRST_BACKOFF_S

    def offsets_moved(self, positions: dict[int, int]) -> bool:
        """Whether the consumer is past the durable offsets (dead letters move them too)."""
        return any(self.offsets.get(p) != o for p, o in positions.items())

    def persist(self, tasks: dict[str, TaskState], ingest: Ingest | None) -> bool:
        """Make the pending round durable: publish, checkpoint, promote, then commit its offsets.

        If the disk or the dead-letter topic refuses, nothing is committed: the failure is counted,
        the round stays pending and is retried after a backoff (steps already done are not redone),
        and the trainer consumes nothing more meanwhile.
        """
        pending = self.pending
        if pending is None:
            return True
        try:
            if ingest is not None:
                # Dead letters must be acknowledged before the checkpoint moves past their offsets.
                ingest.flush_dead_letters()
            for state in pending.tasks:
                if state.name not in pending.published:
                    version, decision = self.publisher.publish(state, pending.offsets, pending.number)
                    pending.decisions[state.name] = decision
                    pending.published[state.name] = version
            written = self.generative.publish(pending.offsets, pending.number, done=pending.published)
            for name, (version, decision) in written.items():
                pending.published[name], pending.decisions[name] = version, decision
            plain, tensors = self.training.saved_state()
            memory, memory_tensors = self.memory.saved_state()
            progress, progress_tensors = self.training.optimisers.state()
            duplicates, duplicates_tensors = self.duplicates.saved_state()
            scope_memory, scope_tensors = self.scope_memory.saved_state()
            scope_outside, outside_tensors = self.scope_outside.saved_state()
            tensors.update(memory_tensors)
            tensors.update(scope_tensors)
            tensors.update(outside_tensors)
            tensors.update(progress_tensors)
            tensors.update(duplicates_tensors)
            tensors.update(self.generative.saved_tensors())
            learner_file = self.registry.write_learner(pending.number, tensors) if tensors else None
            if pending.router is not None:
                write_router(self.registry, pending.router, tasks, pending.number, self.settings.base_model)
                pending.router = None  # written: a retry does not write it again
            body = self._body(pending, tasks, plain, learner_file)
            self.registry.write_checkpoint(
                {
                    **body,
                    "memory": memory,
                    "progress": progress,
                    "duplicates": duplicates,
                    "scope_memory": scope_memory,
                    "scope_outside": scope_outside,
                }
            )
            self.registry.prune_learners(keep=learner_file)
            self.offsets = pending.offsets
            for name, version in pending.published.items():
                if name not in pending.applied:
                    self.publisher.apply(name, version, pending.decisions[name])
                    pending.applied.add(name)
        except (OSError, Unacknowledged) as exc:
            cause = "registry" if isinstance(exc, OSError) else "dead_letters"
            self.metrics.persist_failures.labels(cause=cause).inc()
            self.metrics.persist_blocked.set(1)
            self.retry_at = time.monotonic() + self._backoff_s
            log.error(
                "round %d is not durable (%s: %s); nothing consumed or committed until a retry in %.0fs",
                pending.number,
                cause,
                exc,
                self._backoff_s,
            )
            self._backoff_s = min(2 * self._backoff_s, self.settings.persist_backoff_max_s)
            return False
        self.pending = None
        self._backoff_s = FIRST_BACKOFF_S
        self.metrics.persist_blocked.set(0)
        if ingest is not None:
            ingest.start_offsets.update(pending.offsets)
            ingest.commit(pending.offsets)
        return True

    def _body(
        self,
        pending: PendingRound,
        tasks: dict[str, TaskState],
        strategy_state: dict[str, Any],
        learner_file: str | None,
    ) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "round": pending.number,
            "topic": self.settings.kafka_topic,
            # Which trainer wrote it: with several trainers, whose the partition was last.
            "writer": self.settings.kafka_group_instance_id or f"{socket.gethostname()}:{os.getpid()}",
            "offsets": {str(p): o for p, o in pending.offsets.items()},
            # Eval records absorbed: the eval set and the repeats of training records set aside from it.
            "tasks": {
                s.name: {
                    "version": s.version,
                    "train_seen": s.train_seen,
                    "eval_seen": len(s.eval_records) + len(s.duplicate_records),
                    # Unlabeled texts are kept, not only learned from: the pool is part of the state.
                    "unlabeled": s.unlabeled,
                    "self_training": {
                        "dropped": s.unlabeled_dropped,
                        "checked": s.pseudo_checked,
                        "right": s.pseudo_right,
                        "given": [[text, label] for text, label in s.pseudo_labels.items()],
                    },
                }
                for s in tasks.values()
                if s.version is not None
            },
            "strategy": self.training.strategy.name,
            "strategy_state": strategy_state,
            # The shared learner and the strategy's tensors (written before this checkpoint).
            "learner": learner_file,
            "columns": [list(key) for key in self.training.columns],
            "generative": self.generative.saved(),
            **self.assessment.saved(),
            "untrained": {
                name: [[text, index] for text, index in rows] for name, rows in pending.untrained.items()
            },
        }

    def restore(self) -> tuple[int, dict[str, TaskState]]:
        """Load the last durable round: its number and its tasks (none without a checkpoint); the
        model, the strategy and the assessment get their part, and ``offsets`` the checkpoint's."""
        checkpoint = self.registry.read_checkpoint()
        if checkpoint is None:
            return 0, {}
        self._check_compatible(checkpoint)
        self.offsets = {int(p): int(o) for p, o in checkpoint["offsets"].items()}
        tasks: dict[str, TaskState] = {}
        for name, saved in checkpoint["tasks"].items():
            version = int(saved["version"])
            manifest = self.registry.manifest(name, version)
            weights = self.registry.load_weights(name, version)
            if self.training.learner is None:
                self.training.model.load(name, weights)
            prototype_sums, prototype_counts = stored_prototypes(weights)
            eval_records = self.registry.eval_records(name, version)
            tasks[name] = TaskState(
                name=name,
                labels=list(manifest["labels"]),
                eval_records=eval_records,
                duplicate_records=self.registry.duplicate_records(name, version),
                eval_judged=len(eval_records),  # the live watch judged them all before the checkpoint
                label_counts=dict(manifest.get("label_counts", {})),
                best_accuracy=manifest["metrics"].get("best_accuracy"),
                prototype_sums=prototype_sums,
                prototype_counts=prototype_counts,
                train_seen=int(saved["train_seen"]),
                head_initialized=set(range(len(manifest["labels"]))),
                version=version,
                accuracy=manifest["metrics"]["accuracy"],
                macro_accuracy=manifest["metrics"].get("macro_accuracy"),
                label_accuracy=dict(manifest["metrics"].get("label_accuracy", {})),
                unlabeled=[str(text) for text in saved.get("unlabeled", [])],
            )
            self_training = saved.get("self_training", {})
            tasks[name].unlabeled_dropped = int(self_training.get("dropped", 0))
            tasks[name].pseudo_checked = int(self_training.get("checked", 0))
            tasks[name].pseudo_right = int(self_training.get("right", 0))
            tasks[name].pseudo_labels = {str(k): str(v) for k, v in self_training.get("given", [])}
            health = DataHealth.from_manifest(manifest)
            if health is not None:  # exported again, so an alert on it holds across a restart
                self.metrics.record_data(name, health)
        for name, state in tasks.items():
            self.metrics.start_task(name)
            self.metrics.record_self_training(
                name, len(state.unlabeled), state.unlabeled_dropped, 0, state.pseudo_label_accuracy
            )
        self.assessment.restore(checkpoint)
        learner_file = checkpoint.get("learner")
        tensors = self.registry.read_learner(learner_file) if learner_file else None
        self.generative.restore(checkpoint.get("generative", {}), tensors)
        for name, rows in checkpoint.get("untrained", {}).items():
            state = tasks[name]
            state.pending = [(str(text), int(index)) for text, index in rows]
            state.round_examples = list(state.pending)
            state.changed = True
        self.training.restore(
            dict(checkpoint.get("strategy_state", {})),
            tensors,
            [(str(task), str(label)) for task, label in checkpoint.get("columns", [])],
        )
        if "memory" in checkpoint:
            self.memory.restore(checkpoint["memory"], tensors or {})
        if "duplicates" in checkpoint:
            self.duplicates.restore(checkpoint["duplicates"], tensors or {})
        if "scope_memory" in checkpoint:
            self.scope_memory.restore(checkpoint["scope_memory"], tensors or {})
        if "scope_outside" in checkpoint:
            self.scope_outside.restore(checkpoint["scope_outside"], tensors or {})
        if "progress" in checkpoint:
            # Last: loading the adapters above draws from torch's generator too.
            self.training.optimisers.restore(checkpoint["progress"], tensors or {})
        log.info("restored round %d: %d task(s), offsets %s", checkpoint["round"], len(tasks), self.offsets)
        return int(checkpoint["round"]), tasks

    def _check_compatible(self, checkpoint: dict[str, Any]) -> None:
        if "partitions" in checkpoint:  # the merged view of several trainers' partition checkpoints
            raise ValueError(
                "the registry's trainer checkpoints are per partition, written by several trainers in "
                "one group: keep kafka_group_trainers: several, or use another registry_dir"
            )
        if checkpoint.get("topic") != self.settings.kafka_topic:
            raise ValueError(
                f"the registry's trainer checkpoint is for topic {checkpoint.get('topic')!r}, "
                f"not {self.settings.kafka_topic!r}; use another registry_dir"
            )
        saved_strategy = str(checkpoint.get("strategy", "lora-per-task"))
        shared_before = bool(checkpoint.get("columns"))  # a shared learner's head has columns
        shared_now = self.training.learner is not None
        if checkpoint["tasks"] and shared_before != shared_now:
            # Per-task adapters and one shared learner cannot be continued from each other.
            raise ValueError(
                f"the registry's trainer checkpoint was written by strategy {saved_strategy!r}, which "
                f"{'shares' if not shared_now else 'does not share'} one learner across tasks, "
                f"unlike strategy {self.training.strategy.name!r}; keep {saved_strategy!r} or use another "
                "registry_dir"
            )


def checkpointed_counts(registry: Registry) -> dict[str, tuple[int, int]]:
    """Per task, the (train, eval) records the trainer's durable checkpoint has absorbed."""
    checkpoint = registry.read_checkpoint() or {"tasks": {}}
    return {name: (int(t["train_seen"]), int(t["eval_seen"])) for name, t in checkpoint["tasks"].items()}
