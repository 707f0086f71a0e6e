"""A bounded memory of base features of training texts, evenly per label, for the task router.

Features of the frozen base model (``service.model.base_features``) never go stale (the base is never
trained), so a memory of them is replay without re-encoding: the router (``service.router``) is refit
on it after every round and never forgets a label while the label keeps examples here. Each label
keeps a uniform sample of its stream (one reservoir per label); as labels arrive, every label's share
of ``size`` shrinks. The memory is saved with the trainer's checkpoint, so a restarted trainer holds
the very same rows.

Every random choice is a function of the seed, the label and how many examples the label has seen, so
it does not depend on how the stream was cut into polls or rounds.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from typing import Any

import torch

#: Keys of the memory's tensors in the trainer's learner file.
MEMORY_PREFIX = "memory."

Key = tuple[str, str]


class FeatureMemory:
    """Per (task, label): a uniform sample of its training texts' base embeddings, ``size`` rows in all."""

    def __init__(self, size: int, seed: int, prefix: str = MEMORY_PREFIX) -> None:
        self.size = size
        self.seed = seed
        #: Keys of its tensors in the learner file (two memories share it).
        self.prefix = prefix
        self._rows: dict[Key, list[torch.Tensor]] = {}
        self._seen: dict[Key, int] = {}
        #: Embeddings offered so far (kept or not): tells whether the memory changed.
        self.added = 0

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._rows.values())

    def keys(self) -> list[Key]:
        """Every (task, label) with rows, in the order first seen."""
        return [key for key, rows in self._rows.items() if rows]

    @property
    def width(self) -> int | None:
        """Features per row (None while empty): fixed by the first rows, kept by every restore."""
        return next((len(rows[0]) for rows in self._rows.values() if rows), None)

    def add(self, task: str, labels: Sequence[str], embeddings: torch.Tensor) -> None:
        """Offer each row of base features to its label's reservoir. A memory restored from rows of
        fewer layers keeps taking that many (the last columns: ``service.model.base_features``), so
        that old and new rows stay one feature space."""
        width = self.width
        if width is not None:
            embeddings = embeddings[:, -width:]
        for label, embedding in zip(labels, embeddings, strict=True):
            self.added += 1
            key = (task, label)
            if key not in self._rows:
                self._rows[key], self._seen[key] = [], 0
                self._shrink()
            rows, seen = self._rows[key], self._seen[key]
            self._seen[key] = seen + 1
            if len(rows) < self._share():
                rows.append(embedding.detach().clone())
                continue
            # Reservoir sampling: the n-th example replaces a kept one with probability share / n.
            slot = self._rng(key, seen).randrange(seen + 1)
            if slot < len(rows):
                rows[slot] = embedding.detach().clone()

    def features(self) -> tuple[torch.Tensor, torch.Tensor, list[Key]]:
        """All rows stacked, each row's index into the keys, and the keys."""
        keys = self.keys()
        if not keys:
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long), []
        x = torch.stack([row for key in keys for row in self._rows[key]])
        y = torch.tensor([i for i, key in enumerate(keys) for _ in self._rows[key]])
        return x, y, keys

    def _share(self) -> int:
        return max(1, self.size // max(1, len(self._rows)))

    def _shrink(self) -> None:
        """Cut every label down to its share, keeping a uniform sample of what it kept."""
        share = self._share()
        for key, rows in self._rows.items():
            if len(rows) > share:
                kept = sorted(self._rng(key, -len(rows)).sample(range(len(rows)), share))
                self._rows[key] = [rows[i] for i in kept]

    def _rng(self, key: Key, n: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + zlib.crc32(f"{key[0]}\0{key[1]}\0{n}".encode()))

    @classmethod
    def union(cls, memories: Sequence[FeatureMemory]) -> FeatureMemory:
        """One memory holding the rows of ``memories`` (of different tasks: several trainers' partitions)."""
        first = memories[0]
        whole = cls(sum(m.size for m in memories), first.seed, first.prefix)
        for memory in memories:
            whole._rows.update(memory._rows)
            whole._seen.update(memory._seen)
            whole.added += memory.added
        return whole

    # --- saved with the checkpoint ------------------------------------------------------------------

    def saved_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The keys and counts (JSON) and the rows (tensors, one per key in key order)."""
        keys = list(self._rows)
        plain = {
            "keys": [list(key) for key in keys],
            "seen": [self._seen[key] for key in keys],
            "added": self.added,
        }
        tensors = {
            f"{self.prefix}{i}": torch.stack(self._rows[key]).contiguous()
            for i, key in enumerate(keys)
            if self._rows[key]
        }
        return plain, tensors

    def restore(self, plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Put back what ``saved_state`` returned."""
        self._rows, self._seen = {}, {}
        self.added = int(plain["added"])
        for i, ((task, label), seen) in enumerate(zip(plain["keys"], plain["seen"], strict=True)):
            key = (str(task), str(label))
            stacked = tensors.get(f"{self.prefix}{i}")
            self._rows[key] = list(stacked.unbind()) if stacked is not None else []
            self._seen[key] = int(seen)
