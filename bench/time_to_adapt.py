"""Time to adapt: from producing a new task's first 200 training records to a successful Predict on it.

    .venv/bin/python bench/time_to_adapt.py [--tasks 3] [--records 200]

Real `continual train` and `continual serve` processes (all-MiniLM-L6-v2, default settings) on a real
broker. Each configuration first learns one warm-up CLINC150 domain; then, for each of the next
domains, the benchmark produces its first ``--records`` training records, immediately the rest of
the domain's training records behind them, and calls Predict on that domain every 50 ms until one
succeeds. It also measures the accuracy of the version that answered first on 150 of the domain's
held-out texts (they are also its eval records, which arrive later). The next domain comes once the
trainer has learned the previous one completely: time to adapt is measured on an idle trainer.

Then the busy case (``fast`` only, ``--busy`` pairs of further domains): a whole domain is produced,
and once its first version answers the benchmark waits 10 s, so that its full round (1,500 records,
3 epochs) is training, and produces a new domain as above. Its time to adapt is
``time_to_adapt_busy_s``; ``busy_round_running`` says whether the busy domain was still served by
its untrained first version when the new one answered (the round had not ended: the new task did not
wait for it).

Two configurations run in the same process, one after the other on the same broker:
- ``fast``: the defaults, a new task's first version published after its first 200 records (one
  pass, head rows started at the label prototypes), refined by the next round;
- ``baseline``: ``first_version_records: 0`` and ``head_init: random``: the first version waits for
  the round (all of the domain's records, every epoch).
Writes bench/results/time_to_adapt.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console

from service.api import continual_pb2, continual_pb2_grpc
from service.datasets import TaskData, clinc150, records
from service.demo import spawn_role
from service.local_kafka import LocalKafka, free_port
from service.producer import produce
from service.settings import Settings, load_settings

RESULTS = Path(__file__).resolve().parent / "results" / "time_to_adapt.json"
REPO = Path(__file__).resolve().parents[1]
CLINC150 = REPO.parent / "shared" / "data" / "clinc150"
console = Console()

#: How long after the busy domain's first version the new domain arrives (its round is training).
BUSY_DELAY_S = 10.0
CONFIGS: dict[str, dict[str, Any]] = {
    "fast": {},
    "baseline": {"first_version_records": 0, "head_init": "random"},
}


def first_answer(stub: continual_pb2_grpc.ContinualStub, task: str, text: str, timeout_s: float) -> int:
    """Call Predict until it succeeds; the version that answered."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return int(stub.Predict(continual_pb2.PredictRequest(task=task, text=text), timeout=5).version)
        except grpc.RpcError as exc:
            waiting = exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
            if not waiting or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def wait_learned(stub: continual_pb2_grpc.ContinualStub, task: TaskData, timeout_s: float = 900) -> None:
    """Until the served version of ``task`` has learned all its records (the trainer is idle again)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        adapters = stub.ListAdapters(continual_pb2.ListAdaptersRequest()).adapters
        info = next((a for a in adapters if a.task == task.name), None)
        if info is not None and (info.train_records, info.eval_records) == (len(task.train), len(task.eval)):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{task.name} was not fully learned within {timeout_s}s")


def accuracy(stub: continual_pb2_grpc.ContinualStub, task: TaskData, n: int = 150) -> tuple[float, set[int]]:
    rows = task.eval[:n]
    replies = [stub.Predict(continual_pb2.PredictRequest(task=task.name, text=t)) for t, _ in rows]
    right = sum(r.label == label for r, (_, label) in zip(replies, rows, strict=True))
    return right / len(rows), {int(r.version) for r in replies}


def arrive(
    stub: continual_pb2_grpc.ContinualStub, bootstrap: str, topic: str, task: TaskData, records_n: int
) -> dict[str, Any]:
    """Produce a new task's first ``records_n`` training records, then the rest; time to its first answer."""
    head = TaskData(task.name, task.train[:records_n], [])
    rest = TaskData(task.name, task.train[records_n:], task.eval)
    started = time.monotonic()
    produce(bootstrap, topic, records([head]))
    produced = time.monotonic()
    produce(bootstrap, topic, records([rest]))
    version = first_answer(stub, task.name, task.eval[0][0], timeout_s=600)
    seconds = time.monotonic() - started
    acc, versions = accuracy(stub, task)
    return {
        "task": task.name,
        "time_to_adapt_s": round(seconds, 2),
        "produce_s": round(produced - started, 2),
        "first_version": version,
        "first_answer_accuracy": round(acc, 4),
        "versions_measured": sorted(versions),
    }


