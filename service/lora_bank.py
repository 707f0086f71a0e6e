"""Every served adapter's LoRA weights in one bank per target layer, for mixed-adapter forwards whose
cost does not grow with the number of adapters loaded.

PEFT keeps one submodule per adapter in every LoRA layer: loading an adapter walks all of the model's
modules (so a thousand loads cost a million module visits: a server over 1,000 tasks took more than
five minutes to start), and a mixed-adapter forward loops over the batch's adapters in every layer.
The bank instead holds, for each target linear layer, the A and B matrices of every loaded adapter
stacked in two tensors (a *slot* per adapter). A forward gathers each row's slot and applies
``x @ A.T @ B.T * alpha / r`` to all rows at once, as PEFT's LoRA layer does for one adapter; slot 0
stays zero, so base-model rows go through the same batched product and come out unchanged. Loading
copies tensors into a free slot and unloading frees it: both are independent of how many adapters
are loaded. Training keeps PEFT (``service.model.AdapterModel``); this is the serving side only, and
it reads exactly the weights files PEFT's state dict wrote.

Forwards may run on several threads at once (each thread's rows are its own); loading and unloading
must not run beside a forward (the inference engine waits for its forwards to end first).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from service.packed_encoder import Packing

#: How PEFT names a LoRA tensor in an adapter's state dict: this prefix, the layer's path, a suffix.
PEFT_PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


class BankedLinear(nn.Module):
    """A frozen linear layer plus, per row of the batch, the LoRA update of that row's adapter slot."""

    def __init__(self, base: nn.Linear, bank: LoraBank, r: int, slots: int) -> None:
        super().__init__()
        self.base = base
        self.bank = bank
        # Buffers, so that they move with the module (``.to(device)``); not in its state dict.
        self.a: torch.Tensor
        self.b: torch.Tensor
        self.register_buffer("a", torch.zeros(slots, r, base.in_features), persistent=False)
        self.register_buffer("b", torch.zeros(slots, base.out_features, r), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)``, plus each row's LoRA update when the batch has adapter rows. ``x`` is padded
        ``(rows, tokens, in)``, or packed ``(tokens, in)`` when the bank was told the packing."""
        out = self.base(x)
        slots = self.bank.row_slots
        if slots is None:
            return out
        packing = self.bank.packing
        # Per row: (tokens, in) @ (in, r) @ (r, out), on the row's own slot.
        rows = packing.pad(x) if packing is not None else x.reshape(len(slots), -1, x.shape[-1])
        down = torch.bmm(rows, self.a[slots].transpose(1, 2))
        update = torch.bmm(down, self.b[slots].transpose(1, 2)) * self.bank.scaling
        return out + (packing.unpad(update) if packing is not None else update.reshape(out.shape))

    def grow(self, slots: int) -> None:
        """Room for ``slots`` adapters; the loaded ones keep their slots."""
        self.a = torch.cat([self.a, self.a.new_zeros(slots - len(self.a), *self.a.shape[1:])])
        self.b = torch.cat([self.b, self.b.new_zeros(slots - len(self.b), *self.b.shape[1:])])


class LoraBank:
    """Wraps the ``target_modules`` linear layers of ``encoder`` (matched by name as PEFT matches
    them) and keeps every loaded adapter's LoRA weights in their banks."""

    def __init__(self, encoder: nn.Module, target_modules: Sequence[str], r: int, alpha: int) -> None:
        self.scaling = alpha / r
        self._forward = threading.local()  # the rows of the forward this thread is running
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        self._capacity = 8  # slot 0 (the base model) and seven adapters, doubled as needed
        self.layers: dict[str, BankedLinear] = {}
        for path, module in list(encoder.named_modules()):
            name = path.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and name in target_modules:
                parent = encoder.get_submodule(path.rsplit(".", 1)[0]) if "." in path else encoder
                layer = BankedLinear(module, self, r, self._capacity)
                setattr(parent, name, layer)
                self.layers[path] = layer
        if not self.layers:
            raise ValueError(f"no linear layer of the base model is named any of {list(target_modules)}")

    @property
    def row_slots(self) -> torch.Tensor | None:
        """Each row's slot in this thread's forward (``rows``); None outside one, or when every row is
        a base row."""
        slots: torch.Tensor | None = getattr(self._forward, "slots", None)
        return slots

    @property
    def packing(self) -> Packing | None:
        """The packing of this thread's forward when its layers see packed tokens."""
        packing: Packing | None = getattr(self._forward, "packing", None)
        return packing

    def load(self, name: str, lora: dict[str, torch.Tensor]) -> None:
        """Put an adapter's LoRA tensors (PEFT state-dict names) in a free slot.
        ValueError, and nothing loaded, when they do not fit these layers exactly."""
        if name in self._slots:
            raise ValueError(f"adapter {name!r} is already loaded")
        pairs = self._pairs(lora)
        slot = self._free.pop() if self._free else len(self._slots) + 1
        if slot >= self._capacity:
            self._capacity *= 2
            for layer in self.layers.values():
                layer.grow(self._capacity)
        for path, (a, b) in pairs.items():
            self.layers[path].a[slot] = a
            self.layers[path].b[slot] = b
        self._slots[name] = slot

    def remove(self, name: str) -> None:
        """Free an adapter's slot (zeroed, so a stale slot can never change an answer)."""
        slot = self._slots.pop(name, None)
        if slot is None:
            return
        for layer in self.layers.values():
            layer.a[slot] = 0.0
            layer.b[slot] = 0.0
        self._free.append(slot)

    @contextmanager
    def rows(self, adapters: Sequence[str | None], packing: Packing | None = None) -> Iterator[None]:
        """During a forward, row i goes through ``adapters[i]`` (None: the base model alone); its
        layers see the rows packed by ``packing`` (``service.packed_encoder``), or padded if None."""
        if all(adapter is None for adapter in adapters):
            yield
            return
        self._forward.slots = torch.tensor([0 if a is None else self._slots[a] for a in adapters])
        self._forward.packing = packing
        try:
            yield
        finally:
            self._forward.slots = self._forward.packing = None

    def _pairs(self, lora: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for path, layer in self.layers.items():
            key = PEFT_PREFIX + path
            a, b = lora.get(key + A_SUFFIX), lora.get(key + B_SUFFIX)
            if a is None or b is None:
                raise ValueError(f"the adapter has no LoRA weights for layer {path}")
            if a.shape != layer.a.shape[1:] or b.shape != layer.b.shape[1:]:
                raise ValueError(
                    f"LoRA weights of layer {path} are {tuple(a.shape)} and {tuple(b.shape)}, "
                    f"this server's layers take {tuple(layer.a.shape[1:])} and {tuple(layer.b.shape[1:])}"
                )
            pairs[path] = (a, b)
        expected = {PEFT_PREFIX + path + suffix for path in self.layers for suffix in (A_SUFFIX, B_SUFFIX)}
        unexpected = sorted(set(lora) - expected)
        if unexpected:
            raise ValueError(f"adapter weights do not fit the base model: {unexpected[:3]}")
        return pairs
