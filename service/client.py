"""A small gRPC client for the CLI: one call, errors printed as status code and message."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import grpc
import typer
from rich.console import Console
from rich.table import Table

from service.api import continual_pb2, continual_pb2_grpc
from service.data_health import DataHealth
from service.settings import Settings

_REQUESTS = {
    "Predict": continual_pb2.PredictRequest,
    "ListAdapters": continual_pb2.ListAdaptersRequest,
    "Rollback": continual_pb2.RollbackRequest,
    "Promote": continual_pb2.PromoteRequest,
    "ListVersions": continual_pb2.ListVersionsRequest,
    "GetAdapter": continual_pb2.GetAdapterRequest,
    "GetLearningStatus": continual_pb2.LearningStatusRequest,
    "Generate": continual_pb2.GenerateRequest,
}


def address(settings: Settings, target: str | None = None) -> str:
    """The server address to call: ``target`` if given, else the settings' gRPC address."""
    return target or f"{settings.grpc_host}:{settings.grpc_port}"


def open_channel(settings: Settings, target: str | None = None) -> grpc.Channel:
    """A channel to the server: TLS when the settings name a CA to trust (presenting the client
    certificate when one is set, for mutual TLS), plaintext otherwise."""
    if settings.tls_ca_file is not None:
        cert, key = settings.tls_client_cert_file, settings.tls_client_key_file
        credentials = grpc.ssl_channel_credentials(
            root_certificates=settings.tls_ca_file.read_bytes(),
            private_key=key.read_bytes() if key is not None else None,
            certificate_chain=cert.read_bytes() if cert is not None else None,
        )
        return grpc.secure_channel(address(settings, target), credentials)
    return grpc.insecure_channel(address(settings, target))


def admin_metadata(settings: Settings) -> list[tuple[str, str]]:
    """The call metadata that admin calls need when an admin token is configured."""
    if settings.admin_token is None:
        return []
    return [("authorization", f"Bearer {settings.admin_token.get_secret_value()}")]


def call(settings: Settings, target: str | None, method: str, timeout_s: float = 30.0, **fields: Any) -> Any:
    """Make one call; on an error status print it and exit with status 1."""
    with open_channel(settings, target) as channel:
        stub = continual_pb2_grpc.ContinualStub(channel)
        try:
            return getattr(stub, method)(
                _REQUESTS[method](**fields), timeout=timeout_s, metadata=admin_metadata(settings)
            )
        except grpc.RpcError as exc:
            Console(stderr=True).print(f"[red]{exc.code().name}[/red]: {exc.details()}")
            raise typer.Exit(1) from None


def stream(settings: Settings, target: str | None, timeout_s: float = 300.0, **fields: Any) -> None:
    """Generate, printing the text as it comes, then the task, version and why it ended (on stderr);
    on an error status print it and exit with status 1."""
    out, notes = Console(highlight=False), Console(stderr=True, highlight=False)
    with open_channel(settings, target) as channel:
        stub = continual_pb2_grpc.ContinualStub(channel)
        try:
            for reply in stub.Generate(continual_pb2.GenerateRequest(**fields), timeout=timeout_s):
                out.print(reply.text, end="", markup=False)
                if reply.done:
                    answered = (
                        f"{reply.task} v{reply.version}" if reply.version else "the language model alone"
                    )
                    out.print()
                    notes.print(f"[dim]{answered}: {reply.finish_reason}, {reply.tokens} tokens[/dim]")
        except grpc.RpcError as exc:
            notes.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
            raise typer.Exit(1) from None


def adapters_table(adapters: Sequence[continual_pb2.AdapterInfo]) -> Table:
    """A table of adapters: served and latest versions, pin, accuracy and record counts."""
    table = Table(title="adapters")
    for column in ("task", "served", "latest", "pinned", "accuracy", "macro", "train", "eval", "labels"):
        table.add_column(column, justify="left" if column == "task" else "right")
    table.add_column("data")
    table.add_column("imbalance", justify="right")
    for info in adapters:
        table.add_row(
            info.task,
            f"v{info.served_version}",
            f"v{info.latest_version}",
            "yes" if info.pinned else "",
            "-" if math.isnan(info.accuracy) or not info.eval_records else f"{info.accuracy:.1%}",
            _percent(info.macro_accuracy),
            str(info.train_records),
            str(info.eval_records),
            str(len(info.labels)),
            *_data_cells(info),
        )
    return table


