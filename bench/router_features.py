"""Which layers of the frozen base model the task router reads, chosen on CLINC150 **val**.

    .venv/bin/python -m bench.router_features [--split val]

The service's own router (``service.router.fit_router`` on a ``FeatureMemory`` holding every training
text) is fitted over all 150 intents, one task per domain, on the mean-pooled outputs of the base
model's last k layers concatenated (``service.model.base_features``), for k = 1 (the last layer alone,
the router before) to every layer; each is measured on the split's texts: the share whose (domain,
intent) the router ranks first. This is the router with every domain learned, the most it has to
tell apart. The default (``BASE_FEATURE_LAYERS``) was chosen from the val column; ``--split test``
exists to confirm a choice, never to make one. Writes bench/results/router_features.json (a split's
run replaces that split's), prints the table and writes it into bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.cl_clinc150 import replace_block
from service.datasets import clinc150
from service.feature_memory import FeatureMemory
from service.model import build_model
from service.router import fit_router
from service.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "router_features.json"
README = REPO / "bench" / "README.md"
CLINC150 = REPO.parent / "shared" / "data" / "clinc150"


def measure(split: str) -> list[dict[str, float]]:
    """Per number of last layers read: the router's accuracy on ``split`` and its fit time."""
    settings = load_settings(drift_enabled=False)
    tasks = clinc150(CLINC150, eval_splits=(split,))
    model = build_model(settings)
    every = model.output_layers
    train = [(task.name, label, text) for task in tasks for text, label in task.train]
    held_out = [(task.name, label, text) for task in tasks for text, label in task.eval]
    x_train = torch.from_numpy(model.base_embeddings([t for *_, t in train], layers=every))
    x_held_out = torch.from_numpy(model.base_embeddings([t for *_, t in held_out], layers=every))
    rows = []
    for layers in range(1, every + 1):
        width = layers * model.hidden_size
        memory = FeatureMemory(size=len(train), seed=settings.seed)
        for task in tasks:
            chosen = [i for i, (name, _, _) in enumerate(train) if name == task.name]
            memory.add(task.name, [train[i][1] for i in chosen], x_train[chosen, -width:])
        started = time.monotonic()
        router = fit_router(memory)
        fit_s = time.monotonic() - started
        assert router is not None
        names, probabilities = router.label_probabilities(x_held_out, [task.name for task in tasks])
        ranked = [names[i] for i in probabilities.argmax(-1).tolist()]
        right = sum(row == (task, label) for row, (task, label, _) in zip(ranked, held_out, strict=True))
        rows.append({"layers": layers, "accuracy": right / len(held_out), "fit_s": round(fit_s, 1)})
        print(
            f"{split}: last {layers} layer(s): {right / len(held_out):.2%} ({fit_s:.0f} s to fit)", flush=True
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--readme", action="store_true", help="only write the table into bench/README.md")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.readme:
        results[args.split] = measure(args.split)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    text = replace_block(README.read_text(), "router_features table", table(results))
    if text is None:
        raise SystemExit(f"{README} lacks the router_features table markers")
    README.write_text(text)


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """The results as markdown: accuracy per split, fit time from the first split measured."""
    splits = list(results)
    lines = [
        "| last layers read | " + " | ".join(f"{split} accuracy" for split in splits) + " | fit |",
        "|---|" + "---|" * (len(splits) + 1),
    ]
    for i, row in enumerate(results[splits[0]]):
        figures = " | ".join(f"{results[split][i]['accuracy']:.2%}" for split in splits)
        lines.append(f"| {row['layers']} | {figures} | {row['fit_s']:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
