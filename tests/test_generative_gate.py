"""The promotion gate and the automatic rollback hold for generative tasks as for classifiers: a tiny
Llama learns to answer "yes", then a broken upstream job teaches it "no"; the gate keeps that version
a candidate, and when a tolerant gate lets it through, the live watch rolls it back."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.ingest import Incoming
from service.records import GenerativeRecord
from service.registry import Registry
from service.settings import Settings
from service.trainer import Trainer
from tests.helpers import new_trainer

PROMPTS = [f"Is item {i} in stock?" for i in range(16)]


@pytest.fixture
def settings(settings: Settings, tiny_language_model_dir: Path) -> Settings:
    return settings.model_copy(
        update={
            "language_model": str(tiny_language_model_dir),
            "generative_learning_rate": 1e-2,
            "generative_epochs": 6,
            "generative_batch_size": 8,
            "generative_anchor_pairs": 0,
            "generative_keep_general": 0,
        }
    )


def pairs(answer: str, split: str, start: int, prompts: list[str]) -> list[Incoming]:
    records = [
        GenerativeRecord(id=f"{split}{answer}{i}", task="stock", prompt=p, response=answer, split=split)  # type: ignore[arg-type]
        for i, p in enumerate(prompts)
    ]
    return [Incoming(0, start + i, r, b"stock", r.to_json()) for i, r in enumerate(records)]


def run_round(trainer: Trainer, batch: list[Incoming]) -> None:
    trainer.absorb(batch)
    trainer.close_round({0: batch[-1].offset + 1})


def test_the_gate_keeps_a_worse_generative_version_and_the_live_watch_rolls_one_back(
    settings: Settings,
) -> None:
    good = pairs("yes", "train", 0, PROMPTS) + pairs("yes", "eval", 100, PROMPTS[:8])
    broken = pairs("no", "train", 200, PROMPTS)

    trainer = new_trainer(settings)
    run_round(trainer, good)
    registry = Registry(settings.registry_dir)
    assert trainer.generative.tasks["stock"].accuracy == 1.0
    run_round(trainer, broken)
    assert trainer.generative.tasks["stock"].accuracy < 1.0 - settings.promotion_tolerance  # type: ignore[operator]
    alias = registry.alias("stock")
    assert alias is not None and alias.served == 1
    assert registry.events("stock")[-1]["event"] == "candidate"

    tolerant = settings.model_copy(
        update={
            "registry_dir": settings.registry_dir.parent / "tolerant",
            "promotion_tolerance": 1.0,
            "live_accuracy_floor": 0.5,
            "live_accuracy_window": 8,
        }
    )
    trainer = new_trainer(tolerant)
    run_round(trainer, good)
    run_round(trainer, broken)
    registry = Registry(tolerant.registry_dir)
    assert registry.alias("stock").served == 2  # type: ignore[union-attr]
    # New eval pairs (still "yes"): the served v2 answers them wrong; the trainer rolls back to v1.
    run_round(trainer, pairs("yes", "eval", 300, PROMPTS[8:]))
    alias = registry.alias("stock")
    assert alias is not None and (alias.served, alias.pinned) == (1, True)
    assert alias.reason.startswith("auto-rollback: live accuracy")
    assert trainer.metrics.registry.get_sample_value("continual_auto_rollbacks_total", {"task": "stock"}) == 1
