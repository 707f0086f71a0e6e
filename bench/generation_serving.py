"""Generation served against generation in process: time to first token and tokens per second.

    .venv/bin/python -m bench.generation_serving [--requests 16] [--max-new-tokens 64] [--threads 2]

One run, one machine, the language model of the settings (SmolLM2-135M-Instruct by default) with one
generative task's adapter (``--train-steps`` steps on the iso-date task, so it is a real adapter):

- in process: ``GenerativeAdapters.generate`` (Hugging Face ``generate``, greedy) over 8 prompts at
  once and one at a time: tokens per second (``inprocess_tokens_per_s``, ``inprocess_tokens_per_s_c1``);
  and the server's own generation engine in this process, 8 rows at a time with new requests joining
  as rows end (``inprocess_engine_tokens_per_s``: what a server could deliver without gRPC);
- served: a real ``continual serve`` process on a registry holding that version, called over gRPC
  by 1 and by 8 concurrent clients (threads of a plain gRPC client, each a ``Generate`` stream):
  time to first token (p50) and tokens per second over the run (``ttft_ms_c1``, ``tokens_per_s_c1``,
  ``ttft_ms_c8``, ``tokens_per_s_c8``), and ``ratio_c8`` = served tokens/s at 8 streams over in-process
  batched tokens/s (``ratio_c8_engine``: over the engine in process).

The prompts are general instructions (``service.general_anchor``) answered greedily, so both sides
generate the same tokens. Results go into bench/results/cl_generative.json under ``serving``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from prometheus_client import CollectorRegistry

from bench.cl_clinc150 import replace_block
from service.api import continual_pb2, continual_pb2_grpc
from service.demo import spawn_role
from service.general_anchor import INSTRUCTIONS
from service.generation_engine import Generation, GenerationEngine, Sampling
from service.generative import GenerativeAdapters
from service.generative_datasets import generative_tasks
from service.generative_settings import GENERATIVE_KIND
from service.language_model import generative_adapters
from service.local_kafka import free_port
from service.registry import open_registry
from service.server_metrics import ServerMetrics
from service.settings import Settings, load_settings

RESULTS = Path(__file__).resolve().parent / "results" / "cl_generative.json"
TASK = "iso-date"


def in_process(adapters: GenerativeAdapters, prompts: list[str], max_new_tokens: int) -> dict[str, float]:
    """Tokens per second of batched (8 at once) and one-at-a-time greedy generation."""
    started = time.perf_counter()
    tokens = 0
    for start in range(0, len(prompts), 8):
        tokens += sum(
            n for _, n in adapters.generate_counted(TASK, prompts[start : start + 8], max_new_tokens)
        )
    batched = tokens / (time.perf_counter() - started)
    batched_engine = _engine_in_process(adapters, prompts, max_new_tokens)
    started, tokens = time.perf_counter(), 0
    for prompt in prompts[:4]:
        tokens += adapters.generate_counted(TASK, [prompt], max_new_tokens)[0][1]
    return {
        "inprocess_tokens_per_s": batched,
        "inprocess_engine_tokens_per_s": batched_engine,
        "inprocess_tokens_per_s_c1": tokens / (time.perf_counter() - started),
    }


def _engine_in_process(adapters: GenerativeAdapters, prompts: list[str], max_new_tokens: int) -> float:
    """Tokens per second of the server's own engine in this process, 8 rows at a time, new requests
    joining as rows end: the most a server could deliver (no gRPC, no other process)."""
    engine = GenerationEngine(
        adapters, ServerMetrics(CollectorRegistry()), max_batch_size=8, queue_size=len(prompts)
    )
    engine.start()
    started = time.perf_counter()
    generations = [
        engine.submit(Generation(adapters.prompt_ids(p), TASK, Sampling(max_new_tokens))) for p in prompts
    ]
    tokens = 0
    for generation in generations:
        while not (piece := generation.pieces.get()).done:
            pass
        tokens += piece.tokens
    seconds = time.perf_counter() - started
    engine.stop()
    engine.join()
    return tokens / seconds


def publish(settings: Settings, adapters: GenerativeAdapters, steps: int) -> int:
    """Train ``TASK``'s adapter a few steps and publish it as a served generative version."""
    adapters.add(TASK)
    train = generative_tasks(16 * max(steps, 1), 0, seed=0)[TASK][0]
    for step in range(steps):
        adapters.step(TASK, train[16 * step : 16 * (step + 1)])
    registry = open_registry(settings)
    manifest = {
        "kind": GENERATIVE_KIND,
        "base_model": settings.language_model,
        "strategy": "lora-per-task",
        "labels": [],
        "metrics": {"accuracy": None, "eval_records": 0, "train_records": 16 * steps},
    }
    version = registry.publish(TASK, adapters.weights(TASK), [], manifest)
    registry.set_alias(TASK, version, pinned=False, reason="benchmark")
    return version


