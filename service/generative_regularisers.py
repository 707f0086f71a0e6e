"""What keeps a shared generative adapter near what earlier tasks taught it: EWC and LwF on a causal
language model (``generative_strategy`` ``ewc`` and ``lwf``, ``service.generative_strategy``).

Both add a term to a training step's loss (``service.generative.GenerativeAdapters.step``), as the
classifiers' ``strategies.ewc`` and ``strategies.lwf`` do on their learner:

- ``GenerativeEWC``: online EWC (Schwarz et al. 2018). After each round the diagonal Fisher
  information of the adapter's weights is estimated on the round's pairs and folded into a running
  importance; every later step pays ``strength / 2 * sum(F * (w - w_anchor)^2)``, the anchor being the
  weights the round ended with.
- ``GenerativeLwF``: Learning without Forgetting (Li and Hoiem 2017). At a round's start the shared
  adapter, as the earlier rounds left it, becomes a frozen teacher; every step pays ``alpha * T^2 *
  KL(teacher || student)`` of the temperature-softened next-token distributions at the answer
  positions of the step's pairs, so the adapter keeps answering the new prompts as it did while it
  learns the new answers.

And one for every strategy, lora-per-task included: ``GeneralDistillation`` keeps what the language
model could do before any task (``generative_keep_general``). Each step also runs a few general
instructions with the model's own answers (``service.general_anchor``) through the adapter and pays
``strength * KL(model alone || adapter)`` of the next-token distributions over all their tokens: the adapter
learns its task while its distribution on everything else stays the model's (the teacher is the
model with adapters disabled, so it costs no weights). Training on the model's greedy answers as
labels instead (``generative_anchor_pairs``) sharpens that distribution rather than keeping it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch.nn import functional

from service.fisher import drawn_fisher
from service.generative import IGNORED, GenerativeAdapters, Pair

#: The teacher adapter of LwF (a task name cannot start with "_").
TEACHER_ADAPTER = "_teacher"
#: Prefix of the EWC importance tensors in the trainer's learner file.
IMPORTANCE = "generative.ewc.importance."


class Regulariser:
    """A term added to every training step of an adapter (a ``service.generative.StepTerm``), and what
    it keeps between rounds; each hook does nothing unless a regulariser needs it."""

    def before_training(self, adapters: GenerativeAdapters, adapter: str) -> None:
        """A round's training of ``adapter`` starts."""

    def prepare(
        self, adapters: GenerativeAdapters, adapter: str, ids: torch.Tensor, mask: torch.Tensor
    ) -> Any:
        """What the step's term needs from outside the step's own forward (run before it)."""
        return None

    def loss(
        self,
        adapters: GenerativeAdapters,
        adapter: str,
        logits: torch.Tensor,
        labels: torch.Tensor,
        prepared: Any,
    ) -> torch.Tensor | None:
        """The term a step adds to its loss (None: nothing yet)."""
        return None

    def after_training(
        self, adapters: GenerativeAdapters, adapter: str, pairs: Sequence[Pair], rng: random.Random
    ) -> None:
        """A round's training of ``adapter`` on ``pairs`` ended."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a restart needs back, as named tensors for the trainer's learner file."""
        return {}

    def restore(self, tensors: dict[str, torch.Tensor], adapters: GenerativeAdapters, adapter: str) -> None:
        """Put back what ``tensors`` returned, ``adapter`` being loaded as the last round left it."""


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where, in a batch's logits, the next token is an answer's (the positions the loss is on)."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORED
    return positions


class GenerativeEWC(Regulariser):
    """Online EWC on the shared adapter's LoRA weights."""

    def __init__(self, strength: float, decay: float, fisher_pairs: int, batch_size: int) -> None:
        self.strength = strength
        self.decay = decay
        self.fisher_pairs = fisher_pairs
        self.batch_size = batch_size
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.rounds = 0

    def loss(
        self,
        adapters: GenerativeAdapters,
        adapter: str,
        logits: torch.Tensor,
        labels: torch.Tensor,
        prepared: Any,
    ) -> torch.Tensor | None:
        if not self.importance:
            return None
        penalty = sum(
            (self.importance[name] * (weight - self.anchor[name]).pow(2)).sum()
            for name, weight in adapters.parameters(adapter).items()
            if name in self.importance
        )
        return self.strength / 2 * torch.as_tensor(penalty)

    def after_training(
        self, adapters: GenerativeAdapters, adapter: str, pairs: Sequence[Pair], rng: random.Random
    ) -> None:
        fisher = self._fisher(adapters, adapter, pairs)
        for name, value in fisher.items():
            old = self.importance.get(name)
            self.importance[name] = value if old is None else value + self.decay * old
        self.anchor = {name: p.detach().clone() for name, p in adapters.parameters(adapter).items()}
        self.rounds += 1

    def _fisher(
        self, adapters: GenerativeAdapters, adapter: str, pairs: Sequence[Pair]
    ) -> dict[str, torch.Tensor]:
        """The diagonal Fisher information on up to ``fisher_pairs`` of the round's pairs, of answer
        tokens drawn from the adapter's own next-token distributions (``service.fisher``)."""
        rng = random.Random(104_729 + self.rounds)
        sample = rng.sample(list(pairs), min(len(pairs), self.fisher_pairs))
        draws = torch.Generator().manual_seed(104_729 + self.rounds)

        def log_probabilities(rows: list[Pair]) -> torch.Tensor:
            ids, mask, labels = adapters.batch(rows)
            with adapters.using(adapter) as model:
                logits = model(input_ids=ids, attention_mask=mask).logits
            return functional.log_softmax(logits[answer_positions(labels)], dim=-1)

        batches = (
            partial(log_probabilities, sample[start : start + self.batch_size])
            for start in range(0, len(sample), self.batch_size)
        )
        return drawn_fisher(adapters.parameters(adapter), batches, len(sample), draws)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {IMPORTANCE + name: value for name, value in self.importance.items()}

    def restore(self, tensors: dict[str, torch.Tensor], adapters: GenerativeAdapters, adapter: str) -> None:
        self.importance = {
            k.removeprefix(IMPORTANCE): v for k, v in tensors.items() if k.startswith(IMPORTANCE)
        }
        if self.importance:
            # The checkpoint's shared adapter is the one the last round ended with: the anchor.
            self.anchor = {name: p.detach().clone() for name, p in adapters.parameters(adapter).items()}


