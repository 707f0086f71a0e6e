"""Every registered strategy passes the same contract, on the trainer and a tiny real BERT.

Hooks run (each strategy's own mechanism leaves its mark), state round-trips through a checkpoint,
the same seed gives the same result, and a shared learner's published versions answer exactly as
the trainer does. Strategy-specific checks follow the contract.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from service.datasets import TaskData, synthetic
from service.learner import SHARED_ADAPTER
from service.registry import Registry
from service.served_model import build_served_model
from service.settings import Settings
from service.trainer import Trainer
from strategies import registered
from tests.helpers import incoming, new_trainer

STRATEGIES = sorted(registered())
SHARED = [name for name, cls in registered().items() if not cls.isolates_tasks]


def learn_in_rounds(settings: Settings, tasks: list[TaskData]) -> Trainer:
    """One round per task, offsets continuing across rounds."""
    trainer = new_trainer(settings)
    offset = 0
    for task in tasks:
        batch = [
            type(row)(0, offset + i, row.record, row.raw_key, row.raw_value)
            for i, row in enumerate(incoming([task]))
        ]
        offset += len(batch)
        trainer.absorb(batch)
        trainer.close_round({0: offset})
    return trainer


def with_strategy(settings: Settings, strategy: str, **changes: Any) -> Settings:
    return settings.model_copy(update={"strategy": strategy, "replay_memory_size": 48, **changes})


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def learned_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    adapters = [SHARED_ADAPTER] if trainer.training.learner is not None else list(trainer.tasks)
    return {f"{a}/{k}": v for a in adapters for k, v in trainer.training.model.weights(a).items()}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_learns_each_task_and_its_state_round_trips(settings: Settings, strategy: str) -> None:
    settings = with_strategy(settings, strategy)
    tasks = synthetic(num_tasks=3, labels_per_task=4)
    trainer = learn_in_rounds(settings, tasks)
    for task in tasks:
        # Right after its round (naive may forget it later: that is what it is for).
        learned = trainer.assessment.matrix[task.name][task.name]
        assert learned >= 0.5, (task.name, learned)  # chance: 0.25
    restored = new_trainer(settings)
    assert_same_state(trainer.training.strategy.state_dict(), restored.training.strategy.state_dict())
    before, after = learned_weights(trainer), learned_weights(restored)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert restored.training.columns == trainer.training.columns
    for task in tasks:
        texts = [text for text, _ in task.eval]
        assert torch.equal(
            trainer.training.predict_task(trainer.tasks[task.name], texts),
            restored.training.predict_task(restored.tasks[task.name], texts),
        )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_gives_the_same_result_for_the_same_seed(settings: Settings, strategy: str) -> None:
    tasks = synthetic(num_tasks=2, labels_per_task=3)
    a = learn_in_rounds(with_strategy(settings, strategy), tasks)
    b = learn_in_rounds(with_strategy(settings, strategy, registry_dir=settings.registry_dir / "b"), tasks)
    wa, wb = learned_weights(a), learned_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert_same_state(a.training.strategy.state_dict(), b.training.strategy.state_dict())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_published_versions_answer_as_the_trainer_does(settings: Settings, strategy: str) -> None:
    """A version holds everything a server needs: for a shared learner, its adapter and the task's rows."""
    settings = with_strategy(settings, strategy)
    tasks = synthetic(num_tasks=2, labels_per_task=3)
    trainer = learn_in_rounds(settings, tasks)
    registry = Registry(settings.registry_dir)
    learners = [name for name in registry.store.children("trainer/") if name.startswith("learner-")]
    checkpoint = registry.read_checkpoint() or {}
    if strategy in SHARED:
        assert learners == [checkpoint["learner"]]  # older learner files are pruned
    served = build_served_model(settings)  # what a server answers with
    for task in tasks:
        state = trainer.tasks[task.name]
        manifest = registry.manifest(task.name, state.version or 0)
        assert manifest["strategy"] == strategy and manifest["labels"] == state.labels
        served.load(task.name, registry.load_weights(task.name, state.version or 0))
        texts = [text for text, _ in task.eval]
        adapters = [task.name] * len(texts)
        answers = torch.stack(served.outputs(texts, adapters))
        assert torch.equal(
            answers.argmax(-1), trainer.training.predict_task(trainer.tasks[task.name], texts).argmax(-1)
        )


def test_replay_keeps_a_bounded_memory_balanced_over_labels(settings: Settings) -> None:
    tasks = synthetic(num_tasks=3, labels_per_task=4)
    trainer = learn_in_rounds(with_strategy(settings, "replay"), tasks)
    memory = trainer.training.strategy.memory  # type: ignore[attr-defined]
    per_column: dict[int, int] = {}
    for _, column in memory:
        per_column[column] = per_column.get(column, 0) + 1
    assert len(memory) == 48 and set(per_column) == set(range(12))
    assert set(per_column.values()) == {4}  # 48 examples over 12 labels
    texts = {text for task in tasks for text, _ in task.train}
    assert all(text in texts for text, _ in memory)
    # Every step after the first round trains on as many remembered examples as new ones.
    replayed = trainer.training.strategy.replay(16)
    assert len(replayed) == 16 and all(example in memory for example in replayed)


