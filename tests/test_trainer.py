"""The trainer in-process on a tiny real BERT: it learns, publishes, checkpoints and restores exactly."""

from __future__ import annotations

import pytest
import torch

from service.datasets import TaskData, synthetic
from service.ingest import Incoming
from service.learner import SHARED_ADAPTER
from service.registry import Alias, Registry
from service.settings import Settings
from service.trainer import Trainer
from tests.helpers import incoming, new_trainer, train_in_process


def test_each_task_is_learned_far_above_chance_and_published(settings: Settings) -> None:
    tasks = synthetic(num_tasks=3, labels_per_task=4)
    trainer = train_in_process(settings, tasks)
    registry = Registry(settings.registry_dir)
    for task in tasks:
        state = trainer.tasks[task.name]
        assert state.accuracy is not None and state.accuracy >= 0.7, (
            task.name,
            state.accuracy,
        )  # chance: 0.25
        assert registry.alias(task.name) == Alias(served=1, pinned=False, reason="first version of the task")
        manifest = registry.manifest(task.name, 1)
        assert manifest["metrics"] == {
            "accuracy": state.accuracy,
            "macro_accuracy": state.macro_accuracy,
            "label_accuracy": state.label_accuracy,
            "best_accuracy": state.accuracy,
            "train_records": len(task.train),
            "eval_records": len(task.eval),
        }
        assert sorted(manifest["labels"]) == sorted({label for _, label in task.train})
        # Synthetic eval sets hold as many records of every label: macro accuracy equals micro.
        assert sorted(state.label_accuracy) == sorted(manifest["labels"])
        assert state.macro_accuracy == pytest.approx(state.accuracy)
    checkpoint = registry.read_checkpoint()
    assert checkpoint is not None and checkpoint["offsets"] == {
        "0": sum(len(t.train) + len(t.eval) for t in tasks)
    }


def test_a_restarted_trainer_resumes_from_its_checkpoint_exactly(settings: Settings) -> None:
    first = train_in_process(settings, synthetic(num_tasks=2))
    restored = new_trainer(settings)
    assert restored.durability.offsets == first.durability.offsets
    for name, state in first.tasks.items():
        again = restored.tasks[name]
        assert (again.labels, again.train_seen, again.eval_records, again.version) == (
            state.labels,
            state.train_seen,
            state.eval_records,
            state.version,
        )
        before, after = first.training.model.weights(name), restored.training.model.weights(name)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_untouched_tasks_keep_their_version_and_new_data_makes_a_new_one(settings: Settings) -> None:
    first, second = synthetic(num_tasks=2)
    trainer = train_in_process(settings, [first])
    batch = incoming([second])
    trainer.absorb(batch)
    report = trainer.close_round({0: 10_000})
    assert report.published == {second.name: 1}
    assert Registry(settings.registry_dir).versions(first.name) == [1]
    trainer.absorb(incoming([first])[:20])
    assert trainer.close_round({0: 20_000}).published == {first.name: 2}