def divergence(
    teacher: torch.Tensor, student: torch.Tensor, at: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean ``KL(teacher || student)`` of the temperature-softened next-token distributions over the
    positions ``at``."""
    wanted = functional.log_softmax(teacher[at] / temperature, dim=-1)
    got = functional.log_softmax(student[at] / temperature, dim=-1)
    return functional.kl_div(got, wanted, log_target=True, reduction="batchmean")


class GenerativeLwF(Regulariser):
    """LwF on the shared adapter: the adapter as earlier rounds left it teaches the new round."""

    def __init__(self, alpha: float, temperature: float) -> None:
        self.alpha = alpha
        self.temperature = temperature
        #: Whether the shared adapter has been trained yet (a fresh one has nothing to teach).
        self.trained = False

    def before_training(self, adapters: GenerativeAdapters, adapter: str) -> None:
        adapters.remove(TEACHER_ADAPTER)
        if self.trained:
            adapters.add(TEACHER_ADAPTER, adapters.weights(adapter))

    def prepare(
        self, adapters: GenerativeAdapters, adapter: str, ids: torch.Tensor, mask: torch.Tensor
    ) -> Any:
        if TEACHER_ADAPTER not in adapters.names():
            return None
        with torch.no_grad(), adapters.using(TEACHER_ADAPTER) as model:
            return model(input_ids=ids, attention_mask=mask).logits

    def loss(
        self,
        adapters: GenerativeAdapters,
        adapter: str,
        logits: torch.Tensor,
        labels: torch.Tensor,
        prepared: Any,
    ) -> torch.Tensor | None:
        if prepared is None:
            return None
        t = self.temperature
        return self.alpha * t * t * divergence(prepared, logits, answer_positions(labels), t)

    def after_training(
        self, adapters: GenerativeAdapters, adapter: str, pairs: Sequence[Pair], rng: random.Random
    ) -> None:
        adapters.remove(TEACHER_ADAPTER)
        self.trained = True

    def restore(self, tensors: dict[str, torch.Tensor], adapters: GenerativeAdapters, adapter: str) -> None:
        self.trained = adapter in adapters.names()


class GeneralDistillation(Regulariser):
    """The model's own next-token distributions on general instructions, kept by every step."""

    def __init__(self, general: Sequence[Pair], per_step: int, strength: float, seed: int = 0) -> None:
        """``general``: instructions with the model's own answers; ``per_step`` of them a step, their
        divergence weighed by ``strength``."""
        self.general = list(general)
        self.per_step = per_step
        self.strength = strength
        self.rng = random.Random(seed)

    def prepare(
        self, adapters: GenerativeAdapters, adapter: str, ids: torch.Tensor, mask: torch.Tensor
    ) -> Any:
        if not self.general or not self.per_step:
            return None
        rows = self.rng.sample(self.general, min(self.per_step, len(self.general)))
        general_ids, general_mask, _ = adapters.batch(rows)
        with torch.no_grad(), adapters.using(None) as model:
            wanted = model(input_ids=general_ids, attention_mask=general_mask).logits
        return general_ids, general_mask, wanted

    def loss(
        self,
        adapters: GenerativeAdapters,
        adapter: str,
        logits: torch.Tensor,
        labels: torch.Tensor,
        prepared: Any,
    ) -> torch.Tensor | None:
        if prepared is None:
            return None
        general_ids, general_mask, wanted = prepared
        with adapters.using(adapter) as model:  # still in the step's training mode
            got = model(input_ids=general_ids, attention_mask=general_mask).logits
        return self.strength * divergence(wanted, got, general_mask.bool())


@torch.no_grad()
def general_divergence(adapters: GenerativeAdapters, adapter: str, general: Sequence[Pair]) -> float:
    """Mean ``KL(model alone || adapter)`` over every token of ``general`` (instructions and the model's
    own answers): how far ``adapter`` moved the model's distribution on them (0: not at all)."""
    if not general:
        return 0.0
    ids, mask, _ = adapters.batch(general)
    with adapters.using(None) as model:
        wanted = model(input_ids=ids, attention_mask=mask).logits
    with adapters.using(adapter) as model:
        got = model(input_ids=ids, attention_mask=mask).logits
    return float(divergence(wanted, got, mask.bool()))
