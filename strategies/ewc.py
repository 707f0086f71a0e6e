"""Online elastic weight consolidation on the shared learner's trainable parameters."""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional

from service.fisher import drawn_fisher
from strategies.base import Example, Strategy, register, total

if TYPE_CHECKING:
    from service.learner import Learner
    from service.settings import Settings


@register("ewc")
class EWC(Strategy):
    """Penalises moving the parameters that mattered to earlier rounds (Kirkpatrick et al. 2017).

    After each round the diagonal Fisher information of the LoRA and head parameters is estimated on
    up to ``ewc_fisher_examples`` of the round's examples (see ``_fisher``) and folded into a running
    importance (online EWC, Schwarz et al. 2018: ``F = ewc_decay * F + F_round``); the parameters are
    anchored where they are. Each later step adds ``ewc_lambda / 2 * sum(F * (theta - anchor)^2)``.

    Only the trainable parameters have importances (Avalanche's EWC keeps one for every parameter of
    the frozen base model too). Head rows added after an anchor was taken have no importance yet: the
    penalty covers the rows the anchor has.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.ewc_rounds = 0

    def extra_loss(
        self, learner: Learner | None, texts: Sequence[str], logits: torch.Tensor
    ) -> torch.Tensor | None:
        return total(self._penalty(learner), super().extra_loss(learner, texts, logits))

    def _penalty(self, learner: Learner | None) -> torch.Tensor | None:
        if learner is None or not self.importance or self.settings.ewc_lambda == 0:
            return None
        parameters = learner.named_parameters()
        total = torch.zeros(())
        for name, importance in self.importance.items():
            moved = _leading(parameters[name], importance.shape) - self.anchor[name]
            total = total + (importance * moved.pow(2)).sum()
        return self.settings.ewc_lambda / 2 * total

    def after_round(self, learner: Learner | None, examples: Sequence[Example]) -> None:
        super().after_round(learner, examples)
        if learner is None or not examples:
            return
        self.ewc_rounds += 1
        fisher = self._fisher(learner, examples)
        for name, value in fisher.items():
            old = self.importance.get(name)
            if old is not None:
                value = value + self.settings.ewc_decay * _padded(old, value.shape)
            self.importance[name] = value
        self.anchor = {name: p.detach().clone() for name, p in learner.named_parameters().items()}

    def _fisher(self, learner: Learner, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """The diagonal Fisher information on up to ``ewc_fisher_examples`` of the round's examples,
        of labels drawn from the learner's own prediction (``service.fisher``; Avalanche's estimate,
        squared mini-batch gradients of the loss on the true labels, vanishes wherever the model
        already fits its data, which is exactly where the weights matter)."""
        rng = random.Random(self.settings.seed * 104_729 + self.ewc_rounds)
        sample = rng.sample(list(examples), min(len(examples), self.settings.ewc_fisher_examples))
        draws = torch.Generator().manual_seed(self.settings.seed * 104_729 + self.ewc_rounds)

        def log_probabilities(texts: list[str]) -> torch.Tensor:
            return functional.log_softmax(learner.logits(texts), dim=-1)

        size = self.settings.batch_size
        batches = (
            partial(log_probabilities, [text for text, _ in sample[start : start + size]])
            for start in range(0, len(sample), size)
        )
        return drawn_fisher(learner.named_parameters(), batches, len(sample), draws)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for name, value in self.importance.items():
            state[f"ewc.importance.{name}"] = value
            state[f"ewc.anchor.{name}"] = self.anchor[name]
        state["ewc.rounds"] = self.ewc_rounds
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        prefix = "ewc.importance."
        self.importance = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        self.anchor = {name: state[f"ewc.anchor.{name}"] for name in self.importance}
        self.ewc_rounds = int(state.get("ewc.rounds", 0))


def _leading(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The part of ``tensor`` an older, smaller ``shape`` covers (a head before it grew)."""
    return tensor[tuple(slice(0, n) for n in shape)]


def _padded(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``tensor`` zero-padded to a grown ``shape``."""
    out = torch.zeros(shape, dtype=tensor.dtype)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out
