"""The gRPC server on loopback: predictions, statuses, hot swap, rollback, health, reflection, metrics."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr
from tritonclient.utils import InferenceServerException

from service.api import continual_pb2, continual_pb2_grpc
from service.client import open_channel
from service.datasets import TaskData, synthetic
from service.local_kafka import free_port
from service.registry import Registry, open_registry
from service.server import SERVICE_NAME, RunningServer, start_server
from service.settings import Settings, SettingsError, load_settings
from service.trainer import Trainer
from tests.helpers import eventually, incoming, new_trainer, train_in_process

TASKS = synthetic(num_tasks=2)

#: Call metadata as grpc's client stubs type it.
Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """These tests are about serving: every new version passes the gate (the gate has its own tests)."""
    return settings.model_copy(update={"promotion_tolerance": 1.0})


@pytest.fixture
def trained(settings: Settings) -> Trainer:
    return train_in_process(settings, TASKS)


@pytest.fixture
def server(settings: Settings, trained: Trainer) -> Iterator[RunningServer]:
    running = start_server(settings.model_copy(update={"server_metrics_port": free_port()}))
    yield running
    running.stop()


@pytest.fixture
def stub(server: RunningServer) -> Iterator[continual_pb2_grpc.ContinualStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield continual_pb2_grpc.ContinualStub(channel)


def accuracy(stub: continual_pb2_grpc.ContinualStub, task: TaskData) -> float:
    answers = [stub.Predict(continual_pb2.PredictRequest(task=task.name, text=text)) for text, _ in task.eval]
    return sum(a.label == label for a, (_, label) in zip(answers, task.eval, strict=True)) / len(task.eval)


def test_predictions_match_the_trained_model(
    stub: continual_pb2_grpc.ContinualStub, trained: Trainer
) -> None:
    for task in TASKS:
        assert accuracy(stub, task) == pytest.approx(trained.tasks[task.name].accuracy)
    reply = stub.Predict(continual_pb2.PredictRequest(task=TASKS[0].name, text=TASKS[0].eval[0][0], top_k=10))
    assert reply.version == 1
    assert len(reply.top_k) == 4  # every label, best first
    assert [s.score for s in reply.top_k] == sorted((s.score for s in reply.top_k), reverse=True)
    assert sum(s.score for s in reply.top_k) == pytest.approx(1.0, abs=1e-4)
    assert (reply.label, reply.score) == (reply.top_k[0].label, reply.top_k[0].score)


def test_a_request_without_a_task_is_routed_to_the_right_one(stub: continual_pb2_grpc.ContinualStub) -> None:
    routed = correct = 0
    for task in TASKS:
        for text, label in task.eval:
            reply = stub.Predict(continual_pb2.PredictRequest(text=text))
            assert reply.task_inferred and 0.0 < reply.task_confidence <= 1.0
            routed += reply.task == task.name
            correct += reply.task == task.name and reply.label == label
    total = sum(len(t.eval) for t in TASKS)
    # A random tiny BERT embeds filler-heavy texts poorly; routing quality on real embeddings is
    # measured with MiniLM in test_minilm.py. Here: clearly better than a coin toss between two tasks.
    assert routed / total >= 0.6, routed / total
    assert correct / total >= 0.4, correct / total
    named = stub.Predict(continual_pb2.PredictRequest(task=TASKS[0].name, text="hi"))
    assert not named.task_inferred and named.task_confidence == 1.0


@pytest.mark.parametrize(
    ("task", "text", "top_k", "code", "message"),
    [
        ("synthetic-0", "", 1, grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
        ("synthetic-0", "x" * 3000, 1, grpc.StatusCode.INVALID_ARGUMENT, "limit is 2000"),
        ("synthetic-0", "hello", -1, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        ("../x", "hello", 1, grpc.StatusCode.INVALID_ARGUMENT, "not a valid task name"),
        ("no-such-task", "hello", 1, grpc.StatusCode.NOT_FOUND, "no-such-task"),
    ],
)
def test_bad_requests_get_a_status_and_a_reason(
    stub: continual_pb2_grpc.ContinualStub,
    task: str,
    text: str,
    top_k: int,
    code: grpc.StatusCode,
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(continual_pb2.PredictRequest(task=task, text=text, top_k=top_k))
    assert error.value.code() == code
    details = error.value.details()
    assert details is not None and message in details


BAD_ITEMS = [("synthetic-0", ""), ("synthetic-0", "x" * 3000), ("../x", "hello"), ("no-such-task", "hello")]


def test_batches_and_streams_answer_each_item_as_predict_does(stub: continual_pb2_grpc.ContinualStub) -> None:
    """Good items get Predict's answer, bad ones Predict's status and message, and neither kind stops
    the other; a stream longer than the server's window keeps its order."""
    good = [(task.name, text) for task in TASKS for text, _ in task.eval[:12]] + [("", TASKS[1].eval[0][0])]
    items = [continual_pb2.PredictRequest(task=t, text=x, top_k=2) for t, x in good + BAD_ITEMS] * 3
    expected: list[continual_pb2.PredictResponse | tuple[int, str]] = []
    for item in items:
        try:
            expected.append(stub.Predict(item))
        except grpc.RpcError as error:
            expected.append((error.code().value[0], str(error.details())))
    batch = stub.PredictBatch(continual_pb2.PredictBatchRequest(items=items)).results
    stream = list(stub.PredictStream(iter(items)))
    assert len(batch) == len(stream) == len(items) > 64  # the stream outgrows stream_window (64)
    for want, *results in zip(expected, batch, stream, strict=True):
        for result in results:
            if isinstance(want, tuple):
                assert (result.error.code, result.error.message) == want
                continue
            got = result.prediction
            assert (got.task, got.label, got.version, got.task_inferred) == (
                want.task,
                want.label,
                want.version,
                want.task_inferred,
            )
            assert [s.label for s in got.top_k] == [s.label for s in want.top_k]
            assert [s.score for s in got.top_k] == pytest.approx([s.score for s in want.top_k], abs=1e-5)
    assert {w[0] for w in expected if isinstance(w, tuple)} == {3, 5}  # INVALID_ARGUMENT, NOT_FOUND
    for size in (0, 257):
        with pytest.raises(grpc.RpcError) as error:
            stub.PredictBatch(continual_pb2.PredictBatchRequest(items=items[:1] * size))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_batch_items" in str(error.value.details())


