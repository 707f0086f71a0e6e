"""Class balancing (service/balancing.py): counts and priors worked out by hand, a trainer taking its
further epochs oversampled only when a task's labels are far apart in size, and logit adjustment
moving what the head learns."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from service.balancing import far_apart, logit_adjustment, oversampled
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


def test_the_logit_adjustment_is_tau_times_the_log_prior_of_each_column() -> None:
    adjustment = logit_adjustment({0: 90, 2: 10, 3: 0}, width=4, tau=2.0)
    expected = [2 * math.log(0.9), 0.0, 2 * math.log(0.1), 0.0]
    assert torch.allclose(adjustment, torch.tensor(expected))


def _prior_learned(settings: Settings, method: str) -> tuple[int, list[float]]:
    """Train a task whose training texts are all one text, label2 with 6 of 66: what can be learned
    is the label prior alone. Returns (examples trained, the trained task's probabilities for it)."""
    task = synthetic(num_tasks=1, labels_per_task=3, train_per_label=30)[0]
    labels = [label for _, label in task.train if label != "label2"] + ["label2"] * 6
    registry = settings.registry_dir / f"{method}-{settings.balance_labels_above}"  # a fresh trainer
    torch.manual_seed(0)  # a shared head's new rows start at random: the same draw every time
    trainer = train_in_process(
        settings.model_copy(update={"balance_method": method, "registry_dir": registry}),
        [TaskData(task.name, [("the same words", label) for label in labels], task.eval)],
    )
    examples = trainer.metrics.registry.get_sample_value(
        "continual_training_examples_total", {"task": task.name, "strategy": settings.strategy}
    )
    state = trainer.tasks[task.name]
    probabilities = trainer.training.predict_task(state, ["the same words"])[0]
    return int(examples or 0), [float(probabilities[state.labels.index(f"label{i}")]) for i in range(3)]


def test_logit_adjustment_learns_balanced_answers_where_plain_training_learns_the_prior(
    settings: Settings,
) -> None:
    plain_examples, plain = _prior_learned(
        settings.model_copy(update={"balance_labels_above": 0.0}), "oversample"
    )
    adjusted_examples, adjusted = _prior_learned(settings, "logit-adjustment")
    # Logit adjustment repeats no example (the further epochs are not oversampled)...
    assert adjusted_examples == plain_examples == settings.epochs * 66
    # ...and where the text says nothing, plain cross-entropy moves the answers towards the prior (6/66
    # for label2) while the adjusted loss leaves the prior to its log-prior term, whose optimum is the
    # uniform answer. (A few Adam steps on one text reach neither optimum: the test asks for the gap.)
    assert plain[2] < 0.25
    assert adjusted[2] > plain[2] + 0.15


def test_a_shared_head_is_not_logit_adjusted_by_one_tasks_prior(settings: Settings) -> None:
    # Its competitors are every task's labels, rehearsed from a balanced memory: not the task's prior.
    shared = settings.model_copy(update={"strategy": "naive"})
    _, plain = _prior_learned(shared, "oversample")
    _, adjusted = _prior_learned(shared, "logit-adjustment")
    assert adjusted == pytest.approx(plain, abs=1e-6)
