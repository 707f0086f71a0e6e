"""Out of scope: the scope score, its threshold calibrated on eval records, the rule's life in the
trainer (calibrated, written with the router, restored) and in a server (every predict API says it)."""

from __future__ import annotations

import math
from urllib.request import urlopen

import grpc
import pytest
import torch
from torch.nn import functional

from service.api import continual_pb2, continual_pb2_grpc
from service.datasets import synthetic
from service.local_kafka import free_port
from service.out_of_scope import MIN_CALIBRATION_RECORDS, ScopeRule, calibrated, scope_scores
from service.registry import Registry
from service.router import Router, load_router
from service.server import start_server
from service.settings import Settings
from tests.helpers import eventually, new_trainer, train_in_process
from tests.test_router import same


def test_the_threshold_turns_away_the_set_share_of_in_scope_records() -> None:
    scores = torch.linspace(0, 1, 1001)
    rule = calibrated(scores, reject_rate=0.02, prototype_weight=5.0)
    assert rule is not None and rule.calibration_records == 1001
    assert int((scores < rule.threshold).sum()) == 20
    # Too few records to judge by, or nothing to turn away: no rule, so nothing is judged.
    assert calibrated(scores[: MIN_CALIBRATION_RECORDS - 1], 0.02, 5.0) is None
    assert calibrated(scores, 0.0, 5.0) is None
    assert ScopeRule.from_manifest(rule.manifest()) == rule
    assert ScopeRule.from_manifest(None) is None


def test_a_text_far_from_every_label_scores_lower_than_a_near_one_the_router_is_as_sure_of() -> None:
    prototypes = functional.normalize(torch.eye(3, 8), dim=-1)
    sure = torch.tensor([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]])
    near, far = torch.eye(1, 8) * 4, torch.eye(8)[7:] + 0.1 * torch.eye(1, 8)
    scores = scope_scores(sure, torch.cat([near, far]), prototypes, prototype_weight=5.0)
    assert scores[0] > scores[1]
    # Without the prototypes' view the two are alike: the softmax is as sure far from all data.
    alike = scope_scores(sure, torch.cat([near, far]), prototypes, prototype_weight=0.0)
    assert alike[0] == alike[1] == pytest.approx(math.log(0.9))
    # The less sure the router, the lower the score, the embedding the same.
    unsure = scope_scores(torch.tensor([[0.4, 0.3, 0.3]]), near, prototypes, prototype_weight=5.0)
    assert unsure[0] < scores[0]


def test_the_trainer_calibrates_the_rule_writes_it_with_the_router_and_restores_its_memory(
    settings: Settings,
) -> None:
    tasks = synthetic(num_tasks=2)
    trainer = train_in_process(settings, tasks)
    router = load_router(Registry(settings.registry_dir))
    eval_records = sum(len(task.eval) for task in tasks)
    assert router is not None and router.scope is not None
    assert router.scope.calibration_records == eval_records == len(trainer.inference.scope_memory)
    assert router.scope.reject_rate == settings.out_of_scope_reject_rate
    assert trainer.inference.router is not None and trainer.inference.router.scope == router.scope
    # Its eval features come back with the checkpoint: a restarted trainer calibrates alike.
    assert same(new_trainer(settings).inference.scope_memory, trainer.inference.scope_memory)
    # Switched off, no rule is written.
    off = settings.model_copy(
        update={"out_of_scope_reject_rate": 0.0, "registry_dir": settings.registry_dir.parent / "off"}
    )
    train_in_process(off, tasks)
    written = load_router(Registry(off.registry_dir))
    assert written is not None and written.scope is None


def test_every_predict_api_says_when_a_task_less_text_is_out_of_scope(settings: Settings) -> None:
    settings = settings.model_copy(update={"promotion_tolerance": 1.0, "server_metrics_port": free_port()})
    tasks = synthetic(num_tasks=2)
    train_in_process(settings, tasks)
    registry = Registry(settings.registry_dir)
    fitted = load_router(registry)
    assert fitted is not None and fitted.scope is not None

    def write(round_number: int, threshold: float) -> None:
        # The fitted router with a threshold no score passes (inf) or every score passes (-inf).
        scope = ScopeRule(threshold, fitted.scope.prototype_weight, 0.02, 100)  # type: ignore[union-attr]
        router = Router(fitted.rows, fitted.weight, fitted.bias, scope)
        manifest = {
            "rows": [list(r) for r in fitted.rows],
            "base_model": settings.base_model,
            "out_of_scope": scope.manifest(),
        }
        registry.write_router(round_number, router.tensors(), manifest)

    texts = [text for task in tasks for text, _ in task.eval[:4]]
    write(100, math.inf)
    server = start_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = continual_pb2_grpc.ContinualStub(channel)
            named = continual_pb2.PredictRequest(task=tasks[0].name, text=texts[0])
            asked = [continual_pb2.PredictRequest(text=t) for t in texts]
            replies = [stub.Predict(r) for r in asked]
            assert all(r.out_of_scope and r.task_inferred and r.label for r in replies)
            # A request naming its task is not judged: the caller said where it belongs.
            assert not stub.Predict(named).out_of_scope
            batch = stub.PredictBatch(continual_pb2.PredictBatchRequest(items=[*asked, named]))
            assert [r.prediction.out_of_scope for r in batch.results] == [True] * len(texts) + [False]
            streamed = list(stub.PredictStream(iter(asked)))
            assert all(r.prediction.out_of_scope for r in streamed)
            # Exported for the dashboard and the alert: every task-less answer, by its judgement.
            metrics = urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
            judged = 3 * len(texts)  # Predict, PredictBatch, PredictStream; named requests apart
            assert f'continual_task_less_answers_total{{out_of_scope="true"}} {float(judged)}' in metrics
            # A router with a threshold every text passes: none out of scope, the answers unchanged.
            write(101, -math.inf)
            eventually(
                lambda: not any(stub.Predict(r).out_of_scope for r in asked), 10, 0.2, "the new rule in use"
            )
            again = [stub.Predict(r) for r in asked]
            assert [(r.task, r.label) for r in again] == [(r.task, r.label) for r in replies]
    finally:
        server.stop()
