"""Continual-learning figures from the accuracy matrix: ACC, BWT, forgetting and FWT.

The matrix is a mapping in learning order: the row of task i holds the accuracy of every measured
task right after task i was (last) learned. The trainer keeps it, exports it, stores it in its
checkpoint; the server reads it from there for the LearningStatus call, the benchmark builds its own.
One set of definitions for all three:

- ACC: mean accuracy over the learned tasks, from the latest row (Lopez-Paz & Ranzato 2017).
- BWT: mean over every task but the latest of (accuracy now − accuracy right after it was learned).
- forgetting of task j: the best accuracy it had in an earlier row from its own on (once learned)
  minus its accuracy now (Chaudhry et al. 2018); 0 for the latest task. Rows before j was learned
  may hold j measured untrained (for FWT); they are not what it forgot.
- FWT: mean over tasks i after the first of (accuracy on i measured before i was learned − the
  accuracy of an untrained model on i, chance level by default). It needs task i measured before
  it is learned, which a stream only offers when a task's eval records come before its training
  records; else it is None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Row: task learned -> (task -> accuracy), in learning order.
AccuracyMatrix = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class LearningSummary:
    """ACC, BWT, FWT and per-task forgetting of one accuracy matrix (None where undefined)."""

    acc: float | None
    bwt: float | None
    fwt: float | None
    #: Per task; negative when a task is better now than ever before.
    forgetting: dict[str, float] = field(default_factory=dict)
    #: Mean forgetting over every task but the latest.
    mean_forgetting: float | None = None


def summarize(
    matrix: AccuracyMatrix,
    before_learning: Mapping[str, float] | None = None,
    untrained: Mapping[str, float] | None = None,
) -> LearningSummary:
    """The figures of ``matrix``. For FWT: ``before_learning`` holds a task's accuracy measured before
    it was learned (with what the tasks before it taught), ``untrained`` its accuracy without any
    training (chance level, say)."""
    order = list(matrix)
    if not order:
        return LearningSummary(None, None, None)
    latest = matrix[order[-1]]
    now = {task: latest[task] for task in order if task in latest}
    acc = sum(now.values()) / len(now) if now else None

    deltas = [now[t] - matrix[t][t] for t in order[:-1] if t in now and t in matrix[t]]
    bwt = sum(deltas) / len(deltas) if deltas else None

    forgetting: dict[str, float] = {}
    for position, task in enumerate(order):
        earlier = [matrix[row][task] for row in order[position:-1] if task in matrix[row]]
        if task in now:
            forgetting[task] = max(earlier) - now[task] if earlier and task != order[-1] else 0.0
    older = [forgetting[t] for t in order[:-1] if t in forgetting]
    mean_forgetting = sum(older) / len(older) if older else None

    before_learning, untrained = before_learning or {}, untrained or {}
    transfers = [
        before_learning[task] - untrained[task]
        for task in order[1:]
        if task in before_learning and task in untrained
    ]
    fwt = sum(transfers) / len(transfers) if transfers else None
    return LearningSummary(acc, bwt, fwt, forgetting, mean_forgetting)


def label_accuracy(rows: Sequence[tuple[str, str]], outcomes: Sequence[bool]) -> dict[str, float]:
    """Accuracy per label, from (text, label) rows and whether each was answered right."""
    right: dict[str, int] = {}
    seen: dict[str, int] = {}
    for (_, label), outcome in zip(rows, outcomes, strict=True):
        seen[label] = seen.get(label, 0) + 1
        right[label] = right.get(label, 0) + int(outcome)
    return {label: right[label] / seen[label] for label in sorted(seen)}


def macro_accuracy(per_label: Mapping[str, float]) -> float | None:
    """The mean of the per-label accuracies: every label counts the same however many eval records it
    has, so a model that neglects a small label shows it (micro accuracy barely moves)."""
    return sum(per_label.values()) / len(per_label) if per_label else None


@dataclass(frozen=True)
class TaskLearning:
    """One task as the trainer's checkpoint has it."""

    task: str
    version: int
    accuracy: float | None
    macro_accuracy: float | None
    train_records: int
    eval_records: int
    labels: int
    #: "generative" for a task of prompts and responses, else "".
    kind: str = ""
    general_probe_accuracy: float | None = None


@dataclass(frozen=True)
class LearningStatus:
    """The trainer's learning as of its latest durable checkpoint."""

    strategy: str
    round: int
    matrix: dict[str, dict[str, float]]
    tasks: list[TaskLearning]
    summary: LearningSummary
    #: The matrix's rows with macro accuracies (empty from a checkpoint written before them).
    macro_matrix: dict[str, dict[str, float]] = field(default_factory=dict)


def checkpointed_generative(checkpoint: Mapping[str, Any] | None) -> dict[str, Any]:
    """The generative tasks a trainer checkpoint holds (their version and training count)."""
    return dict((checkpoint or {}).get("generative", {}).get("tasks", {}))


def learning_status(
    checkpoint: Mapping[str, Any] | None, manifests: Mapping[str, Mapping[str, Any]]
) -> LearningStatus:
    """Read a trainer checkpoint (None before the first) and the manifests of the versions it holds."""
    if checkpoint is None:
        return LearningStatus("", 0, {}, [], summarize({}))
    matrix = {name: dict(row) for name, row in checkpoint.get("accuracy_matrix", [])}
    tasks = [
        TaskLearning(
            task=name,
            version=int(saved["version"]),
            accuracy=manifests[name]["metrics"].get("accuracy"),
            macro_accuracy=manifests[name]["metrics"].get("macro_accuracy"),
            train_records=int(saved["train_seen"]),
            eval_records=int(saved["eval_seen"]),
            labels=len(manifests[name]["labels"]),
        )
        for name, saved in checkpoint["tasks"].items()
        if name in manifests
    ] + [
        TaskLearning(
            task=name,
            version=int(saved["version"]),
            accuracy=manifests[name]["metrics"].get("accuracy"),
            macro_accuracy=None,
            train_records=int(saved["train_seen"]),
            eval_records=int(manifests[name]["metrics"].get("eval_records", 0)),
            labels=0,
            kind="generative",
            general_probe_accuracy=(manifests[name]["metrics"].get("general_probe") or {}).get("accuracy"),
        )
        for name, saved in checkpointed_generative(checkpoint).items()
        if name in manifests
    ]
    chance = {t.task: 1.0 / t.labels for t in tasks if t.labels}
    before = {str(k): float(v) for k, v in checkpoint.get("accuracy_before_learning", {}).items()}
    strategy, round_number = str(checkpoint.get("strategy", "")), int(checkpoint["round"])
    macro = {name: dict(row) for name, row in checkpoint.get("macro_accuracy_matrix", [])}
    return LearningStatus(strategy, round_number, matrix, tasks, summarize(matrix, before, chance), macro)
