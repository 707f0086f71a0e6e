"""Property-based: whatever arrives, decoding never raises, and a stream of generated good and bad records
through the real broker and a real trainer loses nothing: every bad record is dead-lettered with the
right reason, every good one is learned, the trainer keeps going."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer

from service.ingest import REASON_HEADER, ensure_topics
from service.records import REASONS, GenerativeRecord, Record, Rejection, decode
from service.registry import Registry
from service.settings import Settings
from tests.helpers import eventually, running_trainer

MAX_TEXT = 200
MAX_LABELS = 5
TASKS = ("alpha", "beta")
WORDS = "apple lion red car piano doctor please tell me about the".split()  # noqa: SIM905


@given(key=st.one_of(st.none(), st.binary(max_size=40)), value=st.one_of(st.none(), st.binary(max_size=400)))
def test_decoding_arbitrary_bytes_never_raises(key: bytes | None, value: bytes | None) -> None:
    result = decode(key, value, MAX_TEXT)
    assert isinstance(result, Record | GenerativeRecord) or result.reason in REASONS


@dataclass(frozen=True)
class Sent:
    """One record as produced, and what the service must make of it."""

    key: bytes
    value: bytes
    #: None for a good record; else the dead-letter reason it must get.
    reason: str | None
    task: str = ""
    label: str = ""
    split: str = ""


def _good(task: str, label: str, split: str, words: list[str], n: int) -> dict[str, object]:
    return {"id": f"r{n}", "task": task, "text": " ".join(words), "label": label, "split": split}


# Mostly good records (labelled; unlabeled texts; eval records of no task), and every reason the
# service can reject one for (those of generative records past decoding: tests/test_generative_stream).
KINDS = (
    ["good"] * 6
    + ["unlabeled", "outside"]
    + [r for r in REASONS if r not in ("too_many_tokens", "kind_mismatch")]
)


def stream_record(rng: random.Random, n: int) -> Sent:
    """One generated record: good (most), or one of every kind of bad."""
    task = rng.choice(TASKS)
    label = rng.choice(["l0", "l1", "l2"])
    split = rng.choice(["train", "train", "eval"])
    body = _good(task, label, split, rng.choices(WORDS, k=rng.randint(1, 8)), n)
    kind = rng.choice(KINDS)
    key = task.encode()
    if kind == "good":
        return Sent(key, json.dumps(body).encode(), None, task, label, split)
    if kind == "unlabeled":
        # Learned from once its task has a label; before that it is dead-lettered (no_labelled_records).
        unlabeled = {k: v for k, v in body.items() if k != "label"} | {"split": "unlabeled"}
        return Sent(key, json.dumps(unlabeled).encode(), "no_labelled_records?", task, "", "unlabeled")
    if kind == "outside":
        outside = {**body, "split": "eval", "label": None}
        return Sent(key, json.dumps(outside).encode(), None, task, "", "outside")
    if kind == "no_labelled_records":
        # A task that never gets a label.
        fresh = {k: v for k, v in body.items() if k != "label"} | {"split": "unlabeled", "task": "fresh"}
        return Sent(b"fresh", json.dumps(fresh).encode(), kind)
    if kind == "too_many_labels":
        # Task "wide" keeps receiving new labels; beyond MAX_LABELS of them each new one is refused.
        wide_label = f"w{rng.randint(0, 12)}"
        wide = {**body, "task": "wide", "label": wide_label}
        return Sent(b"wide", json.dumps(wide).encode(), "too_many_labels?", "wide", wide_label, split)
    junk: object = rng.choice([rng.randint(-5, 5), None, [1, 2], {"a": 1}])
    wrong_field = rng.choice(["id", "text", "label", "split"])
    if wrong_field == "label" and junk is None:
        junk = 7  # a null label is a kind of its own (missing_label, or an out-of-scope eval record)
    value: bytes
    if kind == "not_utf8":
        value = b"\xff\xfe" + rng.randbytes(rng.randint(0, 30))
    elif kind == "not_json":
        value = ("not json " + "".join(rng.choices('{}[]:,"abc 123', k=rng.randint(0, 30)))).encode()
    elif kind == "not_object":
        value = json.dumps(rng.choice([rng.randint(0, 9), [1, 2], "text", True])).encode()
    elif kind == "missing_field":
        dropped = rng.choice(["id", "task", "text", "label", "split"])
        value = json.dumps({k: v for k, v in body.items() if k != dropped}).encode()
    elif kind == "wrong_type":
        value = json.dumps({**body, wrong_field: junk}).encode()
    elif kind == "missing_label":
        value = json.dumps({**body, "split": "train", "label": None}).encode()
    elif kind == "unexpected_label":
        value = json.dumps({**body, "split": "unlabeled"}).encode()
    elif kind == "bad_value":
        value = json.dumps({**body, "split": rng.choice(["test", "TRAIN", "", "validation"])}).encode()
    elif kind == "text_too_long":
        value = json.dumps({**body, "text": "x" * (MAX_TEXT + rng.randint(1, 500))}).encode()
    elif kind == "mixed_kinds":
        value = json.dumps({**body, "prompt": "a prompt beside a text"}).encode()
    elif kind == "unknown_schema_version":
        value = json.dumps({**body, "schema_version": rng.randint(2, 99)}).encode()
    else:  # key_mismatch
        key = b"someone-else"
        value = json.dumps(body).encode()
    return Sent(key, value, kind)


def expected_outcomes(sent: list[Sent]) -> tuple[Counter[str], Counter[tuple[str, str]]]:
    """Dead-letter reasons and learned (task, split) counts, following the label limit in stream order."""
    reasons: Counter[str] = Counter()
    learned: Counter[tuple[str, str]] = Counter()
    labels: dict[str, list[str]] = {}
    for record in sent:
        if record.reason is not None and not record.reason.endswith("?"):
            reasons[record.reason] += 1
            continue
        seen = labels.setdefault(record.task, [])
        if record.split in ("unlabeled", "outside"):
            if record.split == "unlabeled" and not seen:
                reasons["no_labelled_records"] += 1
            else:
                learned[(record.task, record.split)] += 1
            continue
        if record.label not in seen and len(seen) >= MAX_LABELS:
            reasons["too_many_labels"] += 1
            continue
        if record.label not in seen:
            seen.append(record.label)
        learned[(record.task, record.split)] += 1
    return reasons, learned


@pytest.mark.slow
@hypothesis_settings(max_examples=2, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(min_value=0, max_value=2**32 - 1), size=st.integers(min_value=1000, max_value=2500))
def test_a_generated_stream_of_good_and_bad_records_loses_nothing(
    seed: int,
    size: int,
    settings: Settings,
    kafka_bootstrap: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Each example gets its own topic, group and registry.
    unique = tmp_path_factory.mktemp("stream")
    settings = settings.model_copy(
        update={
            "kafka_bootstrap": kafka_bootstrap,
            "kafka_topic": f"{settings.kafka_topic}-{unique.name}",
            "kafka_dead_letter_topic": f"{settings.kafka_dead_letter_topic}-{unique.name}",
            "kafka_group_id": f"{settings.kafka_group_id}-{unique.name}",
            "registry_dir": unique / "registry",
            "max_text_chars": MAX_TEXT,
            "max_labels_per_task": MAX_LABELS,
            "epochs": 1,
        }
    )
    # Thousands of records are too many for hypothesis to draw one by one; it draws the seed and size
    # (and reports them on failure), a seeded generator draws the records.
    rng = random.Random(seed)
    sent = [stream_record(rng, i) for i in range(size)]
    reasons, learned = expected_outcomes(sent)
    ensure_topics(settings)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=20)
    for record in sent:
        producer.send(settings.kafka_topic, key=record.key, value=record.value)
    producer.flush()
    producer.close()

    def checkpointed() -> Counter[tuple[str, str]] | None:
        checkpoint = Registry(settings.registry_dir).read_checkpoint()
        if checkpoint is None or sum(int(o) for o in checkpoint["offsets"].values()) < len(sent):
            return None
        counts: Counter[tuple[str, str]] = Counter()
        for name, task in checkpoint["tasks"].items():
            counts[(name, "train")] += task["train_seen"]
            counts[(name, "eval")] += task["eval_seen"]
            counts[(name, "unlabeled")] += len(task["unlabeled"]) + task["self_training"]["dropped"]
        outside = checkpoint["scope_outside"]
        for (name, _), seen in zip(outside["keys"], outside["seen"], strict=True):
            counts[(name, "outside")] += seen
        return +counts

    with running_trainer(settings) as running:
        absorbed = eventually(
            checkpointed, timeout_s=180, interval_s=0.5, what="the whole stream checkpointed"
        )
        assert running.thread.is_alive()  # the trainer never died
    assert absorbed == +learned

    dead = KafkaConsumer(
        settings.kafka_dead_letter_topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    letters: list = []
    eventually(
        lambda: (
            letters.extend(m for ms in dead.poll(500).values() for m in ms)
            or len(letters) >= sum(reasons.values())
        ),
        timeout_s=60,
    )
    dead.close()
    assert Counter(dict(m.headers)[REASON_HEADER].decode() for m in letters) == reasons
    assert isinstance(decode(b"x", b"{}", MAX_TEXT), Rejection)
