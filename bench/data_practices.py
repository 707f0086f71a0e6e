"""Data-practices benchmark on CLINC150: what the service's guards against data pitfalls are worth.

    .venv/bin/python -m bench.data_practices [--parts imbalance oos self_training duplicates]
        [--measure-on val]

- ``imbalance``: each of the 10 domains learned alone by the service's own trainer (the default
  strategy and settings, all-MiniLM-L6-v2, one round; its val records are the trainer's eval records)
  with half its intents (every other one, in ``domains.json`` order) cut to 10% of their training
  records; once with class-balanced further epochs off (``balance_labels_above`` 0) and once with
  the default, measured on the domain's test records: micro and macro accuracy, means over the
  domains and per domain.
- ``oos``: the 10 domains learned in order by the service's own trainer (default strategy and
  settings, one round each, val records as its eval records, so the out-of-scope threshold is
  calibrated on val), then CLINC150's test and oos_test records asked with no task, answered the way a
  server answers them: ``in_scope_accuracy`` (an in-scope text judged out of scope counts as wrong),
  ``in_scope_accuracy_without_rejection``, ``oos_recall`` and ``oos_precision``. Beside the default,
  the same trained service with other weights of the prototype view (``by_prototype_weight``, each
  threshold calibrated the same way; 0 is the router's confidence alone), each also measured on
  oos_val, which is what the weight was chosen on.
- ``self_training``: each domain learned alone by the service's own trainer (default settings, one
  round) from 20 labelled training records per intent, once alone (``labelled_only``) and once with
  the rest of its training records sent unlabeled (``self_trained``: split ``unlabeled``, pseudo-
  labelled by the service), measured task-aware on the domain's test records.
- ``duplicates``: how many records of each split repeat a training record, exactly (the same text
  once lower-cased with punctuation and spacing dropped, ``service.data_health.normalized``) or
  nearly (cosine of their base-model embeddings at least ``--near`` 0.97), and how many repeat
  within the training split. A count, no target.

Choose settings with ``--measure-on val``, never on test. Results: bench/results/data_practices.json
(one part at a time is merged in) and data_practices_imbalance.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bench.cl_clinc150 import CLINC150, TrainerLearner
from service.data_health import normalized
from service.datasets import TaskData, clinc150
from service.evaluation import label_accuracy, macro_accuracy
from service.model import BASE_FEATURE_LAYERS, build_model, unit_prototypes
from service.out_of_scope import calibrated, scope_scores
from service.records import Record
from service.router import answer_without_task
from service.settings import Settings, load_settings

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()

#: The cut intents keep this share of their training records.
KEPT_SHARE = 0.10


def cut(task: TaskData, intents: Sequence[str]) -> TaskData:
    """``task`` with every other one of ``intents`` keeping ``KEPT_SHARE`` of its training records."""
    small = set(intents[1::2])
    counts = Counter(label for _, label in task.train)
    left = {label: max(1, round(n * KEPT_SHARE)) if label in small else n for label, n in counts.items()}
    train = []
    for text, label in task.train:
        if left[label] > 0:
            train.append((text, label))
            left[label] -= 1
    return TaskData(task.name, train, task.eval)


def one_round_settings(workdir: str, **overrides: Any) -> Settings:
    """The default settings, a registry in ``workdir``, rounds closed by the benchmark alone."""
    return load_settings(
        registry_dir=Path(workdir) / "registry",
        first_version_records=0,
        round_max_records=10**9,
        drift_enabled=False,
        **overrides,
    )


def learn_one(task: TaskData, measured: TaskData, balance_above: float) -> dict[str, Any]:
    """A fresh trainer learns ``task`` in one round; micro and macro accuracy on ``measured``'s eval
    records (in a child process, so every run starts from the same state)."""
    with tempfile.TemporaryDirectory(prefix="data-practices-") as workdir:
        settings = one_round_settings(workdir, balance_labels_above=balance_above)
        learner = TrainerLearner(settings)
        learner.learn(task)
        texts, truth = [t for t, _ in measured.eval], [label for _, label in measured.eval]
        labels, scores = learner.within(task.name, texts)
        outcomes = [labels[i] == label for i, label in zip(scores.argmax(-1).tolist(), truth, strict=True)]
    per_label = label_accuracy(measured.eval, outcomes)
    return {
        "micro": sum(outcomes) / len(outcomes),
        "macro": macro_accuracy(per_label),
        "per_label": per_label,
    }


def imbalance(measure_on: str) -> dict[str, Any]:
    """The ``imbalance`` part: every domain cut, learned with and without balancing."""
    intents = json.loads((CLINC150 / "domains.json").read_text())
    trained = {t.name: t for t in clinc150(CLINC150, eval_splits=("val",))}
    measured = {t.name: t for t in clinc150(CLINC150, eval_splits=(measure_on,))}
    default = load_settings().balance_labels_above
    per_domain: dict[str, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    for number, (name, task) in enumerate(trained.items(), 1):
        small = cut(task, intents[name])
        row: dict[str, Any] = {"train_records": len(small.train)}
        for key, above in (("unbalanced", 0.0), ("balanced", default)):
            started = time.monotonic()
            with context.Pool(1) as pool:
                result = pool.apply(learn_one, (small, measured[name], above))
            row[key] = {**result, "wall_s": round(time.monotonic() - started, 1)}
        per_domain[name] = row
        console.print(
            f"imbalance {number}/{len(trained)} {name}: macro {row['unbalanced']['macro']:.1%} -> "
            f"{row['balanced']['macro']:.1%}, micro {row['unbalanced']['micro']:.1%} -> "
            f"{row['balanced']['micro']:.1%}"
        )

    def mean(key: str, figure: str) -> float:
        return sum(r[key][figure] for r in per_domain.values()) / len(per_domain)

    return {
        "measured_on": measure_on,
        "kept_share": KEPT_SHARE,
        "balance_labels_above": default,
        "balance_method": load_settings().balance_method,
        "logit_adjustment_tau": load_settings().logit_adjustment_tau,
        "macro_unbalanced": mean("unbalanced", "macro"),
        "macro_balanced": mean("balanced", "macro"),
        "micro_unbalanced": mean("unbalanced", "micro"),
        "micro_balanced": mean("balanced", "micro"),
        "per_domain": per_domain,
    }


def out_of_scope(measure_on: str) -> dict[str, Any]:
    """The ``oos`` part (in a child process, so that it starts from a fresh model)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result: dict[str, Any] = pool.apply(_out_of_scope, (measure_on,))
    return result


