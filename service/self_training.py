"""Self-training: a task's unlabeled texts, pseudo-labelled by the task as trained now, join its
round's training at a lower weight.

Records of split ``unlabeled`` (a text, no label) wait in their task's pool (the latest
``self_training_pool_size``). When a round trains the task, after its epochs the task answers its
eval records and its pool. The confidence threshold is the lowest at which its answers to the eval
records are at least ``self_training_precision`` precise: chosen on held-out records, so the
confidence needs no calibration of its own. Every unlabeled text answered at least that confidently
becomes a pseudo-labelled example, and one more epoch runs over the round's examples and these,
shuffled together, a pseudo-labelled one weighing ``self_training_weight`` in the loss (a labelled
one 1). The pool is kept: each time the task trains, a better version labels it again.

What was given is remembered (the newest pseudo-label per text), so that when a labelled copy of the
same text arrives later the pseudo-label is checked: the share found right is exported
(``continual_task_pseudo_label_accuracy``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from service.metrics import TrainerMetrics
from service.settings import Settings
from service.tasks import TaskState

#: Fewer eval records than this cannot tell a threshold's precision: no pseudo-labels.
MIN_EVAL_RECORDS = 20


@dataclass(frozen=True)
class PseudoLabels:
    """The threshold a round's pseudo-labels passed, and them: (text, label index within the task)."""

    threshold: float
    examples: list[tuple[str, int]]


def precision_threshold(confidences: torch.Tensor, right: torch.Tensor, precision: float) -> float | None:
    """The lowest confidence at which the answers at least that confident are ``precision`` precise
    (``right``: whether each answer was), or None when not even the most confident one is."""
    order = confidences.argsort(descending=True)
    hits = right[order].double().cumsum(0)
    precise = (hits / torch.arange(1, len(order) + 1) >= precision).nonzero()
    if not len(precise):
        return None
    return float(confidences[order][int(precise.max())])


def pseudo_labels(
    eval_scores: torch.Tensor,
    eval_truth: torch.Tensor,
    texts: list[str],
    scores: torch.Tensor,
    precision: float,
) -> PseudoLabels | None:
    """Pseudo-labels for ``texts`` (their label probabilities ``scores``), at the threshold the eval
    records (probabilities ``eval_scores``, true label indices ``eval_truth``) set for ``precision``."""
    if len(eval_truth) < MIN_EVAL_RECORDS or not texts:
        return None
    confidence, answer = eval_scores.max(dim=-1)
    threshold = precision_threshold(confidence, answer == eval_truth, precision)
    if threshold is None:
        return None
    confidence, answer = scores.max(dim=-1)
    kept = (confidence >= threshold).nonzero().flatten().tolist()
    return PseudoLabels(threshold, [(texts[i], int(answer[i])) for i in kept])


class Trains(Protocol):
    """What self-training needs of the training stage (``service.training.Training``, which calls it)."""

    settings: Settings
    metrics: TrainerMetrics

    def prepare_head(self, state: TaskState) -> None: ...

    def predict_task(self, task: TaskState, texts: Sequence[str]) -> torch.Tensor: ...

    def step_weighted(self, state: TaskState, examples: Sequence[tuple[str, int, float]]) -> None: ...


def self_train(training: Trains, state: TaskState, rng: random.Random) -> None:
    """After a task's epochs: ``self_training_epochs`` more over its round's examples and the unlabeled
    texts the task as trained then labels confidently enough, those weighing ``self_training_weight``
    (each epoch labels them again, with the model the epoch before left)."""
    settings = training.settings
    if not state.unlabeled or settings.self_training_weight <= 0 or not state.round_examples:
        return
    training.prepare_head(state)
    for _ in range(settings.self_training_epochs):
        if not _self_training_epoch(training, state, rng):
            return


def _self_training_epoch(training: Trains, state: TaskState, rng: random.Random) -> bool:
    """One epoch over the round's examples and the pool's pseudo-labels; False when none passed."""
    settings = training.settings
    truth = torch.tensor([state.labels.index(label) for _, label in state.eval_records], dtype=torch.long)
    given = pseudo_labels(
        training.predict_task(state, [text for text, _ in state.eval_records]),
        truth,
        state.unlabeled,
        training.predict_task(state, state.unlabeled),
        settings.self_training_precision,
    )
    state.pseudo_labelled = len(given.examples) if given is not None else 0
    training.metrics.record_self_training(
        state.name,
        len(state.unlabeled),
        state.unlabeled_dropped,
        state.pseudo_labelled,
        state.pseudo_label_accuracy,
    )
    if given is None or not given.examples:
        return False
    state.remember_pseudo_labels(
        {text: state.labels[index] for text, index in given.examples}, settings.self_training_pool_size
    )
    examples = [(text, index, 1.0) for text, index in state.round_examples]
    examples += [(text, index, settings.self_training_weight) for text, index in given.examples]
    rng.shuffle(examples)
    for i in range(0, len(examples), settings.batch_size):
        training.step_weighted(state, examples[i : i + settings.batch_size])
    return True
