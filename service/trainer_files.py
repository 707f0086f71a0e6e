"""The trainer's own files in the registry, beside the versions: its checkpoint (which versions it
holds, the offsets it absorbed), the learner tensors the checkpoint names, and the task router it
fits. Written whole (``ObjectStore.write``), the file before the manifest or checkpoint that names it.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from service.errors import CorruptVersion
from service.object_store import ObjectStore


class TrainerFiles:
    """The checkpoint, learner and router files of one registry's store (``Registry`` is one)."""

    store: ObjectStore

    # --- trainer checkpoint -------------------------------------------------------------------------

    def read_checkpoint(self) -> dict[str, Any] | None:
        """The trainer's last durable checkpoint, or None on a fresh registry."""
        stored = self.store.read("trainer/checkpoint.json")
        return dict(json.loads(stored.data)) if stored is not None else None

    def checkpoint_written_at(self) -> float | None:
        """When the checkpoint was written (epoch seconds: it is replaced whole), None if never."""
        return self.store.modified("trainer/checkpoint.json")

    def write_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Replace the trainer checkpoint atomically and durably."""
        self.store.write("trainer/checkpoint.json", json_bytes(checkpoint))

    def write_learner(self, round_number: int, tensors: dict[str, torch.Tensor]) -> str:
        """Write the trainer's tensors for a checkpoint durably; returns the name the checkpoint keeps.

        Written before the checkpoint that names it, so a checkpoint never names a missing file.
        """
        name = f"learner-{round_number:06d}.safetensors"
        self.store.write(f"trainer/{name}", tensor_bytes(tensors, name))
        return name

    def read_learner(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint names."""
        stored = self.store.read(f"trainer/{name}")
        if stored is None:
            raise CorruptVersion(f"the checkpoint names trainer/{name}, which is missing")
        return tensors_of(stored.data, name)

    def prune_learners(self, keep: str | None) -> None:
        """Delete learner files other than ``keep`` (older checkpoints' ones)."""
        for name in self.store.children("trainer/"):
            if name.startswith("learner-") and name.endswith(".safetensors") and name != keep:
                self.store.delete(f"trainer/{name}")

    # --- task router --------------------------------------------------------------------------------

    def write_router(
        self, round_number: int, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]
    ) -> None:
        """Write a router's weights, then point ``router.json`` at them; keep the previous file only."""
        name = f"router-{round_number:06d}.safetensors"
        content = tensor_bytes(tensors, name)
        self.store.write(f"router/{name}", content)
        # The previous file stays: a server may have read the old manifest and be loading it now.
        previous = self.router_manifest()
        keep = {name, previous["file"] if previous else name}
        written = {"file": name, "sha256": hashlib.sha256(content).hexdigest(), "created_at": time.time()}
        self.store.write("router/router.json", json_bytes({**manifest, **written}))
        for existing in self.store.children("router/"):
            if existing.startswith("router-") and existing.endswith(".safetensors") and existing not in keep:
                self.store.delete(f"router/{existing}")

    def router_manifest(self) -> dict[str, Any] | None:
        """The current router's manifest, or None before the first router."""
        stored = self.store.read("router/router.json")
        if stored is None:
            return None
        try:
            return dict(json.loads(stored.data))
        except json.JSONDecodeError as exc:
            raise CorruptVersion(f"router manifest is not JSON: {exc}") from None

    def load_router(self, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The weights a router manifest names, checked against its sha256."""
        name = str(manifest["file"])
        stored = self.store.read(f"router/{name}")
        if stored is None or hashlib.sha256(stored.data).hexdigest() != manifest["sha256"]:
            raise CorruptVersion(f"{name} is missing or does not match its sha256 in router.json")
        return tensors_of(stored.data, name)


def json_bytes(body: dict[str, Any]) -> bytes:
    """``body`` as the registry writes JSON (indented, keys sorted, UTF-8)."""
    return json.dumps(body, indent=2, sort_keys=True).encode("utf-8")


def tensor_bytes(tensors: dict[str, torch.Tensor], name: str) -> bytes:
    """A safetensors file's content; its failures are OSErrors like a disk's (callers handle those)."""
    try:
        return save(tensors)
    except SafetensorError as exc:
        raise OSError(f"cannot write {name}: {exc}") from exc


def tensors_of(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's content; CorruptVersion if it is not one."""
    try:
        return load(data)
    except SafetensorError as exc:
        raise CorruptVersion(f"{name} is not a safetensors file: {exc}") from None
