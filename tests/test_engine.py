"""The inference engine on a tiny real BERT with real LoRA adapters: mixed-adapter batches answer as
the trainer's PEFT model does one text at a time, jobs are batched and answered in order, the queue
is bounded, deadlines drop requests before their forward, and an adapter is unloaded only once no
queued request needs it."""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from prometheus_client import CollectorRegistry

from service.engine import InferenceEngine, Row
from service.errors import CorruptVersion, DeadlineExceeded, ResourceExhausted
from service.model import BASE_FEATURE_LAYERS, AdapterModel, build_model
from service.served_model import ServedModel, build_served_model
from service.server_metrics import ServerMetrics
from service.settings import Settings

TEXTS = [f"text number {i} {'with more words ' * (i % 4)}" for i in range(24)]
ADAPTERS = ["a@v1", "b@v1", "c@v1"]


@pytest.fixture
def trained(settings: Settings) -> AdapterModel:
    """The trainer's (PEFT) model with three adapters whose LoRA weights (zero at first for B) are
    moved off zero, so each differs: the reference every served answer is checked against."""
    model = build_model(settings)
    generator = torch.Generator().manual_seed(0)
    for labels, name in enumerate(ADAPTERS, start=2):
        model.add(name, num_labels=labels)
        with torch.no_grad():
            for parameter in model.named_parameters(name).values():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


@pytest.fixture
def model(settings: Settings, trained: AdapterModel) -> ServedModel:
    """A server's model with the same three adapters, loaded from their weights files' tensors."""
    model = build_served_model(settings)
    for name in ADAPTERS:
        model.load(name, trained.weights(name))
    return model


def make_engine(
    model: ServedModel,
    weights: Callable[[str], dict[str, torch.Tensor]] | None = None,
    capacity: int = 100,
    workers: int = 1,
    **limits: float,
) -> InferenceEngine:
    settings = {"max_batch_size": 8, "max_batch_wait_ms": 2.0, "queue_size": 64, **limits}
    return InferenceEngine(
        model,
        ServerMetrics(CollectorRegistry()),
        int(settings["max_batch_size"]),
        settings["max_batch_wait_ms"],
        int(settings["queue_size"]),
        capacity=capacity,
        weights=weights,
        workers=workers,
        threads=1,
    )


@pytest.fixture
def engine(model: ServedModel) -> Iterator[InferenceEngine]:
    engine = make_engine(model)
    engine.start()
    yield engine
    engine.stop()


class Paused:
    """Holds the engine between two batches until released, so jobs pile up in its queue."""

    def __init__(self, engine: InferenceEngine) -> None:
        self.inside, self.release = threading.Event(), threading.Event()
        threading.Thread(target=engine.between_batches, args=(self._hold,), daemon=True).start()
        assert self.inside.wait(10)

    def _hold(self) -> None:
        self.inside.set()
        self.release.wait(30)


def sample(metrics: ServerMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_mixed_adapter_batches_answer_as_the_trainers_model_does_one_text_at_a_time(
    trained: AdapterModel, engine: InferenceEngine
) -> None:
    rows = [Row(text, [*ADAPTERS, None][i % 4]) for i, text in enumerate(TEXTS)]
    alone = [
        trained.predict(row.adapter, [row.text])[0]
        if row.adapter
        else torch.from_numpy(trained.base_embeddings([row.text], layers=BASE_FEATURE_LAYERS))[0]
        for row in rows
    ]
    paused = Paused(engine)  # the requests queue up together: every batch mixes adapters and base rows
    futures = [engine.submit([row]) for row in rows]
    paused.release.set()
    answers = [future.result(timeout=30)[0] for future in futures]
    for row, single, batched in zip(rows, alone, answers, strict=True):
        assert batched.shape == single.shape, row
        assert torch.allclose(batched, single, atol=1e-5), (row, (batched - single).abs().max())
    assert sample(engine.metrics, "continual_inference_batch_rows_count") == 3  # 24 rows, 8 a batch
    # One job with more rows than a batch holds runs in pieces and keeps its rows in order.
    many = engine.run(rows)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(many, alone, strict=True))


def test_workers_run_batches_side_by_side_and_change_the_model_only_while_none_runs(
    trained: AdapterModel, model: ServedModel
) -> None:
    spans: list[tuple[float, float]] = []  # each forward's start and end, observed around the real one
    changes: list[float] = []
    forward = model.outputs

    def observed(texts: list[str], adapters: list[str | None]) -> list[torch.Tensor]:
        started = time.monotonic()
        answers = forward(texts, adapters)
        spans.append((started, time.monotonic()))
        return answers

    model.outputs = observed  # type: ignore[method-assign]
    trained.add("d@v1", num_labels=4)  # one more adapter, loaded and retired amid the load
    extra = trained.weights("d@v1")
    alone = {name: trained.predict(name, TEXTS) for name in ADAPTERS}
    engine = make_engine(model, workers=2, max_batch_size=2)
    engine.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as clients:
            answers = [
                clients.submit(engine.run, [Row(text, ADAPTERS[i % 3])]) for i, text in enumerate(TEXTS * 4)
            ]
            time.sleep(0.2)
            engine.between_batches(lambda: (changes.append(time.monotonic()), engine.load("d@v1", extra)))
            engine.retire("d@v1")
            for i, answer in enumerate(answers):
                expected = alone[ADAPTERS[i % 3]][i % len(TEXTS)]
                assert torch.allclose(answer.result(timeout=60)[0], expected, atol=1e-5)
        engine.run([Row("after", "a@v1")])
        assert "d@v1" not in model.names()
    finally:
        engine.stop()
    overlapping = sum(a[0] < b[1] and b[0] < a[1] for a, b in itertools.combinations(spans, 2))
    assert overlapping > 0, "two workers never ran a forward at the same time"
    assert changes and not any(start < changes[0] < end for start, end in spans)


