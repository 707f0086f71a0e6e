"""Kafka security against a real broker that the test configures: a SASL_SSL listener with a SCRAM-SHA-512
user and an SSL listener that requires client certificates, both under a self-signed CA. The trainer's
consumer, admin client, dead-letter producer and reader all work over them; a wrong password, a
missing client certificate or a wrong CA fails at start-up with an error that names the setting
(the `continual train` process exits, it does not retry), and the password appears nowhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from service.datasets import records, synthetic
from service.ingest import REASON_HEADER, Ingest, ensure_topics
from service.kafka_access import check_access, client_options
from service.local_kafka import LocalKafka, SecureListeners, free_port
from service.metrics import TrainerMetrics
from service.producer import produce
from service.settings import Settings, SettingsError
from tests.helpers import eventually

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

PASSWORD = "s3cret-scram-pass"


def _openssl(command: str, *paths: Path | str) -> None:
    words, filled = command.split(), iter(paths)
    subprocess.run(
        ["openssl", *[str(next(filled)) if w == "{}" else w for w in words]], check=True, capture_output=True
    )


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA; the broker's key and certificate (broker.pem); a client certificate; another CA."""
    for ca in ("ca", "other-ca"):
        _openssl(
            "req -x509 -newkey rsa:2048 -nodes -days 1 -subj {} -keyout {} -out {}",
            f"/CN={ca}",
            folder / f"{ca}.key",
            folder / f"{ca}.pem",
        )
    for name, extension in (
        ("broker", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (folder / f"{name}.ext").write_text(extension + "\n")
        _openssl(
            "req -newkey rsa:2048 -nodes -subj {} -keyout {} -out {}",
            f"/CN={name}",
            folder / f"{name}.key",
            folder / f"{name}.csr",
        )
        _openssl(
            "x509 -req -CAcreateserial -days 1 -in {} -CA {} -CAkey {} -out {} -extfile {}",
            folder / f"{name}.csr",
            folder / "ca.pem",
            folder / "ca.key",
            folder / f"{name}.crt",
            folder / f"{name}.ext",
        )
    (folder / "broker.pem").write_text(
        (folder / "broker.key").read_text() + (folder / "broker.crt").read_text()
    )
    return {
        "ca": folder / "ca.pem",
        "other_ca": folder / "other-ca.pem",
        "cert": folder / "client.crt",
        "key": folder / "client.key",
    }


@pytest.fixture(scope="module")
def secure_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[SecureListeners, dict[str, Path]]]:
    folder = tmp_path_factory.mktemp("kafka-tls")
    files = _certificates(folder)
    listeners = SecureListeners(folder, ("trainer", PASSWORD), free_port(), free_port())
    with LocalKafka(folder / "data", secure=listeners):
        yield listeners, files


def _sasl(
    settings: Settings, listeners: SecureListeners, files: dict[str, Path], password: str = PASSWORD
) -> Settings:
    return settings.model_copy(
        update={
            "kafka_bootstrap": f"127.0.0.1:{listeners.sasl_ssl_port}",
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_username": "trainer",
            "kafka_sasl_password": SecretStr(password),
            "kafka_ssl_cafile": files["ca"],
        }
    )


def _ssl(
    settings: Settings, listeners: SecureListeners, files: dict[str, Path], certificate: bool = True
) -> Settings:
    update: dict[str, object] = {
        "kafka_bootstrap": f"127.0.0.1:{listeners.ssl_port}",
        "kafka_security_protocol": "SSL",
        "kafka_ssl_cafile": files["ca"],
    }
    if certificate:
        update.update(kafka_ssl_certfile=files["cert"], kafka_ssl_keyfile=files["key"])
    return settings.model_copy(update=update)


@pytest.mark.parametrize("listener", ["SASL_SSL", "SSL"])
def test_the_trainers_kafka_clients_work_over_a_secured_listener(
    settings: Settings, secure_broker: tuple[SecureListeners, dict[str, Path]], listener: str
) -> None:
    listeners, files = secure_broker
    secured = (
        _sasl(settings, listeners, files) if listener == "SASL_SSL" else _ssl(settings, listeners, files)
    )
    check_access(secured)
    ensure_topics(secured)
    task = synthetic(num_tasks=1, labels_per_task=2, train_per_label=5)[0]
    produce(
        secured.kafka_bootstrap or "", secured.kafka_topic, records([task]), options=client_options(secured)
    )
    bad = KafkaProducer(bootstrap_servers=secured.kafka_bootstrap, **client_options(secured))
    bad.send(secured.kafka_topic, key=task.name.encode(), value=b"{not json")
    bad.flush()
    bad.close()
    ingest = Ingest(secured, TrainerMetrics(CollectorRegistry(), "lora-per-task"), {})
    received = []
    expected = len(task.train) + len(task.eval) + 1
    eventually(
        lambda: received.extend(ingest.poll(0.5)) or sum(ingest.positions.values()) == expected,
        60,
        what="every record read over " + listener,
    )
    assert len(received) == expected - 1
    ingest.flush_dead_letters()
    ingest.close()
    dead = KafkaConsumer(
        secured.kafka_dead_letter_topic,
        bootstrap_servers=secured.kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
        **client_options(secured),
    )
    assert [dict(m.headers)[REASON_HEADER] for m in dead] == [b"not_json"]
    dead.close()


def test_refused_credentials_fail_at_start_naming_the_setting_and_never_the_password(
    settings: Settings, secure_broker: tuple[SecureListeners, dict[str, Path]], tmp_path: Path
) -> None:
    listeners, files = secure_broker
    cases = [
        (_sasl(settings, listeners, files, password="not-the-password"), "kafka_sasl_password"),
        (_ssl(settings, listeners, files, certificate=False), "kafka_ssl_certfile"),
        (
            _sasl(settings, listeners, files).model_copy(update={"kafka_ssl_cafile": files["other_ca"]}),
            "kafka_ssl_cafile",
        ),
    ]
    for wrong, setting in cases:
        with pytest.raises(SettingsError, match=setting) as refused:
            check_access(wrong, timeout_s=5)
        assert PASSWORD not in str(refused.value) and "not-the-password" not in str(refused.value)

    # The trainer process stops at once with that message (exit 2), instead of retrying forever.
    config = tmp_path / "settings.yaml"
    config.write_text(cases[0][0].to_yaml())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUAL_")}
    started = subprocess.run(
        [sys.executable, "-m", "service.cli", "train", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert started.returncode == 2, started.stdout + started.stderr
    said = started.stdout + started.stderr
    assert "kafka_sasl_password" in said and "not-the-password" not in said and PASSWORD not in said
    assert json.dumps(PASSWORD) not in said
