"""Continual learning of generative tasks: five tasks with exact answers learned one after another.

    .venv/bin/python -m bench.cl_generative [--strategies S ...] [--orders given reversed shuffled]
        [--train 500] [--eval 100] [--epochs 2] [--learning-rate 1e-3] [--measure-on test|val]
        [--readme] [--plots]

The tasks are written by rule (``service.generative_datasets``: reversing words, a date in ISO
format, sorting numbers, a unit conversion, a person as JSON), so exact match is a fair judge. They
are learned in process, on the learning core the service uses for generative tasks
(``service.generative``) and SmolLM2-135M-Instruct converted from its packaged GGUF file:

- ``lora-per-task``: an adapter per task; a request names its task;
- ``naive``: one adapter, trained on each task in turn (what forgetting looks like);
- ``replay``: one adapter; every step's batch carries, beside the new pairs, half as many pairs drawn
  from a reservoir of the earlier tasks' pairs (``--replay-size`` in all);
- ``ewc``, ``lwf``: one adapter, each step paying online EWC's penalty (``--ewc-lambda``) or LwF's
  distillation towards the adapter before the task (``--lwf-alpha``);
  (what each trains on: the service's ``service.generative_strategy``, as ``generative_strategy``);
- zero-shot: the language model alone, untrained (the floor).

After each task every task learned so far is measured on its held-out pairs (exact match after
normalisation, ``service.generative.normalised``): the accuracy matrix, and from it ACC and BWT
(``service.evaluation``). The general probe (``service.general_probe``: questions of general
knowledge and a paragraph's perplexity) is measured on the language model before and on every
task's adapter after the stream: ``general_probe_delta`` is the mean drop of its accuracy, the base
model's own abilities lost. Held-out pairs: ``--eval`` for val and as many for test, written from
the same seed; choose settings with ``--measure-on val``, report ``test``.

Results are merged into bench/results/cl_generative.json one (strategy, order) at a time, with an
exact-match heatmap per run (bench/results/cl_generative_<strategy>_<order>.png). Serving figures
(time to first token, tokens/s) join when the service serves generative tasks.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from rich.console import Console

from bench.cl_clinc150 import replace_block
from service.demo import plot_matrix
from service.evaluation import summarize
from service.general_anchor import agreement, anchors
from service.general_probe import ProbeResult, measure
from service.generative import GenerativeAdapters, Pair
from service.generative_datasets import GENERATIVE_TASKS, generative_tasks
from service.generative_regularisers import general_divergence
from service.generative_strategy import GenerativeStrategy
from service.language_model import language_model_folder, load_language_model
from service.settings import Settings, load_settings

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("lora-per-task", "naive", "replay", "ewc", "lwf")


def orders(names: list[str]) -> dict[str, list[str]]:
    """The tasks in their written order, reversed, and a fixed shuffle."""
    shuffled = list(names)
    random.Random(0).shuffle(shuffled)
    return {"given": list(names), "reversed": names[::-1], "shuffled": shuffled}


def run(
    strategy: str,
    order: list[str],
    data: dict[str, tuple[list[Pair], list[Pair]]],
    args: argparse.Namespace,
    say: Any,
) -> dict[str, Any]:
    """Learn ``order``'s tasks with ``strategy``; the accuracy matrix, its figures, the probe, the time."""
    started = time.monotonic()
    learner = _learner(args)
    rng = random.Random(args.seed)
    # The model's own answers to general instructions, learned beside each task (``--anchor`` per batch)
    # or whose distributions each step keeps (``--distill`` per step).
    anchored, held_out = anchors(learner) if args.anchor or args.distill else ([], [])
    plan = GenerativeStrategy.for_settings(_settings(args, strategy))  # the service's own strategies
    matrix: dict[str, dict[str, float]] = {}
    for position, task in enumerate(order):
        adapter = plan.adapter(task)
        if adapter not in learner.names():
            learner.add(adapter)
        train = list(data[task][0])
        plan.train(
            learner,
            adapter,
            train,
            args.epochs,
            args.batch_size,
            rng,
            anchored,
            args.anchor,
            args.distill,
            args.distill_strength,
        )
        plan.remember({task: train}, rng)
        matrix[task] = {
            seen: _exact_match(learner, plan.adapter(seen), data[seen][1]) for seen in order[: position + 1]
        }
        say(f"{strategy}: after {task}: " + ", ".join(f"{k} {v:.2f}" for k, v in matrix[task].items()))
    summary = summarize(matrix)
    adapters = list(dict.fromkeys(plan.adapter(task) for task in order))
    probes = [measure(learner, adapter) for adapter in adapters]
    if not held_out:
        held_out = anchors(learner)[1]
    agreements = [agreement(learner, adapter, held_out) for adapter in adapters]
    divergences = [general_divergence(learner, adapter, held_out) for adapter in adapters]
    return {
        "matrix": matrix,
        "acc": summary.acc,
        "bwt": summary.bwt,
        "forgetting": summary.mean_forgetting,
        "general_probe_after": _mean_probe(probes),
        "general_probe_per_adapter": {a: p.accuracy for a, p in zip(adapters, probes, strict=True)},
        # Held-out general instructions answered in the language model's own words (chosen on).
        "general_agreement_after": sum(agreements) / len(agreements),
        # How far the adapters moved the model's next-token distributions on them (KL, 0: not at all).
        "general_divergence_after": sum(divergences) / len(divergences),
        "wall_s": round(time.monotonic() - started, 1),
        # The knob of a regularised strategy (not in CONFIG: runs of other strategies do not depend on it).
        **({"ewc_lambda": args.ewc_lambda} if strategy == "ewc" else {}),
        **({"lwf_alpha": args.lwf_alpha} if strategy == "lwf" else {}),
    }


