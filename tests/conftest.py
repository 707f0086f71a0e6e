"""Shared fixtures: a real Kafka broker, a tiny real BERT, settings that point at both."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.demo import spawn_role
from service.language_model import language_model_folder, save_tiny_language_model
from service.local_kafka import LocalKafka, free_port
from service.local_s3 import LocalS3
from service.model import save_tiny_model
from service.settings import DEFAULT_BASE_MODEL, Settings, load_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CLINC150 = REPO.parent / "shared" / "data" / "clinc150"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Apache Kafka broker: CONTINUAL_KAFKA_BOOTSTRAP if set, else one started for the session."""
    external = os.environ.get("CONTINUAL_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    with LocalKafka(tmp_path_factory.mktemp("kafka")) as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """A real S3-compatible server (Versity's gateway, service/local_s3.py) with a ``registry`` bucket."""
    with LocalS3(tmp_path_factory.mktemp("s3")) as server:
        server.create_bucket("registry")
        yield server


@pytest.fixture
def s3_settings(settings: Settings, s3_server: LocalS3, tmp_path: Path) -> Settings:
    """``settings`` with the registry in the S3 server's bucket, under a prefix of this test's own,
    the credentials in a shared credentials file as an operator would give them."""
    return settings.model_copy(
        update={
            "registry_url": f"s3://registry/tests/{uuid.uuid4().hex[:8]}",
            "registry_s3_endpoint": s3_server.endpoint,
            "registry_s3_credentials_file": s3_server.credentials_file(tmp_path / "s3-credentials"),
        }
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT saved as a normal model folder, with MiniLM's tokenizer."""
    minilm = load_settings(base_model=DEFAULT_BASE_MODEL).base_model_path()
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), tokenizer_from=minilm)


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    """Settings for one test: the tiny model, a fresh registry, unique Kafka names, free ports."""
    unique = uuid.uuid4().hex[:8]
    return load_settings(
        base_model=str(tiny_model_dir),
        registry_dir=tmp_path / "registry",
        kafka_topic=f"records-{unique}",
        kafka_dead_letter_topic=f"records-{unique}.dlq",
        kafka_group_id=f"trainer-{unique}",
        learning_rate=1e-2,
        head_learning_rate=1e-1,
        lora_dropout=0.0,
        batch_size=16,
        epochs=5,
        round_idle_s=0.5,
        # Rounds close on idleness or size here; the early first version has its own tests.
        first_version_records=0,
        grpc_port=free_port(),
        trainer_metrics_port=0,
        server_metrics_port=0,
        registry_poll_s=0.1,
        clinc150_dir=CLINC150,
        # A random tiny model embeds every text alike (a fifth of synthetic eval records would be
        # "near" repeats at 0.97): near repeats only where embeddings mean something (MiniLM tests).
        duplicate_cosine=1.0,
    )


@pytest.fixture
def cluster(settings: Settings, kafka_bootstrap: str, tmp_path: Path) -> Iterator[Settings]:
    """Trainer and server as real processes, configured by a YAML file, logs kept for failures."""
    # Every new version passes the gate here: these tests follow the path, the gate has its own tests.
    settings = settings.model_copy(
        update={
            "kafka_bootstrap": kafka_bootstrap,
            "trainer_metrics_port": free_port(),
            "server_metrics_port": free_port(),
            "promotion_tolerance": 1.0,
        }
    )
    config = tmp_path / "settings.yaml"
    config.write_text(settings.to_yaml())
    processes = {role: spawn_role(role, config, tmp_path / f"{role}.log") for role in ("train", "serve")}
    yield settings
    for process in processes.values():
        process.terminate()
    for role, process in processes.items():
        process.wait(timeout=60)
        # A graceful stop exits 0; anything else is a crash worth seeing.
        assert process.returncode == 0, (tmp_path / f"{role}.log").read_text()


@pytest.fixture(scope="session")
def language_model_dir() -> Path:
    """The packaged SmolLM2-135M-Instruct as a Hugging Face folder (`make test` converts it first)."""
    settings = load_settings()
    return language_model_folder(settings.language_model, settings.models_dir)


@pytest.fixture(scope="session")
def tiny_language_model_dir(tmp_path_factory: pytest.TempPathFactory, language_model_dir: Path) -> Path:
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer and chat template."""
    return save_tiny_language_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer_from=language_model_dir)
