"""Drift of the training stream: each task's new training texts against its eval texts (MMD on
base-model embeddings), a window at a time. The server watches what it is asked; this watches
what the trainer is taught."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

import numpy as np

from service.drift import MIN_REFERENCE, MMDDrift
from service.metrics import TrainerMetrics
from service.settings import Settings
from service.tasks import TaskState

log = logging.getLogger(__name__)


class TrainingDrift:
    """Owns each task's input-drift test and the training texts waiting for a full window."""

    def __init__(
        self, settings: Settings, metrics: TrainerMetrics, embed: Callable[[Sequence[str]], np.ndarray]
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.embed = embed
        self._detectors: dict[str, MMDDrift] = {}
        #: Per task, the base-model embeddings of training texts waiting for a full window.
        self._pending: dict[str, list[np.ndarray]] = {}
        self._sampler = random.Random(settings.seed)

    def judge(self, state: TaskState, embeddings: np.ndarray) -> bool:
        """Add the base-model embeddings of the task's new training texts (the ones its prototypes were
        just given: embedding them again here cost 5-9% of a round) and test every full window; True
        when one drifted and the settings say to adapt now."""
        pending = self._pending.setdefault(state.name, [])
        pending.extend(embeddings)
        if len(pending) < self.settings.drift_window:
            return False
        self._pending[state.name] = []
        detector = self._detectors.get(state.name)
        if detector is None:
            reference = [text for text, _ in state.eval_records[: self.settings.drift_reference_size]]
            if len(reference) < MIN_REFERENCE:
                return False  # no reference yet: the task's eval records have not arrived
            detector = MMDDrift(
                self.embed(reference),
                self.settings.drift_window,
                self.settings.drift_permutations,
                self.settings.drift_alpha,
                seed=self.settings.seed,
                detector="training_input",
            )
            self._detectors[state.name] = detector
        rate = self.settings.drift_sample_rate
        sampled = [row for row in pending if self._sampler.random() < rate]
        adapt = False
        for result in detector.add(np.stack(sampled) if sampled else np.empty((0, pending[0].shape[0]))):
            self.metrics.drift.record(state.name, result)
            if result.drifted:
                log.warning(
                    "task %r: new training records drifted from its reference (MMD² %.4f, p %.4g)",
                    state.name,
                    result.statistic,
                    result.p_value,
                )
                adapt = adapt or self.settings.drift_reaction == "adapt"
        return adapt
