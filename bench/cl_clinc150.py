"""Continual-learning benchmark on CLINC150: 10 domains learned one after another, in three orders.

    .venv/bin/python -m bench.cl_clinc150 [--orders given ...] [--strategies S ...] [--domains N]
        [--set FIELD=VALUE ... --label NAME]   # one strategy with other settings, stored as NAME

Each strategy runs the service's own trainer in process (all-MiniLM-L6-v2, the default settings),
one round per domain: the domain's training records and its **val** records (the trainer's eval
records, used for its gate and its accuracy matrix) are absorbed and the round is closed. `joint`
gets every domain in one round (the stream shuffled across domains): the upper bound. After each
domain the benchmark measures every learned domain on its **test** records:

- task-aware: the request names its domain (its adapter, or the shared head's columns of its 15
  intents);
- task-agnostic: the request names nothing and is routed the way the server routes it (to the domain
  of the nearest intent prototype, `service.serving.nearest_task`), then answered by the trainer's
  latest learning of that domain (the promotion gate is not in the path); it is right only if the
  intent is, out of all 150;
- global head (strategies with a shared head only): the argmax over every intent learned so far, the
  usual class-incremental measure.

The same replay and EWC configurations also run through Avalanche's own training template
(`bench.avalanche_template`), measured the same way, with accuracy and wall-time ratios against it.
From the accuracy matrices come ACC, BWT and forgetting (`service.evaluation`). Each order runs in its
own process, for its wall time and peak memory. References measured in the same run on frozen MiniLM
embeddings: a joint linear head over all 150 intents, Avalanche's StreamingLDA fed the stream in order,
and domain routing by nearest intent prototype.

Hyper-parameters are chosen with ``--measure-on val``, never on test. Results are merged into
bench/results/cl_clinc150.json one order at a time, with a task-agnostic accuracy-matrix heatmap per
strategy and order (bench/results/cl_clinc150_<strategy>_<order>.png); ``--readme`` writes the tables
and the heatmap list into bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from prometheus_client import CollectorRegistry
from rich.console import Console

from bench.avalanche_template import TEMPLATES, AvalancheLearner
from service.datasets import TaskData, clinc150, records
from service.demo import plot_matrix
from service.evaluation import LearningSummary, summarize
from service.ingest import Incoming
from service.learner import SHARED_ADAPTER
from service.metrics import TrainerMetrics
from service.model import BASE_FEATURE_LAYERS, AdapterModel, build_model
from service.records import Record
from service.registry import Registry
from service.router import Router, answer_without_task, answered_by_router
from service.serving import nearest_task
from service.settings import Settings, load_settings
from service.trainer import Trainer
from strategies import registered

RESULTS = Path(__file__).resolve().parent / "results"
CLINC150 = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"
console = Console()


ORDERS = ("given", "reversed", "shuffled")
#: The settings that shape what is learned, stored with every run (the rest: ports, topics, paths).
LEARNING_SETTINGS = {
    "base_model", "max_length", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "strategy",
    "learning_rate", "head_learning_rate", "learning_rate_decay", "base_dropout",
    "label_smoothing", "warmup_steps",
    "batch_size", "epochs", "task_inference", "router_memory_size", "routing_coverage",
    "routing_max_candidates", "routing_label_scores", "router_alone_above", "named_label_scores",
    "head_init", "replay_memory_size",
    "ewc_lambda", "ewc_decay", "ewc_fisher_examples", "lwf_alpha", "lwf_temperature", "seed",
}  # fmt: skip


@dataclass(frozen=True)
class Stream:
    """Where a stream's records are (``data_full.json``) and how its labels group into tasks."""

    data: Path
    tasks_file: Path

    def tasks(self) -> list[str]:
        """The task names, in the stream's order."""
        return list(json.loads(self.tasks_file.read_text()))

    def load(self, order: Sequence[str], train_per_label: int | None, split: str) -> dict[str, TaskData]:
        """The tasks in ``order``, with ``split`` as their eval records."""
        tasks = clinc150(self.data, order, train_per_label, eval_splits=(split,), tasks_file=self.tasks_file)
        return {task.name: task for task in tasks}


