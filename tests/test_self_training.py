"""Self-training: the precision threshold chosen on eval records, unlabeled texts pseudo-labelled and
trained on when their task trains, the pool kept across a restart, pseudo-labels checked later."""

from __future__ import annotations

import torch

from service.data_health import normalized
from service.datasets import synthetic
from service.ingest import Incoming
from service.records import Record
from service.registry import Registry
from service.self_training import MIN_EVAL_RECORDS, precision_threshold, pseudo_labels
from service.settings import Settings
from tests.helpers import incoming, new_trainer


def test_the_threshold_is_the_lowest_confidence_still_precise_enough() -> None:
    confidence = torch.tensor([0.6, 0.9, 0.7, 0.8], dtype=torch.float64)
    right = torch.tensor([True, True, False, True])  # best first: 0.9 ✓, 0.8 ✓, 0.7 ✗, 0.6 ✓
    assert precision_threshold(confidence, right, 0.75) == 0.6  # all four: 3 of 4
    assert precision_threshold(confidence, right, 0.9) == 0.8  # the top two only
    assert precision_threshold(confidence, ~right, 0.5) is None  # the most confident is wrong


def test_pseudo_labels_are_the_texts_answered_at_least_that_confidently() -> None:
    eval_scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]] * 5, dtype=torch.float64)
    truth = torch.tensor([0, 1, 1, 1] * 5)  # the 0.7 answers are wrong: the threshold is 0.8
    scores = torch.tensor([[0.95, 0.05], [0.3, 0.7], [0.1, 0.9]])
    given = pseudo_labels(eval_scores, truth, ["a", "b", "c"], scores, precision=0.95)
    assert given is not None and given.threshold == 0.8
    assert given.examples == [("a", 0), ("c", 1)]
    # Too few eval records to tell a precision: none.
    few = MIN_EVAL_RECORDS - 1
    assert pseudo_labels(eval_scores[:few], truth[:few], ["a"], scores[:1], 0.95) is None


def test_a_task_learns_from_its_unlabeled_texts_keeps_them_and_checks_its_pseudo_labels(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"self_training_precision": 0.5})
    (task,) = synthetic(num_tasks=1, train_per_label=40)
    labelled, held_back = task.train[:80], task.train[80:]
    unlabeled = [
        Record(id=f"u{i}", task=task.name, text=text, label=None, split="unlabeled")
        for i, (text, _) in enumerate(held_back)
    ]
    batch = incoming([task.__class__(task.name, labelled, task.eval)])
    batch += [Incoming(0, len(batch) + i, r, r.task.encode(), r.to_json()) for i, r in enumerate(unlabeled)]
    trainer = new_trainer(settings)
    trainer.absorb(batch)
    trainer.close_round({0: len(batch)})
    state = trainer.tasks[task.name]
    assert state.unlabeled == [text for text, _ in held_back]
    assert 0 < state.pseudo_labelled <= len(held_back)
    assert len(state.pseudo_labels) == state.pseudo_labelled
    registry = trainer.metrics.registry
    assert (
        registry.get_sample_value("continual_task_pseudo_labelled", {"task": task.name})
        == state.pseudo_labelled
    )
    assert registry.get_sample_value("continual_task_unlabeled_records", {"task": task.name}) == len(
        held_back
    )

    # The pool and what was given come back with the checkpoint.
    restarted = new_trainer(settings)
    again = restarted.tasks[task.name]
    assert (again.unlabeled, again.pseudo_labels) == (state.unlabeled, state.pseudo_labels)
    # Labelled copies of pseudo-labelled texts check them.
    copies = [(text, label) for text, label in held_back if normalized(text) in state.pseudo_labels]
    assert copies
    given = {text: state.pseudo_labels[normalized(text)] for text, _ in copies}
    records = [
        Record(id=f"c{i}", task=task.name, text=text, label=label, split="train")
        for i, (text, label) in enumerate(copies)
    ]
    restarted.absorb([Incoming(1, i, r, r.task.encode(), r.to_json()) for i, r in enumerate(records)])
    right = sum(given[text] == label for text, label in copies)
    assert (again.pseudo_checked, again.pseudo_right) == (len(copies), right)
    assert again.pseudo_label_accuracy == right / len(copies)
    assert Registry(settings.registry_dir).read_checkpoint() is not None


def test_each_self_training_epoch_labels_the_pool_again_and_trains_on_it(settings: Settings) -> None:
    (task,) = synthetic(num_tasks=1, train_per_label=40)
    labelled, held_back = task.train[:80], task.train[80:]
    unlabeled = [
        Record(id=f"u{i}", task=task.name, text=text, label=None, split="unlabeled")
        for i, (text, _) in enumerate(held_back)
    ]
    trained = {}
    for epochs in (1, 2):
        configured = settings.model_copy(
            update={
                "self_training_precision": 0.5,
                "self_training_epochs": epochs,
                "registry_dir": settings.registry_dir / str(epochs),
            }
        )
        batch = incoming([task.__class__(task.name, labelled, task.eval)])
        batch += [
            Incoming(0, len(batch) + i, r, r.task.encode(), r.to_json()) for i, r in enumerate(unlabeled)
        ]
        trainer = new_trainer(configured)
        trainer.absorb(batch)
        trainer.close_round({0: len(batch)})
        examples = trainer.metrics.registry.get_sample_value(
            "continual_training_examples_total", {"task": task.name, "strategy": settings.strategy}
        )
        trained[epochs] = (int(examples or 0), trainer.tasks[task.name].pseudo_labelled)
    # The second epoch trains the round's 80 examples again and the pool as labelled anew.
    (one, _), (two, pseudo_second) = trained[1], trained[2]
    assert pseudo_second > 0
    assert two - one == len(labelled) + pseudo_second