def test_a_server_holding_one_adapter_answers_every_task_under_load(
    settings: Settings, server: RunningServer, stub: continual_pb2_grpc.ContinualStub
) -> None:
    """Adapters are a cache: with room for one, concurrent requests over every task (and none) load
    and evict them as they come, and each gets the answer of a server that holds them all."""
    small = start_server(settings.model_copy(update={"max_loaded_adapters": 1, "grpc_port": free_port()}))
    try:
        items = [(task.name, text) for task in TASKS for text, _ in task.eval[:8]]
        items += [("", text) for text, _ in TASKS[1].eval[:4]]
        want = [stub.Predict(continual_pb2.PredictRequest(task=t, text=x, top_k=3)) for t, x in items * 2]
        with grpc.insecure_channel(f"127.0.0.1:{small.port}") as channel:
            cached = continual_pb2_grpc.ContinualStub(channel)
            with futures.ThreadPoolExecutor(8) as pool:
                asked = (continual_pb2.PredictRequest(task=t, text=x, top_k=3) for t, x in items * 2)
                got = list(pool.map(cached.Predict, asked))
        for a, b in zip(got, want, strict=True):
            assert (a.task, a.label, a.version) == (b.task, b.label, b.version)
            assert [s.score for s in a.top_k] == pytest.approx([s.score for s in b.top_k], abs=1e-5)
        # Two tasks through room for one: each task's adapter was loaded, evicting the other's (how
        # many times more depends on how the engine's batches fell, which the load decides).
        loads = small.pool.metrics.registry.get_sample_value("continual_adapter_loads_total")
        assert loads is not None and loads >= 2, loads
    finally:
        small.stop()