def test_ewc_importance_covers_only_trainable_parameters_and_penalises_moving(settings: Settings) -> None:
    trainer = learn_in_rounds(with_strategy(settings, "ewc"), synthetic(num_tasks=2, labels_per_task=3))
    strategy: Any = trainer.training.strategy
    assert trainer.training.learner is not None
    trainable = trainer.training.learner.named_parameters()
    assert set(strategy.importance) == set(trainable)
    assert all(float(value.sum()) > 0 for value in strategy.importance.values())
    assert strategy.extra_loss(trainer.training.learner, [], torch.zeros(0)) == 0  # at the anchor
    with torch.no_grad():
        trainable["head.weight"].add_(0.1)
    assert float(strategy.extra_loss(trainer.training.learner, [], torch.zeros(0)).detach()) > 0


def test_replay_and_ewc_combined_each_count_one_round_per_round(settings: Settings) -> None:
    # Their seeds come from their round counts: one object holding both must not count twice.
    tasks = synthetic(num_tasks=2, labels_per_task=3)
    trainer = learn_in_rounds(with_strategy(settings, "replay+ewc"), tasks)
    state = trainer.training.strategy.state_dict()
    assert (state["replay"]["rounds"], state["ewc.rounds"]) == (2, 2)


def test_lwf_distils_from_the_learner_as_the_last_round_left_it(settings: Settings) -> None:
    first, second = synthetic(num_tasks=2, labels_per_task=3)
    trainer = learn_in_rounds(with_strategy(settings, "lwf"), [first])
    assert trainer.training.learner is not None
    texts = [text for text, _ in second.train[:8]]
    before = trainer.training.learner.logits(texts).detach()
    trainer.training.strategy.before_round(trainer.training.learner)
    # Right after the snapshot the teacher answers like the learner, so there is nothing to distil.
    assert float(
        trainer.training.strategy.extra_loss(trainer.training.learner, texts, before) or 0
    ) == pytest.approx(0, abs=1e-6)
    moved = before.clone()
    moved[:, 0] += 5.0
    assert float(trainer.training.strategy.extra_loss(trainer.training.learner, texts, moved) or 0) > 0.01


def test_a_registry_is_not_continued_by_a_strategy_that_learns_another_way(settings: Settings) -> None:
    learn_in_rounds(settings, synthetic(num_tasks=1))  # lora-per-task: one adapter per task
    with pytest.raises(ValueError, match="written by strategy 'lora-per-task'"):
        new_trainer(with_strategy(settings, "replay"))
    # Between strategies that share one learner, the learner carries over.
    shared = with_strategy(settings, "naive", registry_dir=settings.registry_dir / "shared")
    before = learn_in_rounds(shared, synthetic(num_tasks=1))
    after = new_trainer(shared.model_copy(update={"strategy": "ewc"}))
    assert (
        after.training.columns == before.training.columns
        and learned_weights(after).keys() == learned_weights(before).keys()
    )


@pytest.mark.parametrize("strategy", SHARED)
def test_a_shared_learner_serves_a_new_task_first_and_trains_it_next_round(
    settings: Settings, strategy: str
) -> None:
    settings = with_strategy(settings, strategy, first_version_records=60)
    first, second = synthetic(num_tasks=2, train_per_label=30, eval_per_label=10)
    trainer = learn_in_rounds(settings.model_copy(update={"first_version_records": 0}), [first])
    trainer = new_trainer(settings)  # the same registry, now serving new tasks first
    rows = [
        type(row)(0, 10_000 + i, row.record, row.raw_key, row.raw_value)
        for i, row in enumerate(incoming([second]))
    ]
    trainer.absorb(rows[:60])
    assert trainer.round_due(idle_s=0.0, positions={0: 10_060})
    trainer.close_round({0: 10_060})
    assert trainer.tasks[second.name].version == 1  # out before any step on it

    def stepped(task: str) -> float:
        labels = {"task": task, "strategy": strategy}
        return trainer.metrics.registry.get_sample_value("continual_training_examples_total", labels) or 0

    assert stepped(second.name) == 0
    trainer.absorb(rows[60:])
    trainer.close_round({0: 10_000 + len(rows)})
    state = trainer.tasks[second.name]
    assert state.version == 2 and stepped(second.name) >= len(second.train) * settings.epochs
    assert state.accuracy is not None and state.accuracy >= 0.5  # chance: 0.25


DIGEST_OF_ONE_ROUND = """
import hashlib, sys
from service.datasets import synthetic
from service.learner import SHARED_ADAPTER
from service.settings import load_settings
from tests.helpers import train_in_process

trainer = train_in_process(load_settings(), synthetic(num_tasks=3, labels_per_task=3))
weights = trainer.training.model.weights(SHARED_ADAPTER)
print(hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest())
"""


def test_a_batch_of_several_tasks_trains_the_same_under_any_hash_seed(settings: Settings) -> None:
    """Steps follow the order records arrived in, not a set's order, which changes with the hash seed."""
    digests = set()
    for hash_seed in ("1", "2", "3"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUAL_")}
        env.update(
            PYTHONHASHSEED=hash_seed,
            CONTINUAL_STRATEGY="naive",
            CONTINUAL_BASE_MODEL=str(settings.base_model),
            CONTINUAL_REGISTRY_DIR=str(settings.registry_dir / hash_seed),
            CONTINUAL_BATCH_SIZE=str(settings.batch_size),
            CONTINUAL_EPOCHS="1",
            CONTINUAL_FIRST_VERSION_RECORDS="0",
        )
        run = subprocess.run(
            [sys.executable, "-c", DIGEST_OF_ONE_ROUND], env=env, capture_output=True, text=True, check=False
        )
        assert run.returncode == 0, run.stderr[-2000:]
        digests.add(run.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests
