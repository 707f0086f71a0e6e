"""Generative tasks from the stream: (prompt, response) records through the real broker and a real
trainer on a tiny Llama, beside a classification task; the records of the wrong kind or over the
token limits dead-lettered with their reasons; versions published with exact match, the general
probe and the kind; the checkpoint restores them; a classification server leaves them alone."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer

from service.api import continual_pb2, continual_pb2_grpc
from service.datasets import records, synthetic
from service.generative_datasets import generative_tasks
from service.ingest import REASON_HEADER, ensure_topics
from service.local_kafka import free_port
from service.producer import produce
from service.records import GenerativeRecord
from service.registry import open_registry
from service.server import start_server
from service.settings import Settings
from tests.helpers import eventually, new_trainer, running_trainer

TRAIN, EVAL = 48, 8


@pytest.fixture
def settings(settings: Settings, kafka_bootstrap: str, tiny_language_model_dir: Path) -> Settings:
    return settings.model_copy(
        update={
            "kafka_bootstrap": kafka_bootstrap,
            "language_model": str(tiny_language_model_dir),
            "max_response_tokens": 32,
            "generative_epochs": 1,
            "generative_batch_size": 8,
            "promotion_tolerance": 1.0,
        }
    )


def _pairs() -> list[GenerativeRecord]:
    train, held_out = generative_tasks(TRAIN, EVAL, seed=0)["reverse-words"]
    return [
        GenerativeRecord(id=f"t{i}", task="reverse", prompt=p.prompt, response=p.response, split="train")
        for i, p in enumerate(train)
    ] + [
        GenerativeRecord(id=f"e{i}", task="reverse", prompt=p.prompt, response=p.response, split="eval")
        for i, p in enumerate(held_out)
    ]


def _dead_letters(settings: Settings, expected: int) -> list[str]:
    consumer = KafkaConsumer(
        settings.kafka_dead_letter_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
    )
    letters: list[str] = []
    try:
        eventually(
            lambda: (
                letters.extend(
                    dict(m.headers)[REASON_HEADER].decode() for ms in consumer.poll(500).values() for m in ms
                )
                or len(letters) >= expected
            ),
            timeout_s=30,
            what="the dead letters",
        )
    finally:
        consumer.close()
    return sorted(letters)


def test_a_generative_task_is_learned_beside_a_classifier_published_and_restored(settings: Settings) -> None:
    assert settings.kafka_bootstrap is not None
    ensure_topics(settings)
    classifier = synthetic(num_tasks=1, labels_per_task=2, train_per_label=16, eval_per_label=4)
    produce(settings.kafka_bootstrap, settings.kafka_topic, records(classifier))
    pairs = _pairs()
    produce(settings.kafka_bootstrap, settings.kafka_topic, pairs)
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    name = classifier[0].name
    wrong = [
        # A text record for the generative task, a pair for the classifier: each task keeps its kind.
        (b"reverse", {"id": "k1", "task": "reverse", "text": "hi", "label": "x", "split": "train"}),
        (name.encode(), {"id": "k2", "task": name, "prompt": "hi", "response": "ho", "split": "train"}),
        # Over max_response_tokens (32) but within max_text_chars.
        (
            b"reverse",
            {"id": "t1", "task": "reverse", "prompt": "Say it", "response": "word " * 60, "split": "train"},
        ),
        (b"reverse", {"id": "m1", "task": "reverse", "prompt": "a", "text": "b", "split": "train"}),
    ]
    for key, body in wrong:
        raw.send(settings.kafka_topic, key=key, value=json.dumps(body).encode())
    raw.flush()
    raw.close()

    registry = open_registry(settings)
    with running_trainer(settings) as running:

        def learned() -> dict | None:
            checkpoint = registry.read_checkpoint()
            if checkpoint is None or "reverse" not in checkpoint.get("generative", {}):
                return None
            return checkpoint if name in checkpoint["tasks"] else None

        checkpoint = eventually(learned, timeout_s=240, interval_s=0.5, what="both tasks checkpointed")
        trainer = running.trainer
        summary = trainer.learning_summary()

    assert _dead_letters(settings, len(wrong)) == sorted(
        ["kind_mismatch", "kind_mismatch", "too_many_tokens", "mixed_kinds"]
    )
    version = int(checkpoint["generative"]["reverse"]["version"])
    manifest = registry.manifest("reverse", version)
    assert manifest["kind"] == "generative" and manifest["base_model"] == settings.language_model
    metrics = manifest["metrics"]
    assert metrics["eval_records"] == EVAL and metrics["train_records"] == TRAIN
    assert 0.0 <= metrics["exact_match"] <= 1.0 and metrics["token_loss"] > 0
    assert set(metrics["general_probe"]) == {"accuracy", "perplexity"}
    eval_pairs = [(r.prompt, r.response) for r in pairs if r.split == "eval"]
    assert registry.eval_records("reverse", version) == eval_pairs
    alias = registry.alias("reverse")
    assert alias is not None and alias.served == version  # the gate let it through, once durable
    # Exact match is the task's accuracy in the one accuracy matrix, beside the classifier's.
    assert "reverse" in trainer.assessment.matrix and name in trainer.assessment.matrix
    assert summary.acc is not None

    # A restart restores the task from its checkpointed version: weights, eval pairs, counts.
    restored = new_trainer(settings)
    task = restored.generative.tasks["reverse"]
    assert (task.version, task.train_seen, len(task.eval_pairs)) == (version, TRAIN, EVAL)
    saved = registry.load_weights("reverse", version)
    now = restored.generative.adapters.weights("reverse")
    assert set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved)

    # A classification server serves the classifier and refuses Predict on the generative task.
    server = start_server(settings.model_copy(update={"server_metrics_port": free_port()}))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = continual_pb2_grpc.ContinualStub(channel)
            text = classifier[0].eval[0][0]
            assert stub.Predict(continual_pb2.PredictRequest(task=name, text=text), timeout=30).label
            with pytest.raises(grpc.RpcError) as refused:
                stub.Predict(continual_pb2.PredictRequest(task="reverse", text="a b"), timeout=30)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "generative" in (refused.value.details() or "")
    finally:
        server.stop()
