"""The model a server answers with: the frozen base encoder, every loaded adapter's LoRA weights in a
``LoraBank``, and each adapter's head.

It reads the weights files the trainer's ``AdapterModel`` writes and answers as that model does (to
float rounding), but a batch runs every row through its own adapter in one forward, and loading or
unloading an adapter costs the same with 1 or 1,000 loaded. A BERT encoder runs on the batch's real
tokens only (``service.packed_encoder``). Forwards (``outputs``) may run on several
threads at once; loading and unloading must not run beside one (the inference engine sees to it).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from service.lora_bank import LoraBank
from service.model import (
    BASE_FEATURE_LAYERS,
    HEAD_PREFIX,
    LORA_PREFIX,
    LoraSpec,
    base_features,
    load_frozen_base,
    lora_spec,
    mean_pool,
)
from service.packed_encoder import Packing, packed_outputs, packs
from service.settings import Settings


class ServedModel:
    """A frozen base encoder with banked LoRA adapters and per-adapter linear heads."""

    def __init__(self, base_path: Path, lora: LoraSpec, max_length: int, packed: bool | None = None) -> None:
        """``packed``: run forwards on real tokens only (None: whenever the encoder allows it)."""
        self.max_length = max_length
        self.tokenizer, encoder = load_frozen_base(base_path)
        self.bank = LoraBank(encoder, lora.target_modules, lora.r, lora.alpha)
        if hasattr(encoder, "pooler"):  # after the bank, which takes the LoRA weights of every layer
            # A BERT pooler's output is never read: answers are mean-pooled.
            encoder.pooler = None  # type: ignore[assignment]
        self.encoder = encoder
        self.packed = packs(encoder) if packed is None else packed
        self.heads: dict[str, nn.Linear] = {}
        self.hidden_size = int(encoder.config.hidden_size)
        # A fast tokenizer sets its padding and truncation on each call: two threads at once can
        # collide ("Already borrowed"), and a call takes well under a millisecond.
        self._tokenizing = threading.Lock()

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
    def outputs(self, texts: Sequence[str], adapters: Sequence[str | None]) -> list[torch.Tensor]:
        """Per text, in one forward through each row's own adapter: an adapter row's probabilities
        under its head; a base row's (adapter None) base features (``service.model.base_features``,
        whose last ``hidden_size`` columns are its base-model embedding)."""
        with self._tokenizing:
            batch = self.tokenizer(
                list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        ids, mask = batch["input_ids"], batch["attention_mask"]
        base = [i for i, adapter in enumerate(adapters) if adapter is None]
        layers = BASE_FEATURE_LAYERS if base else 1
        if self.packed:
            packing = Packing.of(mask)
            with self.bank.rows(adapters, packing):
                features = torch.cat(packed_outputs(self.encoder, ids, packing, layers), dim=-1)
        else:
            with self.bank.rows(adapters):
                hidden = self.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=bool(base))
            features = (
                base_features(hidden.hidden_states, mask, layers)
                if base
                else mean_pool(hidden.last_hidden_state, mask)
            )
        out: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        for i in base:
            out[i] = features[i]
        pooled = features[:, -self.hidden_size :]  # the last layer's: the embedding
        for adapter in {adapter for adapter in adapters if adapter is not None}:
            rows = [i for i, name in enumerate(adapters) if name == adapter]
            for i, row in zip(rows, torch.softmax(self.heads[adapter](pooled[rows]), dim=-1), strict=True):
                out[i] = row
        return out


def build_served_model(settings: Settings) -> ServedModel:
    """The base model and LoRA shape the settings describe, with no adapters loaded yet."""
    return ServedModel(settings.base_model_path(), lora_spec(settings), max_length=settings.max_length)
