"""How generative tasks share the language model: what each one trains, and which earlier pairs each
step carries beside its own (``generative_strategy``; the classifiers' ``strategy`` is separate: the
two kinds learn on different models).

- ``lora-per-task`` (default): a LoRA adapter per task; nothing is shared, so nothing is forgotten.
- ``naive``: one adapter for every task, trained on each round's new pairs alone (what forgetting
  looks like: the baseline the others are measured against).
- ``replay``: one adapter; every step's batch carries, beside its new pairs, half as many drawn from a
  reservoir of the earlier pairs (a uniform sample of every train pair seen, ``replay_memory_size``).
- ``ewc``: one adapter, trained on the new pairs alone, every step paying online EWC's penalty for
  moving the weights earlier rounds found important (``service.generative_regularisers``).
- ``lwf``: one adapter, trained on the new pairs alone, every step distilled towards the answers the
  adapter gave the new prompts before the round (LwF, ``service.generative_regularisers``).
- ``joint``: one adapter, trained each round on every train pair seen so far (the upper bound of a
  shared adapter, at a cost that grows with the stream).

With a shared adapter every task's version is that adapter as trained when the version was made.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, get_args

import torch

from service.generative import GenerativeAdapters, Pair
from service.generative_regularisers import GeneralDistillation, GenerativeEWC, GenerativeLwF, Regulariser
from service.generative_settings import GenerativeSettings

if TYPE_CHECKING:
    from service.settings import Settings

GENERATIVE_STRATEGIES: tuple[str, ...] = get_args(
    GenerativeSettings.model_fields["generative_strategy"].annotation
)
#: The one adapter of the shared strategies (a task name cannot start with "_").
SHARED_ADAPTER = "_shared"
#: The strategies whose steps pay a regulariser's term.
REGULARISED = ("ewc", "lwf")


class GenerativeStrategy:
    """The adapter a task trains, the pairs a round trains on, and the memory of earlier pairs."""

    def __init__(self, name: str, memory_size: int, regulariser: Regulariser | None = None) -> None:
        """``regulariser``: the term of ``ewc`` and ``lwf`` (``for_settings`` builds it)."""
        if name not in GENERATIVE_STRATEGIES:
            raise ValueError(f"generative_strategy {name!r} is not one of {', '.join(GENERATIVE_STRATEGIES)}")
        if (regulariser is not None) != (name in REGULARISED):
            needs = "needs a" if name in REGULARISED else "takes no"
            raise ValueError(f"generative_strategy {name!r} {needs} regulariser")
        self.name = name
        self.regulariser = regulariser
        self.memory_size = memory_size
        #: ``replay``: a uniform sample of the train pairs seen (reservoir sampling), and how many were.
        self.reservoir: list[Pair] = []
        self.offered = 0
        #: ``joint``: every train pair seen.
        self.seen: list[Pair] = []

    @classmethod
    def for_settings(cls, settings: Settings) -> GenerativeStrategy:
        """The strategy ``settings`` name, with its regulariser's knobs."""
        regulariser: Regulariser | None = None
        if settings.generative_strategy == "ewc":
            regulariser = GenerativeEWC(
                settings.generative_ewc_lambda,
                settings.ewc_decay,
                settings.ewc_fisher_examples,
                settings.generative_batch_size,
            )
        elif settings.generative_strategy == "lwf":
            regulariser = GenerativeLwF(settings.generative_lwf_alpha, settings.lwf_temperature)
        return cls(settings.generative_strategy, settings.replay_memory_size, regulariser)

    @property
    def isolates_tasks(self) -> bool:
        """Whether each task trains an adapter of its own."""
        return self.name == "lora-per-task"

    def adapter(self, task: str) -> str:
        """The adapter ``task`` trains and answers with."""
        return task if self.isolates_tasks else SHARED_ADAPTER

    def rounds_pairs(self, new: dict[str, list[Pair]]) -> dict[str, list[Pair]]:
        """Per adapter, the pairs this round trains on (new ones in task order; ``joint``: every one)."""
        if self.isolates_tasks:
            return {task: pairs for task, pairs in new.items() if pairs}
        fresh = [pair for pairs in new.values() for pair in pairs]
        trained = self.seen + fresh if self.name == "joint" else fresh
        return {SHARED_ADAPTER: trained} if fresh else {}

    def replayed(self, batch_size: int, rng: random.Random) -> list[Pair]:
        """``replay``: the earlier pairs a step carries beside ``batch_size`` new ones."""
        if self.name != "replay" or not self.reservoir:
            return []
        return rng.sample(self.reservoir, min(len(self.reservoir), max(1, batch_size // 2)))

    def train(
        self,
        adapters: GenerativeAdapters,
        adapter: str,
        pairs: list[Pair],
        epochs: int,
        batch_size: int,
        rng: random.Random,
        general: list[Pair] | None = None,
        general_per_step: int = 0,
        distilled_per_step: int = 0,
        distilled_strength: float = 1.0,
        between_steps: Callable[[], None] = lambda: None,
    ) -> float:
        """One round of ``adapter``: ``epochs`` over ``pairs``, each step's batch carrying the earlier
        pairs ``replayed`` and ``general_per_step`` of ``general`` (the model's own answers,
        ``service.general_anchor``), each step paying the regulariser's term and keeping the model's
        distributions on ``distilled_per_step`` of ``general`` (``GeneralDistillation``, weighed by
        ``distilled_strength``); the mean loss. ``pairs`` is shuffled in place, once per epoch."""
        general = general or []
        regularisers: list[Regulariser] = [] if self.regulariser is None else [self.regulariser]
        if distilled_per_step and general:
            kept = GeneralDistillation(general, distilled_per_step, distilled_strength, rng.getrandbits(32))
            regularisers.append(kept)
        for regulariser in regularisers:
            regulariser.before_training(adapters, adapter)
        losses = []
        for _ in range(epochs):
            rng.shuffle(pairs)
            for start in range(0, len(pairs), batch_size):
                batch = pairs[start : start + batch_size]
                batch += self.replayed(len(batch), rng)
                batch += rng.sample(general, min(general_per_step, len(general)))
                losses.append(adapters.step(adapter, batch, regularisers))
                between_steps()
        for regulariser in regularisers:
            regulariser.after_training(adapters, adapter, pairs, rng)
        return sum(losses) / len(losses)

    def remember(self, new: dict[str, list[Pair]], rng: random.Random) -> None:
        """After a round: its new train pairs join the memory."""
        for pair in (pair for pairs in new.values() for pair in pairs):
            self.offered += 1
            if self.name == "joint":
                self.seen.append(pair)
            elif self.name == "replay":
                if len(self.reservoir) < self.memory_size:
                    self.reservoir.append(pair)
                elif (slot := rng.randrange(self.offered)) < self.memory_size:
                    self.reservoir[slot] = pair

    def saved(self) -> dict[str, Any]:
        """The checkpoint's part (pairs as [prompt, response])."""
        return {
            "name": self.name,
            "reservoir": [[p.prompt, p.response] for p in self.reservoir],
            "offered": self.offered,
            "seen": [[p.prompt, p.response] for p in self.seen],
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Put back what ``saved`` returned; a checkpoint of another strategy is refused."""
        if saved and saved.get("name", self.name) != self.name:
            raise ValueError(
                f"the registry's generative tasks were learned with generative_strategy {saved['name']!r}, "
                f"not {self.name!r}; use another registry_dir"
            )
        self.reservoir = [Pair(str(p), str(r)) for p, r in saved.get("reservoir", [])]
        self.offered = int(saved.get("offered", 0))
        self.seen = [Pair(str(p), str(r)) for p, r in saved.get("seen", [])]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The regulariser's tensors for the trainer's learner file."""
        return self.regulariser.tensors() if self.regulariser is not None else {}

    def restore_tensors(self, tensors: dict[str, torch.Tensor], adapters: GenerativeAdapters) -> None:
        """Put back the regulariser's tensors, once the shared adapter is loaded as checkpointed."""
        if self.regulariser is not None:
            self.regulariser.restore(tensors, adapters, SHARED_ADAPTER)
