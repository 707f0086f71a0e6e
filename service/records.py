"""Message schema v1: decoding and validating one Kafka record (see protos/continual/v1/record.schema.json).

Decoding never raises on bad input: it returns a Rejection with a machine-readable reason (a fixed
code, used as a metric label) and a human-readable detail, which the ingest sends to the dead-letter
topic.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

from service.settings import TASK_NAME

SCHEMA_VERSION = 1
SPLITS = ("train", "eval", "unlabeled")
MAX_ID_CHARS = 256
MAX_LABEL_CHARS = 128

#: Every reason a record can be rejected for; fixed so it can label a metric.
REASONS = (
    "not_utf8",
    "not_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "bad_value",
    "text_too_long",
    "unknown_schema_version",
    "key_mismatch",
    "too_many_labels",
    "missing_label",
    "unexpected_label",
    "no_labelled_records",
)

Split = Literal["train", "eval", "unlabeled"]


@dataclass(frozen=True)
class Record:
    """One valid record: a training example, an eval record, or an unlabeled text.

    ``label`` is None for an unlabeled text, and for an eval record that belongs to none of the
    tasks (an out-of-scope example: ``"label": null``)."""

    id: str
    task: str
    text: str
    label: str | None
    split: Split
    ts: float | None = None

    @property
    def out_of_scope(self) -> bool:
        """An eval record that says its text belongs to none of the tasks."""
        return self.split == "eval" and self.label is None

    def to_json(self) -> bytes:
        """The wire form of this record (schema v1)."""
        body = {
            k: v for k, v in asdict(self).items() if v is not None or (k == "label" and self.out_of_scope)
        }
        return json.dumps(body, ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Rejection:
    """Why a record was not accepted."""

    reason: str
    detail: str

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")


def decode(key: bytes | None, value: bytes | None, max_text_chars: int) -> Record | Rejection:
    """Parse and validate one record's key and value."""
    if value is None:
        return Rejection("not_json", "record has no value (tombstone)")
    try:
        text_value = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection("not_utf8", f"value is not UTF-8: {exc.reason} at byte {exc.start}")
    try:
        body = json.loads(text_value, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        return Rejection("not_json", f"value is not JSON: {exc}")
    if not isinstance(body, dict):
        return Rejection("not_object", f"value is a JSON {type(body).__name__}, not an object")
    return _validate(key, body, max_text_chars)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _validate(key: bytes | None, body: dict[str, Any], max_text_chars: int) -> Record | Rejection:
    version = body.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        return Rejection("unknown_schema_version", f"schema_version {version!r} is not {SCHEMA_VERSION}")
    # An unlabeled record carries no label; a train record needs one and an eval record one or null.
    required = ("id", "task", "text", "split") + (("label",) if body.get("split") != "unlabeled" else ())
    missing = [name for name in required if name not in body]
    if missing:
        return Rejection("missing_field", f"missing field(s): {', '.join(missing)}")
    for name in ("id", "task", "text", "split", "label"):
        if name in body and not isinstance(body[name], str) and not (name == "label" and body[name] is None):
            return Rejection(
                "wrong_type", f"field {name!r} must be a string, got {type(body[name]).__name__}"
            )
    ts = body.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts)):
        return Rejection("wrong_type", f"field 'ts' must be a finite number, got {ts!r}")

    record_id, task, text, split = (body[n] for n in ("id", "task", "text", "split"))
    label = body.get("label")
    if not record_id or len(record_id) > MAX_ID_CHARS:
        return Rejection("bad_value", f"field 'id' must have 1 to {MAX_ID_CHARS} characters")
    if not TASK_NAME.fullmatch(task):
        return Rejection(
            "bad_value", f"task {task[:80]!r} must match {TASK_NAME.pattern} (it names an adapter)"
        )
    if key is not None and key != task.encode("utf-8"):
        shown = key[:80].decode("utf-8", errors="replace")
        return Rejection("key_mismatch", f"record key {shown!r} differs from task {task!r}")
    if not text.strip():
        return Rejection("bad_value", "field 'text' is blank")
    if len(text) > max_text_chars:
        return Rejection("text_too_long", f"text has {len(text)} characters, the limit is {max_text_chars}")
    if split not in SPLITS:
        return Rejection("bad_value", f"split {split[:40]!r} is not one of {', '.join(SPLITS)}")
    if split == "unlabeled" and label is not None:
        return Rejection("unexpected_label", "an unlabeled record carries a label: send it as train or eval")
    if split == "train" and label is None:
        return Rejection("missing_label", "a train record needs a label (unlabeled texts: split unlabeled)")
    if label is not None and (not label.strip() or len(label) > MAX_LABEL_CHARS):
        return Rejection("bad_value", f"field 'label' must have 1 to {MAX_LABEL_CHARS} visible characters")
    return Record(id=record_id, task=task, text=text, label=label, split=cast(Split, split), ts=ts)
