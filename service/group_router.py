"""The task router of several trainers in one group, fitted over every partition's memories.

Each partition's learner keeps the base features of its tasks' texts (``service.task_inference``) in
its checkpoint; none holds every task, and a router fitted on one partition's tasks would route every
text to them. So the trainer that owns partition 0 fits the one router: over the memories of the
partitions it learns, as they are, and of the others, as their last durable checkpoints hold them,
and writes it as one trainer would, with the version of every task it was fitted beside. It refits
after a round of its own closed or when another partition's checkpoint moved (looked at every
``CHECK_EVERY_S``). Another trainer takes the job over with partition 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.feature_memory import MEMORY_PREFIX, FeatureMemory
from service.metrics import TrainerMetrics
from service.out_of_scope import OUTSIDE_MEMORY_PREFIX, SCOPE_MEMORY_PREFIX
from service.registry import Registry
from service.settings import Settings
from service.task_inference import TaskInference, write_router
from service.tasks import TaskState, stored_prototypes

if TYPE_CHECKING:
    from service.trainer import Trainer

log = logging.getLogger(__name__)

#: How often the owner of partition 0 looks whether other partitions' checkpoints moved.
CHECK_EVERY_S = 5.0
#: The partition whose owner fits the router.
ROUTER_PARTITION = 0


@dataclass
class _Partition:
    """What a partition learned elsewhere gives the router, as of one of its checkpoints."""

    written_at: float | None
    round: int
    tasks: dict[str, TaskState]
    memories: tuple[FeatureMemory, FeatureMemory, FeatureMemory]


class GroupRouter:
    """Fits and writes the router when this trainer owns partition 0 and a memory moved."""

    def __init__(self, settings: Settings, registry: Registry, metrics: TrainerMetrics, hidden: int) -> None:
        self.settings = settings
        self.registry = registry
        self.hidden = hidden
        #: Its memories are replaced by every partition's before each fit.
        self.inference = TaskInference(settings, metrics)
        self._others: dict[int, _Partition] = {}
        self._due = True
        self._next_check = 0.0
        self._fitted_rounds: dict[int, int] | None = None

    def changed(self) -> None:
        """A round of this trainer's closed: refit at the next ``refresh``."""
        self._due = True

    def refresh(self, learners: Mapping[int, Trainer], heartbeat: Callable[[], None]) -> None:
        """Refit and write the router if this trainer owns partition 0 and some partition's durable
        state moved since the last fit."""
        if not self.inference.enabled or ROUTER_PARTITION not in learners:
            return
        if not self._due and time.monotonic() < self._next_check:
            return
        self._due, self._next_check = False, time.monotonic() + CHECK_EVERY_S
        self._read_others(set(learners))
        rounds = {p: learner.rounds.number for p, learner in learners.items()}
        rounds.update({p: other.round for p, other in self._others.items()})
        if rounds == self._fitted_rounds:
            return
        tasks: dict[str, TaskState] = {}
        memories: list[tuple[FeatureMemory, FeatureMemory, FeatureMemory]] = []
        for learner in learners.values():
            tasks.update(learner.tasks)
            known = learner.inference
            memories.append((known.memory, known.scope_memory, known.scope_outside))
        for other in self._others.values():
            tasks.update(other.tasks)
            memories.append(other.memories)
        inference = self.inference
        inference.memory, inference.scope_memory, inference.scope_outside = (
            FeatureMemory.union([m[i] for m in memories]) for i in range(3)
        )
        router = inference.refit(tasks, self.hidden, heartbeat)
        self._fitted_rounds = rounds
        if router is not None:
            # Named by the partitions' rounds together: a later fit always writes a new file.
            write_router(self.registry, router, tasks, sum(rounds.values()), self.settings.base_model)
            log.info("router fitted over %d partition(s), %d task(s)", len(rounds), len(router.tasks()))

    def _read_others(self, local: set[int]) -> None:
        """Bring the other partitions' durable state up to date (re-read only where it moved)."""
        for p in list(self._others):
            if p in local:
                del self._others[p]  # learned here now
        for folder in self.registry.partition_checkpoints():
            if folder in local:
                continue
            view = self.registry.for_partition(folder)
            written_at = view.checkpoint_written_at()
            known = self._others.get(folder)
            if known is None or known.written_at != written_at:
                self._others[folder] = self._partition(view, written_at)

    def _partition(self, view: Registry, written_at: float | None) -> _Partition:
        checkpoint: dict[str, Any] = view.read_checkpoint() or {"round": 0, "tasks": {}}
        tensors = view.read_learner(checkpoint["learner"]) if checkpoint.get("learner") else {}
        memories = []
        for key, size, prefix in (
            ("memory", self.settings.router_memory_size, MEMORY_PREFIX),
            ("scope_memory", self.settings.out_of_scope_memory_size, SCOPE_MEMORY_PREFIX),
            ("scope_outside", self.settings.out_of_scope_memory_size, OUTSIDE_MEMORY_PREFIX),
        ):
            memory = FeatureMemory(size, self.settings.seed, prefix)
            if key in checkpoint:
                memory.restore(checkpoint[key], tensors)
            memories.append(memory)
        tasks = {}
        for name, saved in checkpoint["tasks"].items():
            version = int(saved["version"])
            sums, counts = stored_prototypes(self.registry.load_weights(name, version))
            labels = list(self.registry.manifest(name, version)["labels"])
            tasks[name] = TaskState(
                name, labels, version=version, prototype_sums=sums, prototype_counts=counts
            )
        memory, scope, outside = memories
        return _Partition(written_at, int(checkpoint["round"]), tasks, (memory, scope, outside))
