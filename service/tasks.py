"""What the trainer knows about each task: its labels, eval records, this round's examples, prototypes.

A record meets this module first: ``TaskState.take`` files it under its task (or says why it cannot),
and the task's label prototypes (mean base-model embeddings per label, what a server routes task-less
requests by) grow with its training texts. Nothing here touches the model; embeddings come in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from service.data_health import normalized
from service.model import PROTOTYPE_COUNTS, PROTOTYPE_SUMS
from service.records import Record, Rejection

#: Training examples: (text, label index within the task).
Examples = list[tuple[str, int]]


@dataclass
class TaskState:
    """Everything the trainer knows about one task."""

    name: str
    labels: list[str] = field(default_factory=list)
    eval_records: list[tuple[str, str]] = field(default_factory=list)
    train_seen: int = 0
    version: int | None = None
    accuracy: float | None = None
    #: The mean of the per-label accuracies on the eval records (``label_accuracy``).
    macro_accuracy: float | None = None
    label_accuracy: dict[str, float] = field(default_factory=dict)
    #: Eval records set aside because they repeat a training record: (text, label, "exact" or "near").
    duplicate_records: list[tuple[str, str, str]] = field(default_factory=list)
    #: What the task gets wrong on its eval records (``service.report.mistakes``; None: not measured).
    mistakes: dict[str, Any] | None = None
    #: Training examples (text, label index) waiting for a full micro-batch.
    pending: Examples = field(default_factory=list)
    #: This round's training examples, for the round's extra epochs.
    round_examples: Examples = field(default_factory=list)
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
    #: Unlabeled texts (the latest ``self_training_pool_size``), pseudo-labelled when the task trains.
    unlabeled: list[str] = field(default_factory=list)
    #: Unlabeled texts pushed out of the pool by newer ones before any round used them.
    unlabeled_dropped: int = 0
    #: Unlabeled texts pseudo-labelled (and trained on) in the task's last trained round.
    pseudo_labelled: int = 0
    #: The label last given to each pseudo-labelled text (normalised), to check when a labelled copy
    #: comes; and how many were checked so, and right.
    pseudo_labels: dict[str, str] = field(default_factory=dict)
    pseudo_checked: int = 0
    pseudo_right: int = 0

    def label_index(self, label: str) -> int:
        """The class index of ``label``, appending it if new (indices never move)."""
        try:
            return self.labels.index(label)
        except ValueError:
            self.labels.append(label)
            return len(self.labels) - 1

    def refusal(self, record: Record, max_labels: int) -> Rejection | None:
        """Why the task cannot take ``record`` (a new label past the task's limit; an unlabeled text
        before the task has any label to give it), or None."""
        if record.label is None:
            if record.split == "unlabeled" and not self.labels:
                return Rejection(
                    "no_labelled_records",
                    f"task {record.task!r} has no labelled records yet to learn unlabeled texts from",
                )
            return None
        if record.label in self.labels or len(self.labels) < max_labels:
            return None
        return Rejection(
            "too_many_labels",
            f"task {record.task!r} already has {len(self.labels)} labels, the limit is {max_labels}",
        )

    def take(self, record: Record, pool_size: int = 0) -> tuple[str, int] | None:
        """File an accepted record: an eval record joins the eval set; an unlabeled text the pool (of
        at most ``pool_size``, the oldest pushed out); a training record is returned as the (text,
        label index) example that waits for a step."""
        if record.label is None:
            self.unlabeled.append(record.text)
            overflow = len(self.unlabeled) - pool_size
            if overflow > 0:
                self.unlabeled_dropped += overflow
                del self.unlabeled[:overflow]
            return None
        self._check_pseudo_label(record.text, record.label)
        index = self.label_index(record.label)
        self.changed = True
        if record.split == "eval":
            self.eval_records.append((record.text, record.label))
            return None
        self.train_seen += 1
        self.label_counts[record.label] = self.label_counts.get(record.label, 0) + 1
        example = (record.text, index)
        self.pending.append(example)
        self.round_examples.append(example)
        return example

    def remember_pseudo_labels(self, labelled: Mapping[str, str], most: int) -> None:
        """Keep the pseudo-labels just given (text: label), the newest ``most`` of all."""
        for text, label in labelled.items():
            key = normalized(text)
            self.pseudo_labels.pop(key, None)
            self.pseudo_labels[key] = label
        for key in list(self.pseudo_labels)[: max(0, len(self.pseudo_labels) - most)]:
            del self.pseudo_labels[key]

    def _check_pseudo_label(self, text: str, label: str) -> None:
        """A labelled copy of a pseudo-labelled text: was the pseudo-label right?"""
        given = self.pseudo_labels.pop(normalized(text), None) if self.pseudo_labels else None
        if given is not None:
            self.pseudo_checked += 1
            self.pseudo_right += given == label

    @property
    def pseudo_label_accuracy(self) -> float | None:
        """Share of pseudo-labels a later labelled copy of the same text agreed with (None: none yet)."""
        return self.pseudo_right / self.pseudo_checked if self.pseudo_checked else None

    def set_aside(self, found: Mapping[int, str]) -> None:
        """Move the eval records at these positions (of ``service.duplicates.DuplicateIndex.screen``)
        out of the eval set into ``duplicate_records``: they are kept and reported, never measured."""
        if not found:
            return
        self.duplicate_records.extend((*self.eval_records[i], kind) for i, kind in sorted(found.items()))
        self.eval_judged -= sum(1 for i in found if i < self.eval_judged)
        self.eval_records = [record for i, record in enumerate(self.eval_records) if i not in found]
        self.changed = True

    def duplicate_counts(self) -> dict[str, int]:
        """Eval records set aside, by kind."""
        counts: dict[str, int] = {}
        for _, _, kind in self.duplicate_records:
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def add_to_prototypes(self, examples: Sequence[tuple[str, int]], embeddings: torch.Tensor) -> None:
        """Add the base-model embeddings of training examples to their labels' prototype sums."""
        for (_, index), embedding in zip(examples, embeddings, strict=True):
            self.prototype_sums[index] = self.prototype_sums.get(index, 0) + embedding
            self.prototype_counts[index] = self.prototype_counts.get(index, 0) + 1

    def prototype_tensors(self, hidden_size: int) -> dict[str, torch.Tensor]:
        """The prototype sums and counts as stored beside a version's weights (none before training)."""
        if not self.prototype_counts:
            return {}
        size = len(self.labels)
        sums = torch.zeros(size, hidden_size)
        counts = torch.zeros(size)
        for index, total in self.prototype_sums.items():
            sums[index] = total
            counts[index] = self.prototype_counts[index]
        return {PROTOTYPE_SUMS: sums, PROTOTYPE_COUNTS: counts}

    def end_round(self, trained_next_round: bool) -> None:
        """Forget the closed round's examples and losses; new eval records are judged from here on.

        A task served before training keeps its examples and stays changed: the next round trains it.
        """
        if not trained_next_round:
            self.round_examples = []
        self.round_losses, self.changed = [], trained_next_round
        self.eval_judged = len(self.eval_records)


def stored_prototypes(weights: dict[str, torch.Tensor]) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    """The per-label prototype sums and counts stored with a version (empty for versions without)."""
    sums, counts = weights.get(PROTOTYPE_SUMS), weights.get(PROTOTYPE_COUNTS)
    if sums is None or counts is None:
        return {}, {}
    seen = [i for i, count in enumerate(counts.tolist()) if count > 0]
    return {i: sums[i] for i in seen}, {i: int(counts[i]) for i in seen}
