"""Crash soak: kill -9 the trainer again and again while a stream of good and bad records arrives, and
restart and kill brokers of a three-node cluster; at the end every record must be learned exactly once.

    .venv/bin/python bench/crash_soak.py [--kills 20] [--two-trainer-kills 12] [--tasks 5] [--seed 0]

A real `continual train` process (tiny BERT base: this checks the mechanics, not accuracy) consumes
from a real three-node Apache Kafka cluster (replication 3, min.insync.replicas 2) started by the
project's scripts. A producer streams a few thousand records over several tasks, with malformed ones
mixed in, while the soak kills the trainer with SIGKILL at random moments and restarts it; a third of
the way through it restarts one broker, two thirds through it kills another with SIGKILL and leaves it
down. Then the trainer runs until it has caught up. A second soak does the same with two trainers
sharing the group (``kafka_group_trainers: several``, six partitions), the kills spread over both.

The proof is in the trainer's durable checkpoint: per task, the train and eval records it has
absorbed must equal what was produced (no loss, no duplicates), and every malformed record must be in
the dead-letter topic. Writes bench/results/crash.json.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from rich.console import Console

from service.checkpoint import checkpointed_counts
from service.datasets import records, synthetic
from service.demo import spawn_role
from service.ingest import ORIGIN_OFFSET_HEADER, ORIGIN_PARTITION_HEADER, committed_offsets, ensure_topics
from service.local_kafka import LocalKafkaCluster
from service.model import save_tiny_model
from service.producer import ReliableProducer
from service.registry import Registry
from service.settings import DEFAULT_BASE_MODEL, Settings, load_settings

RESULTS = Path(__file__).resolve().parent / "results" / "crash.json"
#: Several trainers in one group: each learns the tasks of its partitions (six, to split).
SEVERAL: dict[str, Any] = {
    "kafka_group_trainers": "several",
    "kafka_partitions": 6,
    "kafka_session_timeout_s": 6.0,
}
REPO = Path(__file__).resolve().parents[1]

#: Malformed values mixed into the stream, one kind after another (each has its own DLQ reason).
MALFORMED = [
    b"\xff\xfe not utf-8",
    b"not json",
    b'{"schema_version": 1}',
    b'{"schema_version": 99}',
    b"[1, 2]",
]


@dataclass
class SoakResult:
    """What the soak did and what the trainer's durable checkpoint says it learned."""

    kills: int
    produced: int
    absorbed: int
    dead_lettered: int
    lost: int
    duplicated: int
    broker_restarts: int
    broker_kills: int
    malformed_produced: int = 0
    #: Dead letters in the topic including copies (a crash before a checkpoint re-dead-letters).
    dead_letter_copies: int = 0
    caught_up: bool = False
    wall_s: float = 0.0
    #: Trainers sharing the group (several: each learns the tasks of its partitions).
    trainers: int = 1
    #: Partitions a surviving trainer checkpointed while the killed one, their last writer, was down.
    partitions_taken_over: int = 0
    per_task: dict[str, dict[str, int]] = field(default_factory=dict)


