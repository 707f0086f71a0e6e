"""Which version serves: the promotion gate for new versions and the live-accuracy watch on the served one.

Both are pure decisions; the trainer measures the accuracies and moves the alias.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """Whether a new version may be served, and why (recorded in the task's history)."""

    promote: bool
    reason: str


def gate(
    candidate: float | None, served: float | None, served_version: int | None, tolerance: float
) -> Decision:
    """Promote unless the candidate is worse than the served version by more than ``tolerance``.

    Both accuracies must be measured on the same eval records; the trainer makes sure of that.
    """
    if served_version is None:
        return Decision(True, "first version of the task")
    if candidate is None or served is None:
        return Decision(True, "no eval records to compare on")
    if candidate >= served - tolerance:
        return Decision(True, f"accuracy {candidate:.4f} vs {served:.4f} of served v{served_version}")
    return Decision(
        False,
        f"accuracy {candidate:.4f} is {served - candidate:.4f} below served v{served_version} "
        f"({served:.4f}), more than the tolerance {tolerance}",
    )


class LiveAccuracy:
    """Per task, whether the served version got each newly arrived eval record right, over a window.

    The window restarts whenever the served version changes, so a version is judged on its own answers.
    """

    def __init__(self, window: int, floor: float) -> None:
        self.window = window
        self.floor = floor
        self._outcomes: dict[str, deque[bool]] = {}
        self._version: dict[str, int] = {}

    def observe(self, task: str, version: int, outcomes: list[bool]) -> None:
        """Add the served version's outcomes on newly arrived eval records."""
        if self._version.get(task) != version:
            self._version[task] = version
            self._outcomes[task] = deque(maxlen=self.window)
        self._outcomes[task].extend(outcomes)

    def accuracy(self, task: str) -> float | None:
        """Accuracy over the window so far, or None before any outcome."""
        outcomes = self._outcomes.get(task)
        if not outcomes:
            return None
        return sum(outcomes) / len(outcomes)

    def below_floor(self, task: str) -> float | None:
        """The window's accuracy when the window is full and under the floor, else None."""
        outcomes = self._outcomes.get(task)
        if self.floor <= 0 or outcomes is None or len(outcomes) < self.window:
            return None
        accuracy = sum(outcomes) / len(outcomes)
        return accuracy if accuracy < self.floor else None

    def reset(self, task: str) -> None:
        """Forget the task's window (after a rollback)."""
        self._outcomes.pop(task, None)
        self._version.pop(task, None)
