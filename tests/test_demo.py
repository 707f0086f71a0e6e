"""`continual run` (what `make run` runs) end to end on the synthetic stream: table, results, plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.local_kafka import free_port
from service.settings import Settings

pytestmark = pytest.mark.slow


def test_continual_run_learns_the_stream_and_writes_results(
    settings: Settings, kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUAL_")}
    env.update(
        {
            "CONTINUAL_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "CONTINUAL_KAFKA_TOPIC": settings.kafka_topic,
            "CONTINUAL_KAFKA_DEAD_LETTER_TOPIC": settings.kafka_dead_letter_topic,
            "CONTINUAL_KAFKA_GROUP_ID": settings.kafka_group_id,
            "CONTINUAL_BASE_MODEL": settings.base_model,
            "CONTINUAL_LEARNING_RATE": str(settings.learning_rate),
            "CONTINUAL_HEAD_LEARNING_RATE": str(settings.head_learning_rate),
            "CONTINUAL_EPOCHS": str(settings.epochs),
            "CONTINUAL_BATCH_SIZE": str(settings.batch_size),
            # As in every tiny-model test (conftest): its embeddings are all alike, no near repeats.
            "CONTINUAL_DUPLICATE_COSINE": str(settings.duplicate_cosine),
            "CONTINUAL_ROUND_IDLE_S": "0.5",
            "CONTINUAL_GRPC_PORT": str(free_port()),
            "CONTINUAL_TRAINER_METRICS_PORT": "0",
            "CONTINUAL_SERVER_METRICS_PORT": "0",
            "COLUMNS": "160",
        }
    )
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "run",
            "--dataset",
            "synthetic",
            "--tasks",
            "2",
            "--exit-when-done",
            "--workdir",
            str(workdir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "per-task accuracy" in result.stdout and "synthetic-1" in result.stdout
    summary = json.loads((workdir / "results.json").read_text())
    assert set(summary["tasks"]) == {"synthetic-0", "synthetic-1"}
    assert all(
        t["train"] == 160 and t["eval"] == 40 and t["accuracy"] >= 0.6 for t in summary["tasks"].values()
    )
    assert [name for name, _ in summary["accuracy_matrix"]] == ["synthetic-0", "synthetic-1"]
    for plot in ("accuracy.png", "accuracy_matrix.png"):
        assert (workdir / plot).read_bytes().startswith(b"\x89PNG")
