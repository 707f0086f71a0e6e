"""The interface every strategy implements, and the name → class registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from service.settings import STRATEGIES, Settings

if TYPE_CHECKING:  # the learner brings the model stack; strategies only need its type here
    from service.learner import Learner

_REGISTRY: dict[str, type[Strategy]] = {}

#: A training example of the shared learner: (text, column of its task's label).
Example = tuple[str, int]


class Strategy:
    """Hooks the trainer calls around learning; each returns values instead of reaching into the trainer.

    The defaults do nothing, so a strategy overrides only what it changes. Strategies that share
    parameters across tasks get the shared ``Learner`` (one adapter, one head over every task's
    labels) in the hooks that need the model; ``Example`` columns index that head.
    """

    name: ClassVar[str]
    #: True when learning one task can never change another task's predictions (one adapter and head
    #: per task). The trainer then re-evaluates only the tasks a round touched: the others' accuracy
    #: is unchanged by construction, not estimated. False: every task shares one learner.
    isolates_tasks: ClassVar[bool] = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def before_task(self, task: str) -> None:
        """Called once, when the first record of a task the trainer has not seen arrives."""

    def before_round(self, learner: Learner | None) -> None:
        """Called before a round's first training step (``learner`` is None for isolated tasks)."""

    def replay(self, count: int) -> list[Example]:
        """Up to ``count`` remembered examples to train on beside a step's new ones."""
        return []

    def rehearsal(self, examples: Sequence[Example]) -> list[Example]:
        """What the round's further epochs train on, given the round's new examples."""
        return list(examples)

    def extra_loss(
        self, learner: Learner | None, texts: Sequence[str], logits: torch.Tensor
    ) -> torch.Tensor | None:
        """A term added to the cross-entropy loss of one training step, or None."""
        return None

    def after_round(self, learner: Learner | None, examples: Sequence[Example]) -> None:
        """Called after a round's training steps with its new examples, before evaluation."""

    def state_dict(self) -> dict[str, Any]:
        """State to persist with the checkpoint: tensors, and JSON-serialisable values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""


def total(*terms: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of the loss terms that are not None (None if all are): combines strategies' extra losses."""
    present = [term for term in terms if term is not None]
    return sum(present[1:], present[0]) if present else None


def register(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: make a strategy selectable by ``name`` in settings."""

    def decorate(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is registered twice")
        if name not in STRATEGIES:
            # The settings validate names without importing strategies; they must know every one.
            raise ValueError(f"strategy {name!r} is not among the names settings accept: {STRATEGIES}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered() -> dict[str, type[Strategy]]:
    """Every registered strategy by name."""
    return dict(_REGISTRY)


def create(name: str, settings: Settings) -> Strategy:
    """A fresh instance of the strategy registered as ``name``."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None
    return cls(settings)
