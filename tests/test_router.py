"""Task inference: the feature memory, the router fitted on it, answering without a task, and the
router's life in the trainer (fitted, written, restored) and in a gRPC server (loaded, used, refused)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.request import urlopen

import grpc
import pytest
import torch

from service.api import continual_pb2, continual_pb2_grpc
from service.datasets import synthetic
from service.errors import CorruptVersion
from service.feature_memory import FeatureMemory
from service.local_kafka import free_port
from service.out_of_scope import ScopeRule
from service.registry import Registry
from service.router import (
    Answer,
    Router,
    answer_without_task,
    answered_by_router,
    candidates,
    could_still_win,
    fit_router,
    load_router,
)
from service.server import start_server
from service.settings import Settings
from tests.helpers import eventually, new_trainer, train_in_process


def same(a: FeatureMemory, b: FeatureMemory) -> bool:
    """Whether two memories hold the same rows for the same keys."""
    (xa, ya, ka), (xb, yb, kb) = a.features(), b.features()
    return ka == kb and torch.equal(ya, yb) and torch.equal(xa, xb)


def clusters(labels: int, per_label: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Points around one random centre per label, in 16 dimensions."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(labels, 16, generator=generator) * 3
    y = [label for label in range(labels) for _ in range(per_label)]
    return centres[y] + torch.randn(len(y), 16, generator=generator), y


def test_the_memory_keeps_an_even_sample_per_label_however_the_stream_is_cut() -> None:
    x, y = clusters(labels=3, per_label=100)
    keys = [("task", f"label-{label}") for label in y]
    whole, pieces = FeatureMemory(size=30, seed=0), FeatureMemory(size=30, seed=0)
    whole.add("task", [k[1] for k in keys], x)
    for start in range(0, len(keys), 7):  # polls of 7 records
        pieces.add("task", [k[1] for k in keys[start : start + 7]], x[start : start + 7])
    features, rows, names = whole.features()
    assert len(whole) == 30 and names == [("task", f"label-{i}") for i in range(3)]
    assert torch.bincount(rows).tolist() == [10, 10, 10]
    # A reservoir keeps a sample of the whole stream, not its first records.
    kept = {tuple(row.tolist()) for row in features}
    assert any(tuple(x[i].tolist()) in kept for i in range(50, 100))
    assert same(whole, pieces)
    # A new label takes its share from the others.
    whole.add("other", ["new"] * 20, torch.zeros(20, 16))
    assert torch.bincount(whole.features()[1]).tolist() == [7, 7, 7, 7]

    plain, tensors = whole.saved_state()
    restored = FeatureMemory(size=30, seed=0)
    restored.restore(json.loads(json.dumps(plain)), tensors)
    assert restored.added == whole.added == 320
    assert same(restored, whole)


def test_the_router_gives_each_task_the_probability_of_its_labels() -> None:
    x, y = clusters(labels=6, per_label=40)
    memory = FeatureMemory(size=10_000, seed=0)
    task_of = ["a", "a", "b", "b", "c", "c"]
    for label in range(6):
        chosen = [i for i, v in enumerate(y) if v == label]
        memory.add(task_of[label], [f"l{label}"] * len(chosen), x[chosen])
    router = fit_router(memory)
    assert router is not None and router.tasks() == {"a", "b", "c"}
    test, truth = clusters(labels=6, per_label=20)  # the same centres, new points
    probabilities = router.task_probabilities(test, ["a", "b", "c"])
    assert torch.allclose(probabilities.sum(-1), torch.ones(len(test)))
    routed = probabilities.argmax(-1).tolist()
    assert sum(r == "abc".index(task_of[t]) for r, t in zip(routed, truth, strict=True)) / len(truth) >= 0.98
    # Tasks left out are left out of the softmax: the rest share all of the probability.
    two = router.task_probabilities(test, ["c", "a"])
    assert torch.allclose(two.sum(-1), torch.ones(len(test)))
    with pytest.raises(ValueError, match="rows"):
        Router.from_tensors([("a", "l0")], router.tensors())
    assert fit_router(FeatureMemory(size=10, seed=0)) is None  # nothing to tell apart yet


def test_a_memory_and_a_router_from_narrower_features_read_the_last_columns() -> None:
    """Base features end with the deepest layer: what was fitted on fewer layers (a checkpoint or a
    router from before) keeps reading its own columns, so old and new rows stay one feature space."""
    x, y = clusters(labels=3, per_label=30)
    labels = [f"l{label}" for label in y]
    wider = torch.cat([torch.randn(len(y), 32), x], dim=1)  # two more layers in front
    old = FeatureMemory(size=1000, seed=0)
    old.add("task", labels[:60], x[:60])
    plain, tensors = old.saved_state()
    restored = FeatureMemory(size=1000, seed=0)
    restored.restore(json.loads(json.dumps(plain)), tensors)
    restored.add("task", labels[60:], wider[60:])
    old.add("task", labels[60:], x[60:])
    assert restored.width == old.width == 16 and same(restored, old)
    router = fit_router(old)
    assert router is not None
    assert torch.equal(router.task_probabilities(wider, ["task"]), router.task_probabilities(x, ["task"]))
    with pytest.raises(ValueError, match="reads 16 features per text, got 8"):
        router.task_probabilities(x[:, :8], ["task"])


def test_fitting_the_router_leaves_the_global_generator_alone() -> None:
    """Training's dropout draws from torch's global generator: a fit that drew from it too would
    change every training step after it, and a restart (which refits) would train differently."""
    x, y = clusters(labels=4, per_label=10)
    memory = FeatureMemory(size=100, seed=0)
    memory.add("task", [f"l{label}" for label in y], x)
    before = torch.get_rng_state()
    assert fit_router(memory) is not None
    assert torch.equal(torch.get_rng_state(), before)


def test_a_text_is_answered_by_the_candidate_with_the_best_joint_probability() -> None:
    asked: list[tuple[int, list[int]]] = []
    own = {0: torch.tensor([[0.5, 0.5]]), 1: torch.tensor([[0.05, 0.95]]), 2: torch.tensor([[1.0, 0.0]])}

    def answer(task: int, rows: list[int]) -> torch.Tensor:
        asked.append((task, rows))
        return own[task][[0] * len(rows)]

    routed = torch.tensor([[0.6, 0.38, 0.02]])
    (best,) = answer_without_task(routed, answer, coverage=0.99, most=3)
    # 0.6 x 0.5 = 0.30 against 0.38 x 0.95 = 0.36: the second task's version is surer of its answer.
    assert (best.task, best.task_probability) == (1, pytest.approx(0.38))
    assert torch.equal(best.label_probabilities, own[1][0])
    assert sorted(task for task, _ in asked) == [0, 1, 2]
    asked.clear()
    (best,) = answer_without_task(routed, answer, coverage=0.5, most=3)
    assert best.task == 0 and [task for task, _ in asked] == [0]  # a sure route asks one version
    assert candidates(torch.tensor([0.1, 0.3, 0.6]), coverage=0.99, most=2) == [2, 1]


def test_router_times_adapter_picks_the_best_product_over_every_candidate_label() -> None:
    own = {0: torch.tensor([[0.6, 0.4]]), 1: torch.tensor([[0.1, 0.9]])}
    routed = torch.tensor([[0.7, 0.3]])
    # The router, over every label: task 0's second label is what it believes; its adapter leans the
    # other way a little, task 1's adapter is sure of a label the router thinks unlikely.
    priors = [torch.tensor([[0.2, 0.5]]), torch.tensor([[0.05, 0.25]])]
    (best,) = answer_without_task(routed, lambda task, rows: own[task], 0.99, 3, priors)
    # Products: task 0 (0.12, 0.20), task 1 (0.005, 0.225): task 1's second label, though p(task 1) is 0.3.
    assert best.task == 1
    assert torch.allclose(best.label_probabilities, torch.tensor([0.005, 0.225]) / 0.23)
    assert best.task_probability == pytest.approx(0.23 / 0.55)
    # The adapter's scoring, on the same answers: p(task) · its best label, 0.7 x 0.6 against 0.3 x 0.9.
    (by_adapter,) = answer_without_task(routed, lambda task, rows: own[task], 0.99, 3)
    assert by_adapter.task == 0 and torch.equal(by_adapter.label_probabilities, own[0][0])


def test_the_router_answers_alone_only_where_its_best_label_is_probable_enough() -> None:
    # Two texts, two tasks; the router's probability of each (task, label), out of one softmax.
    priors = [torch.tensor([[0.02, 0.9], [0.3, 0.2]]), torch.tensor([[0.05, 0.03], [0.25, 0.25]])]
    sure, unsure = answered_by_router(priors, above=0.8)
    assert unsure is None  # 0.3 at best: the adapters answer it
    assert sure is not None and (sure.task, sure.task_probability) == (0, pytest.approx(0.92))
    assert torch.allclose(sure.label_probabilities, torch.tensor([0.02, 0.9]) / 0.92)
    lowered = answered_by_router(priors, above=0.3)[1]  # its best, task 0's first label, is 0.3
    assert lowered is not None and (lowered.task, lowered.task_probability) == (0, pytest.approx(0.5))


def test_candidates_that_could_not_win_are_spared_without_changing_any_answer() -> None:
    generator = torch.Generator().manual_seed(0)
    spared = 0
    for _ in range(300):
        tasks = torch.softmax(torch.randn(3, generator=generator) * 4, 0).sort(descending=True).values
        sizes = [int(torch.randint(2, 6, (1,), generator=generator)) for _ in range(3)]
        answers = [torch.softmax(torch.randn(n, generator=generator) * 3, 0) for n in sizes]
        # The router's label probabilities: each task's share spread over its labels.
        shares = [torch.softmax(torch.randn(n, generator=generator) * 3, 0) for n in sizes]
        labelled = [p * share for p, share in zip(tasks, shares, strict=True)]
        for priors in (labelled, None):
            kept = [0, *could_still_win(tasks, answers[0], priors)]
            every = answer_among([0, 1, 2], tasks, answers, priors)
            narrowed = answer_among(kept, tasks, answers, priors)
            assert kept[narrowed.task] == every.task
            assert int(narrowed.label_probabilities.argmax()) == int(every.label_probabilities.argmax())
            spared += 3 - len(kept)
    assert spared > 600  # of 1,200 candidates after the first, most could not have won


def answer_among(
    among: list[int], tasks: torch.Tensor, answers: list[torch.Tensor], priors: list[torch.Tensor] | None
) -> Answer:
    """``answer_without_task`` for one text, over the candidates ``among`` alone."""
    return answer_without_task(
        tasks[among].unsqueeze(0),
        lambda task, _: answers[among[task]].unsqueeze(0),
        1.0,
        len(among),
        [priors[i].unsqueeze(0) for i in among] if priors else None,
    )[0]


def test_label_priors_follow_each_versions_label_order_or_are_none_for_an_unknown_label() -> None:
    router = Router((("a", "x"), ("a", "y"), ("b", "z")), torch.eye(3), torch.zeros(3))
    embeddings = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    rows, probabilities = router.label_probabilities(embeddings, ["a", "b"])
    assert rows == [("a", "x"), ("a", "y"), ("b", "z")]
    priors = router.label_priors(embeddings, ["a", "b"], [["y", "x"], ["z"]])
    assert priors is not None
    assert torch.equal(priors[0], probabilities[:, [1, 0]]) and torch.equal(priors[1], probabilities[:, [2]])
    assert router.label_priors(embeddings, ["a", "b"], [["x", "new"], ["z"]]) is None


def test_the_registry_keeps_the_current_router_and_the_one_before(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    assert registry.router_manifest() is None and load_router(registry) is None
    router = Router((("a", "x"), ("b", "y")), torch.randn(2, 4), torch.zeros(2))
    for round_number in (1, 2, 3):
        registry.write_router(round_number, router.tensors(), {"rows": [list(r) for r in router.rows]})
    assert sorted(p.name for p in (tmp_path / "router").glob("*.safetensors")) == [
        "router-000002.safetensors",
        "router-000003.safetensors",
    ]
    loaded = load_router(registry)
    assert loaded is not None and loaded.rows == router.rows and torch.equal(loaded.weight, router.weight)
    (tmp_path / "router" / "router-000003.safetensors").write_bytes(b"not a router")
    with pytest.raises(CorruptVersion, match="sha256"):
        load_router(registry)


def test_the_trainer_fits_writes_and_restores_its_router(settings: Settings) -> None:
    tasks = synthetic(num_tasks=2)
    trainer = train_in_process(settings, tasks)
    registry = Registry(settings.registry_dir)
    router = load_router(registry)
    labels = {(task.name, label) for task in tasks for _, label in task.train}
    assert router is not None and set(router.rows) == labels
    assert trainer.inference.router is not None and torch.equal(
        trainer.inference.router.weight, router.weight
    )
    # The router reads several layers of the base model (the tiny one has two and its embeddings).
    assert router.weight.shape[1] == trainer.inference.memory.width == 3 * trainer.training.model.hidden_size
    # The memory comes back with the checkpoint, so the restarted trainer refits the same router.
    restarted = new_trainer(settings)
    assert same(restarted.inference.memory, trainer.inference.memory)
    refit = fit_router(restarted.inference.memory)
    assert refit is not None and torch.allclose(refit.weight, router.weight, atol=1e-6)
    assert restarted.inference.router is not None and restarted.inference.router.rows == router.rows


def test_a_server_routes_by_the_newest_router_and_refuses_a_corrupt_one(settings: Settings) -> None:
    settings = settings.model_copy(update={"promotion_tolerance": 1.0, "server_metrics_port": 0})
    tasks = synthetic(num_tasks=2)
    train_in_process(settings, tasks)
    registry = Registry(settings.registry_dir)
    fitted = load_router(registry)
    assert fitted is not None

    def write(round_number: int, favoured: str) -> None:
        # A router that sends every text to one task: a bias that outweighs anything the text says.
        bias = torch.tensor([100.0 if task == favoured else 0.0 for task, _ in fitted.rows])
        router = Router(fitted.rows, torch.zeros_like(fitted.weight), bias)
        manifest = {"rows": [list(r) for r in fitted.rows], "base_model": settings.base_model}
        registry.write_router(round_number, router.tensors(), manifest)

    texts = [text for task in tasks for text, _ in task.eval[:10]]
    write(100, tasks[1].name)
    server = start_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = continual_pb2_grpc.ContinualStub(channel)

            def tasks_named() -> set[str]:
                return {stub.Predict(continual_pb2.PredictRequest(text=t)).task for t in texts}

            assert tasks_named() == {tasks[1].name}
            write(101, tasks[0].name)
            eventually(lambda: tasks_named() == {tasks[0].name}, 10, 0.2, "the new router in use")
            # A corrupt router is refused; the one in use keeps routing.
            write(102, tasks[1].name)
            (settings.registry_dir / "router" / "router-000102.safetensors").write_bytes(b"broken")
            time.sleep(20 * settings.registry_poll_s)  # the server has polled it several times
            assert tasks_named() == {tasks[0].name}
    finally:
        server.stop()

    # With prototype routing the router is not read at all.
    settings = settings.model_copy(update={"task_inference": "prototypes", "grpc_port": free_port()})
    server = start_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = continual_pb2_grpc.ContinualStub(channel)
            named = {stub.Predict(continual_pb2.PredictRequest(text=t)).task for t in texts}
    finally:
        server.stop()
    assert named == {task.name for task in tasks}


def test_a_server_lets_the_router_answer_alone_or_score_named_requests_as_set(settings: Settings) -> None:
    port = free_port()
    settings = settings.model_copy(
        update={
            "promotion_tolerance": 1.0,
            "server_metrics_port": port,
            "router_alone_above": 0.9,
            "named_label_scores": "router-times-adapter",
            "drift_enabled": False,  # its references' forwards would count among the rows
        }
    )
    tasks = synthetic(num_tasks=2)
    train_in_process(settings, tasks)
    registry = Registry(settings.registry_dir)
    fitted = load_router(registry)
    assert fitted is not None
    favoured = fitted.rows[-1]
    # The trainer records the versions it fitted the router beside: the router speaks only for them.
    served = {task: registry.versions(task)[-1] for task in fitted.tasks()}
    assert fitted.versions == served and set(served) == {task.name for task in tasks}

    def write(round_number: int, beside: dict[str, int]) -> None:
        # Sure of one (task, label): a bias on it that outweighs anything a text says.
        bias = torch.tensor([100.0 if row == favoured else 0.0 for row in fitted.rows])
        router = Router(fitted.rows, torch.zeros_like(fitted.weight), bias)
        rows = [list(r) for r in fitted.rows]
        manifest = {"rows": rows, "base_model": settings.base_model, "versions": beside}
        registry.write_router(round_number, router.tensors(), manifest)

    def metric(name: str) -> float:
        text = urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
        return float(line.split()[1])

    texts = [text for task in tasks for text, _ in task.eval[:5]]
    write(100, served)
    server = start_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = continual_pb2_grpc.ContinualStub(channel)
            replies = [stub.Predict(continual_pb2.PredictRequest(text=t, top_k=2)) for t in texts]
            assert {(r.task, r.label) for r in replies} == {favoured}
            assert all(r.task_inferred and r.task_confidence > 0.99 for r in replies)
            assert all(len(r.top_k) == 2 for r in replies)  # ranked within its task, as an adapter ranks
            # One row a request, its base row for routing: no adapter forward at all.
            assert metric("continual_router_alone_answers_total") == len(texts)
            assert metric("continual_inference_batch_rows_sum") == len(texts)
            # Naming the task: its adapter's answer times the router's, whose bias now decides; two
            # rows a request (its task's and its base features for the router).
            named = [stub.Predict(continual_pb2.PredictRequest(task=favoured[0], text=t)) for t in texts]
            assert {(r.task, r.label) for r in named} == {favoured}
            assert not any(r.task_inferred for r in named)
            assert metric("continual_inference_batch_rows_sum") == 3 * len(texts)
            # The same router fitted beside another version of the task (as after a rollback, or a
            # version the gate held back): the adapters answer, each request a second row at least.
            write(101, {**served, favoured[0]: served[favoured[0]] + 1})

            def adapters_answer() -> bool:
                before = metric("continual_router_alone_answers_total")
                stub.Predict(continual_pb2.PredictRequest(text=texts[0]))
                return metric("continual_router_alone_answers_total") == before

            eventually(adapters_answer, 10, 0.2, "the router of another version in use")
            rows = metric("continual_inference_batch_rows_sum")
            for text in texts:
                stub.Predict(continual_pb2.PredictRequest(text=text))
            assert metric("continual_inference_batch_rows_sum") >= rows + 2 * len(texts)
    finally:
        server.stop()


@pytest.mark.parametrize("tasks", [["a", "b"], ["b"]])
def test_one_route_gives_what_the_separate_questions_give(tasks: list[str]) -> None:
    # A server asks route() once per task-less request; it must answer as the three questions do
    # (over every task the router has, or a subset of them).
    generator = torch.Generator().manual_seed(0)
    scope = ScopeRule(threshold=-0.5, prototype_weight=5.0, reject_rate=0.02, calibration_records=100)
    rows = (("a", "x"), ("a", "y"), ("b", "z"))
    router = Router(rows, torch.randn(3, 4, generator=generator), torch.randn(3, generator=generator), scope)
    features = torch.randn(5, 4, generator=generator)
    prototypes = torch.nn.functional.normalize(torch.randn(3, 4, generator=generator), dim=-1)
    labels = [[label for task, label in rows if task == name][::-1] for name in tasks]
    route = router.route(features, tasks, labels, prototypes)
    assert torch.equal(route.task_probabilities, router.task_probabilities(features, tasks))
    assert route.label_priors is not None
    expected = router.label_priors(features, tasks, labels)
    assert expected is not None and all(
        torch.equal(a, b) for a, b in zip(route.label_priors, expected, strict=True)
    )
    judged = router.out_of_scope(features, tasks, prototypes)
    assert route.out_of_scope is not None and judged is not None and torch.equal(route.out_of_scope, judged)
    assert router.route(features, tasks, None, prototypes).label_priors is None