def _out_of_scope(measure_on: str) -> dict[str, Any]:
    data = json.loads((CLINC150 / "data_full.json").read_text())
    tasks = clinc150(CLINC150, eval_splits=("val",))
    with tempfile.TemporaryDirectory(prefix="data-practices-") as workdir:
        settings = one_round_settings(workdir)
        learner = TrainerLearner(settings)
        started = time.monotonic()
        for number, task in enumerate(tasks, 1):
            learner.learn(task)
            console.print(
                f"oos: learned {number}/{len(tasks)} {task.name} ({time.monotonic() - started:.0f} s)"
            )
        trainer, router = learner.trainer, learner.router
        assert router is not None and router.scope is not None, "the default trainer calibrates a rule"
        seen = [task.name for task in tasks]
        hidden = learner.model.hidden_size
        prototypes = torch.cat([unit_prototypes(trainer.tasks[t].prototype_tensors(hidden)) for t in seen])

        def scored(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
            """Base features of ``texts`` and their router row probabilities over every task."""
            features = torch.from_numpy(
                learner.model.base_embeddings(list(texts), layers=BASE_FEATURE_LAYERS)
            )
            return features, router.label_probabilities(features, seen)[1]

        inside = data[measure_on]
        texts = [text for text, _ in inside]
        x_in, p_in = scored(texts)
        answered: list[bool] = []
        probabilities = router.task_probabilities(x_in, seen)
        priors = router.label_priors(x_in, seen, [learner.labels(t) for t in seen])

        def answer(task: int, rows: list[int]) -> torch.Tensor:
            return learner.within(seen[task], [texts[r] for r in rows])[1]

        for a, (_, label) in zip(
            answer_without_task(
                probabilities, answer, settings.routing_coverage, settings.routing_max_candidates, priors
            ),
            inside,
            strict=True,
        ):
            answered.append(learner.labels(seen[a.task])[int(a.label_probabilities.argmax())] == label)
        right = torch.tensor(answered)
        outside = {
            split: scored([text for text, _ in data[split]]) for split in (f"oos_{measure_on}", "oos_val")
        }
        calibration, _, _ = trainer.inference.scope_memory.features()
        _, p_calibration = router.label_probabilities(calibration, seen)

        def figures(weight: float) -> dict[str, float]:
            rule = calibrated(
                scope_scores(p_calibration, calibration[:, -hidden:], prototypes, weight),
                settings.out_of_scope_reject_rate,
                weight,
            )
            assert rule is not None

            def rejected(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
                return rule.scores(p, x[:, -hidden:], prototypes) < rule.threshold

            kept = ~rejected(x_in, p_in)
            caught = rejected(*outside[f"oos_{measure_on}"])
            flagged = int(caught.sum()) + int((~kept).sum())
            return {
                "threshold": rule.threshold,
                "in_scope_accuracy": float((right & kept).float().mean()),
                "in_scope_rejected": float((~kept).float().mean()),
                "oos_recall": float(caught.float().mean()),
                "oos_precision": int(caught.sum()) / flagged if flagged else float("nan"),
                "oos_val_recall": float(rejected(*outside["oos_val"]).float().mean()),
            }

        default = settings.out_of_scope_prototype_weight
        by_weight = {str(weight): figures(weight) for weight in (0.0, 2.0, default, 10.0, 20.0)}
        assert abs(by_weight[str(default)]["threshold"] - router.scope.threshold) < 1e-6
    return {
        "measured_on": measure_on,
        "reject_rate": settings.out_of_scope_reject_rate,
        "prototype_weight": default,
        "calibration_records": router.scope.calibration_records,
        "in_scope_records": len(inside),
        "oos_records": len(data[f"oos_{measure_on}"]),
        "in_scope_accuracy_without_rejection": float(right.float().mean()),
        **{k: v for k, v in by_weight[str(default)].items() if k != "threshold"},
        "by_prototype_weight": by_weight,
        "wall_s": round(time.monotonic() - started, 1),
    }


#: Labelled training records per intent in the ``self_training`` part; the rest are sent unlabeled.
LABELLED_PER_INTENT = 20


def learn_with_unlabeled(task: TaskData, unlabeled: list[str], measured: TaskData) -> dict[str, Any]:
    """A fresh trainer learns ``task`` and the ``unlabeled`` texts in one round; task-aware accuracy on
    ``measured``'s eval records and what self-training did (in a child process)."""
    with tempfile.TemporaryDirectory(prefix="data-practices-") as workdir:
        settings = one_round_settings(workdir)
        learner = TrainerLearner(settings)
        texts = [
            Record(id=f"u{i}", task=task.name, text=text, label=None, split="unlabeled")
            for i, text in enumerate(unlabeled)
        ]
        learner.learn(task, texts)
        state = learner.trainer.tasks[task.name]
        eval_texts, truth = [t for t, _ in measured.eval], [label for _, label in measured.eval]
        labels, scores = learner.within(task.name, eval_texts)
        right = [labels[i] == label for i, label in zip(scores.argmax(-1).tolist(), truth, strict=True)]
        return {"accuracy": sum(right) / len(right), "pseudo_labelled": state.pseudo_labelled}


def self_training(measure_on: str) -> dict[str, Any]:
    """The ``self_training`` part: every domain from few labels, without and with its unlabeled rest."""
    full = {t.name: t for t in clinc150(CLINC150, eval_splits=("val",))}
    few = {t.name: t for t in clinc150(CLINC150, eval_splits=("val",), train_per_label=LABELLED_PER_INTENT)}
    measured = {t.name: t for t in clinc150(CLINC150, eval_splits=(measure_on,))}
    per_domain: dict[str, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    for number, (name, task) in enumerate(few.items(), 1):
        kept = set(task.train)
        rest = [text for text, label in full[name].train if (text, label) not in kept]
        row: dict[str, Any] = {"labelled": len(task.train), "unlabeled": len(rest)}
        for key, texts in (("labelled_only", []), ("self_trained", rest)):
            started = time.monotonic()
            with context.Pool(1) as pool:
                result = pool.apply(learn_with_unlabeled, (task, texts, measured[name]))
            row[key] = {**result, "wall_s": round(time.monotonic() - started, 1)}
        per_domain[name] = row
        console.print(
            f"self_training {number}/{len(few)} {name}: {row['labelled_only']['accuracy']:.1%} -> "
            f"{row['self_trained']['accuracy']:.1%} "
            f"({row['self_trained']['pseudo_labelled']} pseudo-labelled)"
        )

    def mean(key: str) -> float:
        return sum(r[key]["accuracy"] for r in per_domain.values()) / len(per_domain)

    settings = load_settings()
    return {
        "measured_on": measure_on,
        "labelled_per_intent": LABELLED_PER_INTENT,
        "self_training_precision": settings.self_training_precision,
        "self_training_weight": settings.self_training_weight,
        "self_training_epochs": settings.self_training_epochs,
        "labelled_only": mean("labelled_only"),
        "self_trained": mean("self_trained"),
        "worst_domain_change": min(
            r["self_trained"]["accuracy"] - r["labelled_only"]["accuracy"] for r in per_domain.values()
        ),
        "per_domain": per_domain,
    }


def duplicates(near: float) -> dict[str, Any]:
    """The ``duplicates`` part: exact and near repeats of training records in CLINC150's splits."""
    data = json.loads((CLINC150 / "data_full.json").read_text())
    model = build_model(load_settings())
    train = [text for text, _ in data["train"]]
    train_keys = {normalized(text) for text in train}
    embed = model.base_embeddings
    train_x = torch.nn.functional.normalize(torch.from_numpy(embed(train)), dim=-1)
    out: dict[str, Any] = {"near_cosine": near}
    for split in ("val", "test", "oos_val", "oos_test"):
        texts = [text for text, _ in data[split]]
        x = torch.nn.functional.normalize(torch.from_numpy(embed(texts)), dim=-1)
        best = torch.cat([(chunk @ train_x.T).max(dim=1).values for chunk in x.split(1024)])
        exact = sum(normalized(text) in train_keys for text in texts)
        out[split] = {"records": len(texts), "exact": exact, "near": int((best >= near).sum())}
        console.print(split, out[split])
    seen: set[str] = set()
    repeats = 0
    for text in train:
        key = normalized(text)
        repeats += key in seen
        seen.add(key)
    out["train"] = {"records": len(train), "exact_within": repeats}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Macro accuracy per domain, unbalanced and balanced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["imbalance"]["per_domain"]
    names = list(rows)
    positions = range(len(names))
    figure, axis = plt.subplots(figsize=(10, 4.5))
    for shift, key in ((-0.2, "unbalanced"), (0.2, "balanced")):
        axis.bar([p + shift for p in positions], [rows[n][key]["macro"] for n in names], 0.4, label=key)
    axis.set_xticks(list(positions), names, rotation=30, ha="right")
    axis.set_ylim(0.5, 1.0)
    axis.set_ylabel("macro accuracy")
    axis.set_title("Half of each domain's intents cut to 10% of their training records")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ("imbalance", "oos", "self_training", "duplicates")
    parser.add_argument("--parts", nargs="+", choices=parts, default=list(parts))
    parser.add_argument("--measure-on", choices=("test", "val"), default="test")
    parser.add_argument("--near", type=float, default=0.97, help="cosine of a near duplicate")
    parser.add_argument("--out", type=Path, default=RESULTS / "data_practices.json")
    args = parser.parse_args()
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    if "duplicates" in args.parts:
        result["duplicates"] = duplicates(args.near)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "oos" in args.parts:
        result["oos"] = out_of_scope(args.measure_on)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        console.print({k: v for k, v in result["oos"].items() if k != "by_prototype_weight"})
    if "self_training" in args.parts:
        result["self_training"] = self_training(args.measure_on)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        console.print({k: v for k, v in result["self_training"].items() if k != "per_domain"})
    if "imbalance" in args.parts:
        result["imbalance"] = imbalance(args.measure_on)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, args.out.with_name(f"{args.out.stem}_imbalance.png"))
    console.print({k: v for k, v in result.get("imbalance", {}).items() if k != "per_domain"})


if __name__ == "__main__":
    main()
