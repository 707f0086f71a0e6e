"""A small gRPC client for the CLI: one call, errors printed as status code and message."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import typer
from rich.console import Console
from rich.table import Table

from service.api import continual_pb2, continual_pb2_grpc
from service.settings import Settings

_REQUESTS = {
    "Predict": continual_pb2.PredictRequest,
    "ListAdapters": continual_pb2.ListAdaptersRequest,
    "Rollback": continual_pb2.RollbackRequest,
    "Promote": continual_pb2.PromoteRequest,
}


def address(settings: Settings, target: str | None = None) -> str:
    """The server address to call: ``target`` if given, else the settings' gRPC address."""
    return target or f"{settings.grpc_host}:{settings.grpc_port}"


def call(settings: Settings, target: str | None, method: str, timeout_s: float = 30.0, **fields: Any) -> Any:
    """Make one call; on an error status print it and exit with status 1."""
    with grpc.insecure_channel(address(settings, target)) as channel:
        stub = continual_pb2_grpc.ContinualStub(channel)
        try:
            return getattr(stub, method)(_REQUESTS[method](**fields), timeout=timeout_s)
        except grpc.RpcError as exc:
            Console(stderr=True).print(f"[red]{exc.code().name}[/red]: {exc.details()}")
            raise typer.Exit(1) from None


def adapters_table(adapters: Sequence[continual_pb2.AdapterInfo]) -> Table:
    """A table of adapters: served and latest versions, pin, accuracy and record counts."""
    table = Table(title="adapters")
    for column in ("task", "served", "latest", "pinned", "accuracy", "train", "eval", "labels"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for info in adapters:
        table.add_row(
            info.task,
            f"v{info.served_version}",
            f"v{info.latest_version}",
            "yes" if info.pinned else "",
            f"{info.accuracy:.1%}" if info.eval_records else "-",
            str(info.train_records),
            str(info.eval_records),
            str(len(info.labels)),
        )
    return table
