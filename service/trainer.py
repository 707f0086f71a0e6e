"""The trainer: a short coordinator over the stages a record meets in order.

``tasks`` (per-task state, buffers, prototypes) → ``rounds`` (when a round closes) → ``training``
(steps, optimisers, strategy hooks) → ``assessment`` (accuracy matrix) and ``publishing`` (versions,
gate, live accuracy) → ``checkpoint`` (durability, restore). Each stage owns its state; none calls
back up. A round is the unit of durability: when it closes the trainer finishes its epochs,
evaluates, publishes a version of every task that changed, writes its checkpoint (versions + Kafka
offsets) atomically, and only then commits the offsets to Kafka.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch

from service.assessment import Assessment, Measured
from service.checkpoint import Durability, PendingRound
from service.duplicates import DuplicateIndex
from service.evaluation import LearningSummary
from service.generative_learning import GenerativeLearning
from service.ingest import Incoming, Ingest
from service.look_ahead import LookAhead
from service.metrics import TrainerMetrics
from service.model import BASE_FEATURE_LAYERS, AdapterModel, build_model
from service.out_of_scope import OUTSIDE_LABEL
from service.publishing import Publisher
from service.records import Record
from service.registry import Registry
from service.rounds import RoundPolicy, RoundReport
from service.settings import Settings
from service.task_inference import TaskInference
from service.tasks import Examples, TaskState
from service.training import Training
from service.training_drift import TrainingDrift
from strategies import create

log = logging.getLogger(__name__)


class Trainer:
    """Learns every task in the stream and publishes its versions to the registry."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        metrics: TrainerMetrics,
        model: AdapterModel | None = None,
        partition: int | None = None,
    ) -> None:
        """``partition``: the one partition learned, by one of several trainers in a group (its files
        in ``registry``; the router is fitted over all partitions: ``service.group_router``)."""
        self.settings = settings
        self.partition = partition
        self.metrics = metrics
        strategy = create(settings.strategy, settings)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        model = model or build_model(settings)
        # Dropout draws from torch's global generator; seeding it makes a run repeatable.
        torch.manual_seed(settings.seed)
        self.training = Training(settings, model, strategy, metrics)
        self.training.heartbeat = self._keep_group
        self.drift = TrainingDrift(settings, metrics, model.base_embeddings)
        self.rounds = RoundPolicy(settings)
        self.assessment = Assessment(metrics)
        self.publisher = Publisher(settings, registry, metrics, self.training)
        #: The task router, its memories and its out-of-scope rule.
        self.inference = TaskInference(settings, metrics, fits_router=partition is None)
        #: What finds eval records that repeat training records (set aside from the eval sets).
        self.duplicates = DuplicateIndex(settings.duplicate_cosine)
        #: Generative tasks (prompt and response records) and their adapters on the language model.
        self.generative = GenerativeLearning(settings, registry, metrics, self.publisher)
        self.generative.heartbeat = self._keep_group
        self.durability = Durability(
            settings,
            registry,
            metrics,
            self.training,
            self.publisher,
            self.assessment,
            self.inference.memory,
            self.duplicates,
            self.inference.scope_memory,
            self.inference.scope_outside,
            self.generative,
        )
        self.rounds.number, self.tasks = self.durability.restore()
        for name, state in self.tasks.items():
            if self.duplicates.eval_size(name) != len(state.eval_records):
                # A checkpoint from before the index, or not in step with its versions: hold the eval
                # set as restored (its repeats of earlier training records stay unknown).
                texts = [text for text, _ in state.eval_records]
                self.duplicates.replace_eval(name, texts, self.training.embed(texts))
        #: Serves new tasks from records read ahead while a round trains.
        self.look_ahead = LookAhead(settings, self.publisher)
        self.inference.restored(registry)
        #: The ingest being polled; long work keeps the group membership alive through it.
        self._ingest: Ingest | None = None
        #: True while a round closes: a rebalance then must not start another one.
        self._closing = False

    def learning_summary(self) -> LearningSummary:
        """ACC, BWT, FWT and forgetting of the accuracy matrix (FWT against chance level)."""
        return self.assessment.summary(self.measured())

    def measured(self) -> dict[str, Measured]:
        """Every task, classification and generative, as the accuracy matrix reads it."""
        return {**self.tasks, **self.generative.tasks}

    def absorb(self, batch: Sequence[Incoming], ingest: Ingest | None = None) -> None:
        """Take a polled batch in: train records are stepped on in micro-batches, eval records kept."""
        # Tasks in the order their first training record arrived (a set's order would change with the
        # interpreter's hash seed, and so would the order of steps and their dropout draws).
        new_train: dict[str, Examples] = {}
        #: Per task, where this batch's eval records start in its eval set.
        new_eval: dict[str, int] = {}
        #: Eval records of texts that belong to no task (``"label": null``), per task they came with.
        outside: dict[str, list[str]] = {}
        batch, taken = self.generative.absorb(batch, self.tasks, ingest)
        self.rounds.records += taken
        for incoming in batch:
            record = incoming.record
            assert isinstance(record, Record)  # the generative ones were taken above
            if record.out_of_scope:
                outside.setdefault(record.task, []).append(record.text)
                self.rounds.records += 1
                continue
            known = self.tasks.get(record.task)
            rejection = (known or TaskState(record.task)).refusal(record, self.settings.max_labels_per_task)
            if rejection is not None:
                if ingest is not None:
                    ingest.dead_letter(
                        incoming.partition, incoming.offset, incoming.raw_key, incoming.raw_value, rejection
                    )
                continue
            state = known or self._new_task(record.task)
            self.rounds.records += 1
            if record.split == "eval":
                new_eval.setdefault(state.name, len(state.eval_records))
            example = state.take(record, self.settings.self_training_pool_size)
            if self.training.learner is not None and record.label is not None:
                self.training.column(state.name, record.label)
            if example is not None:
                new_train.setdefault(state.name, []).append(example)
        # The router reads more of the base model than prototypes and drift: one forward gives both.
        layers = BASE_FEATURE_LAYERS if self.inference.enabled else 1
        hidden = self.training.model.hidden_size
        for name in dict.fromkeys([*new_train, *new_eval]):
            state, examples = self.tasks[name], new_train.get(name, [])
            embeddings = torch.empty(0, hidden)
            if examples:
                features = self.training.embed([text for text, _ in examples], layers)
                embeddings = features[:, -hidden:]
                state.add_to_prototypes(examples, embeddings)
                if self.inference.enabled:
                    self.inference.memory.add(name, [state.labels[index] for _, index in examples], features)
                if self.settings.drift_enabled:
                    self.rounds.adapt_now |= self.drift.judge(state, embeddings.numpy())
            records = state.eval_records[new_eval.get(name, len(state.eval_records)) :]
            fresh = [text for text, _ in records]
            eval_features = self.training.embed(fresh, layers) if fresh else torch.empty(0, hidden)
            if fresh and self.inference.enabled:
                self.inference.scope_memory.add(name, [label for _, label in records], eval_features)
            found = self.duplicates.screen(
                name, [text for text, _ in examples], embeddings, fresh, eval_features[:, -hidden:]
            )
            state.set_aside(found)
        if self.inference.enabled:
            for name, texts in outside.items():
                self.inference.scope_outside.add(
                    name, [OUTSIDE_LABEL] * len(texts), self.training.embed(texts, layers)
                )
        for name in new_train:
            state = self.tasks[name]
            if not self.rounds.serve_first(state):  # else its first version goes out untrained first
                self.training.step_full_batches(state)

    def _new_task(self, name: str) -> TaskState:
        # A task served from records read ahead is trained at once: its first version is out.
        state = self.tasks[name] = TaskState(name=name, version=self.look_ahead.served.pop(name, None))
        self.metrics.start_task(name)
        self.training.add_task(name)
        log.info("new task %r", name)
        return state

    def round_due(self, idle_s: float, positions: dict[int, int]) -> bool:
        """Whether to close the round now: enough records, or a quiet stream with something to save."""
        return self.rounds.due(self.tasks.values(), idle_s, self.unsaved(positions))

    def unsaved(self, positions: dict[int, int]) -> bool:
        """Records absorbed, or offsets moved (dead letters), since the last checkpoint."""
        return (
            self.rounds.records > 0
            or self.durability.pending is not None
            or any(state.round_examples for state in self.tasks.values())
            or self.durability.offsets_moved(self._own(positions))
        )

    def _own(self, positions: dict[int, int]) -> dict[int, int]:
        """The positions of the partitions this trainer learns."""
        return {p: o for p, o in positions.items() if self.partition in (None, p)}

    def close_round(self, positions: dict[int, int], ingest: Ingest | None = None) -> RoundReport:
        """Finish training, evaluate, publish, checkpoint, then commit offsets (in that order)."""
        self._closing = True
        try:
            return self._close_round(self._own(positions), ingest)
        finally:
            self._closing = False
            if ingest is not None:
                self.look_ahead.rewind(ingest)

    def _close_round(self, positions: dict[int, int], ingest: Ingest | None) -> RoundReport:
        started = time.monotonic()
        rng = self.rounds.open()
        # New tasks served early go out untrained (head rows at the label prototypes); all their
        # training runs in the next round.
        early = {state.name for state in self.tasks.values() if self.rounds.first_version_due(state)}
        if early and any(s.changed and s.name not in early for s in self.tasks.values()):
            # Other tasks' epochs come first in this round: serve the new tasks now, not after them
            # (the round publishes them again with their eval records, and checkpoints them).
            for name in sorted(early):
                self.publisher.publish_first(self.tasks[name])
        trained = self.training.finish_round(list(self.tasks.values()), early, rng)
        hidden = self.training.model.hidden_size
        router = self.inference.refit(self.tasks, hidden, self._keep_group) if trained else None
        trained |= self.generative.train_round(rng)

        changed = [s for s in self.tasks.values() if s.changed]
        to_evaluate = changed if self.training.strategy.isolates_tasks else list(self.tasks.values())
        self.assessment.measure(to_evaluate, self.training)
        self.assessment.record(trained, self.measured())
        for state in changed:
            self.publisher.watch_live_accuracy(state)

        # A round still waiting for durability is folded in: its tasks are published with this one's.
        waiting = self.durability.pending
        earlier = waiting.tasks if waiting else []
        tasks = to_evaluate + [s for s in earlier if s not in to_evaluate]
        # Records of early-served tasks are committed before they are trained: the checkpoint keeps
        # them, so a restart trains them instead of skipping them.
        untrained = {name: list(self.tasks[name].round_examples) for name in early}
        offsets = {**self.durability.offsets, **positions}
        if router is None and waiting is not None:
            router = waiting.router  # not written yet: goes out with this round
        pending = self.durability.pending = PendingRound(
            self.rounds.number, tasks, offsets, untrained, router=router
        )
        self.durability.persist(self.tasks, ingest)

        for state in self.tasks.values():
            state.end_round(trained_next_round=state.name in early)
        self.rounds.reset()
        seconds = time.monotonic() - started
        self.metrics.rounds.inc()
        self.metrics.round_seconds.observe(seconds)
        accuracy = {name: s.accuracy for name, s in self.measured().items()}
        report = RoundReport(self.rounds.number, trained, dict(pending.published), accuracy, seconds)
        log.info("%s", report)
        return report

    def run(
        self,
        ingest: Ingest,
        stop: threading.Event,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        """Poll, absorb and close rounds until ``stop`` is set; a graceful stop closes the open round."""
        ingest.start_offsets.update(self.durability.offsets)
        self._ingest = ingest
        ingest.before_revoke = self.flush_before_revoke
        last_arrival = time.monotonic()
        try:
            while not stop.is_set():
                ingest.export_lag()
                if self.durability.pending is not None:
                    # The last round is not durable: read nothing more (records wait in Kafka, memory
                    # stays flat), stay in the group, retry after the backoff.
                    ingest.keepalive()
                    if time.monotonic() >= self.durability.retry_at:
                        self.durability.persist(self.tasks, ingest)
                    stop.wait(0.2)
                    continue
                batch = ingest.poll_or_back_off(stop)
                if batch is None:
                    continue  # the broker is away: keep the state, poll again after the backoff
                if batch:
                    self.absorb(batch, ingest)
                    last_arrival = time.monotonic()
                if self.round_due(time.monotonic() - last_arrival, ingest.positions):
                    report = self.close_round(dict(ingest.positions), ingest)
                    if on_round is not None:
                        on_round(report)
            if self.durability.pending is not None:
                self.durability.persist(self.tasks, ingest)
            elif self.unsaved(ingest.positions):
                self.close_round(dict(ingest.positions), ingest)
        finally:
            self._ingest = None
            ingest.before_revoke = None
            ingest.close()

    def _keep_group(self) -> None:
        """During long work, tell the consumer group this trainer is alive; while a round closes, read
        ahead for new tasks to serve at once (see service.look_ahead)."""
        if self._ingest is None:
            return
        if self._closing and self.settings.first_version_records > 0:
            self.look_ahead.look(self._ingest, self.tasks, self.partition)
        else:
            self._ingest.keepalive()

    def follow(self, ingest: Ingest | None) -> None:
        """Keep the group alive through ``ingest`` during long work (None: stop), as ``run`` does."""
        self._ingest = ingest

    def release(self) -> None:
        """Unload every task's adapter from the model (shared with other trainers in the process)."""
        for name in self.tasks:
            self.training.model.remove(name)

    def flush_before_revoke(self) -> bool:
        """Make what was absorbed durable and committed before the group hands partitions to another.

        Called inside a poll. While a round is closing (its keep-alive polls can see a rebalance too)
        it does nothing: that round's own checkpoint follows.
        """
        ingest = self._ingest
        if ingest is None or self._closing:
            return False
        if self.durability.pending is None and not self.unsaved(ingest.positions):
            return True
        log.info("partitions are being revoked: closing the round first")
        self.close_round(dict(ingest.positions), ingest)
        return self.durability.pending is None