def soak(
    bootstrap: str,
    workdir: Path,
    base_model: str,
    kills: int,
    cluster: LocalKafkaCluster | None = None,
    tasks: int = 5,
    train_per_label: int = 100,
    eval_per_label: int = 20,
    stream_seconds: float = 150.0,
    seed: int = 0,
    say: Callable[[str], None] = print,
    trainers: int = 1,
) -> SoakResult:
    """Run the soak against ``bootstrap`` (with broker restarts and kills when ``cluster`` is given);
    ``trainers`` > 1: that many trainers share the group (``kafka_group_trainers: several``, a topic
    of six partitions), the kills go round them, and after every other kill the killed one stays
    down past the session timeout, so that the others take its partitions over."""
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    unique = uuid.uuid4().hex[:8]
    settings = load_settings(
        base_model=base_model,
        registry_dir=workdir / "registry",
        kafka_bootstrap=bootstrap,
        kafka_topic=f"soak-{unique}",
        kafka_dead_letter_topic=f"soak-{unique}.dlq",
        kafka_group_id=f"soak-{unique}",
        # Static membership: a restarted trainer takes its partitions back without a rebalance wait.
        kafka_group_instance_id="soak-trainer",
        kafka_replication_factor=3 if cluster is not None else 1,
        learning_rate=1e-2,
        head_learning_rate=1e-1,
        lora_dropout=0.0,
        batch_size=16,
        epochs=1,
        round_max_records=150,
        round_idle_s=0.5,
        trainer_metrics_port=0,
        drift_enabled=False,
        **(SEVERAL if trainers > 1 else {}),
    )
    ensure_topics(settings)
    configs = []
    for i in range(trainers):
        member = settings.kafka_group_instance_id if trainers == 1 else f"soak-trainer-{i}"
        configs.append(workdir / f"settings-{i}.yaml")
        configs[i].write_text(settings.model_copy(update={"kafka_group_instance_id": member}).to_yaml())

    data = synthetic(
        num_tasks=tasks, train_per_label=train_per_label, eval_per_label=eval_per_label, seed=seed
    )
    good = list(records(data))
    stream: list[tuple[bytes, bytes]] = [(r.task.encode(), r.to_json()) for r in good]
    malformed = 0
    for i in range(len(good) // 25):  # about 4% bad records, spread through the stream
        stream.insert(rng.randrange(len(stream) + 1), (b"bad", MALFORMED[i % len(MALFORMED)]))
        malformed += 1
    producer_done = threading.Event()
    producer = threading.Thread(
        target=_produce, args=(settings, stream, stream_seconds, producer_done), name="producer"
    )
    producer.start()

    broker_restarts = broker_kills = taken_over = 0
    running = {
        i: spawn_role("train", configs[i], workdir / f"trainer-{i}-start.log") for i in range(trainers)
    }
    for kill in range(kills):
        time.sleep(rng.uniform(4.0, 14.0))
        victim = kill % trainers
        waits_out = trainers > 1 and kill % 2 == 1
        if waits_out:
            # The one that last wrote the most partitions' checkpoints stays down: it has partitions
            # to take over (one that has not closed a round yet would leave nothing to count).
            ready = time.monotonic() + 20.0
            while not _writers(settings) and time.monotonic() < ready:
                time.sleep(0.5)
            written = Counter(_writers(settings).values()).most_common()
            members = {f"soak-trainer-{i}": i for i in range(trainers)}
            victim = next((members[name] for name, _ in written if name in members), victim)
        running[victim].send_signal(signal.SIGKILL)
        running[victim].wait()
        say(f"kill {kill + 1}/{kills}: trainer {victim} killed with SIGKILL")
        if waits_out:
            before = _writers(settings)
            time.sleep(settings.kafka_session_timeout_s + 6.0)  # its partitions go to the others
            gone = f"soak-trainer-{victim}"
            # ...and the others checkpoint them as records arrive (a loaded machine may take a while).
            deadline = time.monotonic() + 30.0
            while True:
                after = _writers(settings)
                taken = sum(before.get(p) == gone != after[p] for p in after)
                if taken or time.monotonic() > deadline or producer_done.is_set():
                    break
                time.sleep(1.0)
            taken_over += taken
        running[victim] = spawn_role("train", configs[victim], workdir / f"trainer-{victim}-{kill:02d}.log")
        if cluster is not None and kill == kills // 3:
            node = cluster.nodes[1]
            node.stop()
            node.start()
            broker_restarts += 1
            say("broker 2 restarted")
        if cluster is not None and kill == 2 * kills // 3:
            cluster.nodes[2].kill()
            broker_kills += 1
            say("broker 3 killed with SIGKILL (stays down)")
    producer.join()
    say(f"stream done: {len(stream)} records; letting the last trainer catch up")

    produced: Counter[tuple[str, str]] = Counter((r.task, r.split) for r in good)
    deadline = time.monotonic() + 600
    caught_up = False
    while time.monotonic() < deadline:
        if _absorbed(settings) == produced and committed_offsets(settings) == _end_offsets(settings):
            caught_up = True
            break
        exited = [i for i, trainer in running.items() if trainer.poll() is not None]
        if exited:
            say(f"trainer {exited[0]} exited with {running[exited[0]].returncode}; see its log in {workdir}")
            break
        time.sleep(1.0)
    time.sleep(3.0)  # anything read twice would show up now
    for trainer in running.values():
        trainer.send_signal(signal.SIGTERM)
    for trainer in running.values():
        trainer.wait(timeout=120)

    absorbed = _absorbed(settings)
    keys = set(produced) | set(absorbed)
    copies, unique_letters = _dead_letters(settings)
    per_task: dict[str, dict[str, int]] = {}
    for task, split in sorted(keys):
        row = per_task.setdefault(task, {})
        row[f"produced_{split}"] = produced[(task, split)]
        row[f"absorbed_{split}"] = absorbed[(task, split)]
    return SoakResult(
        kills=kills,
        produced=sum(produced.values()),
        absorbed=sum(absorbed.values()),
        dead_lettered=unique_letters,
        lost=sum(max(0, produced[k] - absorbed[k]) for k in keys),
        duplicated=sum(max(0, absorbed[k] - produced[k]) for k in keys),
        broker_restarts=broker_restarts,
        broker_kills=broker_kills,
        malformed_produced=malformed,
        dead_letter_copies=copies,
        caught_up=caught_up,
        wall_s=round(time.monotonic() - started, 1),
        per_task=per_task,
        trainers=trainers,
        partitions_taken_over=taken_over,
    )


def _produce(
    settings: Settings, stream: list[tuple[bytes, bytes]], seconds: float, done: threading.Event
) -> None:
    """Send the stream in small bursts spread over ``seconds``, so kills land mid-stream."""
    assert settings.kafka_bootstrap is not None
    producer = ReliableProducer(settings.kafka_bootstrap, "soak-producer")
    bursts = 50
    size = max(1, len(stream) // bursts)
    try:
        for start in range(0, len(stream), size):
            for key, value in stream[start : start + size]:
                producer.send(settings.kafka_topic, key, value, [])
            producer.flush(timeout_s=120)
            time.sleep(seconds / bursts)
    finally:
        producer.close(timeout_s=10)
        done.set()


def _absorbed(settings: Settings) -> Counter[tuple[str, str]]:
    """Per (task, split), the records the trainer's durable checkpoint has absorbed."""
    counts: Counter[tuple[str, str]] = Counter()
    for name, (train, evaluated) in checkpointed_counts(Registry(settings.registry_dir)).items():
        counts[(name, "train")], counts[(name, "eval")] = train, evaluated
    return +counts


def _writers(settings: Settings) -> dict[int, str]:
    """Per partition, the trainer that wrote its checkpoint last (several trainers)."""
    checkpoints = Registry(settings.registry_dir).partition_checkpoints()
    return {p: str(checkpoint.get("writer")) for p, checkpoint in checkpoints.items()}


def _end_offsets(settings: Settings) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    try:
        partitions = [
            TopicPartition(settings.kafka_topic, p)
            for p in consumer.partitions_for_topic(settings.kafka_topic)
        ]
        return {tp.partition: offset for tp, offset in consumer.end_offsets(partitions).items() if offset > 0}
    finally:
        consumer.close()


def _dead_letters(settings: Settings) -> tuple[int, int]:
    """(records in the dead-letter topic, distinct source records among them)."""
    consumer = KafkaConsumer(
        settings.kafka_dead_letter_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
    )
    origins = []
    for message in consumer:
        headers = dict(message.headers)
        origins.append((headers[ORIGIN_PARTITION_HEADER], headers[ORIGIN_OFFSET_HEADER]))
    consumer.close()
    return len(origins), len(set(origins))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=20, help="kills of the one trainer")
    parser.add_argument("--two-trainer-kills", type=int, default=12, help="kills spread over two trainers")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console()
    results: dict[str, SoakResult] = {}
    with tempfile.TemporaryDirectory(prefix="continual-soak-") as tmp:
        workdir = Path(tmp)
        minilm = load_settings(base_model=DEFAULT_BASE_MODEL).base_model_path()
        tiny = save_tiny_model(workdir / "tiny-bert", tokenizer_from=minilm)
        for name, trainers, kills in (
            ("one_trainer", 1, args.kills),
            ("two_trainers", 2, args.two_trainer_kills),
        ):
            console.print(f"{name}: starting a three-node Kafka cluster")
            with LocalKafkaCluster(workdir / f"kafka-{name}", size=3) as cluster:
                results[name] = soak(
                    cluster.bootstrap,
                    workdir / name,
                    str(tiny),
                    kills=kills,
                    cluster=cluster,
                    tasks=args.tasks,
                    seed=args.seed,
                    say=console.print,
                    trainers=trainers,
                )
    # The one-trainer soak's figures at the top (as before), the two-trainer one's beside them.
    body = {**asdict(results["one_trainer"]), "two_trainers": asdict(results["two_trainers"])}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(body, indent=2) + "\n")
    console.print_json(json.dumps(body))
    failed = [
        name
        for name, result in results.items()
        if result.lost
        or result.duplicated
        or not result.caught_up
        or result.dead_lettered != result.malformed_produced
        or result.dead_letter_copies != result.malformed_produced
    ]
    if failed:
        console.print(f"[red]FAILED[/red] {failed}: records lost, duplicated, or not dead-lettered once")
        sys.exit(1)
    console.print(f"[green]OK[/green]: wrote {RESULTS}")


if __name__ == "__main__":
    main()
