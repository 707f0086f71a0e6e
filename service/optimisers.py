"""The adapters' optimisers: one AdamW per adapter (its LoRA weights and its head at their own rates),
made on the adapter's first step, stepped at a rate the round's schedule sets, and saved with the
checkpoint (moments, step counts and torch's generator) so that a restarted trainer goes on exactly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from service.model import AdapterModel
from service.settings import Settings

#: Key prefix of the optimisers' moments in the learner file, and the key of torch's generator state.
OPTIMIZER_PREFIX = "optimizer."
RNG_STATE = "rng.torch"


class Optimisers:
    """Every adapter's AdamW; an adapter's is made again after its head grew (new parameters)."""

    def __init__(self, settings: Settings, model: AdapterModel) -> None:
        self.settings = settings
        self.model = model
        self._by_adapter: dict[str, torch.optim.Optimizer] = {}

    def at_rate(self, adapter: str, rate: float) -> torch.optim.Optimizer:
        """The adapter's optimiser with its learning rates at ``rate`` times the set ones (and, in its
        first ``warmup_steps`` steps, that times a linear warm-up)."""
        optimizer = self._by_adapter.get(adapter)
        if optimizer is None:
            # No requires_grad to set: the forward pass activates the adapter, which makes it trainable.
            lora, head = self.model.parameters(adapter)
            optimizer = self._by_adapter[adapter] = torch.optim.AdamW(
                [{"params": lora}, {"params": head}], lr=self.settings.learning_rate, weight_decay=0.01
            )
        rates = (self.settings.learning_rate, self.settings.head_learning_rate)
        warmup = self.settings.warmup_steps
        if warmup:
            # AdamW's own step count: saved with the checkpoint, and back to 0 with fresh moments
            # (a new adapter, or a head that grew), which are what a warm-up protects.
            rate *= min(1.0, (_steps_taken(optimizer) + 1) / warmup)
        for group, base in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = base * rate
        return optimizer

    def forget(self, adapter: str) -> None:
        """Drop the adapter's optimiser (its parameters were replaced)."""
        self._by_adapter.pop(adapter, None)

    def decay(self, steps: int) -> Iterator[float]:
        """The rate of each of ``steps`` scheduled steps: 1 throughout, or down linearly to 1/steps."""
        for step in range(steps):
            yield 1.0 if self.settings.learning_rate_decay == "none" else (steps - step) / steps

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What a restarted trainer needs to go on exactly where this one is: every optimiser's state
        (AdamW's moments and step counts) and torch's generator (the next dropout masks)."""
        adapters = list(self._by_adapter)
        plain: dict[str, Any] = {"adapters": adapters, "param_groups": []}
        tensors = {RNG_STATE: torch.get_rng_state()}
        for a, adapter in enumerate(adapters):
            saved = self._by_adapter[adapter].state_dict()
            plain["param_groups"].append(saved["param_groups"])
            for parameter, values in saved["state"].items():
                for key, value in values.items():
                    tensors[f"{OPTIMIZER_PREFIX}{a}.{parameter}.{key}"] = value.contiguous()
        return plain, tensors

    def restore(self, plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Put back what ``state`` returned (after the adapters themselves are back)."""
        for a, (adapter, groups) in enumerate(zip(plain["adapters"], plain["param_groups"], strict=True)):
            state: dict[int, dict[str, torch.Tensor]] = {}
            for name, value in unprefixed(tensors, f"{OPTIMIZER_PREFIX}{a}.").items():
                parameter, key = name.split(".", 1)
                state.setdefault(int(parameter), {})[key] = value
            self.forget(adapter)
            self.at_rate(adapter, 1.0).load_state_dict({"state": state, "param_groups": groups})
        if RNG_STATE in tensors:
            torch.set_rng_state(tensors[RNG_STATE])


def _steps_taken(optimizer: torch.optim.Optimizer) -> int:
    """How many steps the optimiser has taken (0 before its first)."""
    for state in optimizer.state.values():
        return int(state["step"])
    return 0


def unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose keys start with ``prefix``, keyed without it."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
