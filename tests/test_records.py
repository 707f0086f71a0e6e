"""Message schema v1: every kind of bad record is rejected with the right reason; good ones pass."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from service.records import REASONS, Record, Rejection, decode

GOOD = {"id": "1", "task": "banking", "text": "what is my balance", "label": "balance", "split": "train"}
SCHEMA = json.loads(
    (Path(__file__).resolve().parents[1] / "protos/continual/v1/record.schema.json").read_text()
)


def encode(body: object) -> bytes:
    return json.dumps(body).encode()


def test_a_good_record_decodes_and_round_trips() -> None:
    result = decode(b"banking", encode({**GOOD, "ts": 1.5}), max_text_chars=100)
    assert result == Record(
        id="1", task="banking", text="what is my balance", label="balance", split="train", ts=1.5
    )
    assert decode(b"banking", result.to_json(), max_text_chars=100) == result
    jsonschema.validate(json.loads(result.to_json()), SCHEMA)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"banking", b"\xff\xfe not utf-8", "not_utf8"),
        (b"banking", b"{not json", "not_json"),
        (b"banking", b"NaN", "not_json"),
        (b"banking", None, "not_json"),
        (b"banking", b"[1, 2]", "not_object"),
        (b"banking", encode({k: v for k, v in GOOD.items() if k != "label"}), "missing_field"),
        (b"banking", encode({**GOOD, "text": 42}), "wrong_type"),
        (b"banking", encode({**GOOD, "ts": "yesterday"}), "wrong_type"),
        (b"banking", encode({**GOOD, "text": "   "}), "bad_value"),
        (b"banking", encode({**GOOD, "split": "test"}), "bad_value"),
        (b"../etc", encode({**GOOD, "task": "../etc"}), "bad_value"),
        (b"banking", encode({**GOOD, "text": "x" * 101}), "text_too_long"),
        (b"banking", encode({**GOOD, "schema_version": 2}), "unknown_schema_version"),
        (b"travel", encode(GOOD), "key_mismatch"),
        (b"banking", encode({**GOOD, "label": None}), "missing_label"),
        (b"banking", encode({**GOOD, "split": "unlabeled"}), "unexpected_label"),
        (
            b"banking",
            encode({k: v for k, v in GOOD.items() if k != "label"} | {"split": "eval"}),
            "missing_field",
        ),
    ],
)
def test_bad_records_are_rejected_with_their_reason(key: bytes, value: bytes | None, reason: str) -> None:
    result = decode(key, value, max_text_chars=100)
    assert isinstance(result, Rejection), result
    assert result.reason == reason
    assert result.detail  # a human-readable explanation goes with every rejection


def test_unlabeled_texts_and_out_of_scope_eval_records_decode_and_round_trip() -> None:
    unlabeled = {k: v for k, v in GOOD.items() if k != "label"} | {"split": "unlabeled"}
    outside = {**GOOD, "split": "eval", "label": None}
    for body, split in (
        (unlabeled, "unlabeled"),
        ({**unlabeled, "label": None}, "unlabeled"),
        (outside, "eval"),
    ):
        result = decode(b"banking", encode(body), max_text_chars=100)
        assert isinstance(result, Record) and result.label is None and result.split == split
        assert result.out_of_scope == (split == "eval")
        assert decode(b"banking", result.to_json(), max_text_chars=100) == result
        jsonschema.validate(json.loads(result.to_json()), SCHEMA)
        jsonschema.validate(body, SCHEMA)


def test_records_the_service_rejects_also_fail_the_published_schema() -> None:
    unlabeled_with_label = {**GOOD, "split": "unlabeled"}
    train_without_label = {**GOOD, "label": None}
    eval_without_label = {k: v for k, v in GOOD.items() if k != "label"} | {"split": "eval"}
    for body in (
        {**GOOD, "split": "test"},
        {**GOOD, "schema_version": 2},
        {**GOOD, "task": "a/b"},
        unlabeled_with_label,
        train_without_label,
        eval_without_label,
    ):
        assert isinstance(decode(None, encode(body), 100), Rejection)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, SCHEMA)


def test_rejection_reasons_are_a_closed_set() -> None:
    with pytest.raises(ValueError, match="unknown rejection reason"):
        Rejection("whatever", "x")
    assert len(set(REASONS)) == len(REASONS)
