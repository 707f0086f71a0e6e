"""Publishing: a task's new version into the registry, the gate that decides whether it is served,
and the live-accuracy watch that rolls the served version back when it fails on new eval records.

The served version is measured next to the trainer's own adapter (loaded once under
``task@served-vN`` and kept while it is served), on the same eval records as the candidate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from service.data_health import DataHealth, assess
from service.drift import PageHinkley
from service.errors import CorruptVersion, NotFound
from service.metrics import TrainerMetrics
from service.promotion import Decision, LiveAccuracy, gate
from service.records import Record
from service.registry import Registry
from service.report import REPORT_FILE, render
from service.settings import Settings
from service.tasks import TaskState
from service.training import Training, first_version_weights

log = logging.getLogger(__name__)
#: Eval records set aside as repeats that a manifest lists (for the report).
DUPLICATES_SHOWN = 20


class Publisher:
    """Writes versions, gates and promotes them, and watches the served ones; owns the loaded
    served versions, the live-accuracy windows and the accuracy-drift detectors."""

    def __init__(
        self, settings: Settings, registry: Registry, metrics: TrainerMetrics, training: Training
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.training = training
        #: Per task, the served version loaded for comparison: (version, adapter name, labels).
        self._references: dict[str, tuple[int, str, list[str]]] = {}
        self.live = LiveAccuracy(settings.live_accuracy_window, settings.live_accuracy_floor)
        self._accuracy_drift: dict[str, tuple[int, PageHinkley]] = {}

    def publish(self, state: TaskState, offsets: dict[int, int], round_number: int) -> tuple[int, Decision]:
        """Gate the task's trainer state against the served version, write it as a new version; returns
        the version and whether it may be served (applied by ``apply`` once the round is durable)."""
        decision = self._gate(state)
        previous = state.version
        weights = self.training.version_weights(state)
        health = self._data_health(state)
        manifest = self._manifest(state, health, offsets, round_number)
        report = self._report_files(state.name)
        version = self.registry.publish(
            state.name, weights, state.eval_records, manifest, report, state.duplicate_records
        )
        state.version = version
        strategy = self.training.strategy.name
        self.metrics.versions_published.labels(task=state.name, strategy=strategy).inc()
        self.metrics.record_data(state.name, health)
        self.metrics.macro_accuracy.labels(task=state.name).set(_or_nan(state.macro_accuracy))
        self.metrics.record_accuracy(state.name, version, previous, _or_nan(state.accuracy))
        if state.round_losses:
            self.metrics.training_loss.labels(task=state.name, strategy=strategy).set(
                sum(state.round_losses) / len(state.round_losses)
            )
        return version, decision

    def publish_first(self, state: TaskState) -> int:
        """Serve a new task at once, ahead of the round that will checkpoint it: an untrained first
        version whose head rows are the label prototypes of its training records so far. ``state`` is
        left as it is: the task's records are trained, published and checkpointed as usual after."""
        health = self._data_health(state)
        manifest = self._manifest(state, health, {}, 0)
        weights = first_version_weights(self.training.model, state)
        version = self.registry.publish(state.name, weights, [], manifest, self._report_files(state.name))
        self.metrics.versions_published.labels(task=state.name, strategy=self.training.strategy.name).inc()
        self.metrics.record_data(state.name, health)
        self.apply(state.name, version, gate(None, None, None, self.settings.promotion_tolerance))
        return version

    def publish_first_from(self, task: str, records: list[Record]) -> int:
        """``publish_first`` for a task the trainer has not taken in yet, from its first records."""
        state = TaskState(name=task)
        limit = self.settings.max_labels_per_task
        examples = [
            example
            for record in records
            if state.refusal(record, limit) is None and (example := state.take(record)) is not None
        ]
        state.add_to_prototypes(examples, self.training.embed([text for text, _ in examples]))
        return self.publish_first(state)

    def apply(self, task: str, version: int, decision: Decision) -> None:
        """Serve ``version`` if the gate let it through (and the task is not pinned), then prune."""
        if decision.promote and self.registry.promote_unless_pinned(task, version, decision.reason):
            self.metrics.versions_promoted.labels(task=task).inc()
        else:
            reason = decision.reason if not decision.promote else "the task was pinned meanwhile"
            self.registry.record_event(task, "candidate", version, reason)
            self.metrics.versions_rejected.labels(task=task).inc()
            log.warning("task %r: v%d stays a candidate: %s", task, version, reason)
        protect = {version}
        if task in self._references:
            protect.add(self._references[task][0])
        for deleted in self.registry.prune(task, self.settings.keep_versions, protect):
            log.info("task %r: pruned v%d", task, deleted)

    def _gate(self, state: TaskState) -> Decision:
        """Whether the version about to be published may be served (see service.promotion)."""
        alias = self.registry.alias(state.name)
        if alias is None:
            return gate(state.accuracy, None, None, self.settings.promotion_tolerance)
        if alias.pinned:
            return Decision(False, f"task is pinned to v{alias.served} ({alias.reason})")
        try:
            served = self._served_accuracy(state, alias.served)
        except CorruptVersion as exc:
            return Decision(True, f"served v{alias.served} cannot be read ({exc}); replacing it")
        return gate(state.accuracy, served, alias.served, self.settings.promotion_tolerance)

    def _served_accuracy(self, state: TaskState, version: int) -> float | None:
        """The served version's accuracy on the task's eval records.

        Measured once is enough: the version's manifest holds its accuracy on the records it was
        published with, which are the first records of the task's eval set
        (``Registry.measured_prefix``), so only the records after them are measured now. Before,
        every round re-measured every served version on all of them: about 8 s per task and round on
        CLINC150, and every task is republished each round under a shared learner.
        """
        records = state.eval_records
        known, correct = self.registry.measured_prefix(state.name, version, records)
        adapter, labels = self._served_reference(state.name, version)
        outcomes = self.training.outcomes(adapter, range(len(labels)), labels, records[known:])
        total = known + len(outcomes)
        return (correct + sum(outcomes)) / total if total else None

    def _served_reference(self, task: str, version: int) -> tuple[str, list[str]]:
        """The served version loaded beside the trainer's own adapter, to measure it on the same records."""
        cached = self._references.get(task)
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
        model = self.training.model
        if cached is not None:
            model.remove(cached[1])
        name = f"{task}@served-v{version}"
        model.load(name, self.registry.load_weights(task, version))
        labels = list(self.registry.manifest(task, version)["labels"])
        self._references[task] = (version, name, labels)
        return name, labels

    def watch_live_accuracy(self, state: TaskState) -> None:
        """Judge the served version on the eval records that arrived this round; roll back if it fails."""
        alias = self.registry.alias(state.name)
        fresh = state.eval_records[state.eval_judged :]
        if alias is None or not fresh:
            return
        try:
            adapter, labels = self._served_reference(state.name, alias.served)
        except CorruptVersion as exc:
            log.error("task %r: cannot judge the served version: %s", state.name, exc)
            return
        self.judge_live(
            state.name, alias.served, self.training.outcomes(adapter, range(len(labels)), labels, fresh)
        )

    def judge_live(self, task: str, served: int, outcomes: list[bool]) -> None:
        """Count whether the served version answered each newly arrived eval record right (its live
        accuracy and accuracy drift); roll back when it falls below the floor. For every kind of task."""
        self.live.observe(task, served, outcomes)
        version, page_hinkley = self._accuracy_drift.get(task, (served, PageHinkley()))
        if version != served:
            page_hinkley = PageHinkley()  # a new served version is judged from scratch
        self._accuracy_drift[task] = (served, page_hinkley)
        self.metrics.drift.record(task, page_hinkley.add([float(o) for o in outcomes]))
        live = self.live.accuracy(task)
        if live is not None:
            self.metrics.live_accuracy.labels(task=task).set(live)
        failing = self.live.below_floor(task)
        if failing is not None:
            self._roll_back(task, served, failing)

    def _roll_back(self, task: str, served: int, failing: float) -> None:
        """Serve the newest earlier version whose accuracy reached the floor, pinned (if there is one)."""
        floor = self.settings.live_accuracy_floor
        good = [
            v
            for v in reversed(self.registry.versions(task))
            if v < served and (self.registry.manifest(task, v)["metrics"]["accuracy"] or 0.0) >= floor
        ]
        reason = (
            f"auto-rollback: live accuracy {failing:.3f} of v{served} on the last "
            f"{self.live.window} eval records is below the floor {floor}"
        )
        if not good:
            log.error("task %r: %s, but no earlier version reached the floor; still serving it", task, reason)
            return
        self.registry.set_alias(task, good[0], pinned=True, reason=reason)
        self.live.reset(task)
        self.metrics.auto_rollbacks.labels(task=task).inc()
        log.error("task %r: rolled back to v%d: %s", task, good[0], reason)

    def _report_files(self, task: str) -> Callable[[dict[str, Any]], dict[str, bytes]]:
        """What writes a version's report (``service.report``), against the version served now."""
        alias = self.registry.alias(task)
        try:
            served = self.registry.manifest(task, alias.served) if alias is not None else None
        except (CorruptVersion, NotFound):
            served = None

        def files(manifest: dict[str, Any]) -> dict[str, bytes]:
            try:
                markdown, figures = render(manifest, served)
            except Exception:  # a report is for people: it never stands between a round and durability
                log.exception("task %r: the report of v%s could not be made", task, manifest.get("version"))
                return {}
            return {REPORT_FILE: markdown.encode(), **figures}

        return files

    def _data_health(self, state: TaskState) -> DataHealth:
        return assess(
            state.labels,
            state.label_counts,
            len(state.eval_records),
            self.settings.min_task_train_records,
            self.settings.min_label_train_records,
            state.duplicate_counts(),
        )

    def _manifest(
        self, state: TaskState, health: DataHealth, offsets: dict[int, int], round_number: int
    ) -> dict[str, Any]:
        model = self.training.model
        lora = model.lora
        return {
            "base_model": self.settings.base_model,
            "strategy": self.training.strategy.name,
            "labels": state.labels,
            "label_counts": state.label_counts,
            "parent_version": state.version,
            "lora": {
                "r": lora.r,
                "alpha": lora.alpha,
                "dropout": lora.dropout,
                "target_modules": list(lora.target_modules),
            },
            "max_length": model.max_length,
            "metrics": {
                "accuracy": state.accuracy,
                "macro_accuracy": state.macro_accuracy,
                "label_accuracy": state.label_accuracy,
                "best_accuracy": state.best_accuracy,
                "eval_records": len(state.eval_records),
                "train_records": state.train_seen,
            },
            "data": health.to_manifest(),
            "mistakes": state.mistakes,
            # The first repeats set aside, for the report (all of them: the version's duplicates.jsonl).
            "duplicates": [list(record) for record in state.duplicate_records[:DUPLICATES_SHOWN]],
            "kafka": {"topic": self.settings.kafka_topic, "offsets": {str(p): o for p, o in offsets.items()}},
            "round": round_number,
        }


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value