def _settings(args: argparse.Namespace, strategy: str) -> Settings:
    """The service's settings of ``strategy`` with the benchmark's knobs."""
    return load_settings(
        generative_strategy=strategy,
        replay_memory_size=args.replay_size,
        generative_batch_size=args.batch_size,
        generative_ewc_lambda=args.ewc_lambda,
        generative_lwf_alpha=args.lwf_alpha,
    )


def _learner(args: argparse.Namespace) -> GenerativeAdapters:
    settings = load_settings()
    model, tokenizer = load_language_model(
        language_model_folder(settings.language_model, settings.models_dir)
    )
    torch.manual_seed(args.seed)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0)
    return GenerativeAdapters(
        model, tokenizer, lora, args.learning_rate, settings.max_prompt_tokens, settings.max_response_tokens
    )


def _exact_match(learner: GenerativeAdapters, adapter: str | None, pairs: list[Pair]) -> float:
    evaluation = learner.evaluate(adapter, pairs, batch_size=25)
    assert evaluation.exact_match is not None
    return evaluation.exact_match


def _mean_probe(probes: list[ProbeResult]) -> dict[str, float]:
    return {
        "accuracy": sum(p.accuracy for p in probes) / len(probes),
        "perplexity": sum(p.perplexity for p in probes) / len(probes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--orders", nargs="+", default=["given", "reversed", "shuffled"])
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--replay-size", type=int, default=200)
    parser.add_argument("--ewc-lambda", type=float, default=load_settings().generative_ewc_lambda)
    parser.add_argument("--lwf-alpha", type=float, default=load_settings().generative_lwf_alpha)
    parser.add_argument("--anchor", type=int, default=0, help="general pairs per batch (0: none)")
    parser.add_argument(
        "--distill",
        type=int,
        default=load_settings().generative_keep_general,
        help="general pairs per step kept as the model alone (0: none)",
    )
    parser.add_argument(
        "--distill-strength",
        type=float,
        default=load_settings().generative_keep_general_strength,
        help="weight of --distill's term",
    )
    parser.add_argument("--tasks", nargs="+", default=list(GENERATIVE_TASKS), choices=GENERATIVE_TASKS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--measure-on", choices=("test", "val"), default="test")
    parser.add_argument("--skip-zero-shot", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "cl_generative.json")
    parser.add_argument("--readme", action="store_true", help="write the table into bench/README.md")
    parser.add_argument("--plots", action="store_true", help="redraw the heatmaps from the results")
    args = parser.parse_args()
    console = Console()
    if args.readme or args.plots:
        stored = json.loads(args.out.read_text())
        if args.plots:
            for strategy, entry in stored["strategies"].items():
                for order, measured in entry["orders"].items():
                    _plot(strategy, order, measured, args.out)
        if args.readme:
            readme = Path(__file__).with_name("README.md")
            text = replace_block(readme.read_text(), f"{args.out.stem} table", table(stored))
            if text is None:
                raise SystemExit(f"{readme} lacks the <!-- {args.out.stem} table --> markers")
            readme.write_text(text)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    written = generative_tasks(args.train, 2 * args.eval, seed=args.seed)
    # Val first, test after: settings are chosen on val, never on test.
    part = slice(0, args.eval) if args.measure_on == "val" else slice(args.eval, 2 * args.eval)
    data = {name: (train, held_out[part]) for name, (train, held_out) in written.items()}
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    config = {k: v for k, v in vars(args).items() if k in CONFIG}
    # Files written before a knob existed were measured at its default.
    stored = {**{k: v for k, v in DEFAULTS.items() if k in config}, **results.get("config", config)}
    if stored != config:
        raise SystemExit(f"{args.out} was measured with {results['config']}; use --out for {config}")
    results["config"] = config
    if not args.skip_zero_shot:
        learner = _learner(args)
        zero = {name: _exact_match(learner, None, data[name][1]) for name in args.tasks}
        probe = measure(learner, None)
        results["zero_shot"] = zero
        results["zero_shot_acc"] = sum(zero.values()) / len(zero)
        results["general_probe_base"] = {"accuracy": probe.accuracy, "perplexity": probe.perplexity}
        console.print(f"zero-shot: {zero}, probe {probe}")
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    for strategy in args.strategies:
        for name in args.orders:
            measured = run(strategy, orders(list(args.tasks))[name], data, args, console.print)
            base = results.get("general_probe_base")
            if base is not None:
                measured["general_probe_delta"] = (
                    measured["general_probe_after"]["accuracy"] - base["accuracy"]
                )
            results.setdefault("strategies", {}).setdefault(strategy, {"orders": {}})["orders"][name] = (
                measured
            )
            entry = results["strategies"][strategy]
            entry["mean"] = _mean(list(entry["orders"].values()))
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            _plot(strategy, name, measured, args.out)
            console.print(f"{strategy}, {name}: ACC {measured['acc']:.3f} BWT {measured['bwt']:+.3f}")


#: What makes two runs comparable: the results file holds runs of one configuration.
CONFIG = (
    "train",
    "eval",
    "epochs",
    "batch_size",
    "learning_rate",
    "rank",
    "replay_size",
    "anchor",
    "distill",
    "distill_strength",
    "tasks",
    "seed",
    "measure_on",
)
#: What a results file written before a knob existed was measured at.
DEFAULTS: dict[str, Any] = {
    "anchor": 0,
    "distill": 0,
    "distill_strength": 1.0,
    "tasks": list(GENERATIVE_TASKS),
}


def _mean(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    def average(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {key: average(key) for key in ("acc", "bwt", "forgetting", "general_probe_delta", "wall_s")}


def _plot(strategy: str, order: str, measured: dict[str, Any], out: Path) -> None:
    plot_matrix(
        measured["matrix"],
        out.parent / f"{out.stem}_{strategy}_{order}.png",
        title=f"{strategy}, {order} order: exact match (%)",
    )


def table(results: dict[str, Any]) -> str:
    """The results as bench/README.md's table: one row per strategy and order, then each mean."""

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}%"

    def points(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:+.1f}".replace("-", "−")

    lines = [
        "| strategy | order | ACC (exact match) | BWT | forgetting | general probe Δ | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    zero = results.get("zero_shot_acc")
    if zero is not None:
        lines.append(f"| zero-shot (the language model alone) | – | {pct(zero)} | – | – | 0 | – |")
    for strategy, entry in results.get("strategies", {}).items():
        rows = list(entry["orders"].items())
        if len(rows) > 1:
            rows.append(("**mean**", entry["mean"]))
        for order, measured in rows:
            cells = [
                strategy,
                order,
                pct(measured.get("acc")),
                points(measured.get("bwt")),
                points(measured.get("forgetting")),
                points(measured.get("general_probe_delta")),
                f"{measured['wall_s']:.0f} s" if measured.get("wall_s") is not None else "–",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
