"""What routing costs a request that names no task, as the served tasks grow (CPU time, one text).

    .venv/bin/python -m bench.routing_cost

A task-less request is routed on its base features (the base model's last four layers, 1,536 numbers)
by the task router over every served (task, label) row, judged in or out of scope against every
served label prototype, and its candidates' label priors read off the same softmax. Measured on a
router of T tasks of 15 labels (random weights: the cost does not depend on them), for T = 10, 100 and
1,000, two ways in the same run:

- ``separate`` (the server before 2026-12-02): three questions to the router, each its own softmax
  over the served rows (task probabilities, label priors, out of scope), and the served versions'
  prototypes stacked afresh for every request;
- ``route`` (now): ``Router.route``, one softmax for all three, over every row without picking them
  out when every task is served, and the stack kept while the same versions are served.

Both read the router's cached plan of rows (which rows a set of tasks reads, where each task's labels
sit), so the ratio is that of one softmax and one prototype stack against three and a stack per call;
the plan's own saving shows in both columns, against the figures committed before it.

Both give the same answers (tests/test_router.py). Median of repeated calls on one torch thread.
Writes bench/results/routing_cost.json and prints the table.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from service.out_of_scope import ScopeRule
from service.router import Router

RESULTS = Path(__file__).resolve().parent / "results" / "routing_cost.json"
LABELS_PER_TASK = 15
FEATURES = 1536
HIDDEN = 384


def median_ms(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(tasks: int, repeats: int) -> dict[str, float]:
    """Per-request routing time (ms) both ways for a router over ``tasks`` tasks."""
    generator = torch.Generator().manual_seed(0)
    names = [f"task-{i}" for i in range(tasks)]
    rows = tuple((name, f"label-{j}") for name in names for j in range(LABELS_PER_TASK))
    scope = ScopeRule(threshold=-1.0, prototype_weight=5.0, reject_rate=0.02, calibration_records=100)
    router = Router(
        rows, torch.randn(len(rows), FEATURES, generator=generator), torch.zeros(len(rows)), scope
    )
    prototypes = [
        torch.nn.functional.normalize(torch.randn(LABELS_PER_TASK, HIDDEN, generator=generator), dim=-1)
        for _ in names
    ]
    labels = [[f"label-{j}" for j in range(LABELS_PER_TASK)] for _ in names]
    features = torch.randn(1, FEATURES, generator=generator)
    stacked = torch.cat(prototypes)

    def separate() -> object:
        every = torch.cat(prototypes)
        return (
            router.task_probabilities(features, names),
            router.out_of_scope(features, names, every),
            router.label_priors(features, names, labels),
        )

    def route() -> object:
        return router.route(features, names, labels, stacked)

    route()
    separate()  # warm-up
    separate_ms, route_ms = median_ms(separate, repeats), median_ms(route, repeats)
    return {
        "tasks": tasks,
        "separate_ms": round(separate_ms, 3),
        "route_ms": round(route_ms, 3),
        "ratio": round(route_ms / separate_ms, 3),
    }


def main() -> None:
    torch.set_num_threads(1)
    levels = [measure(tasks, repeats) for tasks, repeats in ((10, 400), (100, 200), (1000, 50))]
    RESULTS.write_text(json.dumps({"levels": levels}, indent=2) + "\n")
    print("| served tasks | separate (ms) | route (ms) | route / separate |")
    print("|---|---|---|---|")
    for level in levels:
        print(f"| {level['tasks']} | {level['separate_ms']} | {level['route_ms']} | {level['ratio']} |")


if __name__ == "__main__":
    main()
