"""The `continual` command line: train, serve, run (the demo), produce, predict, adapters, report."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from service.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from service.registry import Registry

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
adapters_app = typer.Typer(
    no_args_is_help=True,
    help="List and inspect adapters, roll back, promote (admin calls send CONTINUAL_ADMIN_TOKEN).",
)
app.add_typer(adapters_app, name="adapters")
console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file (CONTINUAL_* variables win).")
]
TargetOption = Annotated[
    str | None, typer.Option("--target", help="host:port of a server (default: the settings' grpc address).")
]


def _or_exit(make: Callable[[], T]) -> T:
    """``make()``; a SettingsError (it names the setting) is printed and the command exits 2."""
    try:
        return make()
    except SettingsError as exc:
        console.print(f"[red]settings error:[/red] {exc}")
        raise typer.Exit(2) from None


def _settings(config: Path | None, **overrides: Any) -> Settings:
    return _or_exit(lambda: load_settings(config, **overrides))


def _check_kafka_access(settings: Settings) -> None:
    """Exit 2 with a message naming the setting if the brokers refuse our password or certificate."""
    from service.kafka_access import check_access

    _or_exit(lambda: check_access(settings))


def _check_sole_trainer(settings: Settings) -> None:
    """Exit 2 with a message naming kafka_group_id if another trainer holds the group."""
    from service.trainer_group import ensure_sole_trainer

    _or_exit(lambda: ensure_sole_trainer(settings))


def _open_registry(settings: Settings) -> Registry:
    """The settings' registry; exit 2 with a message naming the setting if its bucket refuses us."""
    from service.registry import open_registry

    return _or_exit(lambda: open_registry(settings))


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        logging.getLogger("continual").info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    logging.basicConfig(
        level=log_level.upper(),
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    # kafka-python warns on every metadata retry while a broker starts; its errors still show.
    logging.getLogger("kafka").setLevel(logging.ERROR)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


@app.command()
def train(config: ConfigOption = None) -> None:
    """Consume the training topic, learn every task, publish versions to the registry."""
    from prometheus_client import CollectorRegistry

    from service.ingest import Ingest, ensure_topics
    from service.metrics import TrainerMetrics, serve_metrics
    from service.trainer import Trainer

    settings = _settings(config)
    if settings.kafka_bootstrap is None:
        console.print(
            "[red]settings error:[/red] kafka_bootstrap: CONTINUAL_KAFKA_BOOTSTRAP is required to train"
        )
        raise typer.Exit(2)
    stop = _stop_on_signals()
    metrics = TrainerMetrics(CollectorRegistry(), settings.strategy)
    port = serve_metrics(metrics.registry, settings.metrics_host, settings.trainer_metrics_port)
    _check_kafka_access(settings)
    registry = _open_registry(settings)
    say = logging.getLogger("continual").info
    if settings.kafka_group_trainers == "several":
        from service.partition_trainers import PartitionTrainers

        trainers = _or_exit(lambda: PartitionTrainers(settings, registry, metrics))
        ensure_topics(settings)
        # Each partition's learner and dead letters are read back when Kafka assigns the partition.
        ingest = Ingest(settings, metrics, {}, read_back=False)
        say("training %s's partitions, one of several trainers (metrics on :%d)", settings.kafka_topic, port)
        trainers.run(ingest, stop)
        return
    _check_sole_trainer(settings)
    trainer = Trainer(settings, registry, metrics)
    ensure_topics(settings)
    ingest = Ingest(settings, metrics, trainer.durability.offsets, registry.checkpoint_written_at())
    say("training from %s topic %s (metrics on :%d)", settings.kafka_bootstrap, settings.kafka_topic, port)
    trainer.run(ingest, stop)


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Serve every task's current adapter over gRPC, following the registry."""
    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. A server's threads that
    # touch torch each get a team, and spinning teams starved the engine's forwards (measured: one
    # client 5 answers/s with spinning, 49/s without, on 2 cores).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from service.server import start_server

    settings = _settings(config)
    _or_exit(settings.check_serving)
    registry = _open_registry(settings)
    stop = _stop_on_signals()
    server = start_server(settings, registry=registry)
    stop.wait()
    server.stop()


@app.command()
def produce(
    dataset: Annotated[str, typer.Option(help="clinc150 or synthetic.")] = "clinc150",
    tasks: Annotated[int, typer.Option(help="Only the first N tasks (0: all).")] = 0,
    train_per_label: Annotated[int, typer.Option(help="Training examples per label (0: all).")] = 0,
    config: ConfigOption = None,
) -> None:
    """Stream a dataset into the training topic, one task after another."""
    from service.demo import load_dataset, produce_with_progress

    settings = _settings(config)
    if settings.kafka_bootstrap is None:
        console.print("[red]settings error:[/red] kafka_bootstrap: CONTINUAL_KAFKA_BOOTSTRAP is required")
        raise typer.Exit(2)
    _check_kafka_access(settings)
    data, _source = load_dataset(settings, dataset, tasks, train_per_label, console)
    produce_with_progress(settings, data, console)


@app.command()
def predict(
    text: str,
    task: Annotated[str, typer.Option(help="The task; without it the server infers the task.")] = "",
    top_k: Annotated[int, typer.Option("--top-k")] = 3,
    target: TargetOption = None,
    config: ConfigOption = None,
) -> None:
    """Classify TEXT with a task's served adapter."""
    from service.client import call

    settings = _settings(config)
    response = call(settings, target, "Predict", task=task, text=text, top_k=top_k)
    inferred = f" (inferred, {response.task_confidence:.0%} sure)" if response.task_inferred else ""
    if response.out_of_scope:
        inferred += " — out of scope: none of the served tasks; best guess below"
    table = Table(title=f"{response.task} v{response.version}{inferred}")
    table.add_column("label")
    table.add_column("score", justify="right")
    for scored in response.top_k:
        table.add_row(scored.label, f"{scored.score:.3f}")
    Console().print(table)


@app.command()
def generate(
    prompt: str,
    task: Annotated[
        str, typer.Option(help="A generative task; without it the language model alone answers.")
    ] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="0: the server's limit.")] = 0,
    temperature: Annotated[float, typer.Option(help="0: greedy.")] = 0.0,
    target: TargetOption = None,
    config: ConfigOption = None,
) -> None:
    """Answer PROMPT with a generative task's served adapter, printing the text as it is generated."""
    from service.client import stream

    stream(
        _settings(config),
        target,
        task=task,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )


