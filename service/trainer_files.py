"""The trainer's own files in the registry, beside the versions: its checkpoint (which versions it
holds, the offsets it absorbed), the learner tensors the checkpoint names, and the task router it
fits. Written whole (``ObjectStore.write``), the file before the manifest or checkpoint that names it.

Several trainers in one group (``kafka_group_trainers: several``) keep them per partition, under
``trainer/partition-<p>/``; read from the registry's root, those checkpoints are one merged view.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from service.errors import CorruptVersion
from service.object_store import ObjectStore

TRAINER_DIR = "trainer"
#: A partition's folder under ``trainer/``: ``partition-003``.
PARTITION_PREFIX = "partition-"


class TrainerFiles:
    """The checkpoint, learner and router files of one registry's store (``Registry`` is one)."""

    store: ObjectStore
    #: Where the checkpoint and learner files live: ``trainer``, or one partition's folder in it.
    trainer_dir: str = TRAINER_DIR

    # --- trainer checkpoint -------------------------------------------------------------------------

    def read_checkpoint(self) -> dict[str, Any] | None:
        """The trainer's last durable checkpoint, or None on a fresh registry; read at the root of a
        registry that several trainers share, every partition's checkpoint merged into one view."""
        stored = self.store.read(f"{self.trainer_dir}/checkpoint.json")
        if stored is not None:
            return dict(json.loads(stored.data))
        if self.trainer_dir != TRAINER_DIR:
            return None
        parts = self.partition_checkpoints()
        return merged_checkpoint(parts) if parts else None

    def partition_checkpoints(self) -> dict[int, dict[str, Any]]:
        """Per partition, the checkpoint that several trainers in one group keep for it."""
        found = {}
        for folder in self.store.children_holding(f"{TRAINER_DIR}/", "checkpoint.json"):
            if folder.startswith(PARTITION_PREFIX):
                stored = self.store.read(f"{TRAINER_DIR}/{folder}/checkpoint.json")
                if stored is not None:
                    found[int(folder[len(PARTITION_PREFIX) :])] = dict(json.loads(stored.data))
        return dict(sorted(found.items()))

    def checkpoint_written_at(self) -> float | None:
        """When the checkpoint was written (epoch seconds: it is replaced whole), None if never."""
        return self.store.modified(f"{self.trainer_dir}/checkpoint.json")

    def write_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Replace the trainer checkpoint atomically and durably."""
        self.store.write(f"{self.trainer_dir}/checkpoint.json", json_bytes(checkpoint))

    def write_learner(self, round_number: int, tensors: dict[str, torch.Tensor]) -> str:
        """Write the trainer's tensors for a checkpoint durably; returns the name the checkpoint keeps.

        Written before the checkpoint that names it, so a checkpoint never names a missing file.
        """
        name = f"learner-{round_number:06d}.safetensors"
        self.store.write(f"{self.trainer_dir}/{name}", tensor_bytes(tensors, name))
        return name

    def read_learner(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint names."""
        stored = self.store.read(f"{self.trainer_dir}/{name}")
        if stored is None:
            raise CorruptVersion(f"the checkpoint names {self.trainer_dir}/{name}, which is missing")
        return tensors_of(stored.data, name)

    def prune_learners(self, keep: str | None) -> None:
        """Delete learner files other than ``keep`` (older checkpoints' ones)."""
        for name in self.store.children(f"{self.trainer_dir}/"):
            if name.startswith("learner-") and name.endswith(".safetensors") and name != keep:
                self.store.delete(f"{self.trainer_dir}/{name}")

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


def partition_dir(partition: int) -> str:
    """The folder of one partition's checkpoint and learner files."""
    return f"{TRAINER_DIR}/{PARTITION_PREFIX}{partition:03d}"


def merged_checkpoint(parts: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """One view of the partitions' checkpoints: their tasks, offsets and eval figures together.

    Each accuracy matrix's rows follow in partition order, every row completed with the other
    partitions' tasks at their latest accuracies. Tasks of different partitions share no parameters
    (several trainers need a task-isolating strategy), so a task's accuracy only moves in its own
    partition's rows: ACC, BWT and forgetting of the merged matrix are what one trainer's would be.
    """
    checkpoints = list(parts.values())
    view: dict[str, Any] = {
        "round": max(int(c["round"]) for c in checkpoints),
        "strategy": checkpoints[0].get("strategy", ""),
        "topic": checkpoints[0].get("topic"),
        "partitions": list(parts),
        "tasks": {name: task for c in checkpoints for name, task in c["tasks"].items()},
        "offsets": {p: o for c in checkpoints for p, o in c["offsets"].items()},
        "accuracy_before_learning": {
            k: v for c in checkpoints for k, v in c.get("accuracy_before_learning", {}).items()
        },
    }
    for key in ("accuracy_matrix", "macro_accuracy_matrix"):
        latest: dict[str, float] = {}
        for c in checkpoints:
            if c.get(key):
                latest.update(c[key][-1][1])
        view[key] = [[name, {**latest, **row}] for c in checkpoints for name, row in c.get(key, [])]
    return view


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
