"""The round policy: when the open round closes, and which new tasks go out before they are trained.

A round closes after ``round_max_records`` records, when the stream has been quiet for
``round_idle_s`` with something unsaved, when drift asks for a version now, or as soon as a new
task has ``first_version_records`` training records (it is then served untrained, its head rows at
the label prototypes, and trained in the next round).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from service.settings import Settings
from service.tasks import TaskState


@dataclass(frozen=True)
class RoundReport:
    """What one closed round did, for logs and progress displays."""

    number: int
    trained: dict[str, int]
    published: dict[str, int]
    accuracy: dict[str, float | None]
    seconds: float

    def __str__(self) -> str:
        accuracy = {k: None if v is None else round(v, 4) for k, v in self.accuracy.items()}
        return (
            f"round {self.number} in {self.seconds:.1f}s: trained {self.trained or 'nothing'}; "
            f"published {self.published or 'nothing'}; accuracy {accuracy}"
        )


class RoundPolicy:
    """Owns the round's number, its record count and whether drift asked to close it now."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.number = 0
        #: Records absorbed into the open round.
        self.records = 0
        #: Set when drift in new training records asks for a round now (drift_reaction "adapt").
        self.adapt_now = False

    def due(self, tasks: Iterable[TaskState], idle_s: float, unsaved: bool) -> bool:
        """Whether to close the round now: enough records, or a quiet stream with something to save."""
        if self.records >= self.settings.round_max_records or self.adapt_now:
            return True
        if any(self.first_version_due(state) for state in tasks):
            return True
        return unsaved and idle_s >= self.settings.round_idle_s

    def serve_first(self, state: TaskState) -> bool:
        """A new task is served before it is trained: its records wait until its first version is out."""
        return state.version is None and self.settings.first_version_records > 0

    def first_version_due(self, state: TaskState) -> bool:
        """A new task has enough training records to be served: publish now rather than at round end."""
        return self.serve_first(state) and state.train_seen >= self.settings.first_version_records

    def open(self) -> random.Random:
        """Start closing the next round: its number, and the generator its further epochs shuffle with."""
        self.number += 1
        return random.Random(self.settings.seed * 7919 + self.number)

    def reset(self) -> None:
        """The round is closed: the next one starts empty."""
        self.records = 0
        self.adapt_now = False
