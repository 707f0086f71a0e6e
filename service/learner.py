"""The shared learner: one LoRA adapter and one head over every label of every task.

Strategies that share parameters across tasks (naive, replay, EWC, LwF, joint) all train this one
classifier. Its outputs are *columns*, one per (task, label) pair in the order they were first seen;
a task's published version is the shared adapter with the head rows of that task's columns, so the
registry, serving and rollback treat it like any other version. Strategies see the learner through
this class only: its trainable parameters by name, its logits, and frozen snapshots of itself
(what LwF distils from).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from service.model import AdapterModel

#: The adapter every shared-parameter strategy trains (a name no task can take: tasks are validated).
SHARED_ADAPTER = "_shared"


class Learner:
    """One adapter of an ``AdapterModel`` seen as a classifier over columns."""

    def __init__(self, model: AdapterModel, adapter: str = SHARED_ADAPTER) -> None:
        self.model = model
        self.adapter = adapter
        #: Columns that belong to a label seen so far (the head may have spare outputs).
        self.in_use = 0

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by name; look them up each time (a growing head is replaced)."""
        return self.model.named_parameters(self.adapter)

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """Outputs of the columns in use for ``texts``, with gradients (the caller picks the mode)."""
        return self.model.logits(self.adapter, texts)[:, : max(self.in_use, 1)]

    def snapshot(self, name: str) -> None:
        """Freeze a copy of the learner as it is now under ``name`` (replacing an older one)."""
        self.model.remove(name)
        self.model.load(name, self.model.weights(self.adapter))

    def frozen_logits(self, name: str, texts: Sequence[str]) -> torch.Tensor:
        """Outputs of the snapshot ``name``: no gradients, no dropout; the learner stays active."""
        return self.model.frozen_logits(name, texts, restore=self.adapter)
