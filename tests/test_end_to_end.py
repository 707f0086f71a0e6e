"""The whole path with real processes: broker → `continual train` → registry → `continual serve` → gRPC."""

from __future__ import annotations

import json
import urllib.request

import grpc
import pytest
from kafka import KafkaConsumer, KafkaProducer

from service.api import continual_pb2, continual_pb2_grpc
from service.datasets import TaskData, records, synthetic
from service.ingest import REASON_HEADER, ensure_topics
from service.producer import produce
from service.settings import Settings
from tests.helpers import eventually

pytestmark = pytest.mark.slow

_ALL = synthetic(num_tasks=3, labels_per_task=4, train_per_label=50, eval_per_label=10)
TASKS = [TaskData(name=t.name, train=t.train[:160], eval=t.eval) for t in _ALL]
# Later training data of the first task, from the same distribution.
MORE = TaskData(name=_ALL[0].name, train=_ALL[0].train[160:], eval=[])
MALFORMED = [
    (b"synthetic-0", b"this is not json", "not_json"),
    (b"synthetic-0", json.dumps({"id": "x", "task": "synthetic-0", "text": "hi"}).encode(), "missing_field"),
    (
        b"synthetic-1",
        json.dumps({"id": "y", "task": "synthetic-1", "text": "hi", "label": 3, "split": "train"}).encode(),
        "wrong_type",
    ),
]


def adapters(stub: continual_pb2_grpc.ContinualStub) -> dict[str, continual_pb2.AdapterInfo]:
    try:
        return {a.task: a for a in stub.ListAdapters(continual_pb2.ListAdaptersRequest(), timeout=5).adapters}
    except grpc.RpcError:
        return {}  # still starting


def test_stream_to_served_predictions(cluster: Settings) -> None:
    settings = cluster
    assert settings.kafka_bootstrap is not None
    ensure_topics(settings)
    produce(settings.kafka_bootstrap, settings.kafka_topic, records(TASKS))
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    for key, value, _ in MALFORMED:
        raw.send(settings.kafka_topic, key=key, value=value)
    raw.flush()

    with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
        stub = continual_pb2_grpc.ContinualStub(channel)

        def all_learned() -> dict[str, continual_pb2.AdapterInfo] | None:
            listed = adapters(stub)
            done = all(
                t.name in listed and (listed[t.name].train_records, listed[t.name].eval_records) == (160, 40)
                for t in TASKS
            )
            return listed if done else None

        listed = eventually(
            all_learned, timeout_s=300, interval_s=1, what="every task to be learned and served"
        )

        # Held-out texts are predicted far above chance (4 labels: 25%).
        for task in TASKS:
            answers = [
                stub.Predict(continual_pb2.PredictRequest(task=task.name, text=t)) for t, _ in task.eval
            ]
            accuracy = sum(a.label == label for a, (_, label) in zip(answers, task.eval, strict=True)) / 40
            assert accuracy >= 0.7, (task.name, accuracy)
            assert {a.version for a in answers} == {listed[task.name].served_version}

        # More data for one task: a new version is published and served without a restart.
        task = TASKS[0]
        before = listed[task.name].served_version
        produce(settings.kafka_bootstrap, settings.kafka_topic, records([MORE]))

        def advanced() -> int | None:
            reply = stub.Predict(continual_pb2.PredictRequest(task=task.name, text=task.eval[0][0]))
            return reply.version if reply.version > before else None

        after = eventually(advanced, timeout_s=120, interval_s=0.5, what="a newer version to be served")

        # Rollback serves the earlier version, and Predict says so.
        info = stub.Rollback(continual_pb2.RollbackRequest(task=task.name))
        assert info.served_version < after and info.pinned
        reply = stub.Predict(continual_pb2.PredictRequest(task=task.name, text=task.eval[0][0]))
        assert reply.version == info.served_version

    # Malformed records are in the dead-letter topic with their reasons; the trainer counted them.
    dead = KafkaConsumer(
        settings.kafka_dead_letter_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
    )
    letters: list = []
    eventually(
        lambda: (
            letters.extend(m for ms in dead.poll(500).values() for m in ms) or len(letters) >= len(MALFORMED)
        ),
        timeout_s=30,
    )
    dead.close()
    assert sorted(dict(m.headers)[REASON_HEADER].decode() for m in letters) == sorted(
        r for _, _, r in MALFORMED
    )
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{settings.trainer_metrics_port}/metrics", timeout=5
    ).read()
    text = metrics.decode()
    assert 'continual_records_dead_lettered_total{reason="not_json"} 1.0' in text
    assert 'continual_records_consumed_total{split="train",task="synthetic-2"} 160.0' in text
    assert 'continual_task_accuracy{strategy="lora-per-task",task="synthetic-1"' in text
