"""One trainer per consumer group: a second one refuses to start, a restarted one is let in."""

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

from service.demo import spawn_role
from service.settings import Settings, SettingsError
from service.trainer_group import ensure_sole_trainer, other_members
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
