"""The gRPC server on loopback: predictions, statuses, hot swap, rollback, health, reflection, metrics."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api import continual_pb2, continual_pb2_grpc
from service.datasets import TaskData, synthetic
from service.local_kafka import free_port
from service.registry import Registry
from service.server import SERVICE_NAME, RunningServer, start_server
from service.settings import Settings
from service.trainer import Trainer
from tests.helpers import eventually, incoming, train_in_process

TASKS = synthetic(num_tasks=2)


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


@pytest.mark.parametrize(
    ("task", "text", "top_k", "code", "message"),
    [
        ("synthetic-0", "", 1, grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
        ("synthetic-0", "x" * 3000, 1, grpc.StatusCode.INVALID_ARGUMENT, "limit is 2000"),
        ("synthetic-0", "hello", -1, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        ("", "hello", 1, grpc.StatusCode.INVALID_ARGUMENT, "task is required"),
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
    assert message in error.value.details()


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


def test_a_corrupt_version_is_refused_and_the_old_one_keeps_serving(
    stub: continual_pb2_grpc.ContinualStub, trained: Trainer, settings: Settings
) -> None:
    task = TASKS[0]
    registry = Registry(settings.registry_dir)
    registry.publish(
        task.name,
        {"head.weight": trained.model.weights(task.name)["head.weight"]},  # no bias, no LoRA: cannot load
        task.eval,
        {**registry.manifest(task.name, 1), "files": {}},
    )
    registry.set_alias(task.name, 2, pinned=False)
    with pytest.raises(grpc.RpcError) as error:
        stub.Promote(continual_pb2.PromoteRequest(task=task.name, version=2))
    assert error.value.code() == grpc.StatusCode.DATA_LOSS
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
