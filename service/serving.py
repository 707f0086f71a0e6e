"""The adapters a server has loaded, kept in step with the registry's aliases, and answering.

Each task's served version is loaded under the name ``task@vN``; a new version is loaded next to the
old one (by the inference engine, between batches) and switched in. A request takes its version and
queues its rows in one step under the serving lock, and a switch retires the old version under the
same lock; the engine unloads a retired version only once no queued row needs it, so a request runs
entirely on the version it started with. The previous version stays loaded, which makes a rollback
to it instant.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from service.drift import DriftMonitor
from service.engine import InferenceEngine, Row, engine_shape
from service.errors import CorruptVersion, FailedPrecondition, InvalidArgument, NotFound
from service.generation_pool import GenerationPool
from service.generative_settings import GENERATIVE_KIND
from service.model import unit_prototypes
from service.registry import Alias, Registry
from service.router import Router, load_router
from service.served_model import ServedModel
from service.server_metrics import ServerMetrics
from service.settings import TASK_NAME, Settings

log = logging.getLogger(__name__)

#: Sharpens the softmax over tasks' cosine similarities into a task confidence.
ROUTING_TEMPERATURE = 0.05


@dataclass(frozen=True, eq=False)
class LoadedVersion:
    """One version in memory."""

    task: str
    version: int
    labels: tuple[str, ...]
    #: Unit-length mean base-model embedding per trained label (rows), for task inference; may be empty.
    prototypes: torch.Tensor

    @property
    def adapter(self) -> str:
        """The adapter name inside the model; unique per version, never reused."""
        return f"{self.task}@v{self.version}"


class AdapterPool:
    """Loads, swaps and unloads adapter versions as the registry's aliases move."""

    def __init__(
        self, settings: Settings, registry: Registry, model: ServedModel, metrics: ServerMetrics
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.model = model
        self.metrics = metrics
        workers, threads = engine_shape(settings.inference_workers, settings.torch_threads)
        self.engine = InferenceEngine(
            model,
            metrics,
            settings.max_batch_size,
            settings.max_batch_wait_ms,
            settings.inference_queue_size,
            capacity=settings.max_loaded_adapters,
            weights=self._adapter_weights,
            workers=workers,
            threads=threads,
        )
        self._drift_references: dict[str, tuple[int, list[str], dict[str, int]]] = {}
        self.drift: DriftMonitor | None = None
        if settings.drift_enabled:
            self.drift = DriftMonitor(
                settings.drift(),
                embed=self._base_embeddings,
                reference=self._drift_reference,
                on_result=metrics.drift.record,
                on_dropped=metrics.drift.dropped.inc,
            )
        # Which version serves each task: taken, with the request's rows queued, in one step (see above).
        self._serving = threading.Lock()
        # Serialises alias syncs (watcher thread and admin calls), so a version is loaded once.
        self._sync_lock = threading.RLock()
        self._loaded: dict[tuple[str, int], LoadedVersion] = {}
        self._served: dict[str, LoadedVersion] = {}
        self._previous: dict[str, LoadedVersion] = {}
        self._failed: set[tuple[str, int]] = set()
        #: Generative tasks: their versions are answered by ``generation`` (the language model is
        #: loaded when the first one is seen).
        self.generative: set[str] = set()
        self.generation = GenerationPool(settings, registry, metrics)
        #: The task router and the file it came from (None before the trainer wrote one).
        self._router: Router | None = None
        self._router_file: str | None = None

    @property
    def hidden_size(self) -> int:
        """Width of a base-model embedding (the last columns of a base row's features)."""
        return self.model.hidden_size

    def served(self) -> dict[str, LoadedVersion]:
        """The version each task is answered with right now."""
        return dict(self._served)

    def sync(self) -> None:
        """Bring every task in line with its alias; a version that fails to load is skipped and logged."""
        for task, alias in self.registry.aliases().items():
            try:
                self.sync_task(task, alias)
            except CorruptVersion as exc:
                log.error("refusing a version, still serving what was loaded: %s", exc)
        if self.settings.task_inference == "router":
            try:
                self._sync_router()
            except CorruptVersion as exc:
                log.error("refusing a router, still routing with the one loaded: %s", exc)

    def _sync_router(self) -> None:
        """Load the trainer's newest router when it changed (the one in use stays until then)."""
        manifest = self.registry.router_manifest()
        if manifest is None or manifest["file"] == self._router_file:
            return
        if manifest.get("base_model") != self.settings.base_model:
            raise CorruptVersion(
                f"router {manifest['file']} was fitted on base model {manifest.get('base_model')!r}, "
                f"this server runs {self.settings.base_model!r}"
            )
        # The manifest just checked, not a newer one the trainer may have written meanwhile.
        router = load_router(self.registry, manifest)
        with self._serving:
            self._router, self._router_file = router, str(manifest["file"])
        log.info("task router %s loaded (%d labels)", manifest["file"], len(router.rows) if router else 0)

    def sync_task(self, task: str, listed: Alias | None = None) -> LoadedVersion | None:
        """Serve the task's alias target, loading it if needed. Raises CorruptVersion if it cannot.

        ``listed``: the alias a poll's listing saw. When it names what is served, nothing is read;
        otherwise the alias is read again here, under the lock, since an operator's rollback may
        have moved it after the listing (acting on the listing would undo the rollback)."""
        with self._sync_lock:
            current = self._served.get(task)
            if task in self.generative:
                served = self.generation.served().get(task)
                if listed is None or served != listed.served:
                    self.generation.sync_task(task, self.registry.alias(task))
                return None
            if listed is not None and current is not None and current.version == listed.served:
                return current
            alias = self.registry.alias(task)
            if alias is None or (current is not None and current.version == alias.served):
                return current
            if self._generative(task, alias.served):
                self.generation.sync_task(task, alias)
                return None
            if (task, alias.served) in self._failed:
                return current
            target = self._load(task, alias.served)
            self._switch(task, target)
            self.metrics.served_version.labels(task=task).set(target.version)
            self.metrics.version_swaps.labels(task=task).inc()
            log.info("task %r now served by v%d (was %s)", task, target.version, current and current.version)
            return target

    def _switch(self, task: str, target: LoadedVersion) -> None:
        with self._serving:
            current = self._served.get(task)
            self._served[task] = target
            if current is not None and current != target:
                self._previous[task] = current
            keep = {target, self._previous.get(task)}
            for key, loaded in list(self._loaded.items()):
                if key[0] == task and loaded not in keep:
                    self.engine.retire(loaded.adapter)
                    del self._loaded[key]

    def _load(self, task: str, version: int) -> LoadedVersion:
        """The version, checked; its adapter is loaded into the model now if the task's current one is
        there or there is room (a request for it loads it otherwise, see the engine)."""
        if (task, version) in self._loaded:
            return self._loaded[(task, version)]
        try:
            manifest, weights = self.registry.servable(task, version, self.settings.base_model)
            loaded = LoadedVersion(
                task=task,
                version=version,
                labels=tuple(manifest["labels"]),
                prototypes=unit_prototypes(weights),
            )
            current = self._served.get(task)
            if self.engine.has_room() or (current is not None and self.engine.is_resident(current.adapter)):
                self.engine.between_batches(lambda: self.engine.load(loaded.adapter, weights))
        except CorruptVersion:
            self._failed.add((task, version))
            self.metrics.load_failures.labels(task=task).inc()
            raise
        self._loaded[(task, version)] = loaded
        return loaded

    def _adapter_weights(self, adapter: str) -> dict[str, torch.Tensor]:
        """The checked weights of ``adapter`` (``task@vN``), for the engine to load on demand."""
        task, version = adapter.rsplit("@v", 1)
        try:
            return self.registry.load_weights(task, int(version))
        except FileNotFoundError:
            raise CorruptVersion(f"{task} v{version} is no longer in the registry") from None

    @contextmanager
    def serving(self) -> Iterator[tuple[dict[str, LoadedVersion], Router | None]]:
        """The version serving each task and the router, held still: rows queued with the engine
        inside stay answerable (a version switched out meanwhile is unloaded only after them)."""
        with self._serving:
            yield self._served, self._router

    def _base_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """Base-model embeddings of ``texts`` (drift's references), through the engine like requests."""
        outputs = self.engine.run([Row(text) for text in texts])
        if not outputs:
            return np.empty((0, self.hidden_size), np.float32)
        return torch.stack(outputs)[:, -self.hidden_size :].numpy()

    def _drift_reference(self, task: str) -> tuple[object, list[str], dict[str, int]]:
        """A key that changes when the reference does, the served version's eval texts, its label mix.

        New versions mostly keep their eval set, so the key is the texts' hash, not the version: the
        drift thread re-embeds a reference only when it really changed.
        """
        loaded = self._served.get(task)
        if loaded is None:
            return None, [], {}
        cached = self._drift_references.get(task)
        if cached is None or cached[0] != loaded.version:
            manifest = self.registry.manifest(task, loaded.version)
            texts = [text for text, _ in self.registry.eval_records(task, loaded.version)]
            cached = (loaded.version, texts, dict(manifest.get("label_counts", {})))
            self._drift_references[task] = cached
        return hash(tuple(cached[1])), cached[1], cached[2]

    def rollback(self, task: str, version: int, reason: str) -> LoadedVersion:
        """Serve an earlier version (the one before the served one when 0) and pin it."""
        versions = self.versions(task)
        served = self.served_version(task)
        if version == 0:
            current = served or versions[-1]
            earlier = [v for v in versions if v < current]
            if not earlier:
                raise FailedPrecondition(f"task {task!r} has no version before v{current} to roll back to")
            version = earlier[-1]
        return self._move_alias(task, version, pinned=True, reason=f"rollback: {reason or 'by an operator'}")

    def promote(self, task: str, version: int, reason: str) -> LoadedVersion:
        """Serve ``version`` (the latest when 0) and unpin the task."""
        versions = self.versions(task)
        return self._move_alias(
            task, version or versions[-1], pinned=False, reason=f"promote: {reason or 'by an operator'}"
        )

    def _generative(self, task: str, version: int) -> bool:
        """Whether ``task`` is generative (its kind never changes: read once, from a version)."""
        if (
            task not in self.generative
            and self.registry.manifest(task, version).get("kind") == GENERATIVE_KIND
        ):
            self.generative.add(task)
        return task in self.generative

    def served_version(self, task: str) -> int:
        """The version this server answers ``task`` with, classifier or generative (0: none)."""
        if task in self.generative:
            return self.generation.served().get(task, 0)
        loaded = self._served.get(task)
        return loaded.version if loaded is not None else 0

    def versions(self, task: str) -> list[int]:
        """The task's versions; InvalidArgument for a bad name, NotFound when it has none."""
        if not TASK_NAME.fullmatch(task):
            raise InvalidArgument(f"task {task[:80]!r} is not a valid task name ({TASK_NAME.pattern})")
        versions = self.registry.versions(task)
        if not versions:
            raise NotFound(f"task {task!r} has no published versions")
        return versions

    def _move_alias(self, task: str, version: int, pinned: bool, reason: str) -> LoadedVersion:
        if version not in self.registry.versions(task):
            raise NotFound(f"task {task!r} has no version {version}")
        if self._generative(task, version):
            with self._sync_lock:
                self.generation.forget_failure(task, version)
                self.generation.load(task, version)  # a corrupt version is refused, nothing moves
                alias = self.registry.set_alias(task, version, pinned, reason)
                self.generation.sync_task(task, alias)
            return LoadedVersion(task, version, (), torch.empty(0, 0))
        with self._sync_lock:
            # Load before moving the alias, so a corrupt version is refused and nothing changes.
            self._failed.discard((task, version))
            self._load(task, version)
            self.registry.set_alias(task, version, pinned, reason)
            loaded = self.sync_task(task)
        assert loaded is not None
        return loaded


class RegistryWatcher(threading.Thread):
    """Polls the registry and keeps the pool in step, without ever letting an error end the thread."""

    def __init__(self, pool: AdapterPool, interval_s: float) -> None:
        super().__init__(name="registry-watcher", daemon=True)
        self.pool = pool
        self.interval_s = interval_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        """Sync until stopped."""
        while not self.stop_event.is_set():
            try:
                self.pool.sync()
            except Exception:
                log.exception("registry sync failed; retrying")
            self.stop_event.wait(self.interval_s)


def nearest_task(
    embeddings: torch.Tensor, prototypes: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each embedding, the index of the task whose nearest unit label prototype is closest (cosine),
    and a confidence: a softmax over the tasks' best similarities, sharpened by ROUTING_TEMPERATURE."""
    unit = torch.nn.functional.normalize(embeddings, dim=-1)
    best = torch.stack([(unit @ task.T).max(dim=-1).values for task in prototypes], dim=-1)
    weights = torch.softmax(best / ROUTING_TEMPERATURE, dim=-1)
    confidences, choices = weights.max(dim=-1)
    return choices, confidences
