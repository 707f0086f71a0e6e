"""Load test of hot swap and rollback: no request may fail while versions change under traffic.

A real `continual serve` process (MiniLM base) answers concurrent Predict calls on several tasks.
First a baseline phase with no version changes, then a phase in which a new version is published and
promoted every second (as the trainer does: an atomic registry write, then the alias) and, every few
seconds, an operator rolls a task back over gRPC and promotes it again a second later.

    .venv/bin/python bench/hotswap.py [--seconds 60] [--baseline-seconds 20] [--clients 4]

Part 1 runs with drift judging off, so swapping is the only difference between its two phases. Part 2
restarts the server with drift judging on and measures the same traffic again, for its cost.

Writes bench/results/hotswap.json. Latencies are reported as ratios against the baseline measured in
the same run, since this machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from rich.console import Console
from rich.progress import Progress

from service.api import continual_pb2, continual_pb2_grpc
from service.datasets import synthetic
from service.demo import spawn_role
from service.local_kafka import free_port
from service.model import build_model
from service.registry import Registry
from service.settings import load_settings

RESULTS = Path(__file__).resolve().parent / "results" / "hotswap.json"
console = Console()


@dataclass
class Traffic:
    """What the clients saw."""

    latencies_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: (task, version) -> time of the first answer from that version.
    first_seen: dict[tuple[str, int], float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client(
    port: int, tasks: list[str], texts: list[str], stop: threading.Event, traffic: Traffic, seed: int
) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = continual_pb2_grpc.ContinualStub(channel)
        while not stop.is_set():
            task = rng.choice(tasks)
            started = time.perf_counter()
            try:
                reply = stub.Predict(
                    continual_pb2.PredictRequest(task=task, text=rng.choice(texts)), timeout=10
                )
            except grpc.RpcError as exc:
                with traffic.lock:
                    traffic.failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            finished = time.perf_counter()
            with traffic.lock:
                traffic.latencies_s.append(finished - started)
                traffic.first_seen.setdefault((task, reply.version), finished)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_phase(
    port: int, tasks: list[str], texts: list[str], clients: int, seconds: float, action: object
) -> Traffic:
    traffic = Traffic()
    stop = threading.Event()
    threads = [
        threading.Thread(target=client, args=(port, tasks, texts, stop, traffic, i), daemon=True)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    try:
        if callable(action):
            action(traffic, seconds)
        else:
            time.sleep(seconds)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    return traffic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--baseline-seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--rollback-every", type=float, default=5.0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    workdir = Path(tempfile.mkdtemp(prefix="hotswap-"))
    settings = load_settings(registry_dir=workdir / "registry", grpc_port=free_port(), server_metrics_port=0)
    registry = Registry(settings.registry_dir)
    data = synthetic(num_tasks=args.tasks)
    texts = [text for task in data for text, _ in task.eval]
    tasks = [task.name for task in data]

    # Initial versions: real adapters (fresh LoRA + head) in the format the trainer writes.
    model = build_model(settings)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for task in data:
        labels = sorted({label for _, label in task.train})
        model.add(task.name, len(labels))
        weights[task.name] = model.weights(task.name)
        manifest = {
            "base_model": settings.base_model,
            "labels": labels,
            "parent_version": None,
            "strategy": settings.strategy,
            "metrics": {"accuracy": None, "eval_records": 0, "train_records": 0},
        }
        # Eval records give the server a drift reference, so drift judging runs as it would in production.
        version = registry.publish(task.name, weights[task.name], task.eval, manifest)
        registry.promote_unless_pinned(task.name, version, "bench: initial version")

    def serve(drift: bool) -> subprocess.Popen[bytes]:
        config = workdir / f"settings-drift-{drift}.yaml"
        config.write_text(settings.model_copy(update={"drift_enabled": drift}).to_yaml())
        process = spawn_role("serve", config, workdir / f"server-drift-{drift}.log")
        with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            stub = continual_pb2_grpc.ContinualStub(channel)
            deadline = time.monotonic() + 120
            while len(stub.ListAdapters(continual_pb2.ListAdaptersRequest()).adapters) < len(tasks):
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not load the initial versions")
                time.sleep(0.2)
        console.print("warm-up: 10s of traffic, not measured")
        run_phase(settings.grpc_port, tasks, texts, args.clients, 10.0, None)
        return process

    def stop(process: subprocess.Popen[bytes]) -> None:
        process.terminate()
        process.wait(timeout=60)

    # Part 1, drift judging off: swapping is the only difference between the two phases.
    server = serve(drift=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
            admin = continual_pb2_grpc.ContinualStub(channel)
            console.print(f"baseline: {args.baseline_seconds:.0f}s of traffic, no version changes")
            baseline = run_phase(settings.grpc_port, tasks, texts, args.clients, args.baseline_seconds, None)

            published: list[tuple[str, int, float]] = []
            rollbacks_ms: list[float] = []

            def churn(traffic: Traffic, seconds: float) -> None:
                rng = random.Random(0)
                start = time.monotonic()
                next_rollback = start + args.rollback_every
                with Progress(console=console) as progress:
                    bar = progress.add_task("publishing and rolling back under traffic", total=seconds)
                    i = 0
                    while (now := time.monotonic()) - start < seconds:
                        task = tasks[i % len(tasks)]
                        i += 1
                        noisy = {k: v + 0.01 * torch.randn_like(v) for k, v in weights[task].items()}
                        latest = registry.versions(task)[-1]
                        version = registry.publish(
                            task,
                            noisy,
                            registry.eval_records(task, latest),
                            {**registry.manifest(task, latest), "parent_version": latest},
                        )
                        if registry.promote_unless_pinned(task, version, "bench: new version"):
                            published.append((task, version, time.perf_counter()))
                        if now >= next_rollback:
                            target = rng.choice(tasks)
                            began = time.perf_counter()
                            admin.Rollback(continual_pb2.RollbackRequest(task=target, reason="bench"))
                            rollbacks_ms.append((time.perf_counter() - began) * 1000)
                            time.sleep(0.5)
                            admin.Promote(continual_pb2.PromoteRequest(task=target, reason="bench"))
                            next_rollback += args.rollback_every
                        progress.update(bar, completed=min(seconds, time.monotonic() - start))
                        time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))

            swapping = run_phase(settings.grpc_port, tasks, texts, args.clients, args.seconds, churn)
    finally:
        stop(server)

    # Part 2, drift judging on (every input embedded again on the drift thread), no swapping.
    server = serve(drift=True)
    try:
        console.print(f"drift on: {args.baseline_seconds:.0f}s of traffic, no version changes")
        with_drift = run_phase(settings.grpc_port, tasks, texts, args.clients, args.baseline_seconds, None)
    finally:
        stop(server)

    to_serve = [
        swapping.first_seen[(task, version)] - at
        for task, version, at in published
        if (task, version) in swapping.first_seen
    ]
    never_served = len(published) - len(to_serve)
    result = {
        "requests": len(swapping.latencies_s) + len(swapping.failures),
        "failed": len(swapping.failures) + len(baseline.failures) + len(with_drift.failures),
        "failures": sorted(set(swapping.failures + baseline.failures + with_drift.failures))[:10],
        "p50_ms": round(percentile(swapping.latencies_s, 0.50) * 1000, 2),
        "p99_ms": round(percentile(swapping.latencies_s, 0.99) * 1000, 2),
        "p50_ms_no_swap": round(percentile(baseline.latencies_s, 0.50) * 1000, 2),
        "p99_ms_no_swap": round(percentile(baseline.latencies_s, 0.99) * 1000, 2),
        "p99_ratio_swap_vs_no_swap": round(
            percentile(swapping.latencies_s, 0.99) / percentile(baseline.latencies_s, 0.99), 3
        ),
        "baseline_requests": len(baseline.latencies_s),
        "p50_ms_drift_on": round(percentile(with_drift.latencies_s, 0.50) * 1000, 2),
        "p99_ms_drift_on": round(percentile(with_drift.latencies_s, 0.99) * 1000, 2),
        "p50_ratio_drift_on_vs_off": round(
            percentile(with_drift.latencies_s, 0.50) / percentile(baseline.latencies_s, 0.50), 3
        ),
        "versions_published": len(published),
        "versions_never_answered_before_the_next": never_served,
        "publish_to_serve_s": round(statistics.median(to_serve), 3) if to_serve else None,
        "publish_to_serve_s_max": round(max(to_serve), 3) if to_serve else None,
        "rollbacks": len(rollbacks_ms),
        "rollback_ms": round(statistics.median(rollbacks_ms), 2) if rollbacks_ms else None,
        "rollback_ms_max": round(max(rollbacks_ms), 2) if rollbacks_ms else None,
        "settings": {
            "clients": args.clients,
            "tasks": args.tasks,
            "seconds": args.seconds,
            "baseline_seconds": args.baseline_seconds,
            "rollback_every_s": args.rollback_every,
            "registry_poll_s": settings.registry_poll_s,
            "drift_sample_rate_in_part_2": settings.drift_sample_rate,
            "drift_max_samples_per_s_in_part_2": settings.drift_max_samples_per_s,
            "base_model": settings.base_model,
            "machine": f"{os.cpu_count()} CPU cores, no GPU",
        },
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    console.print_json(data=result)


if __name__ == "__main__":
    main()
