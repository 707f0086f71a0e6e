"""The registry: numbered immutable versions, atomic writes, verified loads, an alias that moves.

Every test runs on both backends: a local directory and a real S3-compatible server (Versity's
gateway, started by the ``s3_server`` fixture), each registry under a prefix of its own.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from service.errors import CorruptVersion, NotFound
from service.local_s3 import LocalS3
from service.object_store import LocalStore
from service.registry import CLAIM_FILE, MANIFEST_FILE, WEIGHTS_FILE, Alias, Registry, open_registry
from service.s3_store import S3Store
from service.settings import Settings, SettingsError

WEIGHTS = {"lora.a": torch.ones(2, 2), "head.weight": torch.zeros(3, 2), "head.bias": torch.zeros(3)}
EVAL = [("what is my balance", "balance")]

#: Makes a new handle on the same registry, as another process or machine would open it.
Opener = Callable[[], Registry]


@pytest.fixture(params=["local", "s3"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    if request.param == "local":
        return lambda: Registry(tmp_path / "registry")
    server: LocalS3 = request.getfixturevalue("s3_server")
    url = f"s3://registry/{uuid.uuid4().hex[:8]}/registry"
    credentials = server.credentials_file(tmp_path / "credentials")

    def open_s3() -> Registry:
        return Registry(S3Store.from_url(url, endpoint=server.endpoint, credentials_file=credentials))

    return open_s3


@pytest.fixture
def registry(opener: Opener) -> Registry:
    return opener()


def publish(registry: Registry, task: str = "banking") -> int:
    return registry.publish(task, WEIGHTS, EVAL, {"labels": ["balance"], "metrics": {"accuracy": 1.0}})


def test_versions_count_up_and_round_trip(registry: Registry) -> None:
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


def test_a_version_being_written_is_invisible_and_its_number_is_not_reused(registry: Registry) -> None:
    publish(registry)
    # What a writer that died mid-version leaves behind: its claim and part of its files, no manifest.
    registry.store.write(f"tasks/banking/versions/000002/{CLAIM_FILE}", b"{}", expect=None)
    registry.store.write(f"tasks/banking/versions/000002/{WEIGHTS_FILE}", b"partial")
    assert registry.versions("banking") == [1]
    with pytest.raises(NotFound):
        registry.manifest("banking", 2)
    assert publish(registry) == 3


def test_a_corrupted_file_is_refused(registry: Registry) -> None:
    publish(registry)
    key = f"tasks/banking/versions/000001/{WEIGHTS_FILE}"
    stored = registry.store.read(key)
    assert stored is not None
    data = bytearray(stored.data)
    data[-1] ^= 0xFF
    registry.store.write(key, bytes(data))
    with pytest.raises(CorruptVersion, match="sha256"):
        registry.load_weights("banking", 1)
    registry.store.delete(key)
    with pytest.raises(CorruptVersion, match="missing"):
        registry.load_weights("banking", 1)


def test_the_alias_moves_and_a_pin_stops_promotion(registry: Registry) -> None:
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


def test_bad_task_names_never_reach_the_storage(registry: Registry) -> None:
    with pytest.raises(NotFound):
        registry.versions("../../etc")


def test_events_record_why_the_alias_moved(registry: Registry) -> None:
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


def test_retention_keeps_the_newest_the_served_and_the_protected(registry: Registry) -> None:
    for _ in range(8):
        publish(registry)
    registry.set_alias("banking", 2, pinned=True, reason="rollback")
    deleted = registry.prune("banking", keep=3, protect={4})
    assert deleted == [1, 3, 5]
    assert registry.versions("banking") == [2, 4, 6, 7, 8]
    left = {key.split("/")[3] for key in registry.store.keys("tasks/banking/versions/")}
    assert left == {"000002", "000004", "000006", "000007", "000008"}  # nothing of a deleted version
    if isinstance(registry.store, LocalStore):
        assert not any((registry.store.root / ".tmp").iterdir())
    assert publish(registry) == 9  # numbers are never reused


def test_a_version_knows_the_exact_records_it_was_evaluated_on(registry: Registry) -> None:
    """What lets the gate take a served version's accuracy from its manifest instead of measuring again."""
    rows = [("what is my balance", "balance"), ("freeze my card ✓", "freeze"), ("", "balance")]
    version = registry.publish("banking", WEIGHTS, rows, {"labels": ["balance", "freeze"], "metrics": {}})
    assert registry.evaluated_on("banking", version, rows)
    assert registry.eval_records("banking", version) == rows
    assert not registry.evaluated_on("banking", version, rows[:2])
    assert not registry.evaluated_on("banking", version, [rows[1], rows[0], rows[2]])
    assert not registry.evaluated_on("banking", version, [*rows[:2], ("", "freeze")])


