"""Training steps: the model, what each task trains (its own adapter or the shared learner), the
optimisers, the strategy's hooks around every step, and the predictions the later stages measure.

Per-task adapters (a strategy that ``isolates_tasks``): each task trains an adapter and head of its
own, seen as a ``Learner`` over the task's label indices. Shared strategies: one learner whose head
has a *column* per (task, label), in the order they were first seen; a task's version is the shared
adapter with the head rows of its columns. The strategy sits on top: it is called, never calls back.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.nn import functional

from service.balancing import further_epoch, loss_adjustment
from service.head_refit import refit_head
from service.learner import SHARED_ADAPTER, Learner
from service.metrics import TrainerMetrics
from service.model import HEAD_PREFIX, AdapterModel
from service.optimisers import Optimisers, unprefixed
from service.self_training import self_train
from service.settings import Settings
from service.tasks import TaskState
from strategies import Example, Strategy

#: Logit scale of head rows started from prototypes: a cosine gap of 0.1 becomes a logit gap of 2.
PROTOTYPE_LOGIT_SCALE = 20.0
#: Key prefixes in the learner file: the shared adapter's weights, and the strategy's tensors.
LEARNER_PREFIX = "learner."
STRATEGY_PREFIX = "strategy."
#: The adapter a first version served while other tasks train is made under (then removed).
FIRST_VERSION_ADAPTER = "_first"


class Training:
    """Owns the model, the strategy, the shared learner and its columns, and the optimisers."""

    def __init__(
        self, settings: Settings, model: AdapterModel, strategy: Strategy, metrics: TrainerMetrics
    ) -> None:
        self.settings = settings
        self.model = model
        self.strategy = strategy
        self.metrics = metrics
        #: Shared-parameter strategies train one learner; its head has a column per (task, label).
        self.learner: Learner | None = None
        self.columns: dict[tuple[str, str], int] = {}
        self._column_tasks: list[str] = []
        if not strategy.isolates_tasks:
            model.add(SHARED_ADAPTER, num_labels=2)
            self.learner = Learner(model)
        self.optimisers = Optimisers(settings, model)
        self._round_started = False
        #: Called during long work (steps, predictions) so the consumer group knows the trainer lives.
        self.heartbeat: Callable[[], None] = lambda: None

    # --- tasks, columns, learners -------------------------------------------------------------------

    def add_task(self, name: str) -> None:
        """A task seen for the first time: its own adapter (two outputs to start; the head grows as
        labels arrive) unless the learner is shared, then the strategy's ``before_task``."""
        if self.learner is None:
            self.model.add(name, num_labels=2)
        self.strategy.before_task(name)

    def column(self, task: str, label: str) -> int:
        """The shared head's output for ``label`` of ``task``, appended if new (columns never move)."""
        column = self.columns.get((task, label))
        if column is None:
            column = self.columns[(task, label)] = len(self.columns)
            self._column_tasks.append(task)
            assert self.learner is not None
            self.learner.in_use = len(self.columns)
        return column

    def columns_of(self, state: TaskState) -> list[int]:
        """The head outputs of the task's labels, in label order."""
        if self.learner is None:
            return list(range(len(state.labels)))
        return [self.columns[(state.name, label)] for label in state.labels]

    def learner_of(self, state: TaskState) -> Learner:
        """What a task trains: the shared learner, or the task's own adapter seen as one."""
        if self.learner is not None:
            return self.learner
        learner = Learner(self.model, state.name)
        learner.in_use = len(state.labels)
        return learner

    def _task_of(self, learner: Learner, column: int) -> str:
        return learner.adapter if self.learner is None else self._column_tasks[column]

    # --- steps --------------------------------------------------------------------------------------

    def prepare_head(self, state: TaskState) -> None:
        """One head output per label seen so far; new rows start at their prototypes if so set."""
        learner = self.learner_of(state)
        if learner.in_use > self.model.heads[learner.adapter].out_features:
            self.model.grow_head(learner.adapter, learner.in_use)
            self.optimisers.forget(learner.adapter)  # the head's parameters were replaced
        if self.settings.head_init == "prototypes":
            self._init_head_rows(state, learner.adapter)

    def step(self, state: TaskState, examples: Sequence[tuple[str, int]], rate: float = 1.0) -> None:
        """One training step on new examples of one task (label indices within the task), at
        ``rate`` times the set learning rates."""
        self.prepare_head(state)
        batch = [(text, self.columns_of(state)[index]) for text, index in examples]
        state.round_losses.append(self._train(self.learner_of(state), batch, rate, self._adjustment(state)))

    def step_weighted(self, state: TaskState, examples: Sequence[tuple[str, int, float]]) -> None:
        """One step on (text, label index, loss weight) examples of a task (pseudo-labels weigh less)."""
        batch = [(text, self.columns_of(state)[index]) for text, index, _ in examples]
        weights = [weight for _, _, weight in examples]
        state.round_losses.append(
            self._train(self.learner_of(state), batch, 1.0, self._adjustment(state), weights)
        )

    def step_full_batches(self, state: TaskState) -> None:
        """Step on the task's pending examples while a full micro-batch waits."""
        size = self.settings.batch_size
        while len(state.pending) >= size:
            batch, state.pending = state.pending[:size], state.pending[size:]
            self.step(state, batch)

    def finish_round(self, tasks: Sequence[TaskState], early: set[str], rng: random.Random) -> dict[str, int]:
        """The round's remaining steps and further epochs; returns the examples trained per task.

        Tasks in ``early`` are published untrained (head rows at their label prototypes) and trained
        next round. A task's own adapter takes its further epochs alone; a shared learner takes every
        trained task's together (through the strategy's rehearsal), then the strategy's ``after_round``.
        """
        size = self.settings.batch_size
        trained: dict[str, int] = {}
        for state in tasks:
            if state.name in early:
                self.prepare_head(state)
                continue
            for i in range(0, len(state.pending), size):
                self.step(state, state.pending[i : i + size])
            state.pending = []
            if not state.round_examples:
                continue
            trained[state.name] = len(state.round_examples)
            further = self.settings.epochs - 1 if self.learner is None else 0
            epochs = [
                further_epoch(state.round_examples, state.label_counts, self.settings, rng)
                for _ in range(further)
            ]
            decay = self.optimisers.decay(sum(-(-len(examples) // size) for examples in epochs))
            for examples in epochs:
                rng.shuffle(examples)
                for i in range(0, len(examples), size):
                    self.step(state, examples[i : i + size], rate=next(decay))
            if self.learner is None:
                self_train(self, state, rng)
        new: list[Example] = []
        if self.learner is not None:
            states = [state for state in tasks if state.name in trained]
            for state in states:
                columns = self.columns_of(state)
                new.extend((text, columns[index]) for text, index in state.round_examples)
            self._rehearse(self.learner, new, states, rng)
            if self.settings.head_refit and states:
                rehearsed = self.strategy.rehearsal(new)
                size = self.settings.eval_batch_size
                refit_head(self.model, SHARED_ADAPTER, rehearsed, self.learner.in_use, size, self.heartbeat)
            for state in states:
                self_train(self, state, rng)
        self.strategy.after_round(self.learner, new)
        self._round_started = False
        return trained

    def _adjustment(self, state: TaskState) -> torch.Tensor | None:
        """Never a shared head's: its competitors are every task's labels, from a balanced memory."""
        return None if self.learner else loss_adjustment(state.labels, state.label_counts, self.settings)

    def _train(
        self,
        learner: Learner,
        examples: Sequence[Example],
        rate: float = 1.0,
        adjustment: torch.Tensor | None = None,
        weights: Sequence[float] | None = None,
    ) -> float:
        """One optimizer step on ``examples`` plus what the strategy replays, at ``rate`` times the
        set learning rates; returns the loss. ``adjustment`` is added to the logits the loss sees;
        with ``weights`` (one per example; replayed ones weigh 1) each example's loss counts so much."""
        self.heartbeat()
        if not self._round_started:
            self._round_started = True
            self.strategy.before_round(self.learner)
        batch = list(examples) + (self.strategy.replay(len(examples)) if self.learner is not None else [])
        optimizer = self.optimisers.at_rate(learner.adapter, rate)
        texts = [text for text, _ in batch]
        for task, count in Counter(self._task_of(learner, column) for _, column in batch).items():
            self.metrics.training_examples.labels(task=task, strategy=self.strategy.name).inc(count)
        with self.model.training(learner.adapter):
            # Only the labels seen so far compete; outputs reserved for unseen ones stay out of it.
            logits = learner.logits(texts)
            targets = torch.tensor([column for _, column in batch])
            smoothing = self.settings.label_smoothing
            adjusted = logits if adjustment is None else logits + adjustment
            if weights is None:
                loss = functional.cross_entropy(adjusted, targets, label_smoothing=smoothing)
            else:
                each = functional.cross_entropy(
                    adjusted, targets, label_smoothing=smoothing, reduction="none"
                )
                weight = torch.tensor([*weights, *[1.0] * (len(batch) - len(weights))])
                loss = (each * weight).sum() / len(batch)
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
        size, further = self.settings.batch_size, self.settings.epochs - 1
        decay: Iterator[float] | None = None
        for _ in range(further):
            examples = self.strategy.rehearsal(new)
            rng.shuffle(examples)
            # A strategy rehearses as many examples in every epoch of a round.
            decay = decay or self.optimisers.decay(further * -(-len(examples) // size))
            for i in range(0, len(examples), size):
                loss = self._train(learner, examples[i : i + size], next(decay, 1.0))
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
        columns = self.columns_of(state)
        means = {columns[i]: state.prototype_sums[i] / state.prototype_counts[i] for i in new}
        _set_prototype_rows(self.model.heads[adapter], means)
        state.head_initialized.update(new)

    # --- predictions --------------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], layers: int = 1) -> torch.Tensor:
        """Base-model embeddings (every adapter off), for prototypes and drift; with ``layers`` > 1,
        base features whose last ``hidden_size`` columns are those embeddings (for the router)."""
        return torch.from_numpy(self.model.base_embeddings(texts, layers=layers))

    def predict_task(self, task: TaskState, texts: Sequence[str]) -> torch.Tensor:
        """The current scores of ``texts`` over ``task``'s labels (in label order)."""
        return self.predict_columns(self.learner_of(task).adapter, texts, self.columns_of(task))

    def predict_columns(self, adapter: str, texts: Sequence[str], columns: Sequence[int]) -> torch.Tensor:
        """Probabilities of ``adapter`` for ``texts``, kept to ``columns`` (argmax-ready)."""
        return self.model.predict(adapter, texts, self.settings.eval_batch_size)[:, list(columns)]

    def answers(
        self, adapter: str, columns: Sequence[int], labels: Sequence[str], texts: Sequence[str]
    ) -> list[str]:
        """The label ``adapter`` answers for each text; ``columns`` are its outputs for ``labels`` (the
        task's columns of a shared head; a published version's are its rows)."""
        if not texts:
            return []
        self.heartbeat()
        return [labels[p] for p in self.predict_columns(adapter, texts, columns).argmax(dim=-1).tolist()]

    def outcomes(
        self, adapter: str, columns: Sequence[int], labels: Sequence[str], rows: Sequence[tuple[str, str]]
    ) -> list[bool]:
        """For each (text, label), whether ``adapter`` answers the label (see ``answers``)."""
        answered = self.answers(adapter, columns, labels, [text for text, _ in rows])
        return [answer == label for answer, (_, label) in zip(answered, rows, strict=True)]

    def eval_answers(self, state: TaskState) -> list[str]:
        """The label the task as trained now answers for each of its eval records."""
        self.prepare_head(state)  # labels known from eval records only have outputs too
        return self.answers(
            self.learner_of(state).adapter,
            self.columns_of(state),
            state.labels,
            [text for text, _ in state.eval_records],
        )

    # --- what is saved ------------------------------------------------------------------------------

    def version_weights(self, state: TaskState) -> dict[str, torch.Tensor]:
        """The adapter and head, plus the label prototypes a server routes task-less requests with."""
        weights = self.model.weights(self.learner_of(state).adapter)
        if self.learner is not None:
            # The shared adapter, with the head rows of this task's columns only.
            columns = self.columns_of(state)
            for key in (HEAD_PREFIX + "weight", HEAD_PREFIX + "bias"):
                weights[key] = weights[key][columns].contiguous()
        weights.update(state.prototype_tensors(self.model.hidden_size))
        return weights

    def saved_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The strategy's JSON-serialisable state, and the tensors of the learner file: the shared
        learner's weights and the strategy's tensors."""
        state = self.strategy.state_dict()
        tensors = {
            STRATEGY_PREFIX + k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)
        }
        if self.learner is not None:
            for key, value in self.model.weights(SHARED_ADAPTER).items():
                tensors[LEARNER_PREFIX + key] = value
        return {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}, tensors

    def restore(
        self,
        strategy_state: dict[str, Any],
        tensors: dict[str, torch.Tensor] | None,
        columns: Sequence[tuple[str, str]],
    ) -> None:
        """Put back what ``saved_state`` returned, and the shared head's columns in their order."""
        strategy_state = dict(strategy_state)
        if tensors is not None:
            strategy_state.update(unprefixed(tensors, STRATEGY_PREFIX))
            if self.learner is not None:
                self.model.remove(SHARED_ADAPTER)
                self.model.load(SHARED_ADAPTER, unprefixed(tensors, LEARNER_PREFIX))
        if self.learner is not None:
            for task, label in columns:
                self.column(task, label)
        self.strategy.load_state_dict(strategy_state)


def first_version_weights(model: AdapterModel, state: TaskState) -> dict[str, torch.Tensor]:
    """A new task's version before any training, made aside while other tasks train: a fresh adapter
    (the identity: LoRA's B starts at zero) with head rows at the label prototypes. The model is left
    as it was, and no random number is drawn from torch's generator."""
    model.add(FIRST_VERSION_ADAPTER, num_labels=len(state.labels))
    try:
        means = {i: state.prototype_sums[i] / count for i, count in state.prototype_counts.items()}
        _set_prototype_rows(model.heads[FIRST_VERSION_ADAPTER], means)
        weights = model.weights(FIRST_VERSION_ADAPTER)
    finally:
        model.remove(FIRST_VERSION_ADAPTER)
    weights.update(state.prototype_tensors(model.hidden_size))
    return weights


def _set_prototype_rows(head: torch.nn.Linear, means: dict[int, torch.Tensor]) -> None:
    """Set head rows to unit label means, all scaled so that cosine gaps become logit gaps."""
    scale = PROTOTYPE_LOGIT_SCALE / float(torch.stack(list(means.values())).norm(dim=-1).mean())
    with torch.no_grad():
        for row, mean in means.items():
            head.weight[row] = functional.normalize(mean, dim=0) * scale
            head.bias[row] = 0.0