def test_the_same_seed_gives_the_same_weights(settings: Settings) -> None:
    tasks = synthetic(num_tasks=1)
    a = train_in_process(settings, tasks)
    b = train_in_process(settings.model_copy(update={"registry_dir": settings.registry_dir / "b"}), tasks)
    wa, wb = a.training.model.weights(tasks[0].name), b.training.model.weights(tasks[0].name)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_accuracy_matrix_and_backward_transfer(settings: Settings) -> None:
    first, second, third = synthetic(num_tasks=3)
    trainer = train_in_process(settings, [first])
    for offset, task in ((2, second), (3, third)):
        trainer.absorb(incoming([task]))
        trainer.close_round({0: offset * 10_000})
    matrix = trainer.assessment.matrix
    assert list(matrix) == [first.name, second.name, third.name]
    assert set(matrix[first.name]) == {first.name}
    assert set(matrix[third.name]) == {first.name, second.name, third.name}
    # One adapter per task: learning later tasks leaves earlier ones exactly where they were.
    assert matrix[third.name][first.name] == matrix[first.name][first.name]
    summary = trainer.learning_summary()
    assert summary.bwt == 0.0
    assert summary.forgetting == {first.name: 0.0, second.name: 0.0, third.name: 0.0}
    assert summary.acc == pytest.approx(sum(matrix[third.name].values()) / 3)
    assert trainer.metrics.registry.get_sample_value("continual_mean_accuracy") == pytest.approx(summary.acc)
    gauge = trainer.metrics.registry.get_sample_value(
        "continual_accuracy_matrix", {"after_task": second.name, "task": first.name}
    )
    assert gauge == matrix[second.name][first.name]
    # Macro accuracy beside micro, cell for cell: the mean of each task's labels' accuracies.
    macro = trainer.assessment.macro_matrix
    assert {row: set(cells) for row, cells in macro.items()} == {row: set(c) for row, c in matrix.items()}
    assert macro[third.name][third.name] == trainer.tasks[third.name].macro_accuracy
    assert (
        trainer.metrics.registry.get_sample_value(
            "continual_macro_accuracy_matrix", {"after_task": second.name, "task": first.name}
        )
        == macro[second.name][first.name]
    )
    restored = new_trainer(settings)
    assert restored.assessment.matrix == matrix
    assert restored.assessment.macro_matrix == macro


def test_forward_transfer_when_a_tasks_eval_records_come_first(settings: Settings) -> None:
    first, second = synthetic(num_tasks=2)
    trainer = train_in_process(settings, [first])
    assert trainer.learning_summary().fwt is None
    eval_only = TaskData(name=second.name, train=[], eval=second.eval)
    trainer.absorb(incoming([eval_only]))
    trainer.close_round({0: 20_000})
    before = trainer.assessment.before_learning[second.name]
    trainer.absorb(incoming([TaskData(name=second.name, train=second.train, eval=[])]))
    trainer.close_round({0: 30_000})
    # Measured before the task was learned, against chance over its 4 labels.
    assert trainer.learning_summary().fwt == pytest.approx(before - 1 / 4)
    assert trainer.tasks[second.name].accuracy > before
    assert new_trainer(settings).learning_summary() == trainer.learning_summary()


def test_forward_transfer_takes_the_last_measurement_before_learning(settings: Settings) -> None:
    # A shared adapter: what a later task teaches changes an unlearned task's accuracy, and FWT's
    # R[i-1][i] is the row right before the task is learned, not its first measurement.
    settings = settings.model_copy(update={"strategy": "naive"})
    first, second, third = synthetic(num_tasks=3)
    trainer = train_in_process(settings, [first])
    trainer.absorb(incoming([TaskData(name=second.name, train=[], eval=second.eval)]))
    trainer.close_round({0: 20_000})
    first_measurement = trainer.assessment.before_learning[second.name]
    trainer.absorb(incoming([third]))
    trainer.close_round({0: 30_000})
    row_before = trainer.assessment.matrix[third.name][second.name]
    assert row_before != first_measurement  # learning the third task moved it
    assert trainer.assessment.before_learning[second.name] == row_before
    trainer.absorb(incoming([TaskData(name=second.name, train=second.train, eval=[])]))
    trainer.close_round({0: 40_000})
    assert trainer.assessment.before_learning[second.name] == row_before
    assert trainer.learning_summary().fwt == pytest.approx(row_before - 1 / 4)


