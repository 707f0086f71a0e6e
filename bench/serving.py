"""Serving benchmark: what a real server delivers against what the model can do, on this machine.

1. The in-process limit, same model and adapters: one text's forward (p50), and texts/s in batches
   of ``max_batch_size`` (mixed adapters, on as many workers side by side as the server runs), and
   of 1 to 16 texts, for the limit at the batch sizes a load really forms.
2. A real ``continual serve`` on a registry of CLINC150's 10 domains (adapters in the format the
   trainer writes, label prototypes, and a task router fitted on training embeddings), loaded by ghz,
   a gRPC load tool no one here wrote, at 1, 4, 16 and 64 concurrent clients: ``Predict`` naming a
   task (spread over the 10), then naming none, then ``PredictBatch`` of 32 texts.
3. 1,000 registered tasks: the time from start to serving them all, the server's memory over the
   10-task one after requests spread over all of them, and the p50 of a first request to a task (its
   adapter loaded on demand) and of a second.
4. The baseline in the same run: the same server with one inference worker (``inference_workers: 1``,
   every core's threads on one batch at a time), named tasks at 16 and 64 clients; and, when the
   router answers sure task-less texts alone (``router_alone_above``), the same server without that,
   task-less at 16 clients.

    go install github.com/bojand/ghz/cmd/ghz@v0.93.0
    .venv/bin/python bench/serving.py [--calls 100] [--ghz ~/go/bin/ghz]

Writes bench/results/serving.json and bench/results/serving.png. Ratios compare figures measured in
the same run, since this machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import matplotlib
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.api import continual_pb2, continual_pb2_grpc
from service.datasets import TaskData, clinc150
from service.demo import spawn_role
from service.engine import engine_shape
from service.feature_memory import FeatureMemory
from service.local_kafka import free_port
from service.model import BASE_FEATURE_LAYERS, PROTOTYPE_COUNTS, PROTOTYPE_SUMS, AdapterModel, build_model
from service.registry import Registry
from service.router import fit_router
from service.served_model import build_served_model
from service.settings import Settings, load_settings

matplotlib.use("Agg")
from matplotlib import pyplot

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PROTO = REPO / "protos" / "continual" / "v1" / "continual.proto"
LEVELS = (1, 4, 16, 64)
#: Batch sizes the in-process limit is also measured at (and ``max_batch_size``, the largest).
OFFLINE_SIZES = (1, 2, 4, 8, 16)


def publish_domains(
    settings: Settings,
    model: AdapterModel,
    data: list[TaskData],
    copies: int = 1,
    features: dict[str, torch.Tensor] | None = None,
) -> None:
    """Each domain as a served version (fresh LoRA, label prototypes, eval records), ``copies`` times
    under numbered names; and a router fitted, as the trainer fits it, on the base features of every
    training text of the first copy (a router memory of ``router_memory_size`` rows holds them all).
    ``features`` keeps each label's base features from one call for the next."""
    registry = Registry(settings.registry_dir)
    memory = FeatureMemory(settings.router_memory_size, settings.seed)
    features = {} if features is None else features
    beside: dict[str, int] = {}  # the versions the router is fitted beside (Router.speaks_for them)
    for task in data:
        labels = sorted({label for _, label in task.train})
        for label in labels:
            if label not in features:
                texts = [t for t, lbl in task.train if lbl == label]
                features[label] = torch.from_numpy(model.base_embeddings(texts, layers=BASE_FEATURE_LAYERS))
        embedded = {label: features[label] for label in labels}
        if task.name not in model.names():
            model.add(task.name, len(labels))
        weights = model.weights(task.name)
        weights[PROTOTYPE_SUMS] = torch.stack(
            [embedded[label][:, -model.hidden_size :].sum(0) for label in labels]
        )
        weights[PROTOTYPE_COUNTS] = torch.tensor([float(len(embedded[label])) for label in labels])
        for label in labels:
            memory.add(task.name, [label] * len(embedded[label]), embedded[label])
        for copy in range(copies):
            name = task.name if copy == 0 else f"{task.name}-{copy}"
            manifest = {
                "base_model": settings.base_model,
                "labels": labels,
                "parent_version": None,
                "strategy": settings.strategy,
                "metrics": {"accuracy": None, "eval_records": len(task.eval[:50]), "train_records": 0},
            }
            version = registry.publish(name, weights, task.eval[:50], manifest)
            registry.promote_unless_pinned(name, version, "bench: initial version")
            if copy == 0:
                beside[name] = version
    router = fit_router(memory)
    assert router is not None
    rows = [list(row) for row in router.rows]
    fitted = {"base_model": settings.base_model, "rows": rows, "versions": beside}
    registry.write_router(1, router.tensors(), fitted)


