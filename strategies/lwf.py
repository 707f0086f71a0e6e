"""Learning without forgetting: distil the previous round's learner into the current one."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from strategies.base import Example, Strategy, register, total

if TYPE_CHECKING:
    from service.learner import Learner
    from service.settings import Settings

#: The adapter name of the frozen copy of the learner taken at the start of a round.
TEACHER = "_teacher"


@register("lwf")
class LwF(Strategy):
    """Each step also matches, on its own texts, what the learner answered before the round (Li & Hoiem
    2016), over the columns that existed then: new data keeps the old tasks' answers in place.

    The distillation loss is Avalanche's ``LearningWithoutForgetting`` (temperature-scaled KL on the
    previously seen units, weighted by ``lwf_alpha``); its teacher is a frozen snapshot of the shared
    adapter loaded beside it, not a deep copy of the whole model. The teacher is the learner as the
    last round left it, which is what the checkpoint holds; LwF itself persists only how many columns that
    learner had been trained on (the units to distil).
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        # Imported here: Avalanche takes seconds to import, and only strategies that use it should pay.
        from avalanche.training.regularization import LearningWithoutForgetting

        self.distillation = LearningWithoutForgetting(
            alpha=settings.lwf_alpha, temperature=settings.lwf_temperature
        )

        #: Columns the learner had been trained on when the last round ended (the teacher's units).
        self.trained_columns = 0

    def before_round(self, learner: Learner | None) -> None:
        super().before_round(learner)
        self.distillation.prev_model = None
        if learner is None or self.trained_columns == 0:
            return  # nothing learned yet: nothing to keep
        learner.snapshot(TEACHER)
        self.distillation.prev_model = lambda texts: learner.frozen_logits(TEACHER, texts)
        self.distillation.prev_classes_by_task = defaultdict(set, {0: set(range(self.trained_columns))})

    def after_round(self, learner: Learner | None, examples: Sequence[Example]) -> None:
        super().after_round(learner, examples)
        if learner is not None and examples:
            self.trained_columns = learner.in_use

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lwf.trained_columns": self.trained_columns}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.trained_columns = int(state.get("lwf.trained_columns", 0))

    def extra_loss(
        self, learner: Learner | None, texts: Sequence[str], logits: torch.Tensor
    ) -> torch.Tensor | None:
        own = None
        if self.distillation.prev_model is not None:
            own = self.distillation(list(texts), logits, None)
        return total(own, super().extra_loss(learner, texts, logits))
