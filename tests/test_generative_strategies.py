"""Generative tasks sharing one adapter (service.generative_strategy) on a tiny Llama: every task's
version is the shared adapter; naive learning forgets the earlier task where replay keeps it; the
memory and the adapter survive a restart; an unknown strategy is a settings error naming the field."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from service.generative import Pair
from service.generative_strategy import SHARED_ADAPTER, GenerativeStrategy
from service.ingest import Incoming
from service.records import GenerativeRecord
from service.registry import Registry
from service.settings import Settings, SettingsError, load_settings
from service.trainer import Trainer
from tests.helpers import new_trainer


@pytest.fixture
def settings(settings: Settings, tiny_language_model_dir: Path) -> Settings:
    return settings.model_copy(
        update={
            "language_model": str(tiny_language_model_dir),
            "generative_learning_rate": 3e-3,
            "generative_epochs": 12,
            "generative_batch_size": 8,
            "generative_anchor_pairs": 0,
            "promotion_tolerance": 1.0,
        }
    )


def pairs(task: str, answer: str, prompts: list[str], start: int) -> list[Incoming]:
    out = []
    for i, prompt in enumerate(prompts):
        for split in ("train", "eval"):
            record = GenerativeRecord(
                id=f"{split}{i}", task=task, prompt=prompt, response=answer, split=split
            )  # type: ignore[arg-type]
            out.append(Incoming(0, start + len(out), record, task.encode(), record.to_json()))
    return out


def learn_two(settings: Settings) -> Trainer:
    trainer = new_trainer(settings)
    for batch in (
        pairs("stock", "yes", [f"Is item {i} in stock?" for i in range(16)], 0),
        pairs("weather", "no", [f"Will it rain in town {i} today?" for i in range(16)], 100),
    ):
        trainer.absorb(batch)
        trainer.close_round({0: batch[-1].offset + 1})
    return trainer


@pytest.mark.parametrize("strategy", ["naive", "replay"])
def test_a_shared_adapter_forgets_without_replay_and_keeps_with_it(settings: Settings, strategy: str) -> None:
    settings = settings.model_copy(update={"generative_strategy": strategy})
    trainer = learn_two(settings)
    registry = Registry(settings.registry_dir)
    # The second round moved the shared adapter: both tasks got a version of it.
    assert registry.versions("stock") == [1, 2] and registry.versions("weather") == [1]
    stock, weather = registry.load_weights("stock", 2), registry.load_weights("weather", 1)
    assert all(torch.equal(stock[k], weather[k]) for k in stock)
    assert registry.manifest("weather", 1)["strategy"] == strategy
    after = trainer.generative.tasks["stock"].accuracy
    first_row = trainer.assessment.matrix["stock"]["stock"]
    assert first_row == 1.0
    if strategy == "naive":
        assert after is not None and after < 0.5, after  # "no" everywhere now
    else:
        assert after == 1.0
        # A restart restores the shared adapter and the replay memory.
        restored = new_trainer(settings)
        assert restored.generative.strategy.reservoir == trainer.generative.strategy.reservoir
        shared = restored.generative.adapters.weights("_shared")
        assert all(torch.equal(shared[k], weather[k]) for k in weather)


def test_an_unknown_generative_strategy_is_a_settings_error_naming_it() -> None:
    with pytest.raises(SettingsError, match="generative_strategy"):
        load_settings(generative_strategy="ewc")


def test_what_each_strategy_trains_a_round_on() -> None:
    first = {"a": [Pair(f"a{i}", "x") for i in range(6)]}
    second = {"b": [Pair(f"b{i}", "y") for i in range(6)]}
    rng = random.Random(0)
    per_task = GenerativeStrategy("lora-per-task", 4)
    assert per_task.rounds_pairs(second) == second and per_task.adapter("b") == "b"
    joint = GenerativeStrategy("joint", 4)
    joint.remember(first, rng)
    assert joint.rounds_pairs(second) == {SHARED_ADAPTER: first["a"] + second["b"]}
    replay = GenerativeStrategy("replay", 4)
    replay.remember(first, rng)
    replay.remember(second, rng)
    assert len(replay.reservoir) == 4 and replay.offered == 12  # a bounded, uniform sample
    assert replay.rounds_pairs(second) == {SHARED_ADAPTER: second["b"]}
    assert len(replay.replayed(6, rng)) == 3 and set(replay.replayed(6, rng)) <= set(replay.reservoir)
    naive = GenerativeStrategy("naive", 4)
    naive.remember(first, rng)
    assert naive.replayed(6, rng) == [] and naive.rounds_pairs({}) == {}