def offline(settings: Settings, data: list[TaskData], sizes: Sequence[int]) -> dict[str, Any]:
    """The served model in this process, the registry's versions loaded and run as a server's engine
    runs it (``engine_shape``: its workers side by side, each on its own torch threads): one text's
    forward p50 (ms) on one worker, and texts/s in mixed-adapter batches of each of ``sizes`` on all
    of them (``offline_batched_per_s``: the largest)."""
    model = build_served_model(settings)
    registry = Registry(settings.registry_dir)
    for task in data:
        model.load(task.name, registry.load_weights(task.name, 1))
    texts = [(task.name, text) for task in data for text, _ in task.eval[:40]]
    random.Random(0).shuffle(texts)
    workers, threads = engine_shape(settings.inference_workers, settings.torch_threads)

    @torch.inference_mode()
    def one_text() -> list[float]:
        torch.set_num_threads(threads)
        seconds = []
        for name, text in texts[:105]:
            started = time.perf_counter()
            model.outputs([text], [name])
            seconds.append(time.perf_counter() - started)
        return seconds[5:]  # the first ones warm up

    @torch.inference_mode()
    def batches(batch: int) -> int:
        torch.set_num_threads(threads)
        start.wait()
        for i in range(0, len(texts) - batch + 1, batch):
            model.outputs([t for _, t in texts[i : i + batch]], [name for name, _ in texts[i : i + batch]])
        return len(texts) // batch * batch

    by_size: dict[str, float] = {}
    with ThreadPoolExecutor(workers) as pool:
        single = pool.submit(one_text).result()
        for size in sizes:
            start = threading.Barrier(workers)
            started = time.perf_counter()
            done = sum(pool.map(batches, [size] * workers))
            by_size[str(size)] = round(done / (time.perf_counter() - started), 1)
    return {
        "offline_single_ms": statistics.median(single) * 1000,
        "offline_batched_per_s": by_size[str(max(sizes))],
        "offline_by_batch": by_size,
    }


def at_batch(by_size: dict[str, float], rows: float) -> float:
    """The in-process texts/s at a batch of ``rows`` (linear between the sizes measured)."""
    sizes = sorted(int(size) for size in by_size)
    rows = min(max(rows, sizes[0]), sizes[-1])
    upper = next(size for size in sizes if size >= rows)
    lower = max((size for size in sizes if size <= rows), default=upper)
    if upper == lower:
        return by_size[str(upper)]
    share = (rows - lower) / (upper - lower)
    return by_size[str(lower)] + share * (by_size[str(upper)] - by_size[str(lower)])


def ghz(
    binary: str, port: int, call: str, data: list[dict[str, Any]], clients: int, calls: int
) -> dict[str, Any]:
    """One ghz run of ``calls`` calls (a count, not a duration: every call is answered, none is cut
    off at the end, so any status but OK is a real failure); its rps, p50 and p99 (ms), failures."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(data, handle)
    command = [
        binary, "--insecure", "--proto", str(PROTO), "--call", f"continual.v1.Continual.{call}",
        "-c", str(clients), "--connections", str(min(clients, 8)), "-n", str(calls),
        "--data-file", handle.name, "--format", "json", f"127.0.0.1:{port}",
    ]  # fmt: skip
    report = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    os.unlink(handle.name)
    latency = {int(p["percentage"]): p["latency"] / 1e6 for p in report.get("latencyDistribution") or []}
    codes = report.get("statusCodeDistribution") or {}
    print("  ghz status codes:", codes, flush=True)
    return {
        "rps": round(report["rps"], 1),
        "p50_ms": round(latency.get(50, float("nan")), 2),
        "p99_ms": round(latency.get(99, float("nan")), 2),
        "calls": calls,
        "failed": sum(n for code, n in codes.items() if code != "OK"),
    }


def server_samples(port: int, prefixes: tuple[str, ...]) -> dict[str, float]:
    """The server's metric samples whose names start with one of ``prefixes``, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(prefixes)
    }


def batch_rows(port: int) -> tuple[float, float]:
    """The server's texts run and batches run so far."""
    samples = server_samples(port, ("continual_inference_batch_rows",))
    return samples["continual_inference_batch_rows_sum"], samples["continual_inference_batch_rows_count"]


def serve(settings: Settings, workdir: Path, name: str, tasks: int) -> subprocess.Popen[bytes]:
    """A `continual serve` process on the settings, once it serves ``tasks`` tasks."""
    config = workdir / f"{name}.yaml"
    config.write_text(settings.to_yaml())
    process = spawn_role("serve", config, workdir / f"{name}.log")
    with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=300)
        stub = continual_pb2_grpc.ContinualStub(channel)
        deadline = time.monotonic() + 300
        while len(stub.ListAdapters(continual_pb2.ListAdaptersRequest()).adapters) < tasks:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {name} did not serve its {tasks} tasks")
            time.sleep(0.5)
    return process


