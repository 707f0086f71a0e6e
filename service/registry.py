"""The adapter registry: immutable numbered versions per task, an alias naming the served one.

Layout under the root directory::

    tasks/<task>/versions/<000001>/adapter.safetensors   LoRA + head weights
                                  eval.jsonl            the eval records the version was measured on
                                  duplicates.jsonl      eval records set aside as repeats of training ones
                                  manifest.json         metrics, labels, base model, offsets, sha256s
                                  report.md, *.png      the version's report (service.report)
    tasks/<task>/alias.json                             {"served": N, "pinned": bool, "reason": ...}
    tasks/<task>/events.jsonl                           promotions, rejections, rollbacks, pruning
    trainer/checkpoint.json                             which versions the trainer holds + offsets
    trainer/learner-<round>.safetensors                 the shared learner and strategy tensors it names
    router/router.json                                  the current task router: its rows and file
    router/router-<round>.safetensors                   the router's weights
    .tmp/                                               versions being written

A version is written in a temporary directory, fsynced, then renamed into place, so a reader sees
all of it or none of it. The alias and the checkpoint are replaced the same way. Trainer and servers
share nothing but this directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from service.durable_files import fsync_dir, fsync_file, save_tensors, sha256_of, write_json
from service.errors import CorruptVersion, NotFound
from service.report import REPORT_FILE
from service.settings import TASK_NAME

WEIGHTS_FILE = "adapter.safetensors"
EVAL_FILE = "eval.jsonl"
DUPLICATES_FILE = "duplicates.jsonl"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Alias:
    """Which version of a task is served, and whether an operator (or auto-rollback) pinned it there."""

    served: int
    pinned: bool
    reason: str = ""


class Registry:
    """Reads and writes versions, aliases and the trainer checkpoint under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "tasks").mkdir(parents=True, exist_ok=True)
        (root / ".tmp").mkdir(exist_ok=True)

    # --- reading ----------------------------------------------------------------------------------

    def tasks(self) -> list[str]:
        """Tasks with at least one published version."""
        return sorted(p.name for p in (self.root / "tasks").iterdir() if self.versions(p.name))

    def versions(self, task: str) -> list[int]:
        """Published versions of ``task``, ascending."""
        directory = self._task_dir(task) / "versions"
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())

    def manifest(self, task: str, version: int) -> dict[str, Any]:
        """The manifest of one version."""
        path = self._version_dir(task, version) / MANIFEST_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"task {task!r} has no version {version}") from None
        except json.JSONDecodeError as exc:
            raise CorruptVersion(f"{task} v{version}: manifest is not JSON: {exc}") from None

    def load_weights(self, task: str, version: int) -> dict[str, torch.Tensor]:
        """The weights of one version after checking every file against the manifest's sha256."""
        manifest = self.manifest(task, version)
        directory = self._version_dir(task, version)
        files: dict[str, str] = manifest.get("files", {})
        if WEIGHTS_FILE not in files:
            raise CorruptVersion(f"{task} v{version}: the manifest lists no sha256 for {WEIGHTS_FILE}")
        for name, expected in files.items():
            try:
                actual = sha256_of(directory / name)
            except FileNotFoundError:
                raise CorruptVersion(f"{task} v{version}: {name} is missing") from None
            if actual != expected:
                raise CorruptVersion(f"{task} v{version}: {name} does not match its sha256 in the manifest")
        return load_file(str(directory / WEIGHTS_FILE))

    def eval_records(self, task: str, version: int) -> list[tuple[str, str]]:
        """The (text, label) pairs the version was evaluated on."""
        path = self._version_dir(task, version) / EVAL_FILE
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [(row["text"], row["label"]) for row in rows]

    def duplicate_records(self, task: str, version: int) -> list[tuple[str, str, str]]:
        """The eval records set aside as repeats of training records when the version was published:
        (text, label, "exact" or "near"); none for versions from before they were kept."""
        rows = _json_lines(self._version_dir(task, version) / DUPLICATES_FILE)
        return [(row["text"], row["label"], row["kind"]) for row in rows]

    def evaluated_on(self, task: str, version: int, records: list[tuple[str, str]]) -> bool:
        """Whether ``records`` are exactly the records the version was evaluated on (by their sha256)."""
        digest = hashlib.sha256(b"".join(_eval_lines(records))).hexdigest()
        return bool(self.manifest(task, version)["files"][EVAL_FILE] == digest)

    def report(self, task: str, version: int) -> tuple[str, dict[str, bytes]] | None:
        """The version's report and its figures as written with it (None for a version without)."""
        directory = self._version_dir(task, version)
        try:
            markdown = (directory / REPORT_FILE).read_text()
        except FileNotFoundError:
            self.manifest(task, version)  # NotFound if the version itself is not there
            return None
        return markdown, {path.name: path.read_bytes() for path in sorted(directory.glob("*.png"))}

    def alias(self, task: str) -> Alias | None:
        """The task's alias, or None before its first promotion."""
        try:
            data = json.loads((self._task_dir(task) / "alias.json").read_text())
        except FileNotFoundError:
            return None
        return Alias(
            served=int(data["served"]), pinned=bool(data["pinned"]), reason=str(data.get("reason", ""))
        )

    def events(self, task: str) -> list[dict[str, Any]]:
        """The task's history: every promotion, rejection, rollback and pruning, oldest first."""
        return _json_lines(self._task_dir(task) / "events.jsonl")

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
        """Write a new version atomically and return its number (one more than the highest so far).

        ``extra_files`` makes files that go with it (its report) from the complete manifest, version
        number included; they are not part of the version's integrity (``files``)."""
        staging = self.root / ".tmp" / uuid.uuid4().hex
        staging.mkdir()
        try:
            try:
                save_file(weights, str(staging / WEIGHTS_FILE))
            except SafetensorError as exc:
                # safetensors reports a full or failing disk as its own error; callers handle OSError.
                raise OSError(f"cannot write {WEIGHTS_FILE}: {exc}") from exc
            _write_lines(staging / EVAL_FILE, _eval_lines(eval_records))
            repeats = ({"text": t, "label": label, "kind": k} for t, label, k in duplicate_records or [])
            _write_lines(staging / DUPLICATES_FILE, _json_line_bytes(repeats))
            files = {name: sha256_of(staging / name) for name in (WEIGHTS_FILE, EVAL_FILE)}
            versions_dir = self._task_dir(task) / "versions"
            versions_dir.mkdir(parents=True, exist_ok=True)
            with self._task_lock(task):
                version = max(self.versions(task), default=0) + 1
                body = {
                    **manifest,
                    "format": MANIFEST_FORMAT,
                    "task": task,
                    "version": version,
                    "created_at": time.time(),
                    "files": files,
                }
                write_json(staging / MANIFEST_FILE, body)
                extra = extra_files(body) if extra_files is not None else {}
                for name, content in extra.items():
                    (staging / name).write_bytes(content)
                for name in (WEIGHTS_FILE, EVAL_FILE, DUPLICATES_FILE, *extra):
                    fsync_file(staging / name)
                fsync_dir(staging)
                os.rename(staging, versions_dir / f"{version:06d}")
                fsync_dir(versions_dir)
            return version
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def set_alias(self, task: str, version: int, pinned: bool, reason: str) -> Alias:
        """Point the task's alias at an existing version, and record why."""
        with self._task_lock(task):
            return self._set_alias_locked(task, version, pinned, reason)

    def promote_unless_pinned(self, task: str, version: int, reason: str) -> bool:
        """Serve ``version`` unless the task is pinned; True when the alias moved."""
        with self._task_lock(task):
            current = self.alias(task)
            if current is not None and current.pinned:
                return False
            self._set_alias_locked(task, version, pinned=False, reason=reason)
            return True

    def _set_alias_locked(self, task: str, version: int, pinned: bool, reason: str) -> Alias:
        if version not in self.versions(task):
            raise NotFound(f"task {task!r} has no version {version}")
        previous = self.alias(task)
        write_json(
            self._task_dir(task) / "alias.json",
            {"served": version, "pinned": pinned, "reason": reason, "updated_at": time.time()},
        )
        self._append_event(
            task,
            {
                "event": "alias",
                "version": version,
                "from_version": previous.served if previous else None,
                "pinned": pinned,
                "reason": reason,
            },
        )
        return Alias(served=version, pinned=pinned, reason=reason)

    def record_event(self, task: str, event: str, version: int, reason: str) -> None:
        """Append one event (e.g. a rejected candidate) to the task's history."""
        with self._task_lock(task):
            self._append_event(task, {"event": event, "version": version, "reason": reason})

    def _append_event(self, task: str, body: dict[str, Any]) -> None:
        # Called with the task lock held, so lines from several processes never interleave.
        line = json.dumps({"at": time.time(), **body}, sort_keys=True) + "\n"
        with open(self._task_dir(task) / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def prune(self, task: str, keep: int, protect: set[int]) -> list[int]:
        """Delete all but the newest ``keep`` versions, never the served one or any in ``protect``.

        A deleted version first moves out of ``versions/`` in one rename, so readers never see part
        of it. Returns the versions deleted.
        """
        with self._task_lock(task):
            alias = self.alias(task)
            keep_set = set(self.versions(task)[-keep:]) | protect | ({alias.served} if alias else set())
            deleted = [v for v in self.versions(task) if v not in keep_set]
            for version in deleted:
                trash = self.root / ".tmp" / f"deleted-{task}-{version}-{uuid.uuid4().hex}"
                os.rename(self._version_dir(task, version), trash)
                shutil.rmtree(trash, ignore_errors=True)
                self._append_event(task, {"event": "pruned", "version": version, "reason": f"keep {keep}"})
            return deleted

    # --- trainer checkpoint -------------------------------------------------------------------------

    def read_checkpoint(self) -> dict[str, Any] | None:
        """The trainer's last durable checkpoint, or None on a fresh registry."""
        try:
            return json.loads((self.root / "trainer" / "checkpoint.json").read_text())
        except FileNotFoundError:
            return None

    def checkpoint_written_at(self) -> float | None:
        """When the checkpoint was written (epoch seconds: it is replaced whole), None if never."""
        path = self.root / "trainer" / "checkpoint.json"
        return path.stat().st_mtime if path.exists() else None

    def write_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Replace the trainer checkpoint atomically and durably."""
        (self.root / "trainer").mkdir(exist_ok=True)
        write_json(self.root / "trainer" / "checkpoint.json", checkpoint)

    def write_learner(self, round_number: int, tensors: dict[str, torch.Tensor]) -> str:
        """Write the trainer's tensors for a checkpoint durably; returns the name the checkpoint keeps.

        Written before the checkpoint that names it, so a checkpoint never names a missing file.
        """
        (self.root / "trainer").mkdir(exist_ok=True)
        name = f"learner-{round_number:06d}.safetensors"
        save_tensors(self.root / "trainer" / name, tensors)
        return name

    def read_learner(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint names."""
        return load_file(str(self.root / "trainer" / name))

    def prune_learners(self, keep: str | None) -> None:
        """Delete learner files other than ``keep`` (older checkpoints' ones)."""
        for path in (self.root / "trainer").glob("learner-*.safetensors"):
            if path.name != keep:
                path.unlink(missing_ok=True)

    # --- task router --------------------------------------------------------------------------------

    def write_router(
        self, round_number: int, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]
    ) -> None:
        """Write a router's weights, then point ``router.json`` at them; keep the previous file only."""
        directory = self.root / "router"
        directory.mkdir(exist_ok=True)
        name = f"router-{round_number:06d}.safetensors"
        save_tensors(directory / name, tensors)
        # The previous file stays: a server may have read the old manifest and be loading it now.
        previous = self.router_manifest()
        keep = {name, previous["file"] if previous else name}
        body = {**manifest, "file": name, "sha256": sha256_of(directory / name), "created_at": time.time()}
        write_json(directory / "router.json", body)
        for path in directory.glob("router-*.safetensors"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def router_manifest(self) -> dict[str, Any] | None:
        """The current router's manifest, or None before the first router."""
        try:
            return json.loads((self.root / "router" / "router.json").read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise CorruptVersion(f"router manifest is not JSON: {exc}") from None

    def load_router(self, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The weights a router manifest names, checked against its sha256."""
        path = self.root / "router" / str(manifest["file"])
        if not path.is_file() or sha256_of(path) != manifest["sha256"]:
            raise CorruptVersion(f"{path.name} is missing or does not match its sha256 in router.json")
        return load_file(str(path))

    # --- helpers ------------------------------------------------------------------------------------

    def _task_dir(self, task: str) -> Path:
        if not TASK_NAME.fullmatch(task):
            raise NotFound(f"{task[:80]!r} is not a valid task name")
        return self.root / "tasks" / task

    def _version_dir(self, task: str, version: int) -> Path:
        return self._task_dir(task) / "versions" / f"{version:06d}"

    @contextmanager
    def _task_lock(self, task: str) -> Iterator[None]:
        # Serialises version numbering and alias moves between trainer and server processes.
        directory = self._task_dir(task)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line of the file (none if there is no file)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line]


def _write_lines(path: Path, lines: Iterable[bytes]) -> None:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line)


def _json_line_bytes(rows: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """One JSON object per line, UTF-8 (what ``_json_lines`` reads back)."""
    for row in rows:
        yield (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def _eval_lines(records: list[tuple[str, str]]) -> Iterator[bytes]:
    """A version's eval file, line by line: one JSON object per (text, label)."""
    return _json_line_bytes({"text": text, "label": label} for text, label in records)
