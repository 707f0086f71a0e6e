"""The generative benchmark's harness (bench/cl_generative.py) on a tiny Llama: every strategy's run
yields a lower-triangular exact-match matrix, its figures and the probe; the README shows the
committed results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.cl_generative import RESULTS, STRATEGIES, orders, run, table
from bench.generation_serving import table as serving_table
from service.generative_datasets import generative_tasks


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_run_measures_every_task_learned_so_far(
    strategy: str, tiny_language_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTINUAL_LANGUAGE_MODEL", str(tiny_language_model_dir))
    data = generative_tasks(train=8, evaluate=4, tasks=["iso-date", "sort-numbers"])
    args = argparse.Namespace(
        seed=0,
        rank=4,
        learning_rate=1e-3,
        epochs=1,
        batch_size=4,
        replay_size=4,
        ewc_lambda=100.0,
        lwf_alpha=1.0,
        anchor=1 if strategy == "replay" else 0,
        distill=1 if strategy == "lora-per-task" else 0,
        distill_strength=1.0,
    )
    measured = run(strategy, ["iso-date", "sort-numbers"], data, args, say=lambda _: None)
    assert list(measured["matrix"]) == ["iso-date", "sort-numbers"]
    assert list(measured["matrix"]["iso-date"]) == ["iso-date"]
    assert list(measured["matrix"]["sort-numbers"]) == ["iso-date", "sort-numbers"]
    assert 0.0 <= measured["acc"] <= 1.0 and measured["bwt"] is not None
    assert set(measured["general_probe_after"]) == {"accuracy", "perplexity"}
    assert 0.0 <= measured["general_agreement_after"] <= 1.0
    assert measured["general_divergence_after"] >= 0.0


def test_the_orders_are_the_written_one_its_reverse_and_a_fixed_shuffle() -> None:
    names = ["a", "b", "c", "d", "e"]
    found = orders(names)
    assert found["given"] == names and found["reversed"] == names[::-1]
    assert sorted(found["shuffled"]) == names and orders(names)["shuffled"] == found["shuffled"]


def test_the_committed_readme_shows_the_committed_results() -> None:
    out = RESULTS / "cl_generative.json"
    assert table(json.loads(out.read_text())) in (out.parents[1] / "README.md").read_text()
    serving = json.loads(out.read_text())["serving"]
    assert serving_table(serving) in (out.parents[1] / "README.md").read_text()
    assert serving["ratio_c8"] > 0 and serving["tokens_per_s_c8"] > 0
