"""How generative tasks share the language model: what each one trains, and which earlier pairs each
step carries beside its own (``generative_strategy``; the classifiers' ``strategy`` is separate: the
two kinds learn on different models).

- ``lora-per-task`` (default): a LoRA adapter per task; nothing is shared, so nothing is forgotten.
- ``naive``: one adapter for every task, trained on each round's new pairs alone (what forgetting
  looks like: the baseline the others are measured against).
- ``replay``: one adapter; every step's batch carries, beside its new pairs, half as many drawn from a
  reservoir of the earlier pairs (a uniform sample of every train pair seen, ``replay_memory_size``).
- ``joint``: one adapter, trained each round on every train pair seen so far (the upper bound of a
  shared adapter, at a cost that grows with the stream).

With a shared adapter every task's version is that adapter as trained when the version was made.
"""

from __future__ import annotations

import random
from typing import Any, get_args

from service.generative import Pair
from service.generative_settings import GenerativeSettings

GENERATIVE_STRATEGIES: tuple[str, ...] = get_args(
    GenerativeSettings.model_fields["generative_strategy"].annotation
)
#: The one adapter of the shared strategies (a task name cannot start with "_").
SHARED_ADAPTER = "_shared"


class GenerativeStrategy:
    """The adapter a task trains, the pairs a round trains on, and the memory of earlier pairs."""

    def __init__(self, name: str, memory_size: int) -> None:
        if name not in GENERATIVE_STRATEGIES:
            raise ValueError(f"generative_strategy {name!r} is not one of {', '.join(GENERATIVE_STRATEGIES)}")
        self.name = name
        self.memory_size = memory_size
        #: ``replay``: a uniform sample of the train pairs seen (reservoir sampling), and how many were.
        self.reservoir: list[Pair] = []
        self.offered = 0
        #: ``joint``: every train pair seen.
        self.seen: list[Pair] = []

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

    def remember(self, new: dict[str, list[Pair]], rng: random.Random) -> None:
        """After a round: its new train pairs join the memory."""
        for pair in (pair for pairs in new.values() for pair in pairs):
            if self.name == "joint":
                self.seen.append(pair)
            elif self.name == "replay":
                self.offered += 1
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
