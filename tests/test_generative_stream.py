"""Generative tasks from the stream: (prompt, response) records through the real broker and a real
trainer on a tiny Llama, beside a classification task; the records of the wrong kind or over the
token limits dead-lettered with their reasons; versions published with exact match, the general
probe and the kind; the checkpoint restores them; a classification server leaves them alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
            if checkpoint is None or "reverse" not in checkpoint.get("generative", {}).get("tasks", {}):
                return None
            return checkpoint if name in checkpoint["tasks"] else None

        checkpoint = eventually(learned, timeout_s=240, interval_s=0.5, what="both tasks checkpointed")
        trainer = running.trainer
        summary = trainer.learning_summary()

    assert _dead_letters(settings, len(wrong)) == sorted(
        ["kind_mismatch", "kind_mismatch", "too_many_tokens", "mixed_kinds"]
    )
    version = int(checkpoint["generative"]["tasks"]["reverse"]["version"])
    manifest = registry.manifest("reverse", version)
    assert manifest["kind"] == "generative" and manifest["base_model"] == settings.language_model
    metrics = manifest["metrics"]
    assert metrics["eval_records"] == EVAL and metrics["train_records"] == TRAIN
    assert 0.0 <= metrics["exact_match"] <= 1.0 and metrics["token_loss"] > 0
    assert set(metrics["general_probe"]) == {"accuracy", "perplexity"}
    exported = trainer.metrics.registry.get_sample_value(
        "continual_general_probe_accuracy", {"task": "reverse"}
    )
    assert exported == metrics["general_probe"]["accuracy"]  # the dashboard's panel reads it
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

    # One server answers both: Predict the classifier, Generate the generative task (and refuses each
    # the other's call); a new version is served without a restart; a rollback serves the earlier one.
    # Long answers allowed here, so that a stream is still running when its client cancels it.
    serving = {"server_metrics_port": free_port(), "max_response_tokens": 400}
    server = start_server(settings.model_copy(update=serving))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = continual_pb2_grpc.ContinualStub(channel)
            _serves_both(stub, name, classifier[0].eval[0][0], version)
            learning = {
                t.task: t for t in stub.GetLearningStatus(continual_pb2.LearningStatusRequest()).tasks
            }
            assert learning["reverse"].kind == "generative" and learning[name].kind == ""
            assert learning["reverse"].general_probe_accuracy == metrics["general_probe"]["accuracy"]
            assert learning["reverse"].eval_records == EVAL
            _generate_batch_answers_each_item(stub, name)
            _a_cancelled_stream_frees_its_place(stub, server.pool.metrics.registry)
            # The CLI streams it too (a thin client: no model stack loaded).
            cli = [
                sys.executable,
                "-m",
                "service.cli",
                "generate",
                "Reverse the words: a b",
                "--task",
                "reverse",
            ]
            done = subprocess.run(
                [*cli, "--max-new-tokens", "4", "--target", f"127.0.0.1:{server.port}"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0 and f"reverse v{version}: " in done.stderr, done.stderr
            status = [sys.executable, "-m", "service.cli", "status", "--target", f"127.0.0.1:{server.port}"]
            shown = subprocess.run(
                status, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"}
            )
            assert shown.returncode == 0 and "reverse * (probe" in shown.stdout, shown.stdout

            more = [
                GenerativeRecord(
                    id=f"m{i}", task="reverse", prompt=p.prompt, response=p.response, split="train"
                )
                for i, p in enumerate(generative_tasks(16, 0, seed=1)["reverse-words"][0])
            ]
            produce(settings.kafka_bootstrap, settings.kafka_topic, more)
            with running_trainer(settings):
                eventually(lambda: _answered_by(stub, "reverse") > version, timeout_s=180, what="v2 served")
            info = stub.Rollback(continual_pb2.RollbackRequest(task="reverse", reason="test"))
            assert info.served_version == version and info.pinned
            assert _answered_by(stub, "reverse") == version
            listed = {a.task: a for a in stub.ListAdapters(continual_pb2.ListAdaptersRequest()).adapters}
            assert listed["reverse"].served_version == version and listed["reverse"].latest_version > version
    finally:
        server.stop()


def _answered_by(stub: continual_pb2_grpc.ContinualStub, task: str) -> int:
    replies = list(stub.Generate(continual_pb2.GenerateRequest(task=task, prompt="a b c", max_new_tokens=2)))
    return replies[-1].version


def _serves_both(stub: continual_pb2_grpc.ContinualStub, classifier: str, text: str, version: int) -> None:
    assert stub.Predict(continual_pb2.PredictRequest(task=classifier, text=text), timeout=30).label
    for call in (
        lambda: stub.Predict(continual_pb2.PredictRequest(task="reverse", text="a b"), timeout=30),
        lambda: list(stub.Generate(continual_pb2.GenerateRequest(task=classifier, prompt="a b"), timeout=30)),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    request = continual_pb2.GenerateRequest(
        task="reverse", prompt="Reverse the words: one two", max_new_tokens=6
    )
    replies = list(stub.Generate(request, timeout=60))
    assert [r.done for r in replies] == [False] * (len(replies) - 1) + [True]
    assert {r.version for r in replies} == {version} and replies[-1].finish_reason in ("stop", "length")
    assert 1 <= replies[-1].tokens <= 6
    # No task: the language model alone answers, and says so (version 0).
    alone = list(stub.Generate(continual_pb2.GenerateRequest(prompt="Hello", max_new_tokens=3), timeout=60))
    assert alone[-1].done and alone[-1].version == 0 and alone[-1].task == ""
    for bad in (
        continual_pb2.GenerateRequest(task="reverse", prompt=" "),
        continual_pb2.GenerateRequest(task="reverse", prompt="hi", max_new_tokens=10_000),
        continual_pb2.GenerateRequest(task="reverse", prompt="hi", temperature=-1),
        continual_pb2.GenerateRequest(task="../x", prompt="hi"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(bad, timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        list(stub.Generate(continual_pb2.GenerateRequest(task="nothing-here", prompt="hi"), timeout=30))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def _generate_batch_answers_each_item(stub: continual_pb2_grpc.ContinualStub, classifier: str) -> None:
    items = [
        continual_pb2.GenerateRequest(task="reverse", prompt="Reverse the words: a b", max_new_tokens=4),
        continual_pb2.GenerateRequest(task=classifier, prompt="hi"),
        continual_pb2.GenerateRequest(prompt="Hi there", max_new_tokens=4),
    ]
    results = stub.GenerateBatch(continual_pb2.GenerateBatchRequest(requests=items), timeout=60).results
    assert [r.WhichOneof("result") for r in results] == ["reply", "error", "reply"]
    assert results[1].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert all(r.reply.done and r.reply.tokens >= 1 for r in (results[0], results[2]))
    # One at a time, the same greedy answer.
    streamed = "".join(r.text for r in stub.Generate(items[0], timeout=60))
    assert results[0].reply.text == streamed


def _a_cancelled_stream_frees_its_place(stub: continual_pb2_grpc.ContinualStub, metrics: object) -> None:
    def cancelled() -> float:
        return metrics.get_sample_value("continual_generations_total", {"reason": "cancelled"}) or 0.0  # type: ignore[attr-defined]

    before = cancelled()
    call = stub.Generate(
        continual_pb2.GenerateRequest(task="reverse", prompt="Count to a thousand.", stop=["zzzz"])
    )
    next(call)
    call.cancel()
    eventually(lambda: cancelled() > before, timeout_s=30, what="the cancelled generation to end")