def test_checkpoint_learner_and_router_round_trip(registry: Registry) -> None:
    assert registry.read_checkpoint() is None and registry.checkpoint_written_at() is None
    first = registry.write_learner(1, {"x": torch.arange(4.0)})
    second = registry.write_learner(2, {"x": torch.arange(5.0)})
    registry.write_checkpoint({"round": 2, "learner": second})
    assert registry.read_checkpoint() == {"round": 2, "learner": second}
    assert registry.checkpoint_written_at() is not None
    registry.prune_learners(keep=second)
    assert torch.equal(registry.read_learner(second)["x"], torch.arange(5.0))
    with pytest.raises(CorruptVersion):
        registry.read_learner(first)
    for round_number in (1, 2, 3):
        registry.write_router(round_number, {"w": torch.full((2,), float(round_number))}, {"rows": []})
    manifest = registry.router_manifest()
    assert manifest is not None and manifest["file"] == "router-000003.safetensors"
    assert torch.equal(registry.load_router(manifest)["w"], torch.full((2,), 3.0))
    assert sorted(registry.store.children("router/")) == [
        "router-000002.safetensors",  # kept: a server may be loading what the last manifest named
        "router-000003.safetensors",
        "router.json",
    ]


def test_each_partitions_trainer_files_are_its_own_and_read_as_one_from_the_root(registry: Registry) -> None:
    # Several trainers in one group: a checkpoint and learner files per partition.
    for partition, task in ((0, "alpha"), (4, "beta")):
        view = registry.for_partition(partition)
        kept = view.write_learner(7, {"x": torch.full((2,), float(partition))})
        view.write_learner(6, {"x": torch.zeros(1)})
        view.prune_learners(keep=kept)  # prunes its own partition's files only
        body = {"round": 7, "learner": kept, "tasks": {task: {"version": 1}}, "offsets": {str(partition): 9}}
        view.write_checkpoint(body)
    for partition in (0, 4):
        view = registry.for_partition(partition)
        assert view.read_checkpoint() is not None and view.checkpoint_written_at() is not None
        learner = view.read_learner("learner-000007.safetensors")
        assert torch.equal(learner["x"], torch.full((2,), float(partition)))
    assert registry.for_partition(1).read_checkpoint() is None
    assert sorted(registry.partition_checkpoints()) == [0, 4]
    merged = registry.read_checkpoint()
    assert merged is not None and merged["partitions"] == [0, 4]
    assert (merged["tasks"], merged["offsets"]) == (
        {"alpha": {"version": 1}, "beta": {"version": 1}},
        {"0": 9, "4": 9},
    )


def test_writers_racing_never_share_a_version_number(opener: Opener) -> None:
    """Two trainers (or a trainer and an operator's tool), each with its own handle, publishing at once."""
    numbers: list[int] = []
    lock = threading.Lock()

    def writer() -> None:
        registry = opener()
        for _ in range(6):
            number = publish(registry)
            with lock:
                numbers.append(number)

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(numbers) == list(range(1, 19))
    registry = opener()
    assert registry.versions("banking") == list(range(1, 19))
    assert all(registry.manifest("banking", n)["version"] == n for n in numbers)