def test_a_new_task_is_served_after_its_first_records_and_refined_next_round(settings: Settings) -> None:
    settings = settings.model_copy(update={"first_version_records": 100})
    (task,) = synthetic(num_tasks=1, train_per_label=40, eval_per_label=10)
    trainer = new_trainer(settings)
    batch = incoming([TaskData(name=task.name, train=task.train, eval=[])])
    trainer.absorb(batch[:100])
    # Due at once, without waiting for the stream to go quiet.
    assert trainer.round_due(idle_s=0.0, positions={0: 100})
    trainer.close_round({0: 100})
    assert trainer.tasks[task.name].version == 1
    assert Registry(settings.registry_dir).alias(task.name) is not None
    examples = trainer.metrics.registry.get_sample_value(
        "continual_training_examples_total", {"task": task.name, "strategy": "lora-per-task"}
    )
    assert examples == 0  # served from its label prototypes before any training step

    trainer.absorb(batch[100:] + incoming([TaskData(name=task.name, train=[], eval=task.eval)]))
    assert not trainer.round_due(idle_s=0.0, positions={0: 200})  # an ordinary round now
    trainer.close_round({0: 200})
    state = trainer.tasks[task.name]
    assert state.version == 2
    # The round after ran every epoch over all 160 records.
    examples = trainer.metrics.registry.get_sample_value(
        "continual_training_examples_total", {"task": task.name, "strategy": "lora-per-task"}
    )
    assert examples == 160 * settings.epochs
    assert state.accuracy is not None and state.accuracy >= 0.8


def test_head_rows_start_at_the_label_prototypes(settings: Settings) -> None:
    (task,) = synthetic(num_tasks=1, train_per_label=40, eval_per_label=10)
    accuracies = {}
    for init in ("prototypes", "random"):
        # One pass only: the start matters most.
        trainer = new_trainer(
            settings.model_copy(
                update={"head_init": init, "epochs": 1, "registry_dir": settings.registry_dir / init}
            )
        )
        trainer.absorb(incoming([task]))
        trainer.close_round({0: 200})
        accuracies[init] = trainer.tasks[task.name].accuracy
    assert accuracies["prototypes"] > accuracies["random"], accuracies


def test_records_served_before_training_survive_a_restart(settings: Settings) -> None:
    settings = settings.model_copy(update={"first_version_records": 100})
    (task,) = synthetic(num_tasks=1, train_per_label=25, eval_per_label=10)
    trainer = new_trainer(settings)
    trainer.absorb(incoming([TaskData(name=task.name, train=task.train, eval=[])]))
    trainer.close_round({0: 100})  # v1 is out untrained; its 100 records' offsets are committed
    # As if the trainer died now: a restart must still train those 100 records, not skip them.
    restarted = new_trainer(settings)
    assert len(restarted.tasks[task.name].pending) == 100
    restarted.absorb(incoming([TaskData(name=task.name, train=[], eval=task.eval)]))
    restarted.close_round({0: 140})
    examples = restarted.metrics.registry.get_sample_value(
        "continual_training_examples_total", {"task": task.name, "strategy": "lora-per-task"}
    )
    assert examples == 100 * settings.epochs
    assert restarted.tasks[task.name].version == 2
    assert restarted.learning_summary().acc is not None


@pytest.mark.parametrize("strategy", ["lora-per-task", "replay+ewc"])
def test_a_restart_between_rounds_changes_no_weight(settings: Settings, strategy: str) -> None:
    # Dropout on in the base model: the generator's state must come back as well as AdamW's moments.
    settings = settings.model_copy(update={"strategy": strategy, "base_dropout": True})
    first, second = synthetic(num_tasks=2, train_per_label=30, eval_per_label=5)

    def part(task: TaskData, i: int) -> TaskData:
        return TaskData(name=task.name, train=task.train[i::3], eval=task.eval if i == 0 else [])

    rounds = [[part(first, 0)], [part(first, 1), part(second, 0)], [part(second, 1), part(first, 2)]]

    def learn(registry_dir: str, restart_after: int | None) -> Trainer:
        trained = settings.model_copy(update={"registry_dir": settings.registry_dir / registry_dir})
        trainer = new_trainer(trained)
        offset = 0
        for number, tasks in enumerate(rounds):
            batch = [
                Incoming(0, offset + i, item.record, item.raw_key, item.raw_value)
                for i, item in enumerate(incoming(tasks))
            ]
            offset += len(batch)
            trainer.absorb(batch)
            trainer.close_round({0: offset})
            if number == restart_after:
                trainer = new_trainer(trained)  # as if killed after the round was durable
        return trainer

    straight, restarted = learn("straight", None), learn("restarted", 1)
    for adapter in [first.name, second.name] if strategy == "lora-per-task" else [SHARED_ADAPTER]:
        before = straight.training.model.weights(adapter)
        after = restarted.training.model.weights(adapter)
        assert before.keys() == after.keys()
        for key in before:
            assert torch.allclose(before[key], after[key], atol=1e-6), (adapter, key)