@app.command()
def status(target: TargetOption = None, config: ConfigOption = None) -> None:
    """How well the stream is learned: ACC, BWT, FWT, forgetting and the accuracy matrix."""
    from service.client import call, learning_tables

    settings = _settings(config)
    out = Console()
    for table in learning_tables(call(settings, target, "GetLearningStatus")):
        out.print(table)


@adapters_app.command("list")
def adapters_list(target: TargetOption = None, config: ConfigOption = None) -> None:
    """Every task with its served and latest versions."""
    from service.client import adapters_table, call

    settings = _settings(config)
    Console().print(adapters_table(call(settings, target, "ListAdapters").adapters))


@adapters_app.command("show")
def adapters_show(task: str, target: TargetOption = None, config: ConfigOption = None) -> None:
    """One task: served version and why, every kept version, recent history."""
    from service.client import adapters_table, call, history_table, versions_table

    settings = _settings(config)
    detail = call(settings, target, "GetAdapter", task=task)
    out = Console()
    out.print(adapters_table([detail.adapter]))
    out.print(versions_table(call(settings, target, "ListVersions", task=task)))
    out.print(history_table(detail))


@adapters_app.command("rollback")
def adapters_rollback(
    task: str,
    version: Annotated[int, typer.Option(help="Version to serve (0: the one before the served one).")] = 0,
    reason: Annotated[str, typer.Option(help="Why, for the task's history.")] = "",
    target: TargetOption = None,
    config: ConfigOption = None,
) -> None:
    """Serve an earlier version of TASK and pin it there."""
    from service.client import adapters_table, call

    settings = _settings(config)
    info = call(settings, target, "Rollback", task=task, version=version, reason=reason)
    Console().print(adapters_table([info]))


@adapters_app.command("promote")
def adapters_promote(
    task: str,
    version: Annotated[int, typer.Option(help="Version to serve (0: the latest).")] = 0,
    reason: Annotated[str, typer.Option(help="Why, for the task's history.")] = "",
    target: TargetOption = None,
    config: ConfigOption = None,
) -> None:
    """Serve a version of TASK (the latest by default) and unpin it."""
    from service.client import adapters_table, call

    settings = _settings(config)
    info = call(settings, target, "Promote", task=task, version=version, reason=reason)
    Console().print(adapters_table([info]))


@app.command()
def report(
    task: str,
    version: Annotated[int, typer.Option(help="The version (0: the served one, or the latest).")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Write report.md and its figures into this folder instead.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """A version's report: accuracy per label, confused labels, wrong answers, data, change from served.

    Read from the registry (``registry_dir`` or ``registry_url``), where the trainer writes it with
    every version.
    """
    from service.errors import NotFound
    from service.report import REPORT_FILE, render

    settings = _settings(config)
    if settings.registry_url is None and not (settings.registry_dir / "tasks").is_dir():
        console.print(f"[red]not found:[/red] no registry in {settings.registry_dir} (registry_dir)")
        raise typer.Exit(1)
    registry = _open_registry(settings)
    alias = registry.alias(task)
    versions = registry.versions(task)
    chosen = version or (alias.served if alias is not None else max(versions, default=0))
    try:
        found = registry.report(task, chosen)
        # A version written before reports existed: made now from its manifest, without comparison.
        markdown, figures = found if found is not None else render(registry.manifest(task, chosen), None)
    except NotFound:
        console.print(f"[red]not found:[/red] {task} v{chosen} in {registry.describe()}")
        raise typer.Exit(1) from None
    if out is None:
        typer.echo(markdown, nl=False)
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(markdown)
    for name, content in figures.items():
        (out / name).write_bytes(content)
    console.print(f"wrote {out / REPORT_FILE} and {len(figures)} figure(s)")


@app.command()
def run(
    dataset: Annotated[
        str, typer.Option(help="clinc150 (falls back to synthetic if absent) or synthetic.")
    ] = "clinc150",
    tasks: Annotated[int, typer.Option(help="Only the first N tasks (0: all).")] = 0,
    train_per_label: Annotated[int, typer.Option(help="Training examples per label (0: all).")] = 0,
    exit_when_done: Annotated[bool, typer.Option(help="Stop once the stream is learned.")] = False,
    workdir: Annotated[Path, typer.Option(help="Registry, broker data and results.")] = Path(
        ".continual/demo"
    ),
    config: ConfigOption = None,
) -> None:
    """The demo: local broker, trainer and server, the stream, live progress, the accuracy table."""
    from service.demo import run_demo

    settings = _settings(config)
    code = run_demo(settings, dataset, tasks, train_per_label, exit_when_done, workdir, console)
    raise typer.Exit(code)


def main() -> None:
    """Entry point of the `continual` script."""
    # Models come from local folders only; make the libraries fail fast rather than reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    app(prog_name="continual")


if __name__ == "__main__":
    main()