def versions_table(response: continual_pb2.ListVersionsResponse) -> Table:
    """A table of a task's kept versions, newest first."""
    table = Table(title=f"{response.task}: versions")
    for column in ("version", "status", "created", "accuracy", "macro", "train", "eval", "parent"):
        table.add_column(column, justify="right")
    for v in response.versions:
        table.add_row(
            f"v{v.version}",
            v.status,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at)),
            "-" if math.isnan(v.accuracy) else f"{v.accuracy:.1%}",
            _percent(v.macro_accuracy),
            str(v.train_records),
            str(v.eval_records),
            f"v{v.parent_version}" if v.parent_version else "-",
        )
    return table


def history_table(detail: continual_pb2.AdapterDetail) -> Table:
    """A table of a task's recent events, oldest first."""
    table = Table(title=f"{detail.adapter.task}: history (served because: {detail.alias_reason or '-'})")
    for column in ("at", "event", "version", "reason"):
        table.add_column(column)
    for e in detail.history:
        table.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at)), e.event, f"v{e.version}", e.reason
        )
    return table


def _data_cells(holder: continual_pb2.AdapterInfo | continual_pb2.TaskLearning) -> tuple[str, str]:
    """The "data" and "imbalance" cells: whether the version's training data was enough, and its
    largest label over its smallest ("-" for versions published before the service judged it)."""
    if not holder.HasField("data"):
        return "-", "-"
    data = holder.data
    health = DataHealth(
        train_records=data.train_records,
        eval_records=data.eval_records,
        min_task_train_records=data.min_task_train_records,
        min_label_train_records=data.min_label_train_records,
        short_labels=tuple((c.label, c.records) for c in data.short_labels),
        imbalance_ratio=data.imbalance_ratio,
        exact_duplicates=data.exact_duplicate_eval_records,
        near_duplicates=data.near_duplicate_eval_records,
    )
    return health.summary(), f"{health.imbalance_ratio:.1f}:1"


def _percent(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "-"
    return f"{value * 100:+.1f}" if signed else f"{value:.1%}"


def learning_tables(status: continual_pb2.LearningStatus) -> list[Table]:
    """The learning summary, per-task figures and the accuracy matrix, as tables."""
    summary = Table(title=f"learning ({status.strategy or 'no checkpoint yet'}, round {status.round})")
    for column in ("ACC", "BWT (points)", "FWT (points)", "mean forgetting (points)"):
        summary.add_column(column, justify="right")
    summary.add_row(
        _percent(status.acc),
        _percent(status.bwt, signed=True),
        _percent(status.fwt, signed=True),
        _percent(status.mean_forgetting, signed=True),
    )
    tasks = Table(title="tasks")
    for column in ("task", "version", "accuracy", "macro", "forgetting (points)", "train", "eval"):
        tasks.add_column(column, justify="left" if column == "task" else "right")
    tasks.add_column("data")
    tasks.add_column("imbalance", justify="right")
    if any(t.kind for t in status.tasks):
        tasks.caption = (
            "generative tasks (*): accuracy is exact match; probe: the general probe's share right"
        )
    for t in status.tasks:
        generative = f"* (probe {_percent(t.general_probe_accuracy)})" if t.kind else ""
        tasks.add_row(
            f"{t.task} {generative}".strip(),
            f"v{t.version}",
            _percent(t.accuracy),
            _percent(t.macro_accuracy),
            _percent(t.forgetting, signed=True),
            str(t.train_records),
            str(t.eval_records),
            *_data_cells(t),
        )
    columns = [row.after_task for row in status.accuracy_matrix]
    matrix = Table(title="accuracy matrix, micro / macro (row: after learning; column: accuracy on)")
    matrix.add_column("after \\ on")
    for name in columns:
        matrix.add_column(name, justify="right")
    for row in status.accuracy_matrix:
        cells = {c.task: f"{_percent(c.accuracy)} / {_percent(c.macro_accuracy)}" for c in row.cells}
        matrix.add_row(row.after_task, *(cells.get(n, "") for n in columns))
    return [summary, tasks, matrix]
