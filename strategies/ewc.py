"""Online elastic weight consolidation on the shared learner's trainable parameters."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional

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
        """The diagonal Fisher information on up to ``ewc_fisher_examples`` of the round's examples.

        The Fisher proper: squared gradients of log p(y|x) with y drawn from the learner's own
        prediction. (Squared mini-batch gradients of the loss on the true labels, Avalanche's estimate,
        vanish wherever the model already fits its data, which is exactly where the weights matter.)
        It is estimated a mini-batch at a time without per-example passes: with y drawn from the model
        each example's score has mean zero, so the cross terms of the squared summed gradient vanish in
        expectation and ``(sum of gradients)^2 / batch`` is an unbiased estimate of the per-example mean.
        """
        rng = random.Random(self.settings.seed * 104_729 + self.ewc_rounds)
        sample = rng.sample(list(examples), min(len(examples), self.settings.ewc_fisher_examples))
        draws = torch.Generator().manual_seed(self.settings.seed * 104_729 + self.ewc_rounds)
        parameters = learner.named_parameters()
        fisher = {name: torch.zeros_like(p) for name, p in parameters.items()}
        size = self.settings.batch_size
        for start in range(0, len(sample), size):
            batch = [text for text, _ in sample[start : start + size]]
            for p in parameters.values():
                p.grad = None
            log_p = functional.log_softmax(learner.logits(batch), dim=-1)
            drawn = torch.multinomial(log_p.detach().exp(), 1, generator=draws)
            log_p.gather(1, drawn).sum().backward()
            for name, p in parameters.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach().pow(2) / len(sample)
        for p in parameters.values():
            p.grad = None
        return fisher

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
