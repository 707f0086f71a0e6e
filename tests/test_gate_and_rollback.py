"""The trainer's promotion gate and automatic rollback, on a tiny real BERT and real registry."""

from __future__ import annotations

from service.datasets import TaskData, synthetic
from service.registry import Registry
from service.settings import Settings
from service.trainer import Trainer
from tests.helpers import incoming, new_trainer

_ALL = synthetic(num_tasks=1, labels_per_task=4, train_per_label=80, eval_per_label=20)[0]
TASK = TaskData(name=_ALL.name, train=_ALL.train, eval=_ALL.eval[:40])
# Eval records of the same task that arrive later, with correct labels.
FRESH_EVAL = TaskData(name=_ALL.name, train=[], eval=_ALL.eval[40:])
# The same task with every label shifted by one: what a broken labelling job upstream would send.
LABELS = sorted({label for _, label in TASK.train})
SHIFTED = {label: LABELS[(i + 1) % len(LABELS)] for i, label in enumerate(LABELS)}
MISLABELLED = TaskData(name=TASK.name, train=[(t, SHIFTED[lbl]) for t, lbl in TASK.train], eval=[])


def run_round(trainer: Trainer, data: TaskData, offset: int) -> None:
    trainer.absorb(incoming([data]))
    trainer.close_round({0: offset})


def metric(trainer: Trainer, name: str) -> float:
    return trainer.metrics.registry.get_sample_value(name, {"task": TASK.name}) or 0.0


def test_the_gate_keeps_a_worse_version_as_a_candidate(settings: Settings) -> None:
    trainer = new_trainer(settings)
    run_round(trainer, TASK, 1)
    registry = Registry(settings.registry_dir)
    good = trainer.tasks[TASK.name].accuracy
    assert good is not None and good >= 0.7

    run_round(trainer, MISLABELLED, 2)
    assert trainer.tasks[TASK.name].accuracy < good - settings.promotion_tolerance  # type: ignore[operator]
    alias = registry.alias(TASK.name)
    assert alias is not None and alias.served == 1 and not alias.pinned
    assert registry.versions(TASK.name) == [1, 2]
    last = registry.events(TASK.name)[-1]
    assert (last["event"], last["version"]) == ("candidate", 2)
    assert "below served v1" in last["reason"]
    assert metric(trainer, "continual_versions_rejected_total") == 1
    assert metric(trainer, "continual_versions_promoted_total") == 1


def test_auto_rollback_fires_when_live_accuracy_falls(settings: Settings) -> None:
    # A tolerant gate lets the broken version through; the live watch must catch it.
    settings = settings.model_copy(
        update={"promotion_tolerance": 1.0, "live_accuracy_floor": 0.5, "live_accuracy_window": 40}
    )
    trainer = new_trainer(settings)
    run_round(trainer, TASK, 1)
    run_round(trainer, MISLABELLED, 2)
    registry = Registry(settings.registry_dir)
    assert registry.alias(TASK.name).served == 2  # type: ignore[union-attr]

    run_round(trainer, FRESH_EVAL, 3)
    alias = registry.alias(TASK.name)
    assert alias is not None and (alias.served, alias.pinned) == (1, True)
    assert alias.reason.startswith("auto-rollback: live accuracy")
    assert metric(trainer, "continual_auto_rollbacks_total") == 1
    # Pinned: the version this round published waits as a candidate.
    assert registry.events(TASK.name)[-1]["event"] == "candidate"


def test_auto_rollback_stays_quiet_while_accuracy_holds(settings: Settings) -> None:
    settings = settings.model_copy(update={"live_accuracy_floor": 0.5, "live_accuracy_window": 40})
    trainer = new_trainer(settings)
    run_round(trainer, TASK, 1)
    for offset in (2, 3):
        run_round(trainer, FRESH_EVAL, offset)
    alias = Registry(settings.registry_dir).alias(TASK.name)
    assert alias is not None and not alias.pinned
    assert metric(trainer, "continual_auto_rollbacks_total") == 0
    assert metric(trainer, "continual_live_accuracy") >= 0.5