def test_kserve_and_triton_clients_call_the_open_inference_protocol(
    server: RunningServer, stub: continual_pb2_grpc.ContinualStub
) -> None:
    """The official Triton client, unchanged, against the Open Inference Protocol v2 service."""
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    task = TASKS[0].name
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(task) and client.is_model_ready(task, "1")
    assert not client.is_model_ready(task, "7") and not client.is_model_ready("no-such-task")
    metadata = client.get_model_metadata(task)
    assert (metadata.name, list(metadata.versions)) == (task, ["1"])
    assert [(t.name, t.datatype) for t in metadata.outputs] == [("label", "BYTES"), ("score", "FP32")]

    def texts_input(texts: list[str]) -> triton.InferInput:
        tensor = triton.InferInput("text", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([text.encode() for text in texts], dtype=np.object_))
        return tensor

    texts = [text for text, _ in TASKS[0].eval[:10]] + ["ünïcödé, and a longer text than the others ✓"]
    outputs = [triton.InferRequestedOutput("label"), triton.InferRequestedOutput("score")]
    result = client.infer(task, [texts_input(texts)], outputs=outputs)
    assert result.get_response().model_version == "1"
    labels, scores = result.as_numpy("label"), result.as_numpy("score")
    for text, label, score in zip(texts, labels, scores, strict=True):
        want = stub.Predict(continual_pb2.PredictRequest(task=task, text=text))
        assert label.decode() == want.label and float(score) == pytest.approx(want.score, abs=1e-5)
    for model, bad, code, message in [
        ("no-such-task", texts, "NOT_FOUND", "no-such-task"),
        (task, ["fine", ""], "INVALID_ARGUMENT", "text is empty"),
    ]:
        with pytest.raises(InferenceServerException) as error:
            client.infer(model, [texts_input(bad)])
        assert error.value.status() == f"StatusCode.{code}" and message in str(error.value.message())
    client.close()


def test_a_new_version_is_served_without_a_restart_and_rollback_pins(
    stub: continual_pb2_grpc.ContinualStub, trained: Trainer, server: RunningServer
) -> None:
    task = TASKS[0]
    trained.absorb(incoming([task])[:40])
    trained.close_round({0: 100_000})

    def served_v2() -> bool:
        return stub.Predict(continual_pb2.PredictRequest(task=task.name, text="hello")).version == 2

    eventually(served_v2, timeout_s=10, what="v2 to be served")

    info = stub.Rollback(continual_pb2.RollbackRequest(task=task.name))
    assert (info.served_version, info.latest_version, info.pinned) == (1, 2, True)
    assert stub.Predict(continual_pb2.PredictRequest(task=task.name, text="hello")).version == 1

    # A version published while pinned waits as a candidate.
    trained.absorb(incoming([task])[:40])
    trained.close_round({0: 200_000})
    listed = {a.task: a for a in stub.ListAdapters(continual_pb2.ListAdaptersRequest()).adapters}
    assert (listed[task.name].served_version, listed[task.name].latest_version) == (1, 3)

    info = stub.Promote(continual_pb2.PromoteRequest(task=task.name))
    assert (info.served_version, info.pinned) == (3, False)
    assert stub.Predict(continual_pb2.PredictRequest(task=task.name, text="hello")).version == 3

    with pytest.raises(grpc.RpcError) as error:
        stub.Rollback(continual_pb2.RollbackRequest(task=task.name, version=42))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        stub.Rollback(continual_pb2.RollbackRequest(task=TASKS[1].name))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_server_on_an_object_store_registry_follows_the_trainer(s3_settings: Settings) -> None:
    """Trainer and server share nothing but an S3 bucket (a real S3 server): the server serves what
    the trainer publishes there, swaps without a restart, and a rollback moves the alias in the bucket."""
    settings = s3_settings.model_copy(update={"promotion_tolerance": 1.0})
    trainer = train_in_process(settings, TASKS)
    registry = open_registry(settings)
    assert registry.tasks() == sorted(task.name for task in TASKS)
    assert not settings.registry_dir.exists()  # nothing went to the local directory
    server = start_server(settings.model_copy(update={"server_metrics_port": free_port()}))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = continual_pb2_grpc.ContinualStub(channel)
            for task in TASKS:
                assert accuracy(stub, task) == pytest.approx(trainer.tasks[task.name].accuracy)
            task = TASKS[0]
            trainer.absorb(incoming([task])[:40])
            trainer.close_round({0: 100_000})

            def served_v2() -> bool:
                return stub.Predict(continual_pb2.PredictRequest(task=task.name, text="hello")).version == 2

            eventually(served_v2, timeout_s=10, what="v2 to be served from the bucket")
            info = stub.Rollback(continual_pb2.RollbackRequest(task=task.name))
            assert (info.served_version, info.pinned) == (1, True)
            alias = open_registry(settings).alias(task.name)
            assert alias is not None and (alias.served, alias.pinned) == (1, True)
    finally:
        server.stop()
    # A trainer started again on the bucket resumes from the checkpoint it left there.
    assert new_trainer(settings).tasks[task.name].version == 2


