"""The trainer: per-task buffers, micro-batch steps, rounds that evaluate, publish and checkpoint.

A round is the unit of durability. Within a round records are absorbed (training records are trained
on in micro-batches as they arrive, eval records join their task's eval set); when the round closes
the trainer finishes the round's extra epochs, evaluates, publishes a new version for every task that
changed, writes its checkpoint (versions + Kafka offsets) atomically, and only then commits the
offsets to Kafka. After a crash it restarts from the checkpoint: every record absorbed before it is in
the published weights and is not read again; every record after it is read again and absorbed once.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from kafka.errors import KafkaError
from torch.nn import functional

from service.drift import MIN_REFERENCE, MMDDrift, PageHinkley
from service.errors import CorruptVersion
from service.evaluation import LearningSummary, summarize
from service.ingest import Incoming, Ingest
from service.learner import SHARED_ADAPTER, Learner
from service.metrics import TrainerMetrics
from service.model import (
    HEAD_PREFIX,
    PROTOTYPE_COUNTS,
    PROTOTYPE_SUMS,
    AdapterModel,
    build_model,
    unit_prototypes,
)
from service.producer import Unacknowledged
from service.promotion import Decision, LiveAccuracy, gate
from service.records import Rejection
from service.registry import Registry
from service.settings import Settings
from strategies import Example, Strategy, create

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
#: Key prefixes in the learner file: the shared adapter's weights, and the strategy's tensors.
LEARNER_PREFIX = "learner."
STRATEGY_PREFIX = "strategy."
#: How long the trainer waits before polling again after Kafka failed it.
BROKER_BACKOFF_S = 1.0
#: Training examples: (text, label index within the task).
Examples = list[tuple[str, int]]
#: Logit scale of head rows started from prototypes: a cosine gap of 0.1 becomes a logit gap of 2.
PROTOTYPE_LOGIT_SCALE = 20.0
#: How often the consumer lag is measured (it asks the broker for the partitions' end offsets).
LAG_EVERY_S = 5.0


@dataclass
class TaskState:
    """Everything the trainer knows about one task."""

    name: str
    labels: list[str] = field(default_factory=list)
    eval_records: list[tuple[str, str]] = field(default_factory=list)
    train_seen: int = 0
    version: int | None = None
    accuracy: float | None = None
    #: Training examples (text, label index) waiting for a full micro-batch.
    pending: list[tuple[str, int]] = field(default_factory=list)
    #: This round's training examples, for the round's extra epochs.
    round_examples: list[tuple[str, int]] = field(default_factory=list)
    round_losses: list[float] = field(default_factory=list)
    #: Training records per label, for prediction drift (the mix the task was trained on).
    label_counts: dict[str, int] = field(default_factory=dict)
    changed: bool = False
    #: Per label index: sum of base-model embeddings of its training texts, and how many (prototypes
    #: that let a server infer the task of a text that names none).
    prototype_sums: dict[int, torch.Tensor] = field(default_factory=dict)
    prototype_counts: dict[int, int] = field(default_factory=dict)
    #: Best accuracy any version of the task reached (for forgetting).
    best_accuracy: float | None = None
    #: How many eval records the live-accuracy watch has already judged.
    eval_judged: int = 0
    #: Head rows already started from their label's prototype (or trained before a restart).
    head_initialized: set[int] = field(default_factory=set)

    def label_index(self, label: str) -> int:
        """The class index of ``label``, appending it if new (indices never move)."""
        try:
            return self.labels.index(label)
        except ValueError:
            self.labels.append(label)
            return len(self.labels) - 1


@dataclass
class _Unpersisted:
    """A closed round on its way to durability; steps done before a failure are not redone on retry."""

    tasks: list[TaskState]
    offsets: dict[int, int]
    #: Training examples of tasks published before training (their offsets are in this round's).
    untrained: dict[str, Examples] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)
    published: dict[str, int] = field(default_factory=dict)
    applied: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class RoundReport:
    """What one closed round did, for logs and progress displays."""

    number: int
    trained: dict[str, int]
    published: dict[str, int]
    accuracy: dict[str, float | None]
    seconds: float


class Trainer:
    """Learns every task in the stream and publishes its versions to the registry."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        metrics: TrainerMetrics,
        model: AdapterModel | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.strategy: Strategy = create(settings.strategy, settings)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.model = model or build_model(settings)
        # Dropout draws from torch's global generator; seeding it makes a run repeatable.
        torch.manual_seed(settings.seed)
        self.tasks: dict[str, TaskState] = {}
        #: Strategies that share parameters train one learner; its head has a column per (task, label).
        self.learner: Learner | None = None
        self.columns: dict[tuple[str, str], int] = {}
        self._column_tasks: list[str] = []
        if not self.strategy.isolates_tasks:
            self.model.add(SHARED_ADAPTER, num_labels=2)
            self.learner = Learner(self.model)
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._round_started = False
        #: The accuracy matrix: row i holds every task's accuracy right after task i was last learned.
        self.accuracy_matrix: dict[str, dict[str, float]] = {}
        #: A task's accuracy measured before its first training record (eval records came first): FWT.
        self.accuracy_before_learning: dict[str, float] = {}
        #: Per task, the served version loaded for comparison: (version, adapter name, labels).
        self._references: dict[str, tuple[int, str, list[str]]] = {}
        self.live = LiveAccuracy(settings.live_accuracy_window, settings.live_accuracy_floor)
        #: Per task: the input-drift test of new training records against the task's eval texts.
        self._input_drift: dict[str, MMDDrift] = {}
        self._drift_pending: dict[str, list[str]] = {}
        self._accuracy_drift: dict[str, tuple[int, PageHinkley]] = {}
        self._drift_sampler = random.Random(settings.seed)
        #: Set when drift in new training records asks for a round now (drift_reaction "adapt").
        self._adapt_now = False
        self.offsets: dict[int, int] = {}
        #: The latest closed round while it is not yet durable (see _persist).
        self._unpersisted: _Unpersisted | None = None
        self._retry_at = 0.0
        self._backoff_s = BROKER_BACKOFF_S
        #: The ingest the trainer polls; long work keeps its group membership alive through it.
        self._ingest: Ingest | None = None
        #: True while a round closes: a rebalance then must not start another one.
        self._closing = False
        self.round_number = 0
        self.round_records = 0
        self._restore()

    # --- restore ------------------------------------------------------------------------------------

    def _restore(self) -> None:
        checkpoint = self.registry.read_checkpoint()
        if checkpoint is None:
            return
        if checkpoint.get("topic") != self.settings.kafka_topic:
            raise ValueError(
                f"the registry's trainer checkpoint is for topic {checkpoint.get('topic')!r}, "
                f"not {self.settings.kafka_topic!r}; use another registry_dir"
            )
        saved_strategy = str(checkpoint.get("strategy", "lora-per-task"))
        shared_before = bool(checkpoint.get("columns"))  # a shared learner's head has columns
        if checkpoint["tasks"] and shared_before != (self.learner is not None):
            # Per-task adapters and one shared learner cannot be continued from each other.
            raise ValueError(
                f"the registry's trainer checkpoint was written by strategy {saved_strategy!r}, which "
                f"{'shares' if self.learner is None else 'does not share'} one learner across tasks, "
                f"unlike strategy {self.strategy.name!r}; keep {saved_strategy!r} or use another registry_dir"
            )
        self.round_number = int(checkpoint["round"])
        self.offsets = {int(p): int(o) for p, o in checkpoint["offsets"].items()}
        for name, saved in checkpoint["tasks"].items():
            version = int(saved["version"])
            manifest = self.registry.manifest(name, version)
            weights = self.registry.load_weights(name, version)
            if self.learner is None:
                self.model.load(name, weights)
            prototype_sums, prototype_counts = _prototypes(weights)
            self.tasks[name] = TaskState(
                name=name,
                labels=list(manifest["labels"]),
                eval_records=self.registry.eval_records(name, version),
                eval_judged=int(saved["eval_seen"]),
                label_counts=dict(manifest.get("label_counts", {})),
                best_accuracy=manifest["metrics"].get("best_accuracy"),
                prototype_sums=prototype_sums,
                prototype_counts=prototype_counts,
                train_seen=int(saved["train_seen"]),
                head_initialized=set(range(len(manifest["labels"]))),
                version=version,
                accuracy=manifest["metrics"]["accuracy"],
            )
        for name in self.tasks:
            self.metrics.start_task(name)
        self.accuracy_matrix = {name: dict(row) for name, row in checkpoint.get("accuracy_matrix", [])}
        self.accuracy_before_learning = dict(checkpoint.get("accuracy_before_learning", {}))
        for name, rows in checkpoint.get("untrained", {}).items():
            state = self.tasks[name]
            state.pending = [(str(text), int(index)) for text, index in rows]
            state.round_examples = list(state.pending)
            state.changed = True
        strategy_state = dict(checkpoint.get("strategy_state", {}))
        if checkpoint.get("learner"):
            tensors = self.registry.read_learner(checkpoint["learner"])
            strategy_state.update(_unprefixed(tensors, STRATEGY_PREFIX))
            if self.learner is not None:
                self.model.remove(SHARED_ADAPTER)
                self.model.load(SHARED_ADAPTER, _unprefixed(tensors, LEARNER_PREFIX))
        if self.learner is not None:
            for task, label in checkpoint.get("columns", []):
                self._column(task, label)
        self.strategy.load_state_dict(strategy_state)
        log.info(
            "restored round %d: %d task(s), offsets %s", self.round_number, len(self.tasks), self.offsets
        )

    # --- absorbing records --------------------------------------------------------------------------

    def absorb(self, batch: Sequence[Incoming], ingest: Ingest | None = None) -> None:
        """Take a polled batch in: train records are stepped on in micro-batches, eval records kept."""
        # Tasks in the order their first training record arrived (a set's order would change with the
        # interpreter's hash seed, and so would the order of steps and their dropout draws).
        new_train: dict[str, list[tuple[str, int]]] = {}
        for incoming in batch:
            record = incoming.record
            state = self.tasks.get(record.task)
            if state is None:
                state = self._new_task(record.task)
            if record.label not in state.labels and len(state.labels) >= self.settings.max_labels_per_task:
                rejection = Rejection(
                    "too_many_labels",
                    f"task {record.task!r} already has {len(state.labels)} labels, "
                    f"the limit is {self.settings.max_labels_per_task}",
                )
                if ingest is not None:
                    ingest.dead_letter(
                        incoming.partition, incoming.offset, incoming.raw_key, incoming.raw_value, rejection
                    )
                continue
            index = state.label_index(record.label)
            if self.learner is not None:
                self._column(state.name, record.label)
            state.changed = True
            self.round_records += 1
            if record.split == "eval":
                state.eval_records.append((record.text, record.label))
            else:
                state.train_seen += 1
                state.label_counts[record.label] = state.label_counts.get(record.label, 0) + 1
                self._drift_pending.setdefault(state.name, []).append(record.text)
                state.pending.append((record.text, index))
                state.round_examples.append((record.text, index))
                new_train.setdefault(state.name, []).append((record.text, index))
        for name, examples in new_train.items():
            self._add_to_prototypes(self.tasks[name], examples)
        if self.settings.drift_enabled:
            for name in new_train:
                self._judge_training_drift(self.tasks[name])
        for name in new_train:
            state = self.tasks[name]
            if self._serve_first(state):
                continue  # its first version goes out untrained (prototype head); training follows
            while len(state.pending) >= self.settings.batch_size:
                step, state.pending = (
                    state.pending[: self.settings.batch_size],
                    state.pending[self.settings.batch_size :],
                )
                self._step(state, step)

    def _add_to_prototypes(self, state: TaskState, examples: list[tuple[str, int]]) -> None:
        embeddings = torch.from_numpy(self.model.base_embeddings([text for text, _ in examples]))
        for (_, index), embedding in zip(examples, embeddings, strict=True):
            state.prototype_sums[index] = state.prototype_sums.get(index, 0) + embedding
            state.prototype_counts[index] = state.prototype_counts.get(index, 0) + 1

    def label_prototypes(self, task: str) -> torch.Tensor:
        """Unit mean base embeddings of the task's labels: what a server routes task-less requests by."""
        return unit_prototypes(self._version_weights(self.tasks[task]))

    def _version_weights(self, state: TaskState) -> dict[str, torch.Tensor]:
        """The adapter and head, plus the label prototypes a server routes task-less requests with."""
        learner = self._learner(state)
        weights = self.model.weights(learner.adapter)
        if self.learner is not None:
            # The shared adapter, with the head rows of this task's columns only.
            columns = self._columns(state)
            for key in (HEAD_PREFIX + "weight", HEAD_PREFIX + "bias"):
                weights[key] = weights[key][columns].contiguous()
        if state.prototype_counts:
            size = len(state.labels)
            sums = torch.zeros(size, self.model.hidden_size)
            counts = torch.zeros(size)
            for index, total in state.prototype_sums.items():
                sums[index] = total
                counts[index] = state.prototype_counts[index]
            weights[PROTOTYPE_SUMS] = sums
            weights[PROTOTYPE_COUNTS] = counts
        return weights

    def _judge_training_drift(self, state: TaskState) -> None:
        """Test the task's newest training texts against its eval texts, a window at a time."""
        pending = self._drift_pending.get(state.name, [])
        if len(pending) < self.settings.drift_window:
            return
        self._drift_pending[state.name] = []
        detector = self._input_drift.get(state.name)
        if detector is None:
            reference = [text for text, _ in state.eval_records[: self.settings.drift_reference_size]]
            if len(reference) < MIN_REFERENCE:
                return  # no reference yet: the task's eval records have not arrived
            detector = MMDDrift(
                self.model.base_embeddings(reference),
                self.settings.drift_window,
                self.settings.drift_permutations,
                self.settings.drift_alpha,
                seed=self.settings.seed,
                detector="training_input",
            )
            self._input_drift[state.name] = detector
        rate = self.settings.drift_sample_rate
        sampled = [text for text in pending if self._drift_sampler.random() < rate]
        for result in detector.add(self.model.base_embeddings(sampled)):
            self.metrics.drift.record(state.name, result)
            if result.drifted:
                log.warning(
                    "task %r: new training records drifted from its reference (MMD² %.4f, p %.4g)",
                    state.name,
                    result.statistic,
                    result.p_value,
                )
                if self.settings.drift_reaction == "adapt":
                    self._adapt_now = True

    def _new_task(self, name: str) -> TaskState:
        state = TaskState(name=name)
        self.tasks[name] = state
        self.metrics.start_task(name)
        if self.learner is None:
            # Two outputs to start; the head grows as labels arrive.
            self.model.add(name, num_labels=2)
        self.strategy.before_task(name)
        log.info("new task %r", name)
        return state

    def _keep_group(self) -> None:
        """During long work, tell the consumer group this trainer is alive (nothing is fetched)."""
        if self._ingest is not None:
            self._ingest.keepalive()

    def _flush_before_revoke(self) -> bool:
        """Make what was absorbed durable and committed before the group hands partitions to another.

        Called inside a poll. While a round is closing (its keep-alive polls can see a rebalance too)
        it does nothing: that round's own checkpoint follows.
        """
        ingest = self._ingest
        if ingest is None or self._closing:
            return False
        if self._unpersisted is None and not self._unsaved(ingest.positions):
            return True
        log.info("partitions are being revoked: closing the round first")
        self.close_round(dict(ingest.positions), ingest)
        return self._unpersisted is None

    def _column(self, task: str, label: str) -> int:
        """The shared head's output for ``label`` of ``task``, appended if new (columns never move)."""
        column = self.columns.get((task, label))
        if column is None:
            column = self.columns[(task, label)] = len(self.columns)
            self._column_tasks.append(task)
            assert self.learner is not None
            self.learner.in_use = len(self.columns)
        return column

    def _task_of(self, learner: Learner, column: int) -> str:
        """The task a head output belongs to."""
        return learner.adapter if self.learner is None else self._column_tasks[column]

    def _columns(self, state: TaskState) -> list[int]:
        """The head outputs of the task's labels, in label order."""
        if self.learner is None:
            return list(range(len(state.labels)))
        return [self.columns[(state.name, label)] for label in state.labels]

    def _learner(self, state: TaskState) -> Learner:
        """What a task trains: the shared learner, or the task's own adapter seen as one."""
        if self.learner is not None:
            return self.learner
        learner = Learner(self.model, state.name)
        learner.in_use = len(state.labels)
        return learner

    def _prepare_head(self, state: TaskState) -> None:
        """One head output per label seen so far; new rows start at their prototypes if so set."""
        learner = self._learner(state)
        if learner.in_use > self.model.heads[learner.adapter].out_features:
            self.model.grow_head(learner.adapter, learner.in_use)
            self._optimizers.pop(learner.adapter, None)  # the head's parameters were replaced
        if self.settings.head_init == "prototypes":
            self._init_head_rows(state, learner.adapter)

    def _step(self, state: TaskState, examples: Sequence[tuple[str, int]]) -> None:
        """One training step on new examples of one task (label indices within the task)."""
        self._prepare_head(state)
        columns = self._columns(state)
        loss = self._train(self._learner(state), [(text, columns[index]) for text, index in examples])
        state.round_losses.append(loss)

    def _train(self, learner: Learner, examples: Sequence[Example]) -> float:
        """One optimizer step on ``examples`` plus what the strategy replays; returns the loss."""
        self._keep_group()
        if not self._round_started:
            self._round_started = True
            self.strategy.before_round(self.learner)
        batch = list(examples) + (self.strategy.replay(len(examples)) if self.learner is not None else [])
        optimizer = self._optimizers.get(learner.adapter)
        if optimizer is None:
            # No requires_grad to set: the forward pass activates the adapter, which makes it trainable.
            lora, head = self.model.parameters(learner.adapter)
            optimizer = self._optimizers[learner.adapter] = torch.optim.AdamW(
                [
                    {"params": lora, "lr": self.settings.learning_rate},
                    {"params": head, "lr": self.settings.head_learning_rate},
                ],
                weight_decay=0.01,
            )
        texts = [text for text, _ in batch]
        for task, count in Counter(self._task_of(learner, column) for _, column in batch).items():
            self.metrics.training_examples.labels(task=task, strategy=self.strategy.name).inc(count)
        with self.model.training(learner.adapter):
            # Only the labels seen so far compete; outputs reserved for unseen ones stay out of it.
            logits = learner.logits(texts)
            loss = functional.cross_entropy(logits, torch.tensor([column for _, column in batch]))
            extra = self.strategy.extra_loss(self.learner, texts, logits)
            if extra is not None:
                loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    def _rehearse(
        self, learner: Learner, new: list[Example], tasks: list[TaskState], rng: random.Random
    ) -> None:
        """The round's further epochs on the shared learner: every task's examples shuffled together."""
        for _ in range(self.settings.epochs - 1):
            examples = self.strategy.rehearsal(new)
            rng.shuffle(examples)
            for i in range(0, len(examples), self.settings.batch_size):
                loss = self._train(learner, examples[i : i + self.settings.batch_size])
                for state in tasks:
                    state.round_losses.append(loss)

    def _init_head_rows(self, state: TaskState, adapter: str) -> None:
        """Start each new label's head row at its normalised mean base embedding.

        A fresh LoRA adapter changes nothing (PEFT starts B at zero), so the task then already
        classifies like a nearest-label-mean classifier on base embeddings (the argmax of w·x with
        rows of one norm is the cosine argmax), before its first gradient step; training refines it.
        """
        new = [i for i in state.prototype_counts if i not in state.head_initialized and i < len(state.labels)]
        if not new:
            return
        columns = self._columns(state)
        means = {columns[i]: state.prototype_sums[i] / state.prototype_counts[i] for i in new}
        scale = PROTOTYPE_LOGIT_SCALE / float(torch.stack(list(means.values())).norm(dim=-1).mean())
        head = self.model.heads[adapter]
        with torch.no_grad():
            for column, mean in means.items():
                head.weight[column] = functional.normalize(mean, dim=0) * scale
                head.bias[column] = 0.0
        state.head_initialized.update(new)

    # --- closing a round ----------------------------------------------------------------------------

    def round_due(self, idle_s: float, positions: dict[int, int]) -> bool:
        """Whether to close the round now: enough records, or a quiet stream with something to save."""
        if self.round_records >= self.settings.round_max_records or self._adapt_now:
            return True
        if any(self._first_version_due(state) for state in self.tasks.values()):
            return True
        return self._unsaved(positions) and idle_s >= self.settings.round_idle_s

    def _serve_first(self, state: TaskState) -> bool:
        """A new task is served before it is trained: its records wait until its first version is out."""
        return state.version is None and self.settings.first_version_records > 0

    def _first_version_due(self, state: TaskState) -> bool:
        """A new task has enough training records to be served: publish now rather than at round end."""
        return self._serve_first(state) and state.train_seen >= self.settings.first_version_records

    def _unsaved(self, positions: dict[int, int]) -> bool:
        """Records absorbed, or offsets moved (dead letters), since the last checkpoint."""
        return (
            self.round_records > 0
            or self._unpersisted is not None
            or any(state.round_examples for state in self.tasks.values())
            or any(self.offsets.get(p) != o for p, o in positions.items())
        )

    def close_round(self, positions: dict[int, int], ingest: Ingest | None = None) -> RoundReport:
        """Finish training, evaluate, publish, checkpoint, then commit offsets (in that order)."""
        self._closing = True
        try:
            return self._close_round(positions, ingest)
        finally:
            self._closing = False

    def _close_round(self, positions: dict[int, int], ingest: Ingest | None) -> RoundReport:
        started = time.monotonic()
        self.round_number += 1
        rng = random.Random(self.settings.seed * 7919 + self.round_number)
        trained: dict[str, int] = {}
        # New tasks served early go out untrained, with their head rows at the label prototypes (a
        # nearest-label-mean classifier); all their training runs in the next round.
        early = {state.name for state in self.tasks.values() if self._first_version_due(state)}
        for state in self.tasks.values():
            if state.name in early:
                self._prepare_head(state)
                continue
            for i in range(0, len(state.pending), self.settings.batch_size):
                self._step(state, state.pending[i : i + self.settings.batch_size])
            state.pending = []
            if not state.round_examples:
                continue
            trained[state.name] = len(state.round_examples)
            # A task's own adapter takes its further epochs now; a shared learner takes every
            # task's together below.
            for _ in range(self.settings.epochs - 1 if self.learner is None else 0):
                examples = state.round_examples[:]
                rng.shuffle(examples)
                for i in range(0, len(examples), self.settings.batch_size):
                    self._step(state, examples[i : i + self.settings.batch_size])
        new: list[Example] = []
        if self.learner is not None:
            for name in trained:
                columns = self._columns(self.tasks[name])
                new.extend((text, columns[index]) for text, index in self.tasks[name].round_examples)
            self._rehearse(self.learner, new, [self.tasks[name] for name in trained], rng)
        self.strategy.after_round(self.learner, new)
        self._round_started = False

        changed = [s for s in self.tasks.values() if s.changed]
        to_evaluate = changed if self.strategy.isolates_tasks else list(self.tasks.values())
        for state in to_evaluate:
            state.accuracy = self._accuracy(state)
            if state.train_seen == 0 and state.accuracy is not None:
                # FWT's R[i-1][i]: the last measurement before the task is learned, with everything
                # the tasks learned so far taught (not the first, which may predate all of them).
                self.accuracy_before_learning[state.name] = state.accuracy
        self._update_accuracy_matrix(trained)
        self._export_accuracy_summary()
        for state in changed:
            self._watch_live_accuracy(state)

        # A round still waiting for durability is folded in: its tasks are published with this one's.
        earlier = self._unpersisted.tasks if self._unpersisted else []
        tasks = to_evaluate + [s for s in earlier if s not in to_evaluate]
        # Records of early-served tasks are committed before they are trained: the checkpoint keeps
        # them, so a restart trains them instead of skipping them.
        untrained = {name: list(self.tasks[name].round_examples) for name in early}
        pending = self._unpersisted = _Unpersisted(tasks, {**self.offsets, **positions}, untrained)
        self._persist(ingest)

        for state in self.tasks.values():
            # An early-served task stays changed: the next round trains it and republishes.
            if state.name not in early:
                state.round_examples = []
            state.round_losses, state.changed = [], state.name in early
            state.eval_judged = len(state.eval_records)
        self.round_records = 0
        self._adapt_now = False
        seconds = time.monotonic() - started
        self.metrics.rounds.inc()
        self.metrics.round_seconds.observe(seconds)
        report = RoundReport(
            number=self.round_number,
            trained=trained,
            published=dict(pending.published),
            accuracy={s.name: s.accuracy for s in self.tasks.values()},
            seconds=seconds,
        )
        log.info(
            "round %d in %.1fs: trained %s; published %s; accuracy %s",
            report.number,
            seconds,
            trained or "nothing",
            pending.published or "nothing",
            {k: None if v is None else round(v, 4) for k, v in report.accuracy.items()},
        )
        return report

    def _persist(self, ingest: Ingest | None) -> bool:
        """Make the closed round durable: publish, checkpoint, promote, then commit its offsets.

        Kafka offsets move only after the checkpoint that holds them is on disk. If the disk or the
        dead-letter topic refuses, nothing is committed: the failure is counted, the round stays
        pending and is retried after a backoff (steps already done are not redone), and ``run``
        consumes nothing more meanwhile. A crash in between loses nothing either: the restarted
        trainer reads again from the last durable checkpoint.
        """
        pending = self._unpersisted
        if pending is None:
            return True
        try:
            if ingest is not None:
                # Dead letters must be acknowledged before the checkpoint moves past their offsets.
                ingest.flush_dead_letters()
            for state in pending.tasks:
                if state.name not in pending.published:
                    self._publish(state, pending)
            plain, learner_file = self._save_learner()
            self.registry.write_checkpoint(
                self._checkpoint(pending.offsets, pending.untrained, plain, learner_file)
            )
            self.registry.prune_learners(keep=learner_file)
            self.offsets = pending.offsets
            for name, version in pending.published.items():
                if name not in pending.applied:
                    self._apply(name, version, pending.decisions[name])
                    pending.applied.add(name)
        except (OSError, Unacknowledged) as exc:
            cause = "registry" if isinstance(exc, OSError) else "dead_letters"
            self.metrics.persist_failures.labels(cause=cause).inc()
            self.metrics.persist_blocked.set(1)
            self._retry_at = time.monotonic() + self._backoff_s
            log.error(
                "round %d is not durable (%s: %s); nothing consumed or committed until a retry in %.0fs",
                self.round_number,
                cause,
                exc,
                self._backoff_s,
            )
            self._backoff_s = min(2 * self._backoff_s, self.settings.persist_backoff_max_s)
            return False
        self._unpersisted = None
        self._backoff_s = BROKER_BACKOFF_S
        self.metrics.persist_blocked.set(0)
        if ingest is not None:
            ingest.start_offsets.update(pending.offsets)
            ingest.commit(pending.offsets)
        return True

    def _save_learner(self) -> tuple[dict[str, Any], str | None]:
        """Write the shared learner and the strategy's tensors to the registry (if any); returns the
        strategy's JSON state and the file the checkpoint is to name."""
        state = self.strategy.state_dict()
        tensors = {
            STRATEGY_PREFIX + k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)
        }
        if self.learner is not None:
            for key, value in self.model.weights(SHARED_ADAPTER).items():
                tensors[LEARNER_PREFIX + key] = value
        learner_file = self.registry.write_learner(self.round_number, tensors) if tensors else None
        return {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}, learner_file

    def _publish(self, state: TaskState, pending: _Unpersisted) -> None:
        pending.decisions[state.name] = self._gate(state)
        previous = state.version
        weights, manifest = self._version_weights(state), self._manifest(state, pending.offsets)
        version = self.registry.publish(state.name, weights, state.eval_records, manifest)
        state.version = pending.published[state.name] = version
        self.metrics.versions_published.labels(task=state.name, strategy=self.strategy.name).inc()
        self.metrics.record_accuracy(
            state.name, version, previous, state.accuracy if state.accuracy is not None else math.nan
        )
        if state.round_losses:
            self.metrics.training_loss.labels(task=state.name, strategy=self.strategy.name).set(
                sum(state.round_losses) / len(state.round_losses)
            )

    def _update_accuracy_matrix(self, trained: dict[str, int]) -> None:
        now = {s.name: s.accuracy for s in self.tasks.values() if s.accuracy is not None}
        for name in trained:
            self.accuracy_matrix.pop(name, None)  # re-inserted last: the newest row is the latest learned
            self.accuracy_matrix[name] = dict(now)
        for after, row in self.accuracy_matrix.items():
            for task, accuracy in row.items():
                self.metrics.accuracy_matrix.labels(after_task=after, task=task).set(accuracy)

    def learning_summary(self) -> LearningSummary:
        """ACC, BWT, FWT and forgetting of the accuracy matrix (FWT against chance level)."""
        chance = {name: 1.0 / len(state.labels) for name, state in self.tasks.items() if state.labels}
        return summarize(self.accuracy_matrix, self.accuracy_before_learning, chance)

    def _export_accuracy_summary(self) -> None:
        summary = self.learning_summary()
        for gauge, value in ((self.metrics.bwt, summary.bwt), (self.metrics.fwt, summary.fwt)):
            if value is not None:
                gauge.set(value)
        if summary.acc is not None:
            self.metrics.mean_accuracy.set(summary.acc)
        for task, forgetting in summary.forgetting.items():
            self.metrics.forgetting.labels(task=task).set(forgetting)
        for state in self.tasks.values():
            if state.accuracy is not None:
                state.best_accuracy = max(state.best_accuracy or 0.0, state.accuracy)

    def _accuracy(self, state: TaskState) -> float | None:
        self._prepare_head(state)  # labels known from eval records only have outputs too
        adapter, columns = self._learner(state).adapter, self._columns(state)
        outcomes = self._outcomes(adapter, columns, state.labels, state.eval_records)
        return sum(outcomes) / len(outcomes) if outcomes else None

    def _outcomes(
        self, adapter: str, columns: Sequence[int], labels: Sequence[str], rows: Sequence[tuple[str, str]]
    ) -> list[bool]:
        """For each (text, label), whether ``adapter`` predicts the label; ``columns`` are its outputs
        for ``labels`` (the task's columns of a shared head; a published version's are its rows)."""
        if not rows:
            return []
        self._keep_group()
        predicted = self.predict_columns(adapter, [text for text, _ in rows], columns).argmax(dim=-1).tolist()
        return [labels[p] == label for p, (_, label) in zip(predicted, rows, strict=True)]

    def predict_task(self, task: str, texts: Sequence[str]) -> torch.Tensor:
        """The trainer's current scores of ``texts`` over ``task``'s labels (in label order)."""
        state = self.tasks[task]
        return self.predict_columns(self._learner(state).adapter, texts, self._columns(state))

    def predict_columns(self, adapter: str, texts: Sequence[str], columns: Sequence[int]) -> torch.Tensor:
        """Probabilities of ``adapter`` for ``texts``, kept to ``columns`` (argmax-ready)."""
        return self.model.predict(adapter, texts, self.settings.eval_batch_size)[:, list(columns)]

    def _served_reference(self, task: str, version: int) -> tuple[str, list[str]]:
        """The served version loaded beside the trainer's own adapter, to measure it on the same records."""
        cached = self._references.get(task)
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
        if cached is not None:
            self.model.remove(cached[1])
        name = f"{task}@served-v{version}"
        self.model.load(name, self.registry.load_weights(task, version))
        labels = list(self.registry.manifest(task, version)["labels"])
        self._references[task] = (version, name, labels)
        return name, labels

    def _gate(self, state: TaskState) -> Decision:
        """Whether the version about to be published may be served (see service.promotion)."""
        alias = self.registry.alias(state.name)
        if alias is None:
            return gate(state.accuracy, None, None, self.settings.promotion_tolerance)
        if alias.pinned:
            return Decision(False, f"task is pinned to v{alias.served} ({alias.reason})")
        try:
            adapter, labels = self._served_reference(state.name, alias.served)
        except CorruptVersion as exc:
            return Decision(True, f"served v{alias.served} cannot be read ({exc}); replacing it")
        outcomes = self._outcomes(adapter, range(len(labels)), labels, state.eval_records)
        served = sum(outcomes) / len(outcomes) if outcomes else None
        return gate(state.accuracy, served, alias.served, self.settings.promotion_tolerance)

    def _apply(self, task: str, version: int, decision: Decision) -> None:
        if decision.promote and self.registry.promote_unless_pinned(task, version, decision.reason):
            self.metrics.versions_promoted.labels(task=task).inc()
        else:
            reason = decision.reason if not decision.promote else "the task was pinned meanwhile"
            self.registry.record_event(task, "candidate", version, reason)
            self.metrics.versions_rejected.labels(task=task).inc()
            log.warning("task %r: v%d stays a candidate: %s", task, version, reason)
        protect = {version}
        if task in self._references:
            protect.add(self._references[task][0])
        for deleted in self.registry.prune(task, self.settings.keep_versions, protect):
            log.info("task %r: pruned v%d", task, deleted)

    def _watch_live_accuracy(self, state: TaskState) -> None:
        """Judge the served version on the eval records that arrived this round; roll back if it fails."""
        alias = self.registry.alias(state.name)
        fresh = state.eval_records[state.eval_judged :]
        if alias is None or not fresh:
            return
        try:
            adapter, labels = self._served_reference(state.name, alias.served)
        except CorruptVersion as exc:
            log.error("task %r: cannot judge the served version: %s", state.name, exc)
            return
        outcomes = self._outcomes(adapter, range(len(labels)), labels, fresh)
        self.live.observe(state.name, alias.served, outcomes)
        version, page_hinkley = self._accuracy_drift.get(state.name, (alias.served, PageHinkley()))
        if version != alias.served:
            page_hinkley = PageHinkley()  # a new served version is judged from scratch
        self._accuracy_drift[state.name] = (alias.served, page_hinkley)
        self.metrics.drift.record(state.name, page_hinkley.add([float(o) for o in outcomes]))
        live = self.live.accuracy(state.name)
        if live is not None:
            self.metrics.live_accuracy.labels(task=state.name).set(live)
        failing = self.live.below_floor(state.name)
        if failing is None:
            return
        floor = self.settings.live_accuracy_floor
        good = [
            v
            for v in reversed(self.registry.versions(state.name))
            if v < alias.served
            and (self.registry.manifest(state.name, v)["metrics"]["accuracy"] or 0.0) >= floor
        ]
        reason = (
            f"auto-rollback: live accuracy {failing:.3f} of v{alias.served} on the last "
            f"{self.live.window} eval records is below the floor {floor}"
        )
        if not good:
            log.error(
                "task %r: %s, but no earlier version reached the floor; still serving it", state.name, reason
            )
            return
        self.registry.set_alias(state.name, good[0], pinned=True, reason=reason)
        self.live.reset(state.name)
        self.metrics.auto_rollbacks.labels(task=state.name).inc()
        log.error("task %r: rolled back to v%d: %s", state.name, good[0], reason)

    def _manifest(self, state: TaskState, offsets: dict[int, int]) -> dict[str, Any]:
        lora = self.model.lora
        return {
            "base_model": self.settings.base_model,
            "strategy": self.strategy.name,
            "labels": state.labels,
            "label_counts": state.label_counts,
            "parent_version": state.version,
            "lora": {
                "r": lora.r,
                "alpha": lora.alpha,
                "dropout": lora.dropout,
                "target_modules": list(lora.target_modules),
            },
            "max_length": self.model.max_length,
            "metrics": {
                "accuracy": state.accuracy,
                "best_accuracy": state.best_accuracy,
                "eval_records": len(state.eval_records),
                "train_records": state.train_seen,
            },
            "kafka": {"topic": self.settings.kafka_topic, "offsets": {str(p): o for p, o in offsets.items()}},
            "round": self.round_number,
        }

    def _checkpoint(
        self,
        offsets: dict[int, int],
        untrained: dict[str, list[tuple[str, int]]],
        strategy_state: dict[str, Any],
        learner_file: str | None,
    ) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "round": self.round_number,
            "topic": self.settings.kafka_topic,
            "offsets": {str(p): o for p, o in offsets.items()},
            "tasks": {
                s.name: {"version": s.version, "train_seen": s.train_seen, "eval_seen": len(s.eval_records)}
                for s in self.tasks.values()
                if s.version is not None
            },
            "strategy": self.strategy.name,
            "strategy_state": strategy_state,
            # The shared learner and the strategy's tensors (written before this checkpoint).
            "learner": learner_file,
            "columns": [list(key) for key in self.columns],
            # A list, not a mapping: row order is learning order, and JSON objects get their keys sorted.
            "accuracy_matrix": [[name, row] for name, row in self.accuracy_matrix.items()],
            "accuracy_before_learning": self.accuracy_before_learning,
            "untrained": {name: [[text, index] for text, index in rows] for name, rows in untrained.items()},
        }

    # --- the loop -----------------------------------------------------------------------------------

    def run(
        self,
        ingest: Ingest,
        stop: threading.Event,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        """Poll, absorb and close rounds until ``stop`` is set; a graceful stop closes the open round."""
        ingest.start_offsets.update(self.offsets)
        self._ingest = ingest
        ingest.before_revoke = self._flush_before_revoke
        last_arrival = time.monotonic()
        next_lag = 0.0
        try:
            while not stop.is_set():
                if time.monotonic() >= next_lag:
                    for partition, lag in ingest.lag().items():
                        self.metrics.consumer_lag.labels(partition=str(partition)).set(lag)
                    next_lag = time.monotonic() + LAG_EVERY_S
                if self._unpersisted is not None:
                    # The last round is not durable: read nothing more (records wait in Kafka, memory
                    # stays flat), stay in the group, retry after the backoff.
                    ingest.keepalive()
                    if time.monotonic() >= self._retry_at:
                        self._persist(ingest)
                    stop.wait(0.2)
                    continue
                try:
                    batch = ingest.poll(timeout_s=0.5)
                except KafkaError as exc:
                    # The broker is away (restarting, partitioned): keep the state, back off, retry.
                    self.metrics.broker_errors.inc()
                    log.warning("Kafka unavailable, retrying in %.0fs: %s", BROKER_BACKOFF_S, exc)
                    stop.wait(BROKER_BACKOFF_S)
                    continue
                if batch:
                    self.absorb(batch, ingest)
                    last_arrival = time.monotonic()
                if self.round_due(time.monotonic() - last_arrival, ingest.positions):
                    report = self.close_round(dict(ingest.positions), ingest)
                    if on_round is not None:
                        on_round(report)
            if self._unpersisted is not None:
                self._persist(ingest)
            elif self._unsaved(ingest.positions):
                self.close_round(dict(ingest.positions), ingest)
        finally:
            self._ingest = None
            ingest.before_revoke = None
            ingest.close()


def checkpointed_counts(registry: Registry) -> dict[str, tuple[int, int]]:
    """Per task, the (train, eval) records the trainer's durable checkpoint has absorbed."""
    checkpoint = registry.read_checkpoint() or {"tasks": {}}
    return {name: (int(t["train_seen"]), int(t["eval_seen"])) for name, t in checkpoint["tasks"].items()}


def _prototypes(weights: dict[str, torch.Tensor]) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    """The per-label prototype sums and counts stored with a version (empty for versions without)."""
    sums, counts = weights.get(PROTOTYPE_SUMS), weights.get(PROTOTYPE_COUNTS)
    if sums is None or counts is None:
        return {}, {}
    seen = [i for i, count in enumerate(counts.tolist()) if count > 0]
    return {i: sums[i] for i in seen}, {i: int(counts[i]) for i in seen}


def _unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
