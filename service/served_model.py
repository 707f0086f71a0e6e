"""The model a server answers with: the frozen base encoder, every loaded adapter's LoRA weights in a
``LoraBank``, and each adapter's head.

It reads the weights files the trainer's ``AdapterModel`` writes and answers as that model does (to
float rounding), but a batch runs every row through its own adapter in one forward, and loading or
unloading an adapter costs the same with 1 or 1,000 loaded. Not thread-safe: the inference engine's
thread is the only one that uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from service.lora_bank import LoraBank
from service.model import HEAD_PREFIX, LORA_PREFIX, LoraSpec, load_frozen_base, lora_spec, mean_pool
from service.settings import Settings


class ServedModel:
    """A frozen base encoder with banked LoRA adapters and per-adapter linear heads."""

    def __init__(self, base_path: Path, lora: LoraSpec, max_length: int) -> None:
        self.max_length = max_length
        self.tokenizer, encoder = load_frozen_base(base_path)
        self.bank = LoraBank(encoder, lora.target_modules, lora.r, lora.alpha)
        self.encoder = encoder
        self.heads: dict[str, nn.Linear] = {}
        self.hidden_size = int(encoder.config.hidden_size)

    def names(self) -> list[str]:
        """The adapters loaded."""
        return list(self.heads)

    def load(self, name: str, weights: dict[str, torch.Tensor]) -> None:
        """An adapter and its head from a weights file's tensors (``AdapterModel.weights``).
        ValueError or KeyError, and nothing loaded, when they do not fit this base model."""
        if name in self.heads:
            raise ValueError(f"adapter {name!r} already exists; versions are never reloaded in place")
        head_weight, head_bias = weights[HEAD_PREFIX + "weight"], weights[HEAD_PREFIX + "bias"]
        if head_weight.shape[1:] != (self.hidden_size,) or head_bias.shape != head_weight.shape[:1]:
            raise ValueError(
                f"a head of {tuple(head_weight.shape)} does not fit outputs of {self.hidden_size}"
            )
        self.bank.load(
            name, {k[len(LORA_PREFIX) :]: v for k, v in weights.items() if k.startswith(LORA_PREFIX)}
        )
        head = nn.Linear(self.hidden_size, head_weight.shape[0])
        head.load_state_dict({"weight": head_weight, "bias": head_bias})
        self.heads[name] = head

    def remove(self, name: str) -> None:
        """Unload an adapter and its head."""
        self.heads.pop(name, None)
        self.bank.remove(name)

    @torch.inference_mode()
    def mixed_pooled(self, texts: Sequence[str], adapters: Sequence[str | None]) -> torch.Tensor:
        """Mean-pooled encoder outputs of ``texts`` in one forward, each through its own adapter
        (None: the base model alone, its base-model embedding)."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with self.bank.rows(adapters):
            hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return mean_pool(hidden.last_hidden_state, batch["attention_mask"])

    @torch.inference_mode()
    def head_probabilities(self, pooled: torch.Tensor, adapters: Sequence[str | None]) -> list[torch.Tensor]:
        """Per row, the probabilities of its adapter's head over the pooled output (a base row's
        pooled output itself, its base-model embedding)."""
        out = list(pooled)
        for adapter in {adapter for adapter in adapters if adapter is not None}:
            rows = [i for i, name in enumerate(adapters) if name == adapter]
            for i, row in zip(rows, torch.softmax(self.heads[adapter](pooled[rows]), dim=-1), strict=True):
                out[i] = row
        return out


def build_served_model(settings: Settings) -> ServedModel:
    """The base model and LoRA shape the settings describe, with no adapters loaded yet."""
    return ServedModel(settings.base_model_path(), lora_spec(settings), max_length=settings.max_length)