def test_a_corrupt_version_is_refused_and_the_old_one_keeps_serving(
    stub: continual_pb2_grpc.ContinualStub, trained: Trainer, settings: Settings, server: RunningServer
) -> None:
    task = TASKS[0]
    registry = Registry(settings.registry_dir)
    # A second version whose weights file is damaged on disk after it was written.
    manifest = registry.manifest(task.name, 1)
    registry.publish(task.name, trained.training.model.weights(task.name), task.eval, manifest)
    weights = settings.registry_dir / "tasks" / task.name / "versions" / "000002" / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    # The watcher finds the alias on v2, refuses it, and keeps answering with v1.
    registry.set_alias(task.name, 2, pinned=False, reason="test")
    time.sleep(5 * settings.registry_poll_s)
    assert stub.Predict(continual_pb2.PredictRequest(task=task.name, text="hello")).version == 1
    failures = server.pool.metrics.registry.get_sample_value(
        "continual_version_load_failures_total", {"task": task.name}
    )
    assert failures == 1
    # An operator asking for it explicitly gets DATA_LOSS and a reason.
    with pytest.raises(grpc.RpcError) as error:
        stub.Promote(continual_pb2.PromoteRequest(task=task.name, version=2))
    assert error.value.code() == grpc.StatusCode.DATA_LOSS
    details = error.value.details()
    assert details is not None and "sha256" in details
    assert stub.Predict(continual_pb2.PredictRequest(task=task.name, text="hello")).version == 1


def test_health_reflection_and_metrics(server: RunningServer, stub: continual_pb2_grpc.ContinualStub) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(
            reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        assert SERVICE_NAME in {s.name for s in reply.list_services_response.service}

    stub.Predict(continual_pb2.PredictRequest(task=TASKS[0].name, text="hello"))
    with pytest.raises(grpc.RpcError):
        stub.Predict(continual_pb2.PredictRequest(task="nope", text="hello"))
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    )
    assert 'continual_requests_total{code="OK",method="Predict"} 1.0' in body
    assert 'continual_requests_total{code="NOT_FOUND",method="Predict"} 1.0' in body
    assert f'continual_served_version{{task="{TASKS[0].name}"}} 1.0' in body
    assert "continual_request_latency_seconds_bucket" in body


