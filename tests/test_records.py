"""Message schema v1: every kind of bad record is rejected with the right reason; good ones pass."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from service.records import REASONS, GenerativeRecord, Record, Rejection, decode

GOOD = {"id": "1", "task": "banking", "text": "what is my balance", "label": "balance", "split": "train"}
PAIR = {"id": "2", "task": "dates", "prompt": "Write 3 May 2024 in ISO format.", "response": "2024-05-03"}
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


def test_a_generative_record_decodes_round_trips_and_matches_the_schema() -> None:
    for split in ("train", "eval"):
        body = {**PAIR, "split": split}
        result = decode(b"dates", encode(body), max_text_chars=100)
        assert result == GenerativeRecord(
            id="2", task="dates", prompt=PAIR["prompt"], response="2024-05-03", split=split
        )
        assert decode(b"dates", result.to_json(), max_text_chars=100) == result
        jsonschema.validate(json.loads(result.to_json()), SCHEMA)
        jsonschema.validate(body, SCHEMA)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({**PAIR, "split": "train", "text": "both kinds"}, "mixed_kinds"),
        ({**PAIR, "split": "eval", "label": "x"}, "mixed_kinds"),
        ({k: v for k, v in PAIR.items() if k != "response"} | {"split": "train"}, "missing_field"),
        ({**PAIR, "split": "train", "response": 7}, "wrong_type"),
        ({**PAIR, "split": "train", "prompt": "  "}, "bad_value"),
        ({**PAIR, "split": "unlabeled"}, "bad_value"),
        ({**PAIR, "split": "train", "response": "x" * 101}, "text_too_long"),
        ({**PAIR, "split": "train", "task": "other"}, "key_mismatch"),
    ],
)
def test_bad_generative_records_are_rejected_and_fail_the_schema(
    body: dict[str, object], reason: str
) -> None:
    result = decode(b"dates", encode(body), max_text_chars=100)
    assert isinstance(result, Rejection) and result.reason == reason, result
    if reason not in ("text_too_long", "key_mismatch"):  # limits of settings, and the key: not the schema's
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, SCHEMA)
