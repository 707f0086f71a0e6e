"""`continual run`: one machine, the whole path — broker, trainer, server, stream, accuracy table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.api import continual_pb2, continual_pb2_grpc
from service.client import address, open_channel
from service.datasets import TaskData, clinc150, records, synthetic
from service.ingest import ensure_topics
from service.kafka_access import client_options
from service.local_kafka import LocalKafka
from service.producer import produce
from service.registry import Registry
from service.settings import Settings


def load_dataset(
    settings: Settings, dataset: str, tasks: int, train_per_label: int, console: Console
) -> tuple[list[TaskData], str]:
    """The task stream to send, and a word for where it came from."""
    if dataset not in ("clinc150", "synthetic"):
        raise ValueError(f"unknown dataset {dataset!r}; use clinc150 or synthetic")
    if dataset == "clinc150" and (settings.clinc150_dir / "data_full.json").is_file():
        data = clinc150(settings.clinc150_dir, train_per_label=train_per_label or None)
        source = f"CLINC150 from {settings.clinc150_dir}"
    else:
        if dataset == "clinc150":
            console.print(
                f"[yellow]CLINC150 not found at {settings.clinc150_dir} (set CONTINUAL_CLINC150_DIR); "
                "streaming the small synthetic dataset instead[/yellow]"
            )
        data = synthetic(num_tasks=tasks or 3, train_per_label=train_per_label or 40)
        source = "synthetic"
    return (data[:tasks] if tasks else data), source


def produce_with_progress(
    settings: Settings, data: list[TaskData], console: Console
) -> Counter[tuple[str, str]]:
    """Send the stream with a progress bar; returns counts by (task, split)."""
    assert settings.kafka_bootstrap is not None
    ensure_topics(settings)
    total = sum(len(t.train) + len(t.eval) for t in data)
    with Progress(
        TextColumn("producing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        bar = progress.add_task("produce", total=total)
        return produce(
            settings.kafka_bootstrap,
            settings.kafka_topic,
            records(data),
            on_sent=lambda _record: progress.advance(bar),
            options=client_options(settings),
        )


def spawn_role(role: str, config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start `continual ROLE --config CONFIG` as its own process, output to ``log_path``.

    CONTINUAL_* variables of this process are not passed on (they would beat the YAML file, which is
    meant to be the one source of the child's settings), and the child never reaches a model hub.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUAL_")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", role, "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_demo(
    settings: Settings,
    dataset: str,
    tasks: int,
    train_per_label: int,
    exit_when_done: bool,
    workdir: Path,
    console: Console,
) -> int:
    """Run everything, wait until every task's served version has absorbed its whole stream."""
    started = time.monotonic()
    workdir = workdir.resolve()
    registry_dir = workdir / "registry"
    shutil.rmtree(registry_dir, ignore_errors=True)  # a demo starts from nothing
    workdir.mkdir(parents=True, exist_ok=True)
    data, source = load_dataset(settings, dataset, tasks, train_per_label, console)
    broker = None
    processes: list[subprocess.Popen[bytes]] = []
    try:
        if settings.kafka_bootstrap is None:
            console.print("starting a local Apache Kafka broker …")
            broker = LocalKafka(workdir / "kafka").start()
        bootstrap = broker.bootstrap if broker else settings.kafka_bootstrap
        settings = settings.model_copy(update={"kafka_bootstrap": bootstrap, "registry_dir": registry_dir})
        config = workdir / "settings.yaml"
        config.touch(mode=0o600)
        config.write_text(settings.to_yaml())
        processes = [
            spawn_role("train", config, workdir / "trainer.log"),
            spawn_role("serve", config, workdir / "server.log"),
        ]
        console.print(
            f"trainer and server started (logs in {workdir}); streaming {len(data)} task(s) of {source}"
        )
        produced = produce_with_progress(settings, data, console)
        results = _follow(settings, data, produced, processes, workdir, console)
        if results is None:
            return 1
        elapsed = time.monotonic() - started
        _report(results, elapsed, source, workdir, console)
        if exit_when_done:
            return 0
        console.print(
            f"serving on {address(settings)} — try: continual predict {json.dumps(data[0].eval[0][0])} "
            f"--target {address(settings)}   (Ctrl-C stops)"
        )
        while all(p.poll() is None for p in processes):
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(processes)
        if broker is not None:
            broker.stop()


