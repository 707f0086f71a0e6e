"""Joint training, the upper bound for benchmarks: every round's epochs go over all data seen so far."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from strategies.base import Example, Strategy, register

if TYPE_CHECKING:
    from service.learner import Learner
    from service.settings import Settings

log = logging.getLogger(__name__)


@register("joint")
class Joint(Strategy):
    """Keeps every training example and trains each round's further epochs on all of them.

    Fed every task in one round, this is joint training on the union: what continual learning is
    measured against. Its memory and its rounds grow without bound, so it is for benchmarks only.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.seen: list[Example] = []
        log.warning("strategy 'joint' keeps every example and retrains on all of them: benchmarks only")

    def rehearsal(self, examples: Sequence[Example]) -> list[Example]:
        return self.seen + super().rehearsal(examples)

    def after_round(self, learner: Learner | None, examples: Sequence[Example]) -> None:
        super().after_round(learner, examples)
        self.seen.extend(examples)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "joint": [[text, column] for text, column in self.seen]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seen = [(str(text), int(column)) for text, column in state.get("joint", [])]
