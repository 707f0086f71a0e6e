"""What the trainer keeps to answer requests that name no task: the memory of training records'
base features the task router is fitted on (``service.router``), the eval records' features its
out-of-scope rule is calibrated on (``service.out_of_scope``), and the router as last fitted."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from service.feature_memory import FeatureMemory
from service.metrics import TrainerMetrics
from service.model import unit_prototypes
from service.out_of_scope import OUTSIDE_MEMORY_PREFIX, SCOPE_MEMORY_PREFIX
from service.registry import Registry
from service.router import Router, fit_router, load_router, scoped
from service.settings import Settings
from service.tasks import TaskState


class TaskInference:
    """The router's memories (saved with the trainer's checkpoint) and the router fitted on them."""

    def __init__(self, settings: Settings, metrics: TrainerMetrics, fits_router: bool = True) -> None:
        """``fits_router`` False: keep the memories only (another fits the router over several)."""
        self.settings = settings
        self.metrics = metrics
        #: Whether requests naming no task are routed by a router (else by label prototypes alone).
        self.enabled = settings.task_inference == "router"
        self.fits_router = fits_router
        #: Base features of training texts, evenly per label, that the router is fitted on.
        self.memory = FeatureMemory(settings.router_memory_size, settings.seed)
        #: Base features of eval records, evenly per label: what the out-of-scope threshold is set on;
        #: and of eval records that belong to no task, when the stream has them.
        size = settings.out_of_scope_memory_size
        self.scope_memory = FeatureMemory(size, settings.seed, SCOPE_MEMORY_PREFIX)
        self.scope_outside = FeatureMemory(size, settings.seed, OUTSIDE_MEMORY_PREFIX)
        #: The router as last fitted (None before two labels, or with prototype routing).
        self.router: Router | None = None
        self._fitted = 0

    def restored(self, registry: Registry) -> None:
        """Once the checkpoint put the memories back: the router it wrote, its memory counted as fitted."""
        self.router = load_router(registry) if self.enabled else None
        self._fitted = self.memory.added

    def refit(
        self, tasks: Mapping[str, TaskState], hidden_size: int, heartbeat: Callable[[], None]
    ) -> Router | None:
        """The router refit on the memory, with its out-of-scope rule, if the memory changed since the
        last fit (else None: nothing new). ``heartbeat`` is called during the fit."""
        if not (self.enabled and self.fits_router) or self._fitted == self.memory.added:
            return None
        started = time.monotonic()
        router = fit_router(self.memory, heartbeat=heartbeat)
        self._fitted = self.memory.added
        if router is None:
            return None
        states = [tasks[task] for task in sorted(router.tasks())]
        prototypes = torch.cat([unit_prototypes(state.prototype_tensors(hidden_size)) for state in states])
        router = scoped(router, self.scope_memory, self.scope_outside, prototypes, self.settings)
        if router.scope is not None and router.scope.outside_recall is not None:
            self.metrics.out_of_scope_recall.set(router.scope.outside_recall)
        self.router = router
        self.metrics.router_fit_seconds.observe(time.monotonic() - started)
        return router


def write_router(
    registry: Registry, router: Router, tasks: Mapping[str, TaskState], round_number: int, base_model: str
) -> None:
    """Write ``router`` with the version of every task it was fitted beside: it answers alone only
    for those (``Router.speaks_for``)."""
    manifest: dict[str, Any] = {
        "rows": [list(row) for row in router.rows],
        "round": round_number,
        "base_model": base_model,
        "versions": {
            name: tasks[name].version
            for name in sorted(router.tasks())
            if name in tasks and tasks[name].version is not None
        },
    }
    if router.scope is not None:
        manifest["out_of_scope"] = router.scope.manifest()
    registry.write_router(round_number, router.tensors(), manifest)
