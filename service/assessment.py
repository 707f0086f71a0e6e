"""Assessment after a round: every task measured on its eval records, the accuracy matrix, and the
learning figures derived from it (``service.evaluation``) exported to Prometheus."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from service.evaluation import LearningSummary, label_accuracy, macro_accuracy, summarize
from service.metrics import TrainerMetrics
from service.report import mistakes
from service.tasks import TaskState
from service.training import Training


class Measured(Protocol):
    """What the matrix reads of a task, classification or generative (whose accuracy is exact match)."""

    name: str
    accuracy: float | None
    macro_accuracy: float | None
    best_accuracy: float | None
    labels: list[str]


class Assessment:
    """Owns the accuracy matrix and the accuracies measured before a task was learned (for FWT)."""

    def __init__(self, metrics: TrainerMetrics) -> None:
        self.metrics = metrics
        #: Row i holds every task's accuracy right after task i was last learned (rows in learning order).
        self.matrix: dict[str, dict[str, float]] = {}
        #: The same rows with every task's macro accuracy (the mean of its labels' accuracies).
        self.macro_matrix: dict[str, dict[str, float]] = {}
        #: A task's accuracy measured before its first training record (eval records came first): FWT.
        self.before_learning: dict[str, float] = {}

    def measure(self, states: Iterable[TaskState], training: Training) -> None:
        """Each task's accuracy (micro, per label and macro) and mistakes as trained now, kept in its
        state."""
        for state in states:
            answers = training.eval_answers(state)
            records = state.eval_records
            outcomes = [answer == label for answer, (_, label) in zip(answers, records, strict=True)]
            state.mistakes = mistakes(records, answers)
            state.accuracy = sum(outcomes) / len(outcomes) if outcomes else None
            state.label_accuracy = label_accuracy(records, outcomes)
            state.macro_accuracy = macro_accuracy(state.label_accuracy)
            if state.train_seen == 0 and state.accuracy is not None:
                # FWT's R[i-1][i]: the last measurement before the task is learned, with everything
                # the tasks learned so far taught (not the first, which may predate all of them).
                self.before_learning[state.name] = state.accuracy

    def record(self, trained: Iterable[str], tasks: Mapping[str, Measured]) -> None:
        """A row for every task the round trained, then the matrix and its figures to the metrics."""
        now = {s.name: s.accuracy for s in tasks.values() if s.accuracy is not None}
        macro_now = {s.name: s.macro_accuracy for s in tasks.values() if s.macro_accuracy is not None}
        for name in trained:
            for matrix, row in ((self.matrix, now), (self.macro_matrix, macro_now)):
                matrix.pop(name, None)  # re-inserted last: the newest row is the latest learned
                matrix[name] = dict(row)
        for matrix, gauge in (
            (self.matrix, self.metrics.accuracy_matrix),
            (self.macro_matrix, self.metrics.macro_accuracy_matrix),
        ):
            for after, cells in matrix.items():
                for task, accuracy in cells.items():
                    gauge.labels(after_task=after, task=task).set(accuracy)
        summary = self.summary(tasks)
        for gauge, value in ((self.metrics.bwt, summary.bwt), (self.metrics.fwt, summary.fwt)):
            if value is not None:
                gauge.set(value)
        if summary.acc is not None:
            self.metrics.mean_accuracy.set(summary.acc)
        for task, forgetting in summary.forgetting.items():
            self.metrics.forgetting.labels(task=task).set(forgetting)
        for state in tasks.values():
            if state.accuracy is not None:
                state.best_accuracy = max(state.best_accuracy or 0.0, state.accuracy)

    def summary(self, tasks: Mapping[str, Measured]) -> LearningSummary:
        """ACC, BWT, FWT and forgetting of the accuracy matrix (FWT against chance level)."""
        chance = {name: 1.0 / len(state.labels) for name, state in tasks.items() if state.labels}
        return summarize(self.matrix, self.before_learning, chance)

    def saved(self) -> dict[str, Any]:
        """The checkpoint's part: a list of rows, not a mapping (row order is learning order, and JSON
        objects get their keys sorted)."""
        return {
            "accuracy_matrix": [[name, row] for name, row in self.matrix.items()],
            "macro_accuracy_matrix": [[name, row] for name, row in self.macro_matrix.items()],
            "accuracy_before_learning": self.before_learning,
        }

    def restore(self, checkpoint: Mapping[str, Any]) -> None:
        """Put back what ``saved`` returned."""
        self.matrix = {name: dict(row) for name, row in checkpoint.get("accuracy_matrix", [])}
        self.macro_matrix = {name: dict(row) for name, row in checkpoint.get("macro_accuracy_matrix", [])}
        self.before_learning = dict(checkpoint.get("accuracy_before_learning", {}))
