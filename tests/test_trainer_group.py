"""Trainers in one consumer group: one by default (a second refuses to start, a restarted one is let
in); several, each learning the tasks of its partitions, with a task-isolating strategy. The
several trainers' kill -9 soak is in tests/test_crash_soak.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from service.demo import spawn_role
from service.evaluation import summarize
from service.metrics import TrainerMetrics
from service.partition_trainers import PartitionTrainers
from service.registry import Registry
from service.settings import STRATEGIES, TASK_ISOLATING_STRATEGIES, Settings, SettingsError, load_settings
from service.trainer import Trainer
from service.trainer_files import json_bytes, merged_checkpoint, partition_dir
from service.trainer_group import ensure_sole_trainer, other_members
from strategies import create
from tests.helpers import eventually


def members(settings: Settings, admin: KafkaAdminClient) -> list[dict[str, Any]]:
    """The group's other members; none while the new cluster has no group coordinator yet."""
    try:
        return other_members(settings, admin)
    except KafkaError:
        return []


def test_a_second_trainer_refuses_the_group_and_a_killed_ones_place_is_taken(
    settings: Settings, kafka_bootstrap: str, tmp_path: Path
) -> None:
    first = settings.model_copy(
        update={
            "kafka_bootstrap": kafka_bootstrap,
            "kafka_group_instance_id": "trainer-a",
            "kafka_session_timeout_s": 6,
        }
    )
    config = tmp_path / "a.yaml"
    config.write_text(first.to_yaml())
    trainer = spawn_role("train", config, tmp_path / "a.log")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        second = first.model_copy(update={"kafka_group_instance_id": "trainer-b"})
        eventually(lambda: members(second, admin), timeout_s=120, what="the first trainer to join")

        # The real command: a second trainer exits 2 naming the setting and the trainer holding the group.
        config_b = tmp_path / "b.yaml"
        config_b.write_text(second.to_yaml())
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUAL_")}
        refused = subprocess.run(
            [sys.executable, "-m", "service.cli", "train", "--config", str(config_b)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert refused.returncode == 2, refused.stdout + refused.stderr
        said = " ".join((refused.stdout + refused.stderr).split())  # the console wraps long lines
        assert "kafka_group_id" in said and "already has a trainer (trainer-a" in said
        assert trainer.poll() is None  # the first one goes on

        # Its own identity, restarted, is let in at once.
        started = time.monotonic()
        ensure_sole_trainer(first, wait_s=0)
        assert time.monotonic() - started < 5

        # kill -9: it stays a member until its session lapses, and then the second one may start.
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        with pytest.raises(SettingsError, match="trainer-a"):
            ensure_sole_trainer(second, wait_s=0)
        started = time.monotonic()
        ensure_sole_trainer(second)
        assert time.monotonic() - started <= first.kafka_session_timeout_s + 6
        assert members(second, admin) == []
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        admin.close()


def test_several_trainers_need_a_strategy_whose_tasks_share_nothing(settings: Settings) -> None:
    isolating = [name for name in STRATEGIES if create(name, settings).isolates_tasks]
    assert isolating == list(TASK_ISOLATING_STRATEGIES)
    with pytest.raises(SettingsError, match=r"strategy: .*kafka_group_trainers: several needs lora-per-task"):
        load_settings(kafka_group_trainers="several", strategy="replay")
    assert load_settings(kafka_group_trainers="several").strategy == "lora-per-task"


def test_partitions_checkpoints_read_as_one_give_one_trainers_figures() -> None:
    # Partition 1 learned a then b; partition 2 learned c. One trainer learning a, b, c in turn.
    first = {
        "round": 3,
        "tasks": {"a": {}, "b": {}},
        "offsets": {"1": 40},
        "accuracy_matrix": [["a", {"a": 0.9}], ["b", {"a": 0.8, "b": 0.95}]],
    }
    second = {"round": 1, "tasks": {"c": {}}, "offsets": {"2": 7}, "accuracy_matrix": [["c", {"c": 0.7}]]}
    view = merged_checkpoint({1: first, 2: second})
    assert (view["round"], view["partitions"], sorted(view["tasks"])) == (3, [1, 2], ["a", "b", "c"])
    assert view["offsets"] == {"1": 40, "2": 7}
    merged = summarize(dict(view["accuracy_matrix"]))
    one = summarize({"a": {"a": 0.9}, "b": {"a": 0.8, "b": 0.95}, "c": {"a": 0.8, "b": 0.95, "c": 0.7}})
    assert (merged.acc, merged.bwt, merged.forgetting) == (one.acc, one.bwt, one.forgetting)


def test_one_and_several_trainers_refuse_each_others_checkpoints(settings: Settings) -> None:
    metrics = TrainerMetrics(CollectorRegistry(), settings.strategy)
    registry = Registry(settings.registry_dir)
    partition = {"round": 1, "tasks": {}, "offsets": {"0": 3}, "topic": settings.kafka_topic}
    registry.store.write(f"{partition_dir(0)}/checkpoint.json", json_bytes(partition))
    with pytest.raises(ValueError, match="kafka_group_trainers: several"):
        Trainer(settings, registry, metrics)
    # A partition's learner reads its own checkpoint.
    assert registry.for_partition(0).read_checkpoint() == partition
    assert registry.for_partition(1).read_checkpoint() is None

    several = settings.model_copy(update={"kafka_group_trainers": "several"})
    registry.store.write("trainer/checkpoint.json", json_bytes({**partition, "offsets": {}}))
    with pytest.raises(SettingsError, match="kafka_group_trainers: the registry's trainer checkpoint"):
        PartitionTrainers(several, registry, metrics)
