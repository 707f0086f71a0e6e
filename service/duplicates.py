"""Eval records that repeat training records: found, set aside from the eval set that gates versions,
counted and reported.

A version's accuracy is only worth something on texts it was not trained on. People who stream
tasks in often hold out records that repeat training ones, exactly or nearly (the same request
asked again, a template filled twice), and CLINC150's own val and test splits hold such repeats
(``bench/data_practices.py``, ``duplicates``). An eval record *repeats* a training record of its task
when their texts are the same once normalised (``service.data_health.normalized``: case,
punctuation and spacing dropped), or nearly, when their base-model embeddings have a cosine of at
least ``duplicate_cosine``. Either order counts: a training record that arrives after an eval record
it repeats sets that eval record aside then.

The index keeps, per task, a fingerprint and a unit base-model embedding (float16) of every training
text and of every eval record still in the eval set (in the eval set's order), and is saved with
the trainer's checkpoint: the training texts themselves are gone once their offsets are committed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional

from service.data_health import normalized

#: Keys of the index's tensors in the trainer's learner file.
DUPLICATES_PREFIX = "duplicates."
EXACT, NEAR = "exact", "near"
#: Rows per block of the cosine products (4,096 × 4,096 floats: 64 MB at most).
BLOCK = 4096


def fingerprint(text: str) -> int:
    """A 63-bit fingerprint of the normalised text (exact duplicates share it)."""
    digest = hashlib.blake2b(normalized(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # fits an int64 tensor


class _TaskIndex:
    """One task's training fingerprints and embeddings, and those of its eval set in its order."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.train_fingerprints: set[int] = set()
        #: In the chunks they arrived in: appending never copies what is there.
        self.train: list[torch.Tensor] = []
        self.eval_fingerprints: list[int] = []
        self.eval = torch.empty(0, width, dtype=torch.float16)


class DuplicateIndex:
    """Finds, per task, the eval records that repeat training records (see the module's docstring)."""

    def __init__(self, near_cosine: float) -> None:
        self.near_cosine = near_cosine
        self._tasks: dict[str, _TaskIndex] = {}

    def screen(
        self,
        task: str,
        train_texts: Sequence[str],
        train_embeddings: torch.Tensor,
        eval_texts: Sequence[str],
        eval_embeddings: torch.Tensor,
    ) -> dict[int, str]:
        """Take a task's new training texts and new eval records (base-model embeddings of each) in;
        returns the eval records that repeat a training record, as positions in the task's eval set
        with the new records appended (``EXACT`` or ``NEAR``). Those are dropped from the index: the
        caller sets them aside (``TaskState.set_aside``)."""
        width = train_embeddings.shape[1] if len(train_texts) else eval_embeddings.shape[1]
        index = self._tasks.setdefault(task, _TaskIndex(width))
        new_train = [fingerprint(text) for text in train_texts]
        index.train_fingerprints.update(new_train)
        new_train_vectors = _unit(train_embeddings)
        if len(new_train_vectors):
            index.train.append(new_train_vectors)
        held = len(index.eval_fingerprints)
        found: dict[int, str] = {}
        # Held eval records against the new training texts only (they were checked against the rest).
        new_train_set = set(new_train)
        for position, value in enumerate(index.eval_fingerprints):
            if value in new_train_set:
                found[position] = EXACT
        for position in _near(index.eval, [new_train_vectors], self.near_cosine):
            found.setdefault(position, NEAR)
        # New eval records against every training text.
        new_eval = [fingerprint(text) for text in eval_texts]
        new_eval_vectors = _unit(eval_embeddings)
        for position, value in enumerate(new_eval):
            if value in index.train_fingerprints:
                found[held + position] = EXACT
        for position in _near(new_eval_vectors, index.train, self.near_cosine):
            found.setdefault(held + position, NEAR)
        kept = [i for i in range(held + len(new_eval)) if i not in found]
        fingerprints = index.eval_fingerprints + new_eval
        vectors = torch.cat([index.eval, new_eval_vectors])
        index.eval_fingerprints = [fingerprints[i] for i in kept]
        index.eval = vectors[kept]
        return found

    def eval_size(self, task: str) -> int:
        """How many eval records of the task the index holds (the task's eval set, once in step)."""
        index = self._tasks.get(task)
        return len(index.eval_fingerprints) if index is not None else 0

    def replace_eval(self, task: str, texts: Sequence[str], embeddings: torch.Tensor) -> None:
        """Hold exactly these eval records for the task (its eval set, read back after a restart)."""
        index = self._tasks.setdefault(task, _TaskIndex(embeddings.shape[1]))
        index.eval_fingerprints = [fingerprint(text) for text in texts]
        index.eval = _unit(embeddings)

    # --- saved with the checkpoint ------------------------------------------------------------------

    def saved_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The tasks in order (JSON) and their fingerprints and embeddings (tensors)."""
        tasks = list(self._tasks)
        tensors: dict[str, torch.Tensor] = {}
        for i, task in enumerate(tasks):
            index = self._tasks[task]
            prefix = f"{DUPLICATES_PREFIX}{i}."
            train_fingerprints = sorted(index.train_fingerprints)
            tensors[prefix + "train_fingerprints"] = torch.tensor(train_fingerprints, dtype=torch.int64)
            empty = torch.empty(0, index.width, dtype=torch.float16)
            tensors[prefix + "train"] = torch.cat([empty, *index.train])
            tensors[prefix + "eval_fingerprints"] = torch.tensor(index.eval_fingerprints, dtype=torch.int64)
            tensors[prefix + "eval"] = index.eval.contiguous()
        return {"tasks": tasks}, tensors

    def restore(self, plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Put back what ``saved_state`` returned."""
        self._tasks = {}
        for i, task in enumerate(plain["tasks"]):
            prefix = f"{DUPLICATES_PREFIX}{i}."
            index = _TaskIndex(tensors[prefix + "train"].shape[1])
            index.train_fingerprints = set(tensors[prefix + "train_fingerprints"].tolist())
            index.train = [tensors[prefix + "train"]]
            index.eval_fingerprints = tensors[prefix + "eval_fingerprints"].tolist()
            index.eval = tensors[prefix + "eval"]
            self._tasks[str(task)] = index


def _unit(embeddings: torch.Tensor) -> torch.Tensor:
    return functional.normalize(embeddings.float(), dim=-1).to(torch.float16)


def _near(rows: torch.Tensor, against: Sequence[torch.Tensor], cosine: float) -> list[int]:
    """The rows whose cosine with a row of one of the ``against`` chunks (all unit) reaches ``cosine``,
    in blocks so that a long eval set against a long training set never holds the whole product."""
    if not len(rows) or not any(len(chunk) for chunk in against):
        return []
    found: list[int] = []
    for start in range(0, len(rows), BLOCK):
        block = rows[start : start + BLOCK].float()
        best = torch.full((len(block),), -1.0)
        for chunk in against:
            for offset in range(0, len(chunk), BLOCK):
                products = block @ chunk[offset : offset + BLOCK].float().T
                best = torch.maximum(best, products.max(dim=1).values)
        found.extend(start + int(i) for i in torch.nonzero(best >= cosine).flatten())
    return found
