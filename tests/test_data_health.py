"""Judging a task's data (service/data_health.py): hand-computed cases, and the trainer publishing,
exporting and restoring the judgement with every version."""

from __future__ import annotations

import pytest

from service.data_health import DataHealth, assess, normalized
from service.datasets import TaskData, synthetic
from service.registry import Registry
from service.settings import Settings
from tests.helpers import new_trainer, train_in_process


def test_enough_records_for_the_task_and_every_label_is_sufficient() -> None:
    health = assess(
        ["a", "b"], {"a": 30, "b": 20}, eval_records=7, min_task_train_records=50, min_label_train_records=20
    )
    assert health.sufficient and health.short_labels == () and health.summary() == "ok"
    assert (health.train_records, health.eval_records, health.imbalance_ratio) == (50, 7, 1.5)


def test_short_labels_and_a_short_task_are_named_smallest_first() -> None:
    # "c" is known from eval records only: 0 training records, short, but not in the imbalance ratio.
    health = assess(
        ["a", "b", "c"],
        {"a": 40, "b": 5},
        eval_records=0,
        min_task_train_records=100,
        min_label_train_records=10,
    )
    assert not health.sufficient
    assert health.short_labels == (("c", 0), ("b", 5))
    assert health.imbalance_ratio == 8.0
    assert health.summary() == "45 of 100 records; 2 label(s) under 10: c, b"


def test_one_label_is_balanced_and_no_minimum_is_always_met() -> None:
    health = assess(["a"], {"a": 3}, eval_records=0, min_task_train_records=0, min_label_train_records=0)
    assert health.sufficient and health.imbalance_ratio == 1.0


def test_the_manifest_form_reads_back_and_old_manifests_have_none() -> None:
    health = assess(["x", "y"], {"x": 9, "y": 3}, 4, 10, 5)
    assert DataHealth.from_manifest({"data": health.to_manifest()}) == health
    assert health.to_manifest()["short_labels"] == {"y": 3} and not health.to_manifest()["sufficient"]
    assert DataHealth.from_manifest({"labels": ["x"]}) is None


def test_exact_duplicates_are_compared_without_case_punctuation_or_spacing() -> None:
    assert normalized("  What's my BALANCE?? ") == normalized("what s my balance") == "what s my balance"
    assert normalized("what is my balance") != normalized("what's my balance")


def test_the_trainer_judges_publishes_exports_and_restores_it(settings: Settings) -> None:
    task = synthetic(num_tasks=1, labels_per_task=3, train_per_label=30)[0]
    # label2 keeps 6 of its 30 training records: short (under 20) and 5x smaller than the others.
    kept = [row for row in task.train if row[1] != "label2"] + [r for r in task.train if r[1] == "label2"][:6]
    trainer = train_in_process(settings, [TaskData(task.name, kept, task.eval)])
    data = Registry(settings.registry_dir).manifest(task.name, 1)["data"]
    assert data == {
        "sufficient": False,
        "train_records": 66,
        "eval_records": len(task.eval),
        "min_task_train_records": settings.min_task_train_records,
        "min_label_train_records": settings.min_label_train_records,
        "short_labels": {"label2": 6},
        "imbalance_ratio": 5.0,
        "exact_duplicates": 0,
        "near_duplicates": 0,
    }

    for owner in (trainer, new_trainer(settings)):  # a restarted trainer exports it again at once
        registry = owner.metrics.registry
        assert registry.get_sample_value("continual_task_data_sufficient", {"task": task.name}) == 0
        assert registry.get_sample_value("continual_task_train_records", {"task": task.name}) == 66
        assert registry.get_sample_value("continual_task_short_labels", {"task": task.name}) == 1
        assert registry.get_sample_value(
            "continual_task_label_imbalance_ratio", {"task": task.name}
        ) == pytest.approx(5.0)