def test_versions_and_history_are_listed(stub: continual_pb2_grpc.ContinualStub, trained: Trainer) -> None:
    task = TASKS[0]
    trained.absorb(incoming([task])[:40])
    trained.close_round({0: 100_000})
    eventually(lambda: stub.Predict(continual_pb2.PredictRequest(task=task.name, text="hi")).version == 2, 10)
    stub.Rollback(continual_pb2.RollbackRequest(task=task.name, reason="answers look wrong"))

    listed = stub.ListVersions(continual_pb2.ListVersionsRequest(task=task.name))
    assert [(v.version, v.status, v.parent_version) for v in listed.versions] == [
        (2, "candidate", 1),
        (1, "served", 0),
    ]
    assert listed.versions[1].train_records == len(task.train)
    assert 0 < listed.versions[1].macro_accuracy <= 1
    detail = stub.GetAdapter(continual_pb2.GetAdapterRequest(task=task.name))
    assert detail.adapter.served_version == 1 and detail.adapter.pinned
    data = detail.adapter.data  # the served version's data, judged when it was published
    assert detail.adapter.HasField("data") and not data.sufficient  # 160 records, 1,000 needed
    assert (data.train_records, data.min_task_train_records, list(data.short_labels)) == (160, 1000, [])
    assert detail.alias_reason == "rollback: answers look wrong"
    assert [(e.event, e.version) for e in detail.history] == [("alias", 1), ("alias", 2), ("alias", 1)]
    with pytest.raises(grpc.RpcError) as error:
        stub.ListVersions(continual_pb2.ListVersionsRequest(task="nope"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_learning_status_reports_the_trainers_matrix_and_figures(
    stub: continual_pb2_grpc.ContinualStub, trained: Trainer
) -> None:
    first, second = TASKS
    trained.absorb(incoming([second])[:40])  # learn the second task again: its row moves last
    trained.close_round({0: 100_000})
    status = stub.GetLearningStatus(continual_pb2.LearningStatusRequest())
    expected = trained.learning_summary()
    assert (status.strategy, status.round) == ("lora-per-task", 2)
    assert [row.after_task for row in status.accuracy_matrix] == [first.name, second.name]
    assert {
        row.after_task: {c.task: c.accuracy for c in row.cells} for row in status.accuracy_matrix
    } == trained.assessment.matrix
    assert {
        row.after_task: {c.task: c.macro_accuracy for c in row.cells} for row in status.accuracy_matrix
    } == trained.assessment.macro_matrix
    assert status.acc == pytest.approx(expected.acc)
    assert status.bwt == pytest.approx(expected.bwt)
    assert math.isnan(status.fwt)  # no task was measured before it was learned
    by_task = {t.task: t for t in status.tasks}
    assert by_task[second.name].version == 2 and by_task[second.name].train_records == 160 + 40
    assert 0 < by_task[second.name].macro_accuracy <= 1
    data = by_task[second.name].data
    assert (data.train_records, data.imbalance_ratio) == (160 + 40, 1.0)  # 50 records per label
    assert by_task[first.name].forgetting == pytest.approx(expected.forgetting[first.name])


def test_admin_calls_need_the_token_when_one_is_set(settings: Settings, trained: Trainer) -> None:
    running = start_server(settings.model_copy(update={"admin_token": SecretStr("s3cret")}))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = continual_pb2_grpc.ContinualStub(channel)
            task = TASKS[0].name
            admin_calls: list[Callable[[Metadata], object]] = [
                lambda md: stub.Rollback(continual_pb2.RollbackRequest(task=task), metadata=md),
                lambda md: stub.Promote(continual_pb2.PromoteRequest(task=task), metadata=md),
                lambda md: stub.ListVersions(continual_pb2.ListVersionsRequest(task=task), metadata=md),
                lambda md: stub.GetAdapter(continual_pb2.GetAdapterRequest(task=task), metadata=md),
            ]
            wrong: Metadata = (("authorization", "Bearer wrong"),)
            for call in admin_calls:
                for metadata in ((), wrong):
                    with pytest.raises(grpc.RpcError) as error:
                        call(metadata)
                    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good: Metadata = (("authorization", "Bearer s3cret"),)
            assert stub.Promote(continual_pb2.PromoteRequest(task=task), metadata=good).served_version == 1
            # Predictions and the plain listing stay open.
            assert stub.Predict(continual_pb2.PredictRequest(task=task, text="hi")).version == 1
            assert stub.ListAdapters(continual_pb2.ListAdaptersRequest()).adapters
    finally:
        running.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(settings: Settings, trained: Trainer, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    running = start_server(settings.model_copy(update={"tls_cert_file": cert, "tls_key_file": key}))
    try:
        client_settings = settings.model_copy(update={"tls_ca_file": cert, "grpc_port": running.port})
        with open_channel(client_settings) as channel:
            reply = continual_pb2_grpc.ContinualStub(channel).Predict(
                continual_pb2.PredictRequest(task=TASKS[0].name, text="hi"), timeout=10
            )
            assert reply.version == 1
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as plain, pytest.raises(grpc.RpcError):
            continual_pb2_grpc.ContinualStub(plain).Predict(
                continual_pb2.PredictRequest(task=TASKS[0].name, text="hi"), timeout=5
            )
    finally:
        running.stop()


def _openssl(command: str, *paths: Path | str) -> None:
    """openssl with ``command``'s words, each ``{}`` in it replaced by the next of ``paths``."""
    words = command.split()
    filled = iter(paths)
    subprocess.run(
        ["openssl", *[str(next(filled)) if w == "{}" else w for w in words]], check=True, capture_output=True
    )


def _authority(name: str, folder: Path) -> tuple[Path, Path]:
    """A self-signed CA: its certificate and key."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req -x509 -newkey rsa:2048 -nodes -days 1 -subj {} -keyout {} -out {}", f"/CN={name}", key, cert
    )
    return cert, key


def _signed(ca: tuple[Path, Path], name: str, folder: Path, extensions: str) -> tuple[Path, Path]:
    """A key and certificate for ``name``, signed by ``ca`` (its certificate and key)."""
    key, request, cert, ext = (folder / f"{name}.{suffix}" for suffix in ("key", "csr", "pem", "ext"))
    ext.write_text(extensions + "\n")
    _openssl("req -newkey rsa:2048 -nodes -subj {} -keyout {} -out {}", f"/CN={name}", key, request)
    _openssl(
        "x509 -req -CAcreateserial -days 1 -in {} -CA {} -CAkey {} -out {} -extfile {}",
        request,
        *ca,
        cert,
        ext,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls_refuses_a_client_without_a_certificate_the_ca_signed(
    settings: Settings, trained: Trainer, tmp_path: Path
) -> None:
    ca, stranger = _authority("test-ca", tmp_path), _authority("other-ca", tmp_path)
    server_cert, server_key = _signed(ca, "localhost", tmp_path, "subjectAltName=DNS:localhost,IP:127.0.0.1")
    client_cert, client_key = _signed(ca, "client", tmp_path, "extendedKeyUsage=clientAuth")
    forged_cert, forged_key = _signed(stranger, "forged", tmp_path, "extendedKeyUsage=clientAuth")
    served = {"tls_cert_file": server_cert, "tls_key_file": server_key, "tls_client_ca_file": ca[0]}
    running = start_server(settings.model_copy(update=served))
    request = continual_pb2.PredictRequest(task=TASKS[0].name, text="hi")
    try:
        client = {"tls_ca_file": ca[0], "grpc_port": running.port, "grpc_host": "localhost"}
        with_cert = {"tls_client_cert_file": client_cert, "tls_client_key_file": client_key}
        with open_channel(settings.model_copy(update={**client, **with_cert})) as channel:
            assert continual_pb2_grpc.ContinualStub(channel).Predict(request, timeout=10).version == 1
        forged = {"tls_client_cert_file": forged_cert, "tls_client_key_file": forged_key}
        for refused in (client, {**client, **forged}):
            with (
                open_channel(settings.model_copy(update=refused)) as channel,
                pytest.raises(grpc.RpcError) as error,
            ):
                continual_pb2_grpc.ContinualStub(channel).Predict(request, timeout=5)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()
    with pytest.raises(SettingsError, match="tls_client_ca_file"):
        load_settings(tls_client_ca_file=ca[0])


def test_two_servers_on_one_registry_converge(settings: Settings, trained: Trainer) -> None:
    servers = [start_server(settings.model_copy(update={"grpc_port": free_port()})) for _ in range(2)]
    try:
        channels = [grpc.insecure_channel(f"127.0.0.1:{s.port}") for s in servers]
        stubs = [continual_pb2_grpc.ContinualStub(c) for c in channels]
        task = TASKS[0]

        def served_everywhere() -> set[int]:
            versions = {
                s.Predict(continual_pb2.PredictRequest(task=task.name, text="hi")).version for s in stubs
            }
            return versions if len(versions) == 1 else set()

        assert served_everywhere() == {1}
        trained.absorb(incoming([task])[:40])
        trained.close_round({0: 100_000})
        assert eventually(lambda: served_everywhere() == {2} or None, 10)
        # A rollback made through one server is followed by the other.
        stubs[0].Rollback(continual_pb2.RollbackRequest(task=task.name))
        assert eventually(lambda: served_everywhere() == {1} or None, 10)
        for channel in channels:
            channel.close()
    finally:
        for server in servers:
            server.stop()


@pytest.mark.slow
def test_the_adapters_cli_drives_a_running_server(settings: Settings, trained: Trainer) -> None:
    running = start_server(settings.model_copy(update={"admin_token": SecretStr("s3cret")}))
    target = f"127.0.0.1:{running.port}"
    task = TASKS[0].name

    def cli(*args: str, token: str = "s3cret") -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUAL_")}
        env.update({"CONTINUAL_ADMIN_TOKEN": token, "COLUMNS": "200"})
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args, "--target", target],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    try:
        trained.absorb(incoming([TASKS[0]])[:40])
        trained.close_round({0: 100_000})
        eventually(lambda: running.pool.served()[task].version == 2, 10)

        rollback = cli("adapters", "rollback", task, "--reason", "bad answers")
        assert rollback.returncode == 0, rollback.stderr
        assert running.pool.served()[task].version == 1
        shown = cli("adapters", "show", task)
        assert shown.returncode == 0, shown.stderr
        assert "rollback: bad answers" in shown.stdout and "candidate" in shown.stdout
        assert "160 of 1000 records" in shown.stdout  # the served v1's data, short of the minimum
        predicted = cli("predict", TASKS[0].eval[0][0], "--task", task)
        assert predicted.returncode == 0 and f"{task} v1" in predicted.stdout
        inferred = cli("predict", TASKS[0].eval[0][0])
        assert inferred.returncode == 0 and "(inferred" in inferred.stdout
        denied = cli("adapters", "promote", task, token="wrong")
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        assert running.pool.served()[task].version == 1
        promoted = cli("adapters", "promote", task)
        assert promoted.returncode == 0, promoted.stderr
        assert running.pool.served()[task].version == 2
        status = cli("status")
        assert status.returncode == 0, status.stderr
        assert "accuracy matrix" in status.stdout and TASKS[1].name in status.stdout
    finally:
        running.stop()


def test_a_server_beyond_loopback_needs_an_admin_token(settings: Settings) -> None:
    """Without a token, anyone who reaches a server bound beyond loopback could roll back or promote."""
    exposed = settings.model_copy(update={"grpc_host": "0.0.0.0"})
    with pytest.raises(SettingsError, match=r"admin_token: the server binds grpc_host '0\.0\.0\.0'"):
        start_server(exposed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUAL_")}
    env.update({"CONTINUAL_GRPC_HOST": "0.0.0.0", "CONTINUAL_REGISTRY_DIR": str(settings.registry_dir)})
    refused = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "allow_unauthenticated_admin" in refused.stderr, refused.stderr
    for allowed in ({"admin_token": SecretStr("s3cret")}, {"allow_unauthenticated_admin": True}):
        running = start_server(exposed.model_copy(update={**allowed, "grpc_port": free_port()}))
        try:
            with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            running.stop()
    for loopback in ("127.0.0.1", "localhost", "[::1]"):
        settings.model_copy(update={"grpc_host": loopback}).check_serving()