def rss_mb(process: subprocess.Popen[bytes]) -> float:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=60)


def one_worker(
    settings: Settings, workdir: Path, named: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """The baseline, in the same run: the same server with one inference worker on every core's
    torch threads (the engine before it ran batches side by side), named tasks at 16 and 64 clients."""
    settings = settings.model_copy(
        update={"inference_workers": 1, "grpc_port": free_port(), "server_metrics_port": free_port()}
    )
    process = serve(settings, workdir, "server-one-worker", 10)
    try:
        ghz(args.ghz, settings.grpc_port, "Predict", named, 4, 100)  # warm-up
        return {
            str(clients): ghz(args.ghz, settings.grpc_port, "Predict", named, clients, args.calls * clients)
            for clients in (16, 64)
        }
    finally:
        stop(process)


def adapters_always(
    settings: Settings, workdir: Path, untasked: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """The task-less baseline, in the same run: the same server with ``router_alone_above`` unset (every
    task-less request asks its candidates' adapters), at 16 clients."""
    settings = settings.model_copy(
        update={"router_alone_above": None, "grpc_port": free_port(), "server_metrics_port": free_port()}
    )
    process = serve(settings, workdir, "server-adapters-always", 10)
    try:
        ghz(args.ghz, settings.grpc_port, "Predict", untasked, 4, 100)  # warm-up
        return {"16": ghz(args.ghz, settings.grpc_port, "Predict", untasked, 16, args.calls * 16)}
    finally:
        stop(process)


def router_alone_share(port: int) -> float:
    """The share of the server's task-less answers so far that the router gave alone."""
    samples = server_samples(port, ("continual_router_alone_answers", "continual_task_less_answers"))
    answered = sum(v for k, v in samples.items() if k == "continual_task_less_answers_total")
    return samples["continual_router_alone_answers_total"] / answered if answered else 0.0


def thousand_adapters(
    settings: Settings,
    workdir: Path,
    model: AdapterModel,
    data: list[TaskData],
    features: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """A server over 1,000 tasks: memory after requests to all of them, cold and warm p50 (ms)."""
    settings = settings.model_copy(
        update={"registry_dir": workdir / "registry-1000", "grpc_port": free_port()}
    )
    copies = -(-1000 // len(data))
    publish_domains(settings, model, data, copies, features)
    names = [t.name if c == 0 else f"{t.name}-{c}" for c in range(copies) for t in data][:1000]
    started = time.monotonic()
    process = serve(settings, workdir, "server-1000", len(names))
    startup_s = time.monotonic() - started
    try:
        cold: list[float] = []
        warm: list[float] = []
        with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
            stub = continual_pb2_grpc.ContinualStub(channel)
            text = data[0].eval[0][0]
            for name in random.Random(0).sample(names, len(names)):
                for kind in (cold, warm):
                    started = time.perf_counter()
                    stub.Predict(continual_pb2.PredictRequest(task=name, text=text), timeout=60)
                    kind.append(time.perf_counter() - started)
        return {
            "tasks": len(names),
            "startup_s": round(startup_s, 1),
            "max_loaded_adapters": settings.max_loaded_adapters,
            "rss_mb": round(rss_mb(process), 1),
            "cold_p50_ms": round(statistics.median(cold) * 1000, 2),
            "warm_p50_ms": round(statistics.median(warm) * 1000, 2),
        }
    finally:
        stop(process)


def plot(result: dict[str, Any], path: Path) -> None:
    figure, axis = pyplot.subplots(figsize=(7, 4))
    for kind, levels in result["levels"].items():
        axis.plot(LEVELS, [levels[str(c)]["rps"] for c in LEVELS], marker="o", label=kind)
    axis.axhline(
        result["offline_batched_per_s"], linestyle="--", color="grey", label="in-process batched limit"
    )
    named = result["levels"]["named"]
    axis.plot(
        LEVELS,
        [at_batch(result["offline_by_batch"], named[str(c)]["rows_per_batch"]) for c in LEVELS],
        linestyle=":", color="grey", label="in-process, at the batch size named requests formed",
    )  # fmt: skip
    axis.set_xscale("log", base=2)
    axis.set_xlabel("concurrent clients (ghz)")
    axis.set_ylabel("answers per second")
    axis.set_title("continual serve under load")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per client at each level")
    parser.add_argument("--ghz", default=shutil.which("ghz") or str(Path.home() / "go" / "bin" / "ghz"))
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(tempfile.mkdtemp(prefix="serving-"))
    settings = load_settings(
        registry_dir=workdir / "registry",
        grpc_port=free_port(),
        server_metrics_port=free_port(),
        drift_enabled=False,
    )
    data = clinc150(settings.clinc150_dir)
    model = build_model(settings)
    features: dict[str, torch.Tensor] = {}
    publish_domains(settings, model, data, features=features)
    largest = settings.max_batch_size
    sizes = sorted({*(size for size in OFFLINE_SIZES if size < largest), largest})
    result: dict[str, Any] = offline(settings, data, sizes)
    print("in-process:", result, flush=True)

    texts = [(task.name, text) for task in data for text, _ in task.eval[:50]]
    random.Random(0).shuffle(texts)
    named = [{"task": task, "text": text} for task, text in texts]
    untasked = [{"text": text} for _, text in texts]
    batches = [{"items": named[i : i + 32]} for i in range(0, len(named) - 31, 32)]
    process = serve(settings, workdir, "server-10", len(data))
    base_rss = rss_mb(process)
    try:
        ghz(args.ghz, settings.grpc_port, "Predict", named, 4, 100)  # warm-up
        result["levels"] = {}
        for kind, call, items in [("named", "Predict", named), ("no task", "Predict", untasked)]:
            result["levels"][kind] = {}
            for clients in LEVELS:
                before = batch_rows(settings.server_metrics_port)
                level = ghz(args.ghz, settings.grpc_port, call, items, clients, args.calls * clients)
                after = batch_rows(settings.server_metrics_port)
                rows, forwards = after[0] - before[0], after[1] - before[1]
                level["rows_per_batch"] = round(rows / forwards, 1)
                result["levels"][kind][str(clients)] = level
                print(kind, clients, level, flush=True)
        result["router_alone_share"] = round(router_alone_share(settings.server_metrics_port), 3)
        batch = ghz(args.ghz, settings.grpc_port, "PredictBatch", batches, 4, args.calls)
        result["predict_batch_32_c4"] = {**batch, "texts_per_s": round(batch["rps"] * 32, 1)}
        print("PredictBatch", result["predict_batch_32_c4"], flush=True)
    finally:
        stop(process)
    result["one_worker"] = one_worker(settings, workdir, named, args)
    if settings.router_alone_above is not None:
        result["adapters_always"] = adapters_always(settings, workdir, untasked, args)
    adapters = thousand_adapters(settings, workdir, model, data, features)
    adapters["rss_over_base_mb"] = round(adapters.pop("rss_mb") - base_rss, 1)
    result["adapters_1000"] = adapters
    levels = result["levels"]
    result.update(
        throughput_ratio_c16=round(levels["named"]["16"]["rps"] / result["offline_batched_per_s"], 3),
        # Against the in-process limit at the batch size 16 clients formed, not the largest.
        throughput_ratio_c16_same_batch=round(
            levels["named"]["16"]["rps"]
            / at_batch(result["offline_by_batch"], levels["named"]["16"]["rows_per_batch"]),
            3,
        ),
        c1_p50_overhead_ms=round(levels["named"]["1"]["p50_ms"] - result["offline_single_ms"], 2),
        agnostic_ratio_c16=round(levels["no task"]["16"]["rps"] / levels["named"]["16"]["rps"], 3),
        router_alone_gain_c16=round(
            levels["no task"]["16"]["rps"] / result["adapters_always"]["16"]["rps"], 3
        )
        if "adapters_always" in result
        else None,
        workers_gain_c16=round(levels["named"]["16"]["rps"] / result["one_worker"]["16"]["rps"], 3),
        workers_gain_c64=round(levels["named"]["64"]["rps"] / result["one_worker"]["64"]["rps"], 3),
        failed=sum(
            level["failed"]
            for kind in [*levels.values(), result["one_worker"], result.get("adapters_always", {})]
            for level in kind.values()
        )
        + batch["failed"],
        settings={
            "max_batch_size": settings.max_batch_size,
            "max_batch_wait_ms": settings.max_batch_wait_ms,
            "inference_workers, torch_threads each": engine_shape(
                settings.inference_workers, settings.torch_threads
            ),
            "calls_per_client": args.calls,
            "base_model": settings.base_model,
            "load_tool": "ghz v0.93.0",
            "machine": f"{os.cpu_count()} CPU cores, no GPU",
        },
    )
    result["offline_single_ms"] = round(result["offline_single_ms"], 2)
    result["offline_batched_per_s"] = round(result["offline_batched_per_s"], 1)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "levels"}, indent=2))


if __name__ == "__main__":
    main()