def test_a_new_task_is_served_before_a_round_trains_other_tasks(settings: Settings) -> None:
    settings = settings.model_copy(update={"first_version_records": 20})
    first, second = synthetic(num_tasks=2, train_per_label=20, eval_per_label=5)
    trainer = new_trainer(settings)
    trainer.absorb(incoming([TaskData(first.name, first.train[:20], [])]))
    trainer.close_round({0: 20})  # the first task's untrained first version
    # The rest of the first task and the start of the second close one round together.
    batch = incoming(
        [TaskData(first.name, first.train[20:], first.eval), TaskData(second.name, second.train[:20], [])]
    )
    batch = [Incoming(0, 20 + i, item.record, item.raw_key, item.raw_value) for i, item in enumerate(batch)]
    trainer.absorb(batch)
    report = trainer.close_round({0: 20 + len(batch)})
    assert report.trained == {first.name: len(first.train)}
    registry = Registry(settings.registry_dir)
    assert registry.versions(second.name) == [1, 2]
    early, trained = registry.manifest(second.name, 1), registry.manifest(first.name, 2)
    # Served before the first task's epochs, not after them.
    assert early["created_at"] < trained["created_at"]
    assert registry.alias(second.name) is not None


@pytest.mark.parametrize("strategy", ["lora-per-task", "replay+ewc"])
def test_linear_decay_brings_each_round_down_to_its_last_step_rate(settings: Settings, strategy: str) -> None:
    settings = settings.model_copy(update={"strategy": strategy, "learning_rate_decay": "linear"})
    (task,) = synthetic(num_tasks=1, labels_per_task=2, train_per_label=20, eval_per_label=4)
    trainer = train_in_process(settings, [task])
    plain, _ = trainer.training.optimisers.state()
    (lora, head), steps = plain["param_groups"][0], 4 * -(-len(task.train) // settings.batch_size)
    # The four further epochs (of five) decay to 1/steps of the set rates; the next round starts again.
    assert lora["lr"] == pytest.approx(settings.learning_rate / steps)
    assert head["lr"] == pytest.approx(settings.head_learning_rate / steps)
    trainer.absorb(incoming([task])[:16])
    trainer.close_round({0: 10_000})
    (lora, _), *_ = trainer.training.optimisers.state()[0]["param_groups"]
    assert lora["lr"] == pytest.approx(settings.learning_rate / 4)


def test_warm_up_takes_the_rates_up_over_an_adapters_first_steps(settings: Settings) -> None:
    settings = settings.model_copy(update={"warmup_steps": 8, "epochs": 2})
    (task,) = synthetic(num_tasks=1, labels_per_task=2, train_per_label=40, eval_per_label=4)
    trainer = new_trainer(settings)
    train = [item for item in incoming([task]) if item.record.split == "train"]
    rates = []
    for step in range(3):  # one micro-batch of 16, one step each
        trainer.absorb(train[step * 16 : (step + 1) * 16])
        ((lora, head),) = trainer.training.optimisers.state()[0]["param_groups"]
        rates.extend([lora["lr"], head["lr"]])
    set_rates = (settings.learning_rate, settings.head_learning_rate)
    expected = [rate * k / 8 for k in (1, 2, 3) for rate in set_rates]
    assert rates == pytest.approx(expected)
    trainer.absorb(train[48:])
    trainer.close_round({0: len(train)})  # 5 + 5 steps in all: past the warm-up, at the set rates
    ((lora, head),) = trainer.training.optimisers.state()[0]["param_groups"]
    assert (lora["lr"], head["lr"]) == pytest.approx((settings.learning_rate, settings.head_learning_rate))
