"""Message schema v1: decoding and validating one Kafka record (see protos/continual/v1/record.schema.json).

A record is of one of two kinds: a classification record (``text``, ``label``) or a generative one
(``prompt``, the ``response`` wanted). A task is of the kind of its first record; the trainer
dead-letters a record of the other kind (``kind_mismatch``) and one over the language model's token
limits (``too_many_tokens``), which need the task and the tokenizer to be judged.

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
    "mixed_kinds",
    "too_many_tokens",
    "kind_mismatch",
)
#: The fields only a generative record has, and those only a classification record has.
GENERATIVE_FIELDS = ("prompt", "response")
CLASSIFICATION_FIELDS = ("text", "label")

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
class GenerativeRecord:
    """One valid generative record: a prompt and the response wanted, to learn from or to judge by."""

    id: str
    task: str
    prompt: str
    response: str
    split: Literal["train", "eval"]
    ts: float | None = None

    def to_json(self) -> bytes:
        """The wire form of this record (schema v1)."""
        body = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(body, ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Rejection:
    """Why a record was not accepted."""

    reason: str
    detail: str

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")


def decode(
    key: bytes | None, value: bytes | None, max_text_chars: int
) -> Record | GenerativeRecord | Rejection:
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


def _validate(
    key: bytes | None, body: dict[str, Any], max_text_chars: int
) -> Record | GenerativeRecord | Rejection:
    version = body.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        return Rejection("unknown_schema_version", f"schema_version {version!r} is not {SCHEMA_VERSION}")
    generative = [name for name in GENERATIVE_FIELDS if name in body]
    if generative:
        classification = [name for name in CLASSIFICATION_FIELDS if name in body]
        if classification:
            return Rejection(
                "mixed_kinds",
                f"a record is classification (text, label) or generative (prompt, response), this one "
                f"has {', '.join(classification)} and {', '.join(generative)}",
            )
        return _validate_generative(key, body, max_text_chars)
    # An unlabeled record carries no label; a train record needs one and an eval record one or null.
    required = ("id", "task", "text", "split") + (("label",) if body.get("split") != "unlabeled" else ())
    missing = [name for name in required if name not in body]
    if missing:
        return Rejection("missing_field", f"missing field(s): {', '.join(missing)}")
    label = body.get("label")
    if label is not None and not isinstance(label, str):
        return Rejection("wrong_type", f"field 'label' must be a string, got {type(label).__name__}")
    rejection = _common(key, body, ("id", "task", "text", "split"))
    if rejection is not None:
        return rejection
    record_id, task, text, split = (str(body[n]) for n in ("id", "task", "text", "split"))
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
    return Record(
        id=record_id, task=task, text=text, label=label, split=cast(Split, split), ts=body.get("ts")
    )


def _common(key: bytes | None, body: dict[str, Any], fields: tuple[str, ...]) -> Rejection | None:
    """The checks every kind of record passes: its ``fields`` present and strings, id, task, key, ts."""
    missing = [name for name in fields if name not in body]
    if missing:
        return Rejection("missing_field", f"missing field(s): {', '.join(missing)}")
    for name in fields:
        if not isinstance(body[name], str):
            return Rejection(
                "wrong_type", f"field {name!r} must be a string, got {type(body[name]).__name__}"
            )
    ts = body.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts)):
        return Rejection("wrong_type", f"field 'ts' must be a finite number, got {ts!r}")
    record_id, task = body["id"], body["task"]
    if not record_id or len(record_id) > MAX_ID_CHARS:
        return Rejection("bad_value", f"field 'id' must have 1 to {MAX_ID_CHARS} characters")
    if not TASK_NAME.fullmatch(task):
        return Rejection(
            "bad_value", f"task {task[:80]!r} must match {TASK_NAME.pattern} (it names an adapter)"
        )
    if key is not None and key != task.encode("utf-8"):
        shown = key[:80].decode("utf-8", errors="replace")
        return Rejection("key_mismatch", f"record key {shown!r} differs from task {task!r}")
    return None


def _validate_generative(
    key: bytes | None, body: dict[str, Any], max_text_chars: int
) -> GenerativeRecord | Rejection:
    rejection = _common(key, body, ("id", "task", "prompt", "response", "split"))
    if rejection is not None:
        return rejection
    prompt, response, split = body["prompt"], body["response"], body["split"]
    for name, value in (("prompt", prompt), ("response", response)):
        if not value.strip():
            return Rejection("bad_value", f"field {name!r} is blank")
        if len(value) > max_text_chars:
            return Rejection(
                "text_too_long", f"{name} has {len(value)} characters, the limit is {max_text_chars}"
            )
    if split not in ("train", "eval"):
        return Rejection("bad_value", f"split {split[:40]!r} of a generative record is not train or eval")
    return GenerativeRecord(
        id=body["id"], task=body["task"], prompt=prompt, response=response, split=split, ts=body.get("ts")
    )
