"""Continual-learning benchmark on CLINC150: 10 domains learned one after another, in three orders.

    .venv/bin/python bench/cl_clinc150.py [--orders 3] [--strategies lora-per-task] [--train-per-label N]

Each strategy runs the service's own trainer in process (all-MiniLM-L6-v2, the default settings),
one round per domain: the domain's training records and its **val** records (the trainer's eval
records, used for its gate and its accuracy matrix) are absorbed and the round is closed. After each
domain the benchmark measures every learned domain on its **test** records:

- task-aware: the request names its domain (the domain's adapter, its 15 intents);
- task-agnostic: the request names nothing and is answered the way the server answers it (routed to
  the domain of the nearest intent prototype, `service.serving.nearest_task`, then that domain's
  adapter); it is right only if the intent is, out of all 150.

From the two accuracy matrices come ACC, BWT and forgetting (`service.evaluation`). Each order runs in
its own process, for its wall time and peak memory. References measured in the same run on frozen
MiniLM embeddings: a joint linear head over all 150 intents (the upper bound), Avalanche's
StreamingLDA fed the stream in order, and domain routing by nearest intent prototype.

Hyper-parameters were not tuned on test. Writes bench/results/cl_clinc150.json and one task-agnostic
accuracy-matrix heatmap per strategy and order (bench/results/cl_clinc150_<strategy>_<order>.png).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from rich.console import Console

from service.datasets import TaskData, clinc150, records
from service.demo import plot_matrix
from service.evaluation import summarize
from service.ingest import Incoming
from service.metrics import TrainerMetrics
from service.model import build_model
from service.registry import Registry
from service.serving import nearest_task
from service.settings import load_settings
from service.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
CLINC150 = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"
console = Console()


def orders(domains: list[str], count: int) -> dict[str, list[str]]:
    """The domains.json order, its reverse, and a fixed shuffle."""
    shuffled = domains[:]
    random.Random(1).shuffle(shuffled)
    return dict(list({"given": domains, "reversed": domains[::-1], "shuffled": shuffled}.items())[:count])


def run_order(strategy: str, order: list[str], train_per_label: int | None, workdir: str) -> dict[str, Any]:
    """Learn the domains in ``order`` with ``strategy``; the matrices and figures (in a child process)."""
    started = time.monotonic()
    val = {t.name: t for t in clinc150(CLINC150, order, train_per_label, eval_splits=("val",))}
    test = {t.name: t for t in clinc150(CLINC150, order, eval_splits=("test",))}
    settings = load_settings(
        registry_dir=Path(workdir) / "registry",
        strategy=strategy,
        # One round per domain, closed by the benchmark: no early versions, nothing to stream.
        first_version_records=0,
        round_max_records=10**9,
        drift_enabled=False,
    )
    metrics = TrainerMetrics(CollectorRegistry(), strategy)
    trainer = Trainer(settings, Registry(settings.registry_dir), metrics)
    test_embeddings = {
        name: torch.from_numpy(trainer.model.base_embeddings([t for t, _ in task.eval]))
        for name, task in test.items()
    }
    aware: dict[str, dict[str, float]] = {}
    agnostic: dict[str, dict[str, float]] = {}
    right: dict[str, torch.Tensor] = {}  # per domain: test record answered right by its own adapter
    offset = 0
    for learned, name in enumerate(order, start=1):
        task = val[name]
        batch = [
            Incoming(0, offset + i, r, r.task.encode(), r.to_json())
            for i, r in enumerate(records([TaskData(name, task.train, task.eval)]))
        ]
        offset += len(batch)
        trainer.absorb(batch)
        report = trainer.close_round({0: offset})
        seen = order[:learned]
        changed = set(report.trained) if trainer.strategy.isolates_tasks else set(seen)
        for domain in changed:
            right[domain] = _task_aware_right(trainer, domain, test[domain])
        prototypes = [trainer.label_prototypes(d) for d in seen]
        aware[name] = {d: float(right[d].float().mean()) for d in seen}
        agnostic[name] = {}
        for d in seen:
            routed, _ = nearest_task(test_embeddings[d], prototypes)
            agnostic[name][d] = float(((routed == seen.index(d)) & right[d]).float().mean())
        console.print(
            f"{strategy} {order[0]}..: {learned}/10 {name}: task-aware {aware[name][name]:.1%}, "
            f"task-agnostic mean {sum(agnostic[name].values()) / learned:.1%}"
        )
    agn, awr = summarize(agnostic), summarize(aware)
    return {
        "acc": agn.acc,
        "acc_task_aware": awr.acc,
        "bwt": agn.bwt,
        "bwt_task_aware": awr.bwt,
        "forgetting": agn.mean_forgetting,
        "forgetting_task_aware": awr.mean_forgetting,
        "wall_s": round(time.monotonic() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "order": order,
        "matrix_task_agnostic": agnostic,
        "matrix_task_aware": aware,
    }


def _task_aware_right(trainer: Trainer, domain: str, task: TaskData) -> torch.Tensor:
    state = trainer.tasks[domain]
    texts = [text for text, _ in task.eval]
    probabilities = trainer.model.predict(domain, texts, trainer.settings.eval_batch_size)
    predicted = probabilities[:, : len(state.labels)].argmax(dim=-1).tolist()
    rows = zip(predicted, task.eval, strict=True)
    return torch.tensor([state.labels[p] == label for p, (_, label) in rows])


def references(domains: list[str]) -> dict[str, float]:
    """Frozen-embedding reference points, measured here: joint head, StreamingLDA, routing."""
    from avalanche.training.supervised.deep_slda import StreamingLDA

    settings = load_settings()
    model = build_model(settings)
    train = clinc150(CLINC150, domains, eval_splits=("test",))
    labels = sorted({label for task in train for _, label in task.train})
    index = {label: i for i, label in enumerate(labels)}
    domain_of = {label: d for d, task in enumerate(train) for _, label in task.train}

    def embed(rows: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(model.base_embeddings([t for t, _ in rows]))
        return x, torch.tensor([index[label] for _, label in rows])

    x_train, y_train = embed([row for task in train for row in task.train])
    x_test, y_test = embed([row for task in train for row in task.eval])

    # The joint upper bound: a linear head on every domain at once (full-batch, L-BFGS).
    torch.manual_seed(0)
    head = torch.nn.Linear(x_train.shape[1], len(labels))
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=300)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x_train), y_train) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    joint = float((head(x_test).argmax(-1) == y_test).float().mean())

    # Avalanche's StreamingLDA, one example at a time in domain order: no forgetting by construction.
    slda = StreamingLDA(
        slda_model=torch.nn.Identity(),
        criterion=torch.nn.CrossEntropyLoss(),
        input_size=x_train.shape[1],
        num_classes=len(labels),
        evaluator=None,
    )
    for x, y in zip(x_train, y_train, strict=True):
        slda.fit(x.unsqueeze(0), y.unsqueeze(0))
    slda_accuracy = float((slda.predict(x_test).argmax(-1) == y_test).float().mean())

    # Routing by nearest intent prototype (the server's rule), on the test texts.
    means = torch.stack([x_train[y_train == i].mean(0) for i in range(len(labels))])
    per_domain = [
        torch.nn.functional.normalize(means[[index[lb] for lb in labels if domain_of[lb] == d]], dim=-1)
        for d in range(len(train))
    ]
    routed, _ = nearest_task(x_test, per_domain)
    true_domain = torch.tensor([domain_of[labels[int(y)]] for y in y_test])
    return {
        "joint_linear_head": joint,
        "streaming_lda_avalanche": slda_accuracy,
        "routing_nearest_prototype": float((routed == true_domain).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=["lora-per-task"])
    parser.add_argument("--train-per-label", type=int, default=None, help="fewer records, for a quick look")
    args = parser.parse_args()
    domains = list(json.loads((CLINC150 / "domains.json").read_text()))
    results: dict[str, Any] = {"references": references(domains), "strategies": {}}
    console.print(results["references"])
    context = multiprocessing.get_context("spawn")
    for strategy in args.strategies:
        runs = {}
        for name, order in orders(domains, args.orders).items():
            with tempfile.TemporaryDirectory(prefix="cl-bench-") as workdir, context.Pool(1) as pool:
                run = pool.apply(run_order, (strategy, order, args.train_per_label, workdir))
            plot_matrix(
                run["matrix_task_agnostic"],
                RESULTS / f"cl_clinc150_{strategy}_{name}.png",
                title=f"{strategy}, {name} order: task-agnostic accuracy (%)",
            )
            runs[name] = run
        keys = ("acc", "acc_task_aware", "bwt", "bwt_task_aware", "forgetting", "wall_s", "peak_rss_mb")
        results["strategies"][strategy] = {
            "orders": runs,
            "mean": {k: sum(r[k] for r in runs.values()) / len(runs) for k in keys},
        }
        console.print(strategy, results["strategies"][strategy]["mean"])
    adapt = RESULTS / "time_to_adapt.json"
    if adapt.exists():
        results["time_to_adapt_s"] = json.loads(adapt.read_text())["time_to_adapt_s"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cl_clinc150.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