def served_version(stub: continual_pb2_grpc.ContinualStub, task: str) -> int:
    adapters = stub.ListAdapters(continual_pb2.ListAdaptersRequest()).adapters
    return next(int(a.served_version) for a in adapters if a.task == task)


def run_config(
    name: str,
    overrides: dict[str, Any],
    bootstrap: str,
    workdir: Path,
    data: list[TaskData],
    records_n: int,
    busy_pairs: list[tuple[TaskData, TaskData]],
) -> dict[str, Any]:
    unique = uuid.uuid4().hex[:8]
    settings: Settings = load_settings(
        **overrides,
        kafka_bootstrap=bootstrap,
        kafka_topic=f"adapt-{unique}",
        kafka_dead_letter_topic=f"adapt-{unique}.dlq",
        kafka_group_id=f"adapt-{unique}",
        registry_dir=workdir / name / "registry",
        grpc_port=free_port(),
        trainer_metrics_port=0,
        server_metrics_port=0,
        registry_poll_s=0.2,
    )
    (workdir / name).mkdir(parents=True)
    config = workdir / name / "settings.yaml"
    config.write_text(settings.to_yaml())
    trainer = spawn_role("train", config, workdir / name / "train.log")
    server = spawn_role("serve", config, workdir / name / "serve.log")
    rows: list[dict[str, Any]] = []
    busy_rows: list[dict[str, Any]] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
            stub = continual_pb2_grpc.ContinualStub(channel)
            warm_up, *measured = data
            produce(bootstrap, settings.kafka_topic, records([warm_up]))
            first_answer(stub, warm_up.name, warm_up.eval[0][0], timeout_s=600)
            wait_learned(stub, warm_up)
            console.print(f"[{name}] warmed up on {warm_up.name}")
            for task in measured:
                row = arrive(stub, bootstrap, settings.kafka_topic, task, records_n)
                rows.append(row)
                console.print(f"[{name}] {task.name}: served after {row['time_to_adapt_s']:.1f}s")
                # The next domain arrives once this one is learned, as separate arrivals would.
                wait_learned(stub, task)
            for busy, task in busy_pairs:
                produce(bootstrap, settings.kafka_topic, records([busy]))
                first_answer(stub, busy.name, busy.eval[0][0], timeout_s=600)
                time.sleep(BUSY_DELAY_S)  # its full round is training now
                row = arrive(stub, bootstrap, settings.kafka_topic, task, records_n)
                row["busy_task"] = busy.name
                row["busy_round_running"] = served_version(stub, busy.name) == 1
                busy_rows.append(row)
                seconds = row["time_to_adapt_s"]
                console.print(f"[{name}] {task.name} during {busy.name}'s round: served after {seconds:.1f}s")
                wait_learned(stub, busy)
                wait_learned(stub, task)
    finally:
        for process in (trainer, server):
            process.terminate()
        for process in (trainer, server):
            process.wait(timeout=120)
    times = [r["time_to_adapt_s"] for r in rows]
    result = {
        "settings": overrides,
        "tasks": rows,
        "median_s": round(statistics.median(times), 2),
        "max_s": max(times),
        "mean_first_answer_accuracy": round(statistics.mean(r["first_answer_accuracy"] for r in rows), 4),
    }
    if busy_rows:
        busy_times = [r["time_to_adapt_s"] for r in busy_rows]
        result["busy"] = {
            "tasks": busy_rows,
            "median_s": round(statistics.median(busy_times), 2),
            "max_s": max(busy_times),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3, help="measured domains (after one warm-up)")
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--busy", type=int, default=3, help="(busy domain, new domain) pairs, fast only")
    args = parser.parse_args()
    every = clinc150(CLINC150)
    data = every[: args.tasks + 1]
    rest = every[args.tasks + 1 :]
    pairs = list(zip(rest[0::2], rest[1::2], strict=False))[: args.busy]
    results: dict[str, Any] = {"records": args.records, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="continual-adapt-") as tmp:
        workdir = Path(tmp)
        with LocalKafka(workdir / "kafka") as broker:
            for name, overrides in CONFIGS.items():
                busy = pairs if name == "fast" else []
                run = run_config(name, overrides, broker.bootstrap, workdir, data, args.records, busy)
                results["configs"][name] = run
    fast, baseline = results["configs"]["fast"], results["configs"]["baseline"]
    results["time_to_adapt_s"] = fast["median_s"]
    if "busy" in fast:
        results["time_to_adapt_busy_s"] = fast["busy"]["median_s"]
    results["ratio_fast_vs_baseline"] = round(fast["median_s"] / baseline["median_s"], 3)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    console.print_json(json.dumps(results))


if __name__ == "__main__":
    main()
