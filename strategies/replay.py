"""Experience replay: a bounded memory of past examples, replayed beside every step's new ones."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from strategies.base import Example, Strategy, register

if TYPE_CHECKING:
    from avalanche.training.storage_policy import ReservoirSamplingBuffer

    from service.learner import Learner
    from service.settings import Settings


@register("replay")
class Replay(Strategy):
    """Keeps ``replay_memory_size`` examples, evenly per label (Avalanche's ``ClassBalancedBuffer``:
    one reservoir per label, so every label keeps a uniform sample of its stream), and adds as many
    remembered examples as a step has new ones (1:1 experience replay).

    The memory is updated after each round with that round's examples, so a round replays what came
    before it. It is persisted with the checkpoint (texts and reservoir weights), so a restarted
    trainer replays exactly the same memory.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        # Imported here: Avalanche takes seconds to import, and only strategies that use it should pay.
        from avalanche.training.storage_policy import ClassBalancedBuffer

        self.buffer = ClassBalancedBuffer(settings.replay_memory_size, adaptive_size=True)
        #: The buffer's content, flat, to sample from cheaply (rebuilt after every update).
        self.memory: list[Example] = []
        #: Rounds and steps so far: each draw gets its own seed, so a restart draws the same examples.
        #: (Named per strategy: combined with EWC in one object, a shared name would count twice.)
        self.replay_rounds = 0
        self.draws = 0

    def replay(self, count: int) -> list[Example]:
        replayed = super().replay(count)
        if self.memory and count > 0:
            rng = random.Random(self.settings.seed * 1_000_003 + self.draws)
            replayed += rng.sample(self.memory, min(count, len(self.memory)))
            self.draws += 1
        return replayed

    def after_round(self, learner: Learner | None, examples: Sequence[Example]) -> None:
        super().after_round(learner, examples)
        if not examples:
            return
        self.replay_rounds += 1
        # The reservoirs draw their weights from torch's generator; a seed per round keeps it repeatable.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.settings.seed * 7919 + self.replay_rounds)
            self.buffer.update_from_dataset(_dataset(examples))
        self._flatten()

    def _flatten(self) -> None:
        """Rebuild each reservoir on a flat dataset (Avalanche nests subsets per update) and the memory."""
        self.memory = []
        for group in self.buffer.buffer_groups.values():
            rows = _rows(group)
            group.buffer = _dataset(rows)
            self.memory.extend(rows)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        groups = {
            str(label): {
                "size": group.max_size,
                "examples": [[text, column] for text, column in _rows(group)],
                "weights": group._buffer_weights.tolist(),
            }
            for label, group in self.buffer.buffer_groups.items()
        }
        state["replay"] = {"groups": groups, "rounds": self.replay_rounds, "draws": self.draws}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state.get("replay")
        if saved is None:
            return
        from avalanche.training.storage_policy import ReservoirSamplingBuffer

        self.replay_rounds, self.draws = int(saved["rounds"]), int(saved["draws"])
        self.buffer.buffer_groups = {}
        for label, group in saved["groups"].items():
            reservoir = ReservoirSamplingBuffer(int(group["size"]))
            reservoir.buffer = _dataset([(str(text), int(column)) for text, column in group["examples"]])
            reservoir._buffer_weights = torch.tensor(group["weights"], dtype=torch.float32)
            self.buffer.buffer_groups[int(label)] = reservoir
        self.buffer.seen_classes = set(self.buffer.buffer_groups)
        self._flatten()


class _Examples(Dataset[Example]):
    def __init__(self, rows: Sequence[Example]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Example:
        return self.rows[index]


def _dataset(rows: Sequence[Example]) -> Any:
    """An Avalanche classification dataset of (text, column) examples, targets = columns."""
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset

    return _make_taskaware_classification_dataset(
        _Examples(rows), targets=[column for _, column in rows], task_labels=0
    )


def _rows(group: ReservoirSamplingBuffer) -> list[Example]:
    return [(str(group.buffer[i][0]), int(group.buffer[i][1])) for i in range(len(group.buffer))]
