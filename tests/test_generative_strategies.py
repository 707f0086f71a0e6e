"""Generative tasks sharing one adapter (service.generative_strategy) on a tiny Llama: every task's
version is the shared adapter; naive learning forgets the earlier task where replay keeps it; EWC
holds the weights the first task found important and LwF the first adapter's answers to the second
task's prompts, where naive learning moves both; keeping the model's distributions on general
instructions holds a task's adapter near the model on held-out ones; the memory, the adapter and EWC's
importance survive a restart; an unknown strategy is a settings error naming the field."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from torch.nn import functional

from service.generative import GenerativeAdapters, Pair
from service.generative_regularisers import (
    GenerativeEWC,
    GenerativeLwF,
    answer_positions,
    general_divergence,
)
from service.generative_strategy import SHARED_ADAPTER, GenerativeStrategy
from service.ingest import Incoming
from service.language_model import load_language_model
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
            "generative_keep_general": 0,
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
        load_settings(generative_strategy="replay+ewc")


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


STOCK = [Pair(f"Is item {i} in stock?", "yes") for i in range(16)]
WEATHER = [Pair(f"Will it rain in town {i} today?", "no") for i in range(16)]


def answer_kl(adapters: GenerativeAdapters, teacher: str, student: str, pairs: list[Pair]) -> float:
    """KL(teacher || student) of the next-token distributions at the answers of ``pairs``."""
    ids, mask, labels = adapters.batch(pairs)
    at = answer_positions(labels)
    with torch.no_grad():
        with adapters.using(teacher) as model:
            wanted = functional.log_softmax(model(input_ids=ids, attention_mask=mask).logits[at], dim=-1)
        with adapters.using(student) as model:
            got = functional.log_softmax(model(input_ids=ids, attention_mask=mask).logits[at], dim=-1)
    return float(functional.kl_div(got, wanted, log_target=True, reduction="batchmean"))


def test_ewc_and_lwf_hold_the_shared_adapter_where_the_first_task_left_it(settings: Settings) -> None:
    held: dict[str, dict[str, float]] = {}
    for strategy in ("naive", "ewc", "lwf"):
        run = settings.model_copy(
            update={
                "generative_strategy": strategy,
                "registry_dir": settings.registry_dir / strategy,
                "generative_ewc_lambda": 1e4,
                "generative_lwf_alpha": 50.0,
            }
        )
        trainer = learn_two(run)
        registry, adapters = Registry(run.registry_dir), trainer.generative.adapters
        adapters.add("first", registry.load_weights("stock", 1))
        adapters.add("second", registry.load_weights("weather", 1))
        # The first task's Fisher at the weights it left (every strategy trains that round alike).
        importance = GenerativeEWC(1.0, 1.0, 64, 8)._fisher(adapters, "first", STOCK)
        first, second = adapters.parameters("first"), adapters.parameters("second")
        held[strategy] = {
            "moved": sum(
                float(
                    (importance[name] * (second[name.replace(".first.", ".second.")] - w).pow(2))
                    .sum()
                    .detach()
                )
                for name, w in first.items()
            ),
            "kl": answer_kl(adapters, "first", "second", WEATHER),
        }
        if strategy == "ewc":
            ewc = trainer.generative.strategy.regulariser
            assert isinstance(ewc, GenerativeEWC) and ewc.importance
            restored = new_trainer(run).generative.strategy.regulariser
            assert isinstance(restored, GenerativeEWC)
            assert restored.importance.keys() == ewc.importance.keys()
            assert all(torch.equal(restored.importance[k], ewc.importance[k]) for k in ewc.importance)
            assert all(torch.equal(restored.anchor[k], ewc.anchor[k]) for k in ewc.anchor)
        if strategy == "lwf":
            lwf = new_trainer(run).generative.strategy.regulariser
            assert isinstance(lwf, GenerativeLwF) and lwf.trained  # the restored adapter teaches next
            assert "_teacher" not in trainer.generative.adapters.names()  # dropped after the round
    assert held["naive"]["moved"] > 0 and held["naive"]["kl"] > 0
    assert held["ewc"]["moved"] < 0.5 * held["naive"]["moved"], held
    assert held["lwf"]["kl"] < 0.5 * held["naive"]["kl"], held


def test_keeping_the_general_distributions_holds_an_adapter_near_the_model_elsewhere(
    tiny_language_model_dir: Path,
) -> None:
    model, tokenizer = load_language_model(tiny_language_model_dir)
    torch.manual_seed(0)
    adapters = GenerativeAdapters(
        model, tokenizer, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0), 1e-2, 64, 16
    )
    general = [Pair(f"Tell me one thing about the colour {i}.", f"Colour {i} is nice.") for i in range(24)]
    kept, held_out = general[:16], general[16:]
    moved = {}
    # The random tiny model's answer loss stays near log(vocabulary), hence the strong term.
    for adapter, distilled in (("plain", 0), ("kept", 4)):
        adapters.add(adapter)
        GenerativeStrategy("lora-per-task", 0).train(
            adapters, adapter, list(STOCK), 3, 4, random.Random(0), kept, 0, distilled, 100.0
        )
        moved[adapter] = general_divergence(adapters, adapter, held_out)
    assert moved["plain"] > 0, moved
    assert moved["kept"] < 0.25 * moved["plain"], moved