def test_jobs_waiting_together_share_batches_in_their_order(engine: InferenceEngine) -> None:
    paused = Paused(engine)
    finished: list[int] = []
    futures = [engine.submit([Row(text, "a@v1")]) for text in TEXTS[:20]]
    for i, future in enumerate(futures):
        future.add_done_callback(lambda _, i=i: finished.append(i))
    paused.release.set()
    for future in futures:
        future.result(timeout=30)
    assert finished == list(range(20))
    # 20 one-row jobs, 8 rows a batch: three forwards.
    assert sample(engine.metrics, "continual_inference_batch_rows_count") == 3
    assert sample(engine.metrics, "continual_inference_batch_rows_sum") == 20


def test_a_lone_request_does_not_wait_for_a_batch_to_fill(model: ServedModel) -> None:
    engine = make_engine(model, max_batch_wait_ms=60_000)
    engine.start()
    try:
        engine.run([Row("warm up", "a@v1")])
        started = time.monotonic()
        engine.run([Row("alone", "a@v1")])
        assert time.monotonic() - started < 10  # far below the minute a filling batch may wait
    finally:
        engine.stop()


def test_a_full_queue_refuses_at_once_and_a_passed_deadline_skips_the_forward(model: ServedModel) -> None:
    engine = make_engine(model, queue_size=2)
    engine.start()
    try:
        paused = Paused(engine)
        late = engine.submit([Row("late", "a@v1")], deadline=time.monotonic() + 0.05)
        kept = engine.submit([Row("kept", "b@v1")])
        with pytest.raises(ResourceExhausted, match="inference_queue_size"):
            engine.submit([Row("one too many", "c@v1")])
        time.sleep(0.1)
        paused.release.set()
        with pytest.raises(DeadlineExceeded):
            late.result(timeout=30)
        assert kept.result(timeout=30)[0].shape == (3,)
        assert sample(engine.metrics, "continual_inference_queue_rejections_total") == 1
        assert sample(engine.metrics, "continual_inference_deadline_drops_total") == 1
        assert sample(engine.metrics, "continual_inference_batch_rows_sum") == 1  # no forward for "late"
    finally:
        engine.stop()


def test_a_retired_adapter_is_unloaded_only_after_the_requests_that_need_it(
    model: ServedModel, engine: InferenceEngine
) -> None:
    paused = Paused(engine)
    queued = [engine.submit([Row(text, "a@v1")]) for text in TEXTS[:5]]
    engine.retire("a@v1")
    assert "a@v1" in model.names()
    paused.release.set()
    assert all(len(future.result(timeout=30)) == 1 for future in queued)
    engine.run([Row("next batch", "b@v1")])  # retired adapters go between batches
    assert "a@v1" not in model.names()
    # A version retired and served again before it went is kept, not loaded twice (which would fail).
    engine.between_batches(lambda: (engine.retire("b@v1"), engine.load("b@v1")))
    engine.run([Row("after", "b@v1")])
    assert "b@v1" in model.names()


def test_adapters_are_a_cache_loaded_on_demand_and_never_evicted_from_under_a_request(
    trained: AdapterModel, model: ServedModel
) -> None:
    saved = {name: trained.weights(name) for name in ADAPTERS}
    alone = {name: trained.predict(name, TEXTS[:6]) for name in ADAPTERS}
    for name in ADAPTERS[1:]:
        model.remove(name)

    def weights(adapter: str) -> dict[str, torch.Tensor]:
        if adapter == "corrupt@v1":
            raise CorruptVersion("corrupt v1: weights.safetensors does not match its sha256")
        return saved[adapter]

    engine = make_engine(model, capacity=1, weights=weights)
    engine.start()
    try:
        for name in [*ADAPTERS, *ADAPTERS]:  # every request for an adapter that was evicted loads it
            answers = engine.run([Row(text, name) for text in TEXTS[:6]])
            assert torch.allclose(torch.stack(answers), alone[name], atol=1e-5)
            assert model.names() == [name]
        # One batch needs all three: none is evicted while its rows wait, even past the capacity.
        paused = Paused(engine)
        queued = [engine.submit([Row(TEXTS[i], name)]) for i, name in enumerate(ADAPTERS)]
        broken = engine.submit([Row("anything", "corrupt@v1")])
        paused.release.set()
        for future, name in zip(queued, ADAPTERS, strict=True):
            assert torch.allclose(future.result(timeout=30)[0], alone[name][ADAPTERS.index(name)], atol=1e-5)
        with pytest.raises(CorruptVersion, match="sha256"):
            broken.result(timeout=30)
        engine.run([Row("next", "a@v1")])
        assert model.names() == ["a@v1"]
        assert engine.metrics.registry.get_sample_value("continual_adapters_loaded") == 1
    finally:
        engine.stop()


def test_stopping_fails_what_waits_and_what_comes_later_instead_of_hanging(model: ServedModel) -> None:
    engine = make_engine(model)
    engine.start()
    paused = Paused(engine)
    waiting = [engine.submit([Row(text, "a@v1")]) for text in TEXTS[:3]]
    stopping = threading.Thread(target=engine.stop)
    stopping.start()
    paused.release.set()
    stopping.join(timeout=60)
    assert not stopping.is_alive()
    for future in waiting:  # answered before the engine stopped, or refused: never left waiting
        assert future.done()
    with pytest.raises(ResourceExhausted, match="shutting down"):
        engine.submit([Row("too late", "a@v1")])