def _follow(
    settings: Settings,
    data: list[TaskData],
    produced: Counter[tuple[str, str]],
    processes: list[subprocess.Popen[bytes]],
    workdir: Path,
    console: Console,
) -> list[continual_pb2.AdapterInfo] | None:
    """Show learning progress until each task's served version has seen all its records."""
    expected = {t.name: (produced[(t.name, "train")], produced[(t.name, "eval")]) for t in data}
    total = sum(train for train, _ in expected.values())
    with open_channel(settings) as channel:
        stub = continual_pb2_grpc.ContinualStub(channel)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("learning", total=total)
            while True:
                for process, name in zip(processes, ("trainer", "server"), strict=True):
                    if process.poll() is not None:
                        console.print(f"[red]{name} exited ({process.returncode}):[/red]")
                        console.print(_tail(workdir / f"{name}.log"))
                        return None
                try:
                    adapters = {
                        a.task: a for a in stub.ListAdapters(continual_pb2.ListAdaptersRequest()).adapters
                    }
                except grpc.RpcError:
                    time.sleep(1)  # the server is still loading the base model
                    continue
                learned = sum(
                    min(a.train_records, expected[a.task][0]) for a in adapters.values() if a.task in expected
                )
                done = [t for t in expected if t in adapters and _absorbed(adapters[t]) == expected[t]]
                progress.update(
                    bar, completed=learned, description=f"learning ({len(done)}/{len(expected)} tasks)"
                )
                if len(done) == len(expected):
                    return [adapters[t.name] for t in data]
                time.sleep(1)


def _repeats(info: continual_pb2.AdapterInfo) -> int:
    """Eval records of a served version's task set aside as repeats of its training records."""
    return info.data.exact_duplicate_eval_records + info.data.near_duplicate_eval_records


def _absorbed(info: continual_pb2.AdapterInfo) -> tuple[int, int]:
    """The (train, eval) records a served version was trained and measured after, repeats included."""
    return info.train_records, info.eval_records + _repeats(info)


def _report(
    adapters: list[continual_pb2.AdapterInfo], elapsed: float, source: str, workdir: Path, console: Console
) -> None:
    table = Table(title=f"per-task accuracy on held-out records ({source})")
    for column in ("task", "version", "train", "eval", "accuracy"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for info in adapters:
        table.add_row(
            info.task,
            f"v{info.served_version}",
            str(info.train_records),
            str(info.eval_records),
            f"{info.accuracy:.1%}",
        )
    mean = sum(a.accuracy for a in adapters) / len(adapters)
    table.add_row("mean", "", "", "", f"{mean:.1%}", style="bold")
    Console().print(table)
    console.print(f"stream learned and served in {elapsed:.0f}s")
    summary: dict[str, Any] = {
        "source": source,
        "seconds": round(elapsed, 1),
        "mean_accuracy": mean,
        "tasks": {
            a.task: {
                "version": a.served_version,
                "accuracy": a.accuracy,
                "train": a.train_records,
                "eval": a.eval_records,
                "eval_repeats": _repeats(a),
            }
            for a in adapters
        },
    }
    checkpoint = Registry(workdir / "registry").read_checkpoint() or {}
    matrix = {name: row for name, row in checkpoint.get("accuracy_matrix", [])}
    summary["accuracy_matrix"] = [[name, row] for name, row in matrix.items()]
    (workdir / "results.json").write_text(json.dumps(summary, indent=2))
    _plot(adapters, workdir / "accuracy.png")
    plots = ["accuracy.png"]
    if matrix:
        plot_matrix(matrix, workdir / "accuracy_matrix.png")
        plots.append("accuracy_matrix.png")
    console.print(
        f"results in {workdir / 'results.json'}, plots: {', '.join(str(workdir / p) for p in plots)}"
    )


def _plot(adapters: list[continual_pb2.AdapterInfo], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, len(adapters) * 0.9), 3.5))
    bars = ax.bar([a.task for a in adapters], [a.accuracy * 100 for a in adapters], color="#4c72b0")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("per-task accuracy of the served adapters")
    plt.setp(ax.get_xticklabels(), rotation=40, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_matrix(
    matrix: dict[str, dict[str, float]], path: Path, title: str = "accuracy matrix R[i][j] (%)"
) -> None:
    """A heatmap of the accuracy matrix: rows and columns in the order the tasks were last learned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(matrix)
    grid = np.array([[matrix[i].get(j, np.nan) * 100 for j in tasks] for i in tasks])
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(tasks), 0.8 + 0.6 * len(tasks)))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for (row, column), accuracy in np.ndenumerate(grid):
        if not np.isnan(accuracy):
            ax.text(column, row, f"{accuracy:.0f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(tasks)), tasks, rotation=40, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("accuracy on task")
    ax.set_ylabel("after learning task")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
