"""Eval records that repeat training records (service.duplicates): found exactly and nearly, in
either order of arrival, set aside from the eval set that gates versions (kept, counted, exported,
reported), and still known after a restart."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import generate_latest

from service.data_health import assess
from service.datasets import TaskData, synthetic
from service.duplicates import EXACT, NEAR, DuplicateIndex
from service.model import build_model
from service.registry import Registry
from service.settings import DEFAULT_BASE_MODEL, Settings, load_settings
from service.tasks import TaskState
from tests.helpers import incoming, new_trainer


def unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_exact_and_near_repeats_are_found_in_either_order_and_dropped_from_the_index() -> None:
    index = DuplicateIndex(near_cosine=0.97)
    found = index.screen(
        "t",
        ["What is my BALANCE?", "book a table"],
        unit([1, 0, 0], [0, 1, 0]),
        ["what is my balance", "table for two", "something else"],
        unit([0, 0, 1], [0.1, 1, 0], [1, 1, 1]),  # the first is exact by its text, not its embedding
    )
    assert found == {0: EXACT, 1: NEAR}
    assert index.eval_size("t") == 1  # only "something else" is held
    # A training record arriving later repeats a held eval record: its position in the eval set.
    found = index.screen("t", ["Something else!"], unit([0, 0, 1]), ["new one"], unit([0, 0.2, 1]))
    assert found == {0: EXACT, 1: NEAR}
    assert index.eval_size("t") == 0
    # Other tasks never match: repeats are judged within a task.
    assert index.screen("u", [], torch.empty(0, 3), ["what is my balance"], unit([1, 0, 0])) == {}
    plain, tensors = index.saved_state()
    restored = DuplicateIndex(near_cosine=0.97)
    restored.restore(plain, tensors)
    assert restored.eval_size("u") == 1
    assert restored.screen("t", [], torch.empty(0, 3), ["BOOK a table."], unit([0, 0, 1])) == {0: EXACT}
    assert restored.screen("t", [], torch.empty(0, 3), ["far"], unit([0.1, 1, 0.05])) == {0: NEAR}


def test_setting_aside_keeps_the_records_and_the_live_watch_in_step() -> None:
    state = TaskState(name="t", eval_records=[("a", "x"), ("b", "y"), ("c", "x"), ("d", "y")], eval_judged=3)
    state.set_aside({0: EXACT, 3: NEAR})
    assert state.eval_records == [("b", "y"), ("c", "x")]
    assert state.duplicate_records == [("a", "x", EXACT), ("d", "y", NEAR)]
    assert state.eval_judged == 2  # "b" and "c" were judged already; nothing new is skipped
    assert state.duplicate_counts() == {EXACT: 1, NEAR: 1}
    health = assess(["x", "y"], {"x": 30, "y": 30}, 2, 50, 20, state.duplicate_counts())
    assert health.sufficient is True  # repeats say nothing about the training data's size
    assert health.summary() == "2 eval record(s) repeat training ones, set aside"
    assert (health.exact_duplicates, health.near_duplicates) == (1, 1)


@pytest.mark.slow
def test_minilm_finds_near_repeats_but_not_paraphrases_in_other_words() -> None:
    model = build_model(load_settings(base_model=DEFAULT_BASE_MODEL))
    train = ["what is my account balance", "book a table for two at seven", "play some jazz music"]
    held = ["what's my account balance", "book a table for two at 7", "reserve a table for two at seven"]
    index = DuplicateIndex(near_cosine=0.97)
    embed = model.base_embeddings
    found = index.screen("t", train, torch.from_numpy(embed(train)), held, torch.from_numpy(embed(held)))
    assert found == {0: NEAR, 1: NEAR}


def test_the_trainer_sets_repeats_aside_publishes_them_and_keeps_them_across_a_restart(
    settings: Settings,
) -> None:
    (task,) = synthetic(num_tasks=1, labels_per_task=3, train_per_label=20, eval_per_label=6)
    repeats = [(text.upper() + "!", label) for text, label in task.train[:4]]  # exact once normalised
    later = task.eval[:2]  # training records that arrive after the eval records they repeat
    stream = TaskData(task.name, task.train, repeats + task.eval)
    trainer = new_trainer(settings)
    batch = incoming([stream])
    trainer.absorb(batch)
    trainer.close_round({0: len(batch)})
    registry = Registry(settings.registry_dir)
    state = trainer.tasks[task.name]
    assert sorted(state.duplicate_records) == sorted((t, label, EXACT) for t, label in repeats)
    assert state.eval_records == task.eval
    manifest = registry.manifest(task.name, 1)
    assert manifest["metrics"]["eval_records"] == len(task.eval)
    assert (manifest["data"]["exact_duplicates"], manifest["data"]["near_duplicates"]) == (4, 0)
    assert registry.eval_records(task.name, 1) == task.eval
    assert sorted(registry.duplicate_records(task.name, 1)) == sorted(state.duplicate_records)
    exported = generate_latest(trainer.metrics.registry).decode()
    assert f'continual_task_duplicate_eval_records{{kind="exact",task="{task.name}"}} 4.0' in exported
    report = registry.report(task.name, 1)
    assert report is not None and "4 exactly and 0 nearly: set aside" in report[0]

    # After a restart the index still knows the training texts and the eval set.
    restarted = new_trainer(settings)
    assert restarted.tasks[task.name].duplicate_records == registry.duplicate_records(task.name, 1)
    again = TaskData(task.name, [(text.title(), label) for text, label in later], repeats[:1])
    batch = incoming([again])
    restarted.absorb(batch)
    state = restarted.tasks[task.name]
    assert state.eval_records == task.eval[2:]  # repeated by the new training records: set aside
    assert state.duplicate_counts() == {EXACT: 4 + 2 + 1}
