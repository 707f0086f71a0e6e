"""The interface every strategy implements, and the name → class registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

_REGISTRY: dict[str, type[Strategy]] = {}


class Strategy:
    """Hooks the trainer calls around learning; each returns values instead of reaching into the trainer.

    The defaults do nothing, so a strategy overrides only what it changes.
    """

    name: ClassVar[str]
    #: True when learning one task can never change another task's predictions (one adapter and head
    #: per task). The trainer then re-evaluates only the tasks a round touched: the others' accuracy
    #: is unchanged by construction, not estimated.
    isolates_tasks: ClassVar[bool] = False

    def before_task(self, task: str) -> None:
        """Called once, when the first record of a task the trainer has not seen arrives."""

    def extra_loss(self, task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """A term added to the cross-entropy loss of one training step, or None."""
        return None

    def after_round(self, trained_tasks: list[str]) -> None:
        """Called after a round's training steps, before evaluation and publishing."""

    def state_dict(self) -> dict[str, Any]:
        """State to persist with the checkpoint (JSON-serialisable or tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""


def register(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: make a strategy selectable by ``name`` in settings."""

    def decorate(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered() -> dict[str, type[Strategy]]:
    """Every registered strategy by name."""
    return dict(_REGISTRY)


def create(name: str) -> Strategy:
    """A fresh instance of the strategy registered as ``name``."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None
