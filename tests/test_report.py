"""A version's report (service.report): what it gets wrong, counted and sampled; rendered against the
served version label by label; written with every version the trainer publishes; printed and written
by ``continual report``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from service.datasets import synthetic
from service.registry import Registry
from service.report import LABEL_FIGURE, REPORT_FILE, mistakes, render
from service.settings import Settings
from tests.helpers import incoming, new_trainer

PNG = b"\x89PNG\r\n\x1a\n"


def test_mistakes_count_confused_pairs_and_sample_the_wrong_answers_evenly() -> None:
    records = [(f"text {i}", "a" if i % 2 else "b") for i in range(100)]
    # Every "a" (odd i) below 60 answered "b"; every tenth "b" answered "c".
    answers = [
        "b" if i % 2 and i < 60 else "c" if i % 20 == 0 else label for i, (_, label) in enumerate(records)
    ]
    found = mistakes(records, answers)
    assert found["wrong_total"] == 30 + 5
    assert found["confusions"] == [["a", "b", 30], ["b", "c", 5]]
    assert len(found["wrong"]) == 18  # every second of the 35 wrong answers, spread over the records
    assert found["wrong"][0] == ["text 0", "b", "c"] and found["wrong"][-1] == ["text 80", "b", "c"]
    assert mistakes(records, [label for _, label in records]) == {
        "confusions": [],
        "wrong": [],
        "wrong_total": 0,
    }


def manifest(version: int, label_accuracy: dict[str, float], **extra: Any) -> dict[str, Any]:
    """A version's manifest with what a report reads (as ``Publisher`` writes it)."""
    accuracy = sum(label_accuracy.values()) / len(label_accuracy)
    return {
        "task": "banking",
        "version": version,
        "created_at": 1764150000.0,
        "strategy": "lora-per-task",
        "base_model": "all-MiniLM-L6-v2",
        "round": version,
        "labels": list(label_accuracy),
        "label_counts": {label: 50 for label in label_accuracy},
        "metrics": {
            "accuracy": accuracy,
            "macro_accuracy": accuracy,
            "label_accuracy": label_accuracy,
            "eval_records": 40,
            "train_records": 200,
        },
        **extra,
    }


def test_a_report_compares_with_the_served_version_label_by_label() -> None:
    served = manifest(1, {"balance": 0.9, "transfer": 0.8, "freeze": 1.0})
    data = {
        "sufficient": False,
        "train_records": 200,
        "eval_records": 40,
        "min_task_train_records": 1000,
        "min_label_train_records": 20,
        "short_labels": {},
        "imbalance_ratio": 1.0,
    }
    found = {
        "confusions": [["transfer", "balance", 3]],
        "wrong": [["move | money\nnow", "transfer", "balance"]],
        "wrong_total": 3,
    }
    new = manifest(2, {"balance": 1.0, "transfer": 0.7, "freeze": 1.0, "pin": 0.5}, data=data, mistakes=found)
    markdown, figures = render(new, served)
    assert markdown.startswith("# `banking` v2\n")
    assert "| accuracy (micro) | 80.0% | 90.0% | -10.0 pts |" in markdown
    assert "1 label(s) better, 1 worse, 1 new. Worse: `transfer`." in markdown
    # Least accurate first, with the served version's accuracy and the change.
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and " | 50 | " in line]
    assert rows[:2] == ["| pin | 50 | 50.0% | – | – |", "| transfer | 50 | 70.0% | 80.0% | -10.0 pts |"]
    assert "**not enough**: 200 of 1000 records" in markdown
    assert "| transfer | balance | 3 |" in markdown
    assert "| move \\| money now | transfer | balance |" in markdown  # one cell, one line
    assert list(figures) == [LABEL_FIGURE] and figures[LABEL_FIGURE].startswith(PNG)
    first, _ = render(served, None)
    assert "No version was served when this one was published." in first and "## Mistakes" not in first


def test_every_published_version_has_its_report_and_the_cli_prints_or_writes_it(
    settings: Settings, tmp_path: Path
) -> None:
    (task,) = synthetic(num_tasks=1, labels_per_task=4, train_per_label=20, eval_per_label=10)
    trainer = new_trainer(settings.model_copy(update={"epochs": 1}))
    batch = incoming([task])
    for start, end in ((0, len(batch) // 2), (len(batch) // 2, len(batch))):
        trainer.absorb(batch[start:end])
        trainer.close_round({0: end})
    registry = Registry(settings.registry_dir)
    assert registry.versions(task.name) == [1, 2]
    saved = registry.report(task.name, 2)
    assert saved is not None
    markdown, figures = saved
    found = registry.manifest(task.name, 2)
    wrong = round((1 - found["metrics"]["accuracy"]) * found["metrics"]["eval_records"])
    assert found["mistakes"]["wrong_total"] == wrong
    assert "against served v1" in markdown.lower()
    for label in found["labels"]:
        assert f"| {label} | " in markdown
    texts = {text for text, _ in task.eval}
    assert all(text in texts for text, _, _ in found["mistakes"]["wrong"])
    assert figures[LABEL_FIGURE].startswith(PNG)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CONTINUAL_REGISTRY_DIR": str(settings.registry_dir)}
        command = [sys.executable, "-m", "service.cli", "report", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    printed = cli(task.name)  # the served version by default
    served = registry.alias(task.name)
    assert served is not None and printed.returncode == 0, printed.stderr
    assert printed.stdout == registry.report(task.name, served.served)[0]  # type: ignore[index]
    written = cli(task.name, "--version", "2", "--out", str(tmp_path / "out"))
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "out" / REPORT_FILE).read_text() == markdown
    assert (tmp_path / "out" / LABEL_FIGURE).read_bytes() == figures[LABEL_FIGURE]
    missing = cli(task.name, "--version", "9")
    assert missing.returncode == 1 and "not found" in missing.stderr