def test_alias_moves_racing_never_lose_one(opener: Opener) -> None:
    """Servers rolling back while the trainer promotes: every move starts from the alias the one
    before it left, so no move is silently overwritten (a lost update would leave two moves with
    the same ``from_version``)."""
    registry = opener()
    for _ in range(24):
        publish(registry)

    def mover(first: int) -> None:
        handle = opener()
        for version in range(first, first + 8):
            handle.set_alias("banking", version, pinned=False, reason=f"move to {version}")

    threads = [threading.Thread(target=mover, args=(first,)) for first in (1, 9, 17)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    moves = [e for e in registry.events("banking") if e["event"] == "alias"]
    assert sorted(e["version"] for e in moves) == list(range(1, 25))
    starts = [e["from_version"] for e in moves]
    assert len(set(starts)) == len(starts) == 24
    # The moves form one chain from nothing to the alias now served.
    ends = {e["version"] for e in moves}
    unmatched = [s for s in starts if s not in ends]
    assert unmatched == [None]
    alias = registry.alias("banking")
    assert alias is not None and alias.served not in set(starts)


def test_the_bucket_is_checked_at_start(settings: Settings, s3_server: LocalS3, tmp_path: Path) -> None:
    """A wrong key or bucket stops the service at start with an error naming the setting."""
    good = settings.model_copy(
        update={
            "registry_url": "s3://registry/checked",
            "registry_s3_endpoint": s3_server.endpoint,
            "registry_s3_credentials_file": s3_server.credentials_file(tmp_path / "credentials"),
        }
    )
    assert open_registry(good).tasks() == []
    wrong_key = tmp_path / "wrong"
    wrong_key.write_text(
        f"[default]\naws_access_key_id = {s3_server.access_key}\naws_secret_access_key = nope\n"
    )
    with pytest.raises(SettingsError, match="registry_url") as error:
        open_registry(good.model_copy(update={"registry_s3_credentials_file": wrong_key}))
    assert "nope" not in str(error.value)
    with pytest.raises(SettingsError, match=r"registry_url.*NoSuchBucket"):
        open_registry(good.model_copy(update={"registry_url": "s3://no-such-bucket/x"}))
    with pytest.raises(SettingsError, match="registry_url"):
        open_registry(good.model_copy(update={"registry_s3_profile": "absent"}))


def test_a_registry_left_on_disk_by_an_older_release_reads_as_before(tmp_path: Path) -> None:
    """Versions written before the object store (a folder renamed into place, no claim file)."""
    old = tmp_path / "tasks" / "banking" / "versions" / "000001"
    publish(Registry(tmp_path / "new"))
    source = tmp_path / "new" / "tasks" / "banking" / "versions" / "000001"
    old.parent.mkdir(parents=True)
    source.rename(old)
    (old / CLAIM_FILE).unlink()
    registry = Registry(tmp_path)
    assert registry.versions("banking") == [1] and (old / MANIFEST_FILE).is_file()
    assert torch.equal(registry.load_weights("banking", 1)["lora.a"], WEIGHTS["lora.a"])
    assert publish(registry) == 2


def test_a_watchers_listing_sees_every_alias_move(opener: Opener) -> None:
    """What a server polls: one listing gives every task and its alias; each move is seen at once,
    pins included, though an unchanged alias is not read again."""
    writer, watcher = opener(), opener()
    for _ in range(3):
        publish(writer)
    publish(writer, "travel")
    assert watcher.aliases() == {"banking": None, "travel": None}
    for version, pinned in ((1, False), (2, False), (3, True), (1, True), (1, False)):
        writer.set_alias("banking", version, pinned=pinned, reason=f"to {version}")
        assert watcher.aliases() == {"banking": Alias(version, pinned, f"to {version}"), "travel": None}
    writer.promote_unless_pinned("travel", 1, "gate")
    assert watcher.aliases()["travel"] == Alias(1, False, "gate")
