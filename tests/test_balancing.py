"""Class-balanced sampling (service/balancing.py): counts worked out by hand, and a trainer taking
its further epochs balanced only when a task's labels are far apart in size."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from service.balancing import far_apart, oversampled
from service.datasets import TaskData, synthetic
from service.settings import Settings
from tests.helpers import train_in_process


def test_small_labels_are_oversampled_to_the_largest_and_nothing_is_dropped() -> None:
    examples = [(f"a{i}", 0) for i in range(40)] + [(f"b{i}", 1) for i in range(6)] + [("c0", 2)]
    out = oversampled(examples, random.Random(0))
    assert Counter(label for _, label in out) == {0: 40, 1: 40, 2: 40}
    assert set(out) == set(examples)  # every example is kept, only repeated
    b_copies = Counter(text for text, label in out if label == 1)
    assert sorted(b_copies.values()) == [6, 6, 7, 7, 7, 7]  # 40 = 6 x 6 + 4 drawn once more
    assert oversampled(examples, random.Random(3)) == oversampled(examples, random.Random(3))


def test_only_labels_far_apart_in_size_call_for_balancing() -> None:
    assert far_apart([40, 6, 30], above_ratio=3.0)
    assert not far_apart([30, 10], above_ratio=3.0)  # 3x is not above 3
    assert not far_apart([40, 6], above_ratio=0)  # off
    assert not far_apart([40, 0], above_ratio=3.0)  # a label with no records is short, not small
    assert not far_apart([], above_ratio=3.0)


@pytest.mark.parametrize(("above", "per_further_epoch"), [(3.0, 3 * 30), (0.0, 66)])
def test_a_task_with_labels_far_apart_trains_its_further_epochs_balanced(
    settings: Settings, above: float, per_further_epoch: int
) -> None:
    task = synthetic(num_tasks=1, labels_per_task=3, train_per_label=30)[0]
    # label2 keeps 6 of its 30 training records: the largest label has 5x its records.
    kept = [row for row in task.train if row[1] != "label2"] + [r for r in task.train if r[1] == "label2"][:6]
    trainer = train_in_process(
        settings.model_copy(update={"balance_labels_above": above}), [TaskData(task.name, kept, task.eval)]
    )
    examples = trainer.metrics.registry.get_sample_value(
        "continual_training_examples_total", {"task": task.name, "strategy": settings.strategy}
    )
    # The first epoch streams the 66 records as they come; every further one is (or is not) balanced.
    assert examples == 66 + (settings.epochs - 1) * per_further_epoch
