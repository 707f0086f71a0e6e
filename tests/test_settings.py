"""Settings: environment, YAML and overrides in that order of strength; bad values name their field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import SettingsError, load_settings


def test_environment_beats_yaml_and_overrides_beat_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("batch_size: 7\nkafka_topic: from-yaml\nepochs: 2\n")
    monkeypatch.setenv("CONTINUAL_KAFKA_TOPIC", "from-env")
    settings = load_settings(config, epochs=4)
    assert (settings.batch_size, settings.kafka_topic, settings.epochs) == (7, "from-env", 4)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"strategy": "magic"}, "strategy"),
        ({"base_model": "/nowhere/model"}, "base_model"),
        ({"kafka_topic": "bad topic!"}, "kafka_topic"),
        ({"grpc_port": 70000}, "grpc_port"),
        ({"registry_url": "https://bucket/prefix"}, "registry_url"),
        ({"registry_url": "s3://Not_A_Bucket/x"}, "registry_url"),
        ({"registry_s3_credentials_file": "/nowhere/credentials"}, "registry_s3_credentials_file"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_bad_settings_fail_naming_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(SettingsError, match=field):
        load_settings(**overrides)


def test_a_missing_config_file_is_reported() -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(Path("/nowhere/settings.yaml"))


def test_the_cli_refuses_bad_settings_at_start_up_with_the_field_named() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        env={"CONTINUAL_BATCH_SIZE": "-3", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "batch_size" in result.stderr


def test_settings_round_trip_through_yaml_secrets_included(tmp_path: Path) -> None:
    settings = load_settings(admin_token="s3cret", batch_size=5, lora_target_modules=["query"])
    config = tmp_path / "settings.yaml"
    config.write_text(settings.to_yaml())
    again = load_settings(config)
    assert again.model_dump() == settings.model_dump()
    assert again.admin_token is not None and again.admin_token.get_secret_value() == "s3cret"
