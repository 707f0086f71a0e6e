"""Kill -9 trainers at random moments mid-stream: every record is learned exactly once.

The short version of bench/crash_soak.py (on a three-node cluster, bench/results/crash.json): one
trainer; and two trainers sharing the group, each learning the tasks of its partitions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.crash_soak import soak
from service.registry import Registry

pytestmark = pytest.mark.slow


def test_repeated_kill_9_of_the_trainer_loses_and_repeats_nothing(
    kafka_bootstrap: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    result = soak(
        kafka_bootstrap,
        tmp_path,
        str(tiny_model_dir),
        kills=3,
        tasks=3,
        train_per_label=40,
        eval_per_label=10,
        stream_seconds=25.0,
        say=lambda _: None,
    )
    assert result.caught_up, result
    assert result.produced == 3 * 4 * 50
    assert (result.lost, result.duplicated) == (0, 0), result.per_task
    assert result.absorbed == result.produced
    assert result.dead_lettered == result.malformed_produced > 0
    # ...each once: a record dead-lettered after the last checkpoint is not sent again after a kill.
    assert result.dead_letter_copies == result.malformed_produced, result


def test_two_trainers_split_the_tasks_and_take_a_killed_ones_over(
    kafka_bootstrap: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Kills alternate between the two; the second one stays down past the session timeout.
    result = soak(
        kafka_bootstrap,
        tmp_path,
        str(tiny_model_dir),
        kills=3,
        tasks=4,
        train_per_label=30,
        eval_per_label=10,
        # Long enough that records still arrive after the wait-out (kill 2, at 8-28 s, plus 12 s).
        stream_seconds=60.0,
        say=lambda _: None,
        trainers=2,
    )
    assert result.caught_up, result
    assert (result.lost, result.duplicated) == (0, 0), result.per_task
    assert result.absorbed == result.produced == 4 * 4 * 40
    assert result.dead_letter_copies == result.dead_lettered == result.malformed_produced > 0
    # The survivor checkpointed partitions the killed one had written last: it took them over.
    assert result.partitions_taken_over > 0, result

    registry = Registry(tmp_path / "registry")
    checkpoints = registry.partition_checkpoints()
    owned = {p: c["tasks"].keys() for p, c in checkpoints.items()}
    tasks = sorted(registry.tasks())
    assert tasks == sorted(result.per_task)
    # Each task is one partition's (its key), and every task is served.
    assert sorted(name for names in owned.values() for name in names) == tasks
    assert all(registry.alias(task) is not None for task in tasks)
    # The owner of partition 0 fitted the router over every partition's tasks.
    router = registry.router_manifest()
    assert router is not None and sorted(router["versions"]) == tasks
    # Status reads the partitions' checkpoints as one.
    merged = registry.read_checkpoint()
    assert merged is not None and sorted(merged["tasks"]) == tasks
    assert {name for name, _ in merged["accuracy_matrix"]} == set(tasks)
