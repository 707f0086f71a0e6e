"""The replies of the admin and status calls, built from registry manifests and the trainer's
checkpoint: what a version, an adapter and the learning status look like on the wire. Pure functions,
so the servicer (``service.server``) stays a thin adapter between gRPC and the pool."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.api import continual_pb2
from service.data_health import DataHealth
from service.evaluation import LearningStatus


def version_info(version: int, manifest: Mapping[str, Any], served: int) -> continual_pb2.VersionInfo:
    """One kept version of a task, from its manifest; ``served`` is the version the server answers with."""
    metrics = manifest["metrics"]
    return continual_pb2.VersionInfo(
        version=version,
        created_at=float(manifest["created_at"]),
        accuracy=or_nan(metrics.get("accuracy")),
        macro_accuracy=or_nan(metrics.get("macro_accuracy")),
        train_records=int(metrics["train_records"]),
        eval_records=int(metrics["eval_records"]),
        parent_version=int(manifest.get("parent_version") or 0),
        status="served" if version == served else "candidate",
        base_model=str(manifest.get("base_model", "")),
        strategy=str(manifest.get("strategy", "")),
    )


def served_figures(info: continual_pb2.AdapterInfo, manifest: Mapping[str, Any]) -> None:
    """Fill ``info`` with what the served version's manifest says: accuracy, records, labels, data."""
    metrics = manifest["metrics"]
    info.accuracy = or_nan(metrics.get("accuracy"))
    info.macro_accuracy = or_nan(metrics.get("macro_accuracy"))
    info.train_records = int(metrics["train_records"])
    info.eval_records = int(metrics["eval_records"])
    info.labels.extend(manifest["labels"])
    data = data_health(manifest)
    if data is not None:
        info.data.CopyFrom(data)


def learning_reply(
    status: LearningStatus, manifests: Mapping[str, Mapping[str, Any]]
) -> continual_pb2.LearningStatus:
    """The trainer's learning status, with each task's data judged as its version's manifest says."""
    summary = status.summary
    return continual_pb2.LearningStatus(
        strategy=status.strategy,
        round=status.round,
        acc=or_nan(summary.acc),
        bwt=or_nan(summary.bwt),
        fwt=or_nan(summary.fwt),
        mean_forgetting=or_nan(summary.mean_forgetting),
        tasks=[
            continual_pb2.TaskLearning(
                task=t.task,
                version=t.version,
                accuracy=or_nan(t.accuracy),
                macro_accuracy=or_nan(t.macro_accuracy),
                forgetting=or_nan(summary.forgetting.get(t.task)),
                train_records=t.train_records,
                eval_records=t.eval_records,
                data=data_health(manifests[t.task]),
                kind=t.kind,
                general_probe_accuracy=or_nan(t.general_probe_accuracy),
            )
            for t in status.tasks
        ],
        accuracy_matrix=[
            continual_pb2.AccuracyRow(
                after_task=after,
                cells=[
                    continual_pb2.AccuracyCell(
                        task=t, accuracy=a, macro_accuracy=or_nan(status.macro_matrix.get(after, {}).get(t))
                    )
                    for t, a in row.items()
                ],
            )
            for after, row in status.matrix.items()
        ],
    )


def data_health(manifest: Mapping[str, Any]) -> continual_pb2.DataHealth | None:
    """A version's data judgement (None, an unset field, for versions published before it existed)."""
    health = DataHealth.from_manifest(manifest)
    if health is None:
        return None
    return continual_pb2.DataHealth(
        sufficient=health.sufficient,
        train_records=health.train_records,
        eval_records=health.eval_records,
        min_task_train_records=health.min_task_train_records,
        min_label_train_records=health.min_label_train_records,
        short_labels=[continual_pb2.LabelCount(label=lb, records=n) for lb, n in health.short_labels],
        imbalance_ratio=health.imbalance_ratio,
        exact_duplicate_eval_records=health.exact_duplicates,
        near_duplicate_eval_records=health.near_duplicates,
    )


def or_nan(value: object) -> float:
    """NaN stands for "undefined" in replies (protobuf doubles have no null)."""
    return float(value) if isinstance(value, int | float) else float("nan")