def load(port: int, prompts: list[str], clients: int, max_new_tokens: int) -> dict[str, float]:
    """``clients`` threads, each streaming its share of ``prompts``: TTFT p50 and tokens/s overall."""
    first: list[float] = []
    tokens: list[int] = []
    lock = threading.Lock()
    shares = [prompts[i::clients] for i in range(clients)]

    def client(share: list[str]) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = continual_pb2_grpc.ContinualStub(channel)
            for prompt in share:
                sent = time.perf_counter()
                seen = None
                request = continual_pb2.GenerateRequest(
                    task=TASK, prompt=prompt, max_new_tokens=max_new_tokens
                )
                for reply in stub.Generate(request, timeout=600):
                    if seen is None and (reply.text or reply.done):
                        seen = time.perf_counter() - sent
                    if reply.done:
                        with lock:
                            first.append(seen or 0.0)
                            tokens.append(reply.tokens)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "ttft_ms": 1000 * statistics.median(first),
        "tokens_per_s": sum(tokens) / wall,
        "requests": len(tokens),
    }


def served(settings: Settings, prompts: list[str], max_new_tokens: int, folder: Path) -> dict[str, float]:
    config = folder / "settings.yaml"
    config.write_text(settings.to_yaml())
    process = spawn_role("serve", config, folder / "serve.log")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
            stub = continual_pb2_grpc.ContinualStub(channel)
            deadline = time.monotonic() + 300
            while True:  # served once the server has loaded the version (and the language model)
                try:
                    listed = stub.ListAdapters(continual_pb2.ListAdaptersRequest(), timeout=5).adapters
                    if any(a.task == TASK and a.served_version for a in listed):
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit((folder / "serve.log").read_text()[-3000:])
                time.sleep(1)
        load(settings.grpc_port, prompts[:2], 1, 8)  # warm-up
        one = load(settings.grpc_port, prompts[: len(prompts) // 2], 1, max_new_tokens)
        eight = load(settings.grpc_port, prompts, 8, max_new_tokens)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {
        "ttft_ms_c1": one["ttft_ms"],
        "tokens_per_s_c1": one["tokens_per_s"],
        "ttft_ms_c8": eight["ttft_ms"],
        "tokens_per_s_c8": eight["tokens_per_s"],
    }


def table(measured: dict[str, Any]) -> str:
    """The serving figures as bench/README.md's table."""
    rows = [
        ("served, 1 stream", measured["ttft_ms_c1"], measured["tokens_per_s_c1"]),
        ("served, 8 streams", measured["ttft_ms_c8"], measured["tokens_per_s_c8"]),
        ("in process, Hugging Face `generate`, one prompt", None, measured["inprocess_tokens_per_s_c1"]),
        ("in process, Hugging Face `generate`, 8 prompts at once", None, measured["inprocess_tokens_per_s"]),
        ("in process, the server's engine, 8 rows", None, measured["inprocess_engine_tokens_per_s"]),
    ]
    lines = ["| | time to first token (p50) | tokens/s |", "|---|---|---|"]
    lines += [
        f"| {name} | {'–' if ttft is None else f'{ttft:.0f} ms'} | {rate:.1f} |" for name, ttft, rate in rows
    ]
    lines.append(
        f"| **served at 8 streams / `generate` on 8** | | **{measured['ratio_c8']:.2f}** "
        f"(over the engine in process: {measured['ratio_c8_engine']:.2f}) |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in process and served")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--readme", action="store_true", help="write the table from the results, run nothing")
    args = parser.parse_args()
    if args.readme:
        readme = Path(__file__).with_name("README.md")
        block = table(json.loads(args.out.read_text())["serving"])
        text = replace_block(readme.read_text(), "generation serving table", block)
        if text is None:
            raise SystemExit(f"{readme} lacks the <!-- generation serving table --> markers")
        readme.write_text(text)
        return
    torch.set_num_threads(args.threads)
    prompts = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        settings = load_settings(
            registry_dir=folder / "registry",
            grpc_port=free_port(),
            server_metrics_port=0,
            torch_threads=args.threads,
            max_response_tokens=max(args.max_new_tokens, load_settings().max_response_tokens),
        )
        adapters = generative_adapters(settings)
        version = publish(settings, adapters, args.train_steps)
        reference = in_process(adapters, prompts, args.max_new_tokens)
        del adapters
        measured: dict[str, Any] = {**served(settings, prompts, args.max_new_tokens, folder), **reference}
    measured["ratio_c8"] = measured["tokens_per_s_c8"] / measured["inprocess_tokens_per_s"]
    measured["ratio_c8_engine"] = measured["tokens_per_s_c8"] / measured["inprocess_engine_tokens_per_s"]
    measured["config"] = {
        "requests": args.requests,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "version": version,
        "language_model": settings.language_model,
    }
    print(json.dumps(measured, indent=2))
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["serving"] = measured
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
