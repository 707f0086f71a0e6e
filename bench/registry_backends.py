"""What the registry costs on an S3 bucket against a local directory, measured in the same run.

    .venv/bin/python -m bench.registry_backends

A server polls the registry every ``registry_poll_s`` (``Registry.aliases``: one listing, an alias
read again only when its fingerprint changed; before 2026-12-03 it listed the tasks and read every
alias) and loads a version when an alias moves; the trainer publishes a version per task per round.
Each is timed on a
``LocalStore`` (a directory) and on an ``S3Store`` against a real S3 server on loopback (Versity's
gateway, ``make tools``), with the same registry content: T tasks (10 and 100) of two versions each,
every version a LoRA + head file the size of a MiniLM task's (r 8 on query and value of six layers,
a 15-label head: about 0.6 MB). Loopback hides a network's latency, so the S3 figures are the
floor of what a bucket in the same region costs (add a round trip per request there).

Writes bench/results/registry_backends.json and prints the table (median ms of repeated runs).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.routing_cost import median_ms
from service.local_s3 import LocalS3
from service.registry import Registry
from service.s3_store import S3Store

RESULTS = Path(__file__).resolve().parent / "results" / "registry_backends.json"
HIDDEN, RANK, LAYERS, LABELS = 384, 8, 6, 15


def adapter_weights() -> dict[str, torch.Tensor]:
    """Tensors the size of one MiniLM task's adapter and head."""
    weights = {}
    for layer in range(LAYERS):
        for module in ("query", "value"):
            weights[f"l{layer}.{module}.lora_A"] = torch.randn(RANK, HIDDEN)
            weights[f"l{layer}.{module}.lora_B"] = torch.randn(HIDDEN, RANK)
    weights["head.weight"] = torch.randn(LABELS, HIDDEN)
    weights["head.bias"] = torch.randn(LABELS)
    return weights


def measure(registry: Registry, tasks: int, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Publish, poll and load times (ms) on one registry."""
    names = [f"task-{i:03d}" for i in range(tasks)]
    evaluation = [(f"text {i}", "label-0") for i in range(200)]
    manifest = {"labels": [f"label-{j}" for j in range(LABELS)], "metrics": {"accuracy": 0.9}}
    started = time.perf_counter()
    for name in names:
        for _ in range(2):
            version = registry.publish(name, weights, evaluation, manifest)
        registry.promote_unless_pinned(name, version, "bench")
    publish_ms = (time.perf_counter() - started) * 1000 / (2 * tasks)

    def poll_each() -> None:  # the watcher before 2026-12-03: list the tasks, read each alias
        for name in registry.tasks():
            registry.alias(name)

    registry.aliases()  # a server's first poll reads every alias; the median is of the ones after
    return {
        "publish_ms": round(publish_ms, 2),
        "poll_each_ms": round(median_ms(poll_each, 5), 2),
        "poll_ms": round(median_ms(registry.aliases, 5), 2),
        "load_ms": round(median_ms(lambda: registry.load_weights(names[0], 2), 10), 2),
    }


def main() -> None:
    torch.manual_seed(0)
    weights = adapter_weights()
    levels: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as workdir, LocalS3(Path(workdir) / "s3") as server:
        server.create_bucket("registry")
        credentials = server.credentials_file(Path(workdir) / "credentials")
        for tasks in (10, 100):
            local = measure(Registry(Path(workdir) / f"local-{tasks}"), tasks, weights)
            store = S3Store.from_url(
                f"s3://registry/bench-{tasks}", endpoint=server.endpoint, credentials_file=credentials
            )
            s3 = measure(Registry(store), tasks, weights)
            ratios = {f"{key}_ratio": round(s3[key] / local[key], 2) for key in local}
            levels.append({"tasks": tasks, "local": local, "s3": s3, **ratios})
    RESULTS.write_text(json.dumps({"levels": levels}, indent=2) + "\n")
    print("| tasks | what | directory (ms) | S3 on loopback (ms) | S3 / directory |")
    print("|---|---|---|---|---|")
    for level in levels:
        for key, what in (
            ("publish_ms", "publish a version"),
            ("poll_each_ms", "a poll, each alias read (before)"),
            ("poll_ms", "a server's poll (`Registry.aliases`)"),
            ("load_ms", "load a version"),
        ):
            ratio = level[f"{key}_ratio"]
            print(f"| {level['tasks']} | {what} | {level['local'][key]} | {level['s3'][key]} | {ratio} |")


if __name__ == "__main__":
    main()
