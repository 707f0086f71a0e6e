"""The registry: numbered immutable versions, atomic writes, verified loads, an alias that moves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.errors import CorruptVersion, NotFound
from service.registry import WEIGHTS_FILE, Alias, Registry

WEIGHTS = {"lora.a": torch.ones(2, 2), "head.weight": torch.zeros(3, 2), "head.bias": torch.zeros(3)}
EVAL = [("what is my balance", "balance")]


def publish(registry: Registry, task: str = "banking") -> int:
    return registry.publish(task, WEIGHTS, EVAL, {"labels": ["balance"], "metrics": {"accuracy": 1.0}})


def test_versions_count_up_and_round_trip(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    assert [publish(registry), publish(registry), publish(registry, "travel")] == [1, 2, 1]
    assert registry.versions("banking") == [1, 2]
    assert registry.tasks() == ["banking", "travel"]
    manifest = registry.manifest("banking", 2)
    assert (
        manifest["version"] == 2
        and manifest["task"] == "banking"
        and set(manifest["files"])
        == {
            WEIGHTS_FILE,
            "eval.jsonl",
        }
    )
    loaded = registry.load_weights("banking", 2)
    assert all(torch.equal(loaded[k], v) for k, v in WEIGHTS.items())
    assert registry.eval_records("banking", 2) == EVAL


def test_a_version_being_written_is_invisible(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    # What a crash mid-write leaves behind: a staging directory with part of a version in it.
    half = tmp_path / ".tmp" / "crashed"
    half.mkdir()
    (half / WEIGHTS_FILE).write_bytes(b"partial")
    assert registry.versions("banking") == [1]
    assert publish(registry) == 2


def test_a_corrupted_file_is_refused(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    weights = tmp_path / "tasks/banking/versions/000001" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptVersion, match="sha256"):
        registry.load_weights("banking", 1)


def test_the_alias_moves_and_a_pin_stops_promotion(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    assert registry.alias("banking") is None
    publish(registry)
    publish(registry)
    assert registry.promote_unless_pinned("banking", 2, "test")
    assert registry.alias("banking") == Alias(served=2, pinned=False, reason="test")
    registry.set_alias("banking", 1, pinned=True, reason="test")
    assert not registry.promote_unless_pinned("banking", 2, "test")
    assert registry.alias("banking") == Alias(served=1, pinned=True, reason="test")
    with pytest.raises(NotFound):
        registry.set_alias("banking", 9, pinned=False, reason="test")


def test_bad_task_names_never_reach_the_file_system(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    with pytest.raises(NotFound):
        registry.versions("../../etc")


def test_events_record_why_the_alias_moved(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    publish(registry)
    registry.set_alias("banking", 2, pinned=False, reason="gate passed")
    registry.record_event("banking", "candidate", 3, "worse than served")
    registry.set_alias("banking", 1, pinned=True, reason="rollback: bad answers")
    events = registry.events("banking")
    assert [(e["event"], e["version"], e["reason"]) for e in events] == [
        ("alias", 2, "gate passed"),
        ("candidate", 3, "worse than served"),
        ("alias", 1, "rollback: bad answers"),
    ]
    assert events[2]["from_version"] == 2 and events[2]["pinned"] is True


def test_retention_keeps_the_newest_the_served_and_the_protected(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    for _ in range(8):
        publish(registry)
    registry.set_alias("banking", 2, pinned=True, reason="rollback")
    deleted = registry.prune("banking", keep=3, protect={4})
    assert deleted == [1, 3, 5]
    assert registry.versions("banking") == [2, 4, 6, 7, 8]
    assert not any(p.name.startswith("deleted-") for p in (tmp_path / ".tmp").iterdir())
    assert publish(registry) == 9  # numbers are never reused


def test_a_version_knows_the_exact_records_it_was_evaluated_on(tmp_path: Path) -> None:
    """What lets the gate take a served version's accuracy from its manifest instead of measuring again."""
    registry = Registry(tmp_path)
    rows = [("what is my balance", "balance"), ("freeze my card ✓", "freeze"), ("", "balance")]
    version = registry.publish("banking", WEIGHTS, rows, {"labels": ["balance", "freeze"], "metrics": {}})
    assert registry.evaluated_on("banking", version, rows)
    assert registry.eval_records("banking", version) == rows
    assert not registry.evaluated_on("banking", version, rows[:2])
    assert not registry.evaluated_on("banking", version, [rows[1], rows[0], rows[2]])
    assert not registry.evaluated_on("banking", version, [*rows[:2], ("", "freeze")])
