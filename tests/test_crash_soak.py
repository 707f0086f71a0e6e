"""Kill -9 the trainer process at random moments mid-stream: every record is learned exactly once.

The short version of bench/crash_soak.py (20 kills on a three-node cluster, bench/results/crash.json).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.crash_soak import soak

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