def orders(domains: list[str], names: Sequence[str]) -> dict[str, list[str]]:
    """The domains.json order, its reverse, and a fixed shuffle (those named)."""
    shuffled = domains[:]
    random.Random(1).shuffle(shuffled)
    every = {"given": domains, "reversed": domains[::-1], "shuffled": shuffled}
    return {name: every[name] for name in names}


def run_order(
    stream: Stream,
    strategy: str,
    order: list[str],
    train_per_label: int | None,
    workdir: str,
    measure_on: str = "test",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Learn the domains in ``order`` with ``strategy`` (settings ``overrides`` on top of the defaults);
    the matrices and figures (in a child process)."""
    started = time.monotonic()
    val = stream.load(order, train_per_label, "val")
    test = stream.load(order, None, measure_on)
    settings = load_settings(
        registry_dir=Path(workdir) / "registry",
        strategy=strategy if strategy not in TEMPLATES else "naive",
        # One round per domain, closed by the benchmark: no early versions, nothing to stream.
        first_version_records=0,
        round_max_records=10**9,
        drift_enabled=False,
        **(overrides or {}),
    )
    learner: Learned = (
        AvalancheLearner(strategy, settings) if strategy in TEMPLATES else TrainerLearner(settings)
    )
    embed = learner.model.base_embeddings
    # Base features: the router reads them all, prototypes the last layer's (their last columns).
    test_features = {
        n: torch.from_numpy(embed([t for t, _ in task.eval], layers=BASE_FEATURE_LAYERS))
        for n, task in test.items()
    }
    prototypes = {name: _unit_label_means(embed, task.train) for name, task in val.items()}
    if strategy == "joint":
        # The upper bound: every domain in one round, the stream shuffled across domains.
        learner.learn_all([val[name] for name in order])
        steps = [order]
    else:
        steps = [order[:learned] for learned in range(1, len(order) + 1)]
    aware: dict[str, dict[str, float]] = {}
    agnostic: dict[str, dict[str, float]] = {}
    global_head: dict[str, dict[str, float]] = {}
    routed: dict[str, dict[str, float]] = {}
    #: Task-agnostic accuracy answered other ways, beside the default (see ``_task_agnostic``).
    matrices: dict[str, dict[str, dict[str, float]]] = {}
    #: Task-aware accuracy answered other ways (see ``_aware_with_router``).
    aware_ways: dict[str, dict[str, dict[str, float]]] = {}
    for seen in steps:
        name = seen[-1]
        if strategy != "joint":
            learner.learn(val[name])
        routing = [prototypes[d] for d in seen]
        aware[name], agnostic[name], global_head[name], routed[name] = {}, {}, {}, {}
        for d in seen:
            texts, labels = [t for t, _ in test[d].eval], [label for _, label in test[d].eval]
            own_labels, own = learner.within(d, texts)
            right = torch.tensor(
                [own_labels[i] == b for i, b in zip(own.argmax(-1).tolist(), labels, strict=True)]
            )
            aware[name][d] = float(right.float().mean())
            ensembled = _aware_with_router(learner, d, test_features[d], labels, (own_labels, own))
            if ensembled is not None:
                aware_ways.setdefault("router-x-adapter", {}).setdefault(name, {})[d] = ensembled
                aware_ways.setdefault("adapter", {}).setdefault(name, {})[d] = aware[name][d]
                if settings.named_label_scores == "router-times-adapter":  # as a server answers it
                    aware[name][d] = ensembled
            ways, routed[name][d] = _task_agnostic(
                learner, settings, seen, d, test_features[d], (texts, labels, own), routing
            )
            for way, value in ways.items():
                matrices.setdefault(way, {}).setdefault(name, {})[d] = value
            agnostic[name][d] = ways["default"]
            answers = learner.global_answers(texts)
            if answers is not None:
                global_head[name][d] = sum(a == b for a, b in zip(answers, labels, strict=True)) / len(labels)
        console.print(
            f"{strategy} {order[0]}..: {len(seen)}/{len(order)} {name}: task-aware {aware[name][name]:.1%}, "
            f"task-agnostic mean {sum(agnostic[name].values()) / len(seen):.1%}"
        )
    agn, awr = _figures(agnostic), _figures(aware)
    glb = _figures(global_head) if any(global_head.values()) else None
    return {
        "acc": agn.acc,
        "acc_task_aware": awr.acc,
        "acc_global_head": glb.acc if glb else None,
        "bwt": agn.bwt,
        "bwt_task_aware": awr.bwt,
        "bwt_global_head": glb.bwt if glb else None,
        "forgetting": agn.mean_forgetting,
        "forgetting_task_aware": awr.mean_forgetting,
        "wall_s": round(time.monotonic() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "order": order,
        "measured_on": measure_on,
        "train_per_label": train_per_label,
        "tasks_file": stream.tasks_file.name,
        # The strategy run, not the one the trainer's settings name (Avalanche's templates run as naive).
        "settings": {**settings.model_dump(mode="json", include=LEARNING_SETTINGS), "strategy": strategy},
        "matrix_task_agnostic": agnostic,
        "matrix_task_aware": aware,
        "matrix_global_head": global_head if glb else None,
        # The share of each domain's texts whose first candidate task is the right one.
        "matrix_routing": routed,
        "routing": "router" if learner.router is not None else "prototypes",
        "acc_task_agnostic_ways": {
            way: _figures(matrix).acc
            for way, matrix in matrices.items()
            if way != "default" and not way.startswith("share:")
        },
        "matrix_task_agnostic_ways": {way: m for way, m in matrices.items() if way != "default"},
        # After the last domain: the share of task-less texts the router answered alone, per threshold.
        "router_alone_share": {
            way.removeprefix("share:"): _figures(matrix).acc
            for way, matrix in matrices.items()
            if way.startswith("share:")
        },
        "acc_task_aware_ways": {way: _figures(matrix).acc for way, matrix in aware_ways.items()},
    }


def _aware_with_router(
    learner: Learned,
    domain: str,
    features: torch.Tensor,
    labels: list[str],
    answered: tuple[list[str], torch.Tensor],
) -> float | None:
    """Task-aware accuracy with the router's probabilities of the named domain's labels (one softmax
    over them alone) multiplied by its adapter's (``named_label_scores: router-times-adapter``); None
    without a router that knows the domain."""
    router, (own_labels, own) = learner.router, answered
    if router is None or domain not in router.tasks():
        return None
    priors = router.label_priors(features, [domain], [own_labels])
    if priors is None:
        return None
    picked = (priors[0] * own).argmax(-1).tolist()
    return sum(own_labels[p] == label for p, label in zip(picked, labels, strict=True)) / len(labels)


def _task_agnostic(
    learner: Learned,
    settings: Settings,
    seen: list[str],
    domain: str,
    features: torch.Tensor,
    truth: tuple[list[str], list[str], torch.Tensor],
    prototypes: list[torch.Tensor],
) -> tuple[dict[str, float], float]:
    """Accuracy on ``domain``'s texts when no domain is named, and the share routed first to it.

    ``default`` is answered the way a server answers: the router over the learned domains when there
    is one, else the nearest label prototype. The other ways are measured beside it on the same learner
    (``prototypes``; ``router-top1``: the router's first task alone; the other label scoring,
    ``adapter`` or ``router-times-adapter``), to compare them in one run.
    ``truth``: the texts, their labels, and the domain's own answer to each.
    """
    texts, labels, own = truth
    right_task = seen.index(domain)
    own_labels = learner.labels(domain)
    choices, _ = nearest_task(features[:, -learner.model.hidden_size :], prototypes)
    by_prototype = [
        int(c) == right_task and own_labels[int(p)] == label
        for c, p, label in zip(choices, own.argmax(-1), labels, strict=True)
    ]
    accuracy = {"prototypes": sum(by_prototype) / len(labels)}
    router = learner.router
    if router is None or not set(seen) <= router.tasks():
        accuracy["default"] = accuracy["prototypes"]
        return accuracy, float((choices == right_task).float().mean())
    answered: dict[tuple[int, int], torch.Tensor] = {}

    def answer(task: int, rows: list[int]) -> torch.Tensor:
        if task == right_task:
            return own[rows]
        missing = [r for r in rows if (task, r) not in answered]
        if missing:
            found = learner.within(seen[task], [texts[r] for r in missing])[1]
            answered.update({(task, r): p for r, p in zip(missing, found, strict=True)})
        return torch.stack([answered[(task, r)] for r in rows])

    probabilities = router.task_probabilities(features, seen)
    priors = router.label_priors(features, seen, [learner.labels(task) for task in seen])
    by_product = settings.routing_label_scores == "router-times-adapter"
    ways = {
        "default": (settings.routing_max_candidates, priors if by_product else None),
        "router-top1": (1, None),
        # The other label scoring, beside the default on the same learner.
        "adapter" if by_product else "router-times-adapter": (
            settings.routing_max_candidates,
            None if by_product else priors,
        ),
    }
    for way, (most, scores) in ways.items():
        answers = answer_without_task(probabilities, answer, settings.routing_coverage, most, scores)
        right = [
            a.task == right_task and own_labels[int(a.label_probabilities.argmax())] == label
            for a, label in zip(answers, labels, strict=True)
        ]
        accuracy[way] = sum(right) / len(labels)
        if way == "default":
            by_default = right
    accuracy.update(_router_alone(priors, right_task, own_labels, labels, by_default))
    above = settings.router_alone_above
    if above is not None and priors is not None:  # the server's rule, so the default is what it answers
        if above not in ROUTER_ALONE_ABOVE:
            accuracy.update(_router_alone(priors, right_task, own_labels, labels, by_default, (above,)))
        accuracy["default"] = accuracy[f"router-alone@{above}"]
    return accuracy, float((probabilities.argmax(-1) == right_task).float().mean())


#: Router confidences above which a task-less text is answered by the router alone (no adapter row).
ROUTER_ALONE_ABOVE = (0.5, 0.8, 0.9, 0.95, 0.98)


def _router_alone(
    priors: list[torch.Tensor] | None,
    right_task: int,
    own_labels: list[str],
    labels: list[str],
    default: list[bool],
    thresholds: Sequence[float] = ROUTER_ALONE_ABOVE,
) -> dict[str, float]:
    """Accuracy with ``router_alone_above`` at each of ``thresholds`` (a text the router is that
    sure of answered by it alone, the rest as by ``default``: whether each was answered right), the
    router alone for every text (``router-alone``), and the share it answered alone (``share:`` ways)."""
    if priors is None:
        return {}
    figures: dict[str, float] = {}
    for above in (0.0, *thresholds):
        answers = answered_by_router(priors, above)
        right = [
            d
            if a is None
            else (a.task, own_labels[int(a.label_probabilities.argmax())]) == (right_task, label)
            for a, label, d in zip(answers, labels, default, strict=True)
        ]
        way = f"router-alone@{above}" if above else "router-alone"
        figures[way] = sum(right) / len(labels)
        if above:
            figures[f"share:{way}"] = sum(a is not None for a in answers) / len(labels)
    return figures


def _figures(matrix: dict[str, dict[str, float]]) -> LearningSummary:
    """ACC, BWT and forgetting of a run's matrix. ``joint`` has one row, measured after learning every
    domain at once: its ACC is that row's mean, and it has no BWT or forgetting (nothing came after)."""
    if len(matrix) == 1:
        (row,) = matrix.values()
        return LearningSummary(sum(row.values()) / len(row), None, None)
    return summarize(matrix)


class Learned(Protocol):
    """What the harness needs of a learner: learn domains, answer with or without the domain."""

    model: AdapterModel

    @property
    def router(self) -> Router | None:
        """The task router, for learners that fit one (else task-less texts go by label prototypes)."""
        ...

    def learn(self, task: TaskData) -> None: ...

    def learn_all(self, tasks: list[TaskData]) -> None: ...

    def global_answers(self, texts: Sequence[str]) -> list[str] | None:
        """Each text's label among every label learned so far (None without one shared head)."""
        ...

    def labels(self, task: str) -> list[str]:
        """``task``'s labels, in the order of ``within``'s columns."""
        ...

    def within(self, task: str, texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
        """``task``'s labels and each text's probabilities over them (rows sum to 1), as its served
        version would answer."""
        ...


class TrainerLearner:
    """The service's own trainer, fed one round per domain as if from one partition."""

    def __init__(self, settings: Settings) -> None:
        self.trainer = Trainer(
            settings, Registry(settings.registry_dir), TrainerMetrics(CollectorRegistry(), settings.strategy)
        )
        self.model = self.trainer.training.model
        self.offset = 0

    @property
    def router(self) -> Router | None:
        return self.trainer.inference.router

    def learn(self, task: TaskData, unlabeled: Sequence[Record] = ()) -> None:
        self._round([*records([task]), *unlabeled])

    def learn_all(self, tasks: list[TaskData]) -> None:
        stream = list(records(tasks))
        random.Random(0).shuffle(stream)
        self._round(stream)

    def _round(self, stream: list[Record]) -> None:
        batch = [Incoming(0, self.offset + i, r, r.task.encode(), r.to_json()) for i, r in enumerate(stream)]
        self.offset += len(batch)
        self.trainer.absorb(batch)
        self.trainer.close_round({0: self.offset})

    def global_answers(self, texts: Sequence[str]) -> list[str] | None:
        training = self.trainer.training
        if training.learner is None:
            return None
        names = {column: label for (_, label), column in training.columns.items()}
        scores = training.predict_columns(SHARED_ADAPTER, texts, range(len(names)))
        return [names[i] for i in scores.argmax(-1).tolist()]

    def labels(self, task: str) -> list[str]:
        return self.trainer.tasks[task].labels

    def within(self, task: str, texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
        state = self.trainer.tasks[task]
        probabilities = self.trainer.training.predict_task(state, texts)
        # A published version's head has the task's rows only: its softmax is over them alone.
        return state.labels, probabilities / probabilities.sum(-1, keepdim=True)


def _unit_label_means(embed: Callable[[list[str]], np.ndarray], rows: list[tuple[str, str]]) -> torch.Tensor:
    """Unit-length mean base embedding per label: the prototypes the server routes by."""
    x = torch.from_numpy(embed([text for text, _ in rows]))
    labels = sorted({label for _, label in rows})
    y = [labels.index(label) for _, label in rows]
    means = torch.stack([x[[i for i, v in enumerate(y) if v == k]].mean(0) for k in range(len(labels))])
    return torch.nn.functional.normalize(means, dim=-1)


def references(stream: Stream) -> dict[str, float]:
    """Frozen-embedding reference points, measured here: joint head, StreamingLDA, routing."""
    from avalanche.training.supervised.deep_slda import StreamingLDA

    settings = load_settings()
    model = build_model(settings)
    train = list(stream.load(stream.tasks(), None, "test").values())
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
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    parser.add_argument("--strategies", nargs="+", default=[*sorted(registered()), *TEMPLATES])
    parser.add_argument("--train-per-label", type=int, default=None, help="fewer records, for a quick look")
    parser.add_argument("--domains", type=int, default=None, help="only the first N domains of each order")
    parser.add_argument("--out", type=Path, default=RESULTS / "cl_clinc150.json")
    parser.add_argument(
        "--data", type=Path, default=CLINC150, help="a folder with data_full.json and domains.json"
    )
    parser.add_argument(
        "--tasks",
        type=Path,
        help="task name → labels, in stream order (default: the data's domains.json); "
        "CLINC150's within-domain stream: bench/streams/clinc150_within_domain.json",
    )
    parser.add_argument("--skip-references", action="store_true", help="keep the references already there")
    parser.add_argument(
        "--measure-on", choices=("test", "val"), default="test", help="val: for choosing hyper-parameters"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a settings field for this run (e.g. epochs=6); recorded with the results",
    )
    parser.add_argument("--label", help="store the (single) strategy's results under this name instead")
    parser.add_argument("--table", action="store_true", help="print the results as markdown, run nothing")
    parser.add_argument(
        "--readme", action="store_true", help="write the tables and heatmaps into bench/README.md"
    )
    parser.add_argument("--plots", action="store_true", help="draw the results' heatmaps again, run nothing")
    args = parser.parse_args()
    if args.label and len(args.strategies) != 1:
        parser.error("--label names the results of one strategy")
    if any("=" not in item for item in args.overrides):
        parser.error("--set takes FIELD=VALUE")
    overrides = {field: _value(text) for field, text in (item.split("=", 1) for item in args.overrides)}
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    if args.readme:
        update_readme(json.loads(args.out.read_text()), args.out, Path(__file__).with_name("README.md"))
        return
    if args.plots:
        for strategy, entry in json.loads(args.out.read_text())["strategies"].items():
            for order, run in entry["orders"].items():
                plot_run(strategy, order, run, args.out)
        return
    stream = Stream(args.data, args.tasks or args.data / "domains.json")
    domains = stream.tasks()
    # Runs are merged into the results file one order at a time, so a long run that stops keeps
    # what it finished and strategies can be run (or rerun) separately.
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    # Figures chosen on val must never sit beside (or be published as) figures measured on test.
    this_run = (
        args.measure_on,
        args.train_per_label,
        min(args.domains or len(domains), len(domains)),
        stream.tasks_file.name,
    )
    for key, entry in results.get("strategies", {}).items():
        for order, run in entry["orders"].items():
            measured = (run.get("measured_on", "test"), run.get("train_per_label"), len(run["order"]))
            if (*measured, run.get("tasks_file", "domains.json")) != this_run:
                parser.error(f"{args.out} holds {key} {order} measured another way: choose another --out")
    if not args.skip_references:
        results["references"] = references(stream)
        console.print(results["references"])
    context = multiprocessing.get_context("spawn")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for strategy in args.strategies:
        key = args.label or strategy
        entry = results.setdefault("strategies", {}).setdefault(key, {"orders": {}})
        for name, order in orders(domains, args.orders).items():
            order = order[: args.domains]
            with tempfile.TemporaryDirectory(prefix="cl-bench-") as workdir, context.Pool(1) as pool:
                run = pool.apply(
                    run_order,
                    (stream, strategy, order, args.train_per_label, workdir, args.measure_on, overrides),
                )
            plot_run(key, name, run, args.out)
            entry["orders"][name] = run
            entry["mean"] = _mean(entry["orders"].values())
            results["avalanche_template_ratios"] = _template_ratios(results["strategies"])
            adapt = RESULTS / "time_to_adapt.json"
            if adapt.exists():
                results["time_to_adapt_s"] = json.loads(adapt.read_text())["time_to_adapt_s"]
            args.out.write_text(json.dumps(results, indent=2) + "\n")
        console.print(key, entry["mean"])


def plot_run(strategy: str, order: str, run: dict[str, Any], out: Path) -> None:
    """Heatmaps of a run's task-agnostic matrix and, for a shared head, its global-head matrix."""
    plot_matrix(
        run["matrix_task_agnostic"],
        out.parent / f"{out.stem}_{strategy}_{order}.png",
        title=f"{strategy}, {order} order: task-agnostic accuracy (%)",
    )
    if run.get("matrix_global_head"):
        plot_matrix(
            run["matrix_global_head"],
            out.parent / f"{out.stem}_{strategy}_{order}_global_head.png",
            title=f"{strategy}, {order} order: global-head accuracy over all intents so far (%)",
        )


def table(results: dict[str, Any]) -> str:
    """The results as the tables in bench/README.md: one row per strategy and order (then means), then
    the ratios against Avalanche's template."""

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}%"

    def points(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:+.2f}".replace("-", "−")

    lines = [
        "| strategy | order | task-agnostic ACC | task-aware ACC | global-head ACC | BWT (task-agnostic) "
        "| BWT (task-aware) | BWT (global head) | forgetting (task-agnostic) | wall | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for strategy, entry in results["strategies"].items():
        mean = _mean(entry["orders"].values())
        rows = [*entry["orders"].items(), ("**mean**", mean)] if len(entry["orders"]) > 1 else []
        for order, run in rows or entry["orders"].items():
            cells = [
                strategy,
                order,
                *(pct(run.get(k)) for k in ("acc", "acc_task_aware", "acc_global_head")),
                *(points(run.get(k)) for k in ("bwt", "bwt_task_aware", "bwt_global_head", "forgetting")),
                f"{run['wall_s']:.0f} s",
                f"{run['peak_rss_mb'] / 1024:.1f} GB",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if not results.get("avalanche_template_ratios"):
        return "\n".join(lines)
    lines += [
        "",
        "Against Avalanche's own template (same orders, ratio ours / theirs; wall time below 1 is faster):",
        "",
        "| ours / Avalanche template | orders | task-agnostic ACC | task-aware ACC | global-head ACC "
        "| wall time | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair, ratios in results.get("avalanche_template_ratios", {}).items():
        keys = ("acc", "acc_task_aware", "acc_global_head", "wall_s", "peak_rss_mb")
        cells = [pair, ", ".join(ratios["orders"]), *(_ratio(ratios.get(f"{k}_ratio")) for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmaps(results: dict[str, Any], out: Path) -> str:
    """Markdown for the heatmaps: the given order's inline, the other orders' as links."""
    inline, links = [], []
    for strategy, entry in results["strategies"].items():
        others = []
        for order in entry["orders"]:
            for suffix, what in (("", "task-agnostic"), ("_global_head", "global head")):
                png = out.parent / f"{out.stem}_{strategy}_{order}{suffix}.png"
                if not png.exists():
                    continue
                path = f"{png.parent.name}/{png.name}"
                if order == "given":
                    inline.append(f"![{strategy}, {order} order, {what}]({path})")
                else:
                    others.append(f"[{order}, {what}]({path})")
        if others:
            links.append(f"- `{strategy}`: " + ", ".join(others))
    intro = (
        "Accuracy matrices on the given order (row: after learning a domain; column: a domain's test "
        "accuracy), task-agnostic and, for a shared head, over every intent learned so far:"
    )
    return "\n".join([intro, "", *inline, *(["", "The other orders:", "", *links] if links else [])])


def update_readme(results: dict[str, Any], out: Path, readme: Path) -> None:
    """Replace the README's blocks of this results file, between HTML-comment markers named after it
    (``<!-- cl_clinc150 table -->`` for ``cl_clinc150.json``): its table, and its heatmaps where the
    README has a block for them."""
    text = readme.read_text()
    blocks = {f"{out.stem} table": table(results), f"{out.stem} heatmaps": heatmaps(results, out)}
    for marker, body in blocks.items():
        replaced = replace_block(text, marker, body)
        if replaced is None:
            if marker.endswith("heatmaps"):
                continue
            raise SystemExit(f"{readme} lacks the <!-- {marker} --> ... <!-- /{marker} --> markers")
        text = replaced
    readme.write_text(text)


def replace_block(text: str, marker: str, body: str) -> str | None:
    """``text`` with what lies between ``<!-- marker -->`` and ``<!-- /marker -->`` replaced by
    ``body``; None if it lacks the markers."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    head, _, rest = text.partition(start)
    _, found, tail = rest.partition(end)
    return f"{head}{start}\n{body}\n{end}{tail}" if found else None


def _value(text: str) -> Any:
    """A ``--set`` value: JSON where it parses (numbers, booleans, lists), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _mean(runs: Any) -> dict[str, float | None]:
    """Each figure's mean over the orders run (None where a strategy does not have it)."""
    runs = list(runs)
    keys = ["acc", "acc_task_aware", "acc_global_head", "bwt", "bwt_task_aware", "bwt_global_head"]
    keys += ["forgetting", "forgetting_task_aware", "wall_s", "peak_rss_mb"]
    means: dict[str, float | None] = {}
    for key in keys:
        values = [run.get(key) for run in runs]
        means[key] = None if any(v is None for v in values) else sum(values) / len(values)
    return means


def _template_ratios(strategies: dict[str, Any]) -> dict[str, Any]:
    """Ours against Avalanche's template on the orders both ran: accuracy and wall-time ratios."""
    ratios = {}
    for ours, theirs in (("replay", "avalanche-replay"), ("ewc", "avalanche-ewc")):
        if ours not in strategies or theirs not in strategies:
            continue
        a, b = strategies[ours]["orders"], strategies[theirs]["orders"]
        common = sorted(set(a) & set(b))
        if not common:
            continue
        row: dict[str, Any] = {"orders": common}
        for key in ("acc", "acc_task_aware", "acc_global_head", "wall_s", "peak_rss_mb"):
            pairs = [(a[o][key], b[o][key]) for o in common]
            if all(x is not None and y for x, y in pairs):
                row[f"{key}_ratio"] = round(sum(x for x, _ in pairs) / sum(y for _, y in pairs), 4)
        ratios[f"{ours} / {theirs}"] = row
    return ratios


if __name__ == "__main__":
    main()
