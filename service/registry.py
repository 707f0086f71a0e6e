"""The adapter registry: immutable numbered versions per task, an alias naming the served one.

Layout under the registry's root (a local directory, or ``s3://bucket/prefix``: ``service.object_store``)::

    tasks/<task>/versions/<000001>/claim.json            the number taken, before anything else
                                  adapter.safetensors   LoRA + head weights
                                  eval.jsonl            the eval records the version was measured on
                                  duplicates.jsonl      eval records set aside as repeats of training ones
                                  report.md, *.png      the version's report (service.report)
                                  manifest.json         metrics, labels, base model, offsets, sha256s: last
    tasks/<task>/alias.json                             {"served": N, "pinned": bool, "reason": ...}
    tasks/<task>/events.jsonl                           promotions, rejections, rollbacks, pruning
    trainer/checkpoint.json                             which versions the trainer holds + offsets
    trainer/learner-<round>.safetensors                 the shared learner and strategy tensors it names
    trainer/partition-<p>/...                           the same per partition, for several trainers
    router/router.json                                  the current task router: its rows and file
    router/router-<round>.safetensors                   the router's weights

A version exists once its manifest, written last, does: readers see all of it or none. Its number is
taken first by creating ``claim.json`` only if absent, a write two writers (on two machines too)
cannot both win; a writer dying after its claim leaves a gap, never a reused number. The alias moves
only if it is still what the mover read. Trainer and servers share nothing but this storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.errors import CorruptVersion, NotFound
from service.object_store import Conflict, LocalStore, ObjectStore, open_store
from service.report import REPORT_FILE
from service.settings import TASK_NAME, Settings
from service.trainer_files import TrainerFiles, json_bytes, partition_dir, tensor_bytes, tensors_of

WEIGHTS_FILE = "adapter.safetensors"
EVAL_FILE = "eval.jsonl"
DUPLICATES_FILE = "duplicates.jsonl"
MANIFEST_FILE = "manifest.json"
CLAIM_FILE = "claim.json"
MANIFEST_FORMAT = 1
#: How often a writer retries a version number or an alias move another writer won meanwhile.
ATTEMPTS = 50


@dataclass(frozen=True)
class Alias:
    """Which version of a task is served, and whether an operator (or auto-rollback) pinned it there."""

    served: int
    pinned: bool
    reason: str = ""


class Registry(TrainerFiles):
    """Reads and writes versions, aliases and events in one store; the trainer's checkpoint, learner
    and router files beside them (``TrainerFiles``)."""

    def __init__(self, store: ObjectStore | Path) -> None:
        """``store``: where the registry lives; a path is a local directory (``LocalStore``)."""
        self.store: ObjectStore = LocalStore(store) if isinstance(store, Path) else store
        self._aliases: dict[str, tuple[str, Alias]] = {}  # alias key: (fingerprint, alias) last read

    def describe(self) -> str:
        """Where the registry is, for messages."""
        return self.store.describe()

    def for_partition(self, partition: int) -> Registry:
        """This registry with one partition's trainer files (several trainers in one group)."""
        view = Registry(self.store)
        view.trainer_dir = partition_dir(partition)
        return view

    # --- reading ----------------------------------------------------------------------------------

    def tasks(self) -> list[str]:
        """Tasks with at least one published version."""
        return [task for task in self.store.children("tasks/") if self.versions(task)]

    def versions(self, task: str) -> list[int]:
        """Published versions of ``task`` (those whose manifest is written), ascending."""
        published = self.store.children_holding(f"{self._task_key(task)}/versions/", MANIFEST_FILE)
        return sorted(int(name) for name in published if name.isdigit())

    def manifest(self, task: str, version: int) -> dict[str, Any]:
        """The manifest of one version."""
        stored = self.store.read(self._version_key(task, version) + MANIFEST_FILE)
        if stored is None:
            raise NotFound(f"task {task!r} has no version {version}")
        try:
            return dict(json.loads(stored.data))
        except json.JSONDecodeError as exc:
            raise CorruptVersion(f"{task} v{version}: manifest is not JSON: {exc}") from None

    def servable(
        self, task: str, version: int, base_model: str, kind: str = "base model"
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The manifest and checked weights of a version a server on ``base_model`` is to load;
        CorruptVersion if it was trained on another (``kind``: what the error calls the model)."""
        manifest = self.manifest(task, version)
        if manifest.get("base_model") != base_model:
            raise CorruptVersion(
                f"{task} v{version} was trained on {kind} {manifest.get('base_model')!r}, "
                f"this server runs {base_model!r}"
            )
        return manifest, self.load_weights(task, version)

    def load_weights(self, task: str, version: int) -> dict[str, torch.Tensor]:
        """The weights of one version after checking every file against the manifest's sha256."""
        manifest = self.manifest(task, version)
        files: dict[str, str] = manifest.get("files", {})
        if WEIGHTS_FILE not in files:
            raise CorruptVersion(f"{task} v{version}: the manifest lists no sha256 for {WEIGHTS_FILE}")
        contents = {}
        for name, expected in files.items():
            stored = self.store.read(self._version_key(task, version) + name)
            if stored is None:
                raise CorruptVersion(f"{task} v{version}: {name} is missing")
            if hashlib.sha256(stored.data).hexdigest() != expected:
                raise CorruptVersion(f"{task} v{version}: {name} does not match its sha256 in the manifest")
            contents[name] = stored.data
        return tensors_of(contents[WEIGHTS_FILE], f"{task} v{version}")

    def eval_records(self, task: str, version: int) -> list[tuple[str, str]]:
        """The (text, label) pairs the version was evaluated on."""
        rows = self._json_lines(self._version_key(task, version) + EVAL_FILE)
        return [(row["text"], row["label"]) for row in rows]

    def duplicate_records(self, task: str, version: int) -> list[tuple[str, str, str]]:
        """The eval records set aside as repeats of training records when the version was published:
        (text, label, "exact" or "near"); none for versions from before they were kept."""
        rows = self._json_lines(self._version_key(task, version) + DUPLICATES_FILE)
        return [(row["text"], row["label"], row["kind"]) for row in rows]

    def evaluated_on(self, task: str, version: int, records: list[tuple[str, str]]) -> bool:
        """Whether ``records`` are exactly the records the version was evaluated on (by their sha256)."""
        digest = hashlib.sha256(b"".join(_eval_lines(records))).hexdigest()
        return bool(self.manifest(task, version)["files"][EVAL_FILE] == digest)

    def measured_prefix(self, task: str, version: int, records: list[tuple[str, str]]) -> tuple[int, int]:
        """How many of ``records``' first ones the version's manifest already holds its accuracy on (the
        records it was published with, checked by their sha256), and how many of them it got right:
        only the records after them need measuring. (0, 0) when the manifest's are not a prefix."""
        metrics = self.manifest(task, version)["metrics"]
        known, accuracy = int(metrics.get("eval_records", 0)), metrics.get("accuracy")
        if accuracy is None or not 0 < known <= len(records):
            return 0, 0
        if not self.evaluated_on(task, version, records[:known]):
            return 0, 0  # other records (read again in another order after a restart): measure them all
        return known, round(float(accuracy) * known)

    def report(self, task: str, version: int) -> tuple[str, dict[str, bytes]] | None:
        """The version's report and its figures as written with it (None for a version without)."""
        prefix = self._version_key(task, version)
        stored = self.store.read(prefix + REPORT_FILE)
        if stored is None:
            self.manifest(task, version)  # NotFound if the version itself is not there
            return None
        figures = {}
        for name in self.store.children(prefix):
            if name.endswith(".png") and (figure := self.store.read(prefix + name)) is not None:
                figures[name] = figure.data
        return stored.data.decode("utf-8"), figures

    def aliases(self) -> dict[str, Alias | None]:
        """Every task with a published version and its alias (None before its first promotion): one
        listing of the store, and an alias read again only when it changed since the last call (on
        a bucket, a server's poll of 100 tasks is then one or two requests, not two hundred)."""
        listed = self.store.fingerprints("tasks/", frozenset({MANIFEST_FILE, "alias.json"}))
        published = {key.split("/")[1] for key in listed if key.endswith("/" + MANIFEST_FILE)}
        found: dict[str, Alias | None] = {}
        for task in sorted(published):
            key = f"tasks/{task}/alias.json"
            fingerprint = listed.get(key)
            cached = self._aliases.get(key)
            if fingerprint is not None and cached is not None and cached[0] == fingerprint:
                found[task] = cached[1]
                continue
            found[task] = alias = self.alias(task) if TASK_NAME.fullmatch(task) else None
            if fingerprint is not None and alias is not None:
                self._aliases[key] = (fingerprint, alias)
        return found

    def alias(self, task: str) -> Alias | None:
        """The task's alias, or None before its first promotion."""
        stored = self.store.read(f"{self._task_key(task)}/alias.json")
        return _alias(stored.data) if stored is not None else None

    def events(self, task: str) -> list[dict[str, Any]]:
        """The task's history: every promotion, rejection, rollback and pruning, oldest first."""
        return self._json_lines(f"{self._task_key(task)}/events.jsonl")

    # --- writing ----------------------------------------------------------------------------------

    def publish(
        self,
        task: str,
        weights: dict[str, torch.Tensor],
        eval_records: list[tuple[str, str]],
        manifest: dict[str, Any],
        extra_files: Callable[[dict[str, Any]], dict[str, bytes]] | None = None,
        duplicate_records: list[tuple[str, str, str]] | None = None,
    ) -> int:
        """Write a new version and return its number (above every number taken so far).

        ``extra_files`` makes files that go with it (its report) from the complete manifest, version
        number included; they are not part of the version's integrity (``files``)."""
        weights_file = tensor_bytes(weights, WEIGHTS_FILE)
        repeats = ({"text": t, "label": label, "kind": k} for t, label, k in duplicate_records or [])
        contents = {
            WEIGHTS_FILE: weights_file,
            EVAL_FILE: b"".join(_eval_lines(eval_records)),
            DUPLICATES_FILE: b"".join(_json_line_bytes(repeats)),
        }
        version = self._claim_version(task)
        files = {name: hashlib.sha256(contents[name]).hexdigest() for name in (WEIGHTS_FILE, EVAL_FILE)}
        written = {"format": MANIFEST_FORMAT, "task": task, "version": version, "created_at": time.time()}
        body = {**manifest, **written, "files": files}
        contents.update(extra_files(body) if extra_files is not None else {})
        prefix = self._version_key(task, version)
        try:
            for name, content in contents.items():
                self.store.write(prefix + name, content)
            self.store.write(prefix + MANIFEST_FILE, json_bytes(body))  # last: now the version exists
        except OSError:
            with suppress(OSError):  # a full disk: leave nothing behind to fill it further
                self.store.delete_under(prefix)
            raise
        return version

    def _claim_version(self, task: str) -> int:
        """Take the next free version number: create its claim only if no writer has."""
        prefix = f"{self._task_key(task)}/versions/"
        claim = json_bytes({"by": f"{socket.gethostname()}:{os.getpid()}", "at": time.time()})
        for _ in range(ATTEMPTS):
            taken = [int(name) for name in self.store.children(prefix) if name.isdigit()]
            version = max(taken, default=0) + 1
            try:
                self.store.write(f"{prefix}{version:06d}/{CLAIM_FILE}", claim, expect=None)
                return version
            except Conflict:
                continue  # another writer took it between our listing and our claim
        raise OSError(f"{self.describe()}: {task}: another writer took every version number tried")

    def set_alias(self, task: str, version: int, pinned: bool, reason: str) -> Alias:
        """Point the task's alias at an existing version, and record why."""
        if version not in self.versions(task):
            raise NotFound(f"task {task!r} has no version {version}")
        moved = self._move_alias(task, lambda _: Alias(version, pinned, reason))
        assert moved is not None
        return moved

    def promote_unless_pinned(self, task: str, version: int, reason: str) -> bool:
        """Serve ``version`` unless the task is pinned; True when the alias moved."""
        if version not in self.versions(task):
            raise NotFound(f"task {task!r} has no version {version}")
        moved = self._move_alias(
            task, lambda current: None if current and current.pinned else Alias(version, False, reason)
        )
        return moved is not None

    def _move_alias(self, task: str, decide: Callable[[Alias | None], Alias | None]) -> Alias | None:
        """Write the alias ``decide`` makes of the current one (None: leave it), only if no one moved
        it meanwhile; re-read and decide again if someone did. Records the move in the history."""
        key = f"{self._task_key(task)}/alias.json"
        for _ in range(ATTEMPTS):
            stored = self.store.read(key)
            previous = _alias(stored.data) if stored is not None else None
            target = decide(previous)
            if target is None:
                return None
            body = {**vars(target), "updated_at": time.time()}
            try:
                self.store.write(key, json_bytes(body), expect=stored.tag if stored is not None else None)
            except Conflict:
                continue
            moved = {"event": "alias", "version": target.served, "pinned": target.pinned}
            self._append_event(
                task, {**moved, "from_version": previous and previous.served, "reason": target.reason}
            )
            return target
        raise OSError(f"{self.describe()}: {task}: the alias moved under every one of {ATTEMPTS} tries")

    def record_event(self, task: str, event: str, version: int, reason: str) -> None:
        """Append one event (e.g. a rejected candidate) to the task's history."""
        self._append_event(task, {"event": event, "version": version, "reason": reason})

    def _append_event(self, task: str, body: dict[str, Any]) -> None:
        line = json.dumps({"at": time.time(), **body}, sort_keys=True) + "\n"
        self.store.append(f"{self._task_key(task)}/events.jsonl", line.encode("utf-8"))

    def prune(self, task: str, keep: int, protect: set[int]) -> list[int]:
        """Delete all but the newest ``keep`` versions, never the served one or any in ``protect``.

        A deleted version's manifest goes first, so readers never see part of it. Returns the versions
        deleted.
        """
        alias = self.alias(task)
        versions = self.versions(task)
        keep_set = set(versions[-keep:]) | protect | ({alias.served} if alias else set())
        deleted = [v for v in versions if v not in keep_set]
        for version in deleted:
            prefix = self._version_key(task, version)
            self.store.delete(prefix + MANIFEST_FILE)
            self.store.delete_under(prefix)
            self._append_event(task, {"event": "pruned", "version": version, "reason": f"keep {keep}"})
        return deleted

    # --- helpers ------------------------------------------------------------------------------------

    def _task_key(self, task: str) -> str:
        if not TASK_NAME.fullmatch(task):
            raise NotFound(f"{task[:80]!r} is not a valid task name")
        return f"tasks/{task}"

    def _version_key(self, task: str, version: int) -> str:
        return f"{self._task_key(task)}/versions/{version:06d}/"

    def _json_lines(self, key: str) -> list[dict[str, Any]]:
        """One JSON object per line of the object (none if there is no object)."""
        stored = self.store.read(key)
        if stored is None:
            return []
        return [json.loads(line) for line in stored.data.decode("utf-8").splitlines() if line]


def open_registry(settings: Settings) -> Registry:
    """The registry the settings name (``registry_url`` or ``registry_dir``: ``object_store.open_store``)."""
    return Registry(open_store(settings))


def _alias(data: bytes) -> Alias:
    body = json.loads(data)
    return Alias(served=int(body["served"]), pinned=bool(body["pinned"]), reason=str(body.get("reason", "")))


def _json_line_bytes(rows: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """One JSON object per line, UTF-8 (what ``_json_lines`` reads back)."""
    for row in rows:
        yield (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def _eval_lines(records: list[tuple[str, str]]) -> Iterator[bytes]:
    """A version's eval file, line by line: one JSON object per (text, label)."""
    return _json_line_bytes({"text": text, "label": label} for text, label in records)
