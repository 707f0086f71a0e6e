"""Task streams to feed the service: CLINC150 (one task per domain) and a small synthetic stream.

Nothing here touches Kafka; ``service.producer`` sends what these functions return.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.records import Record, Split


@dataclass(frozen=True)
class TaskData:
    """One task's labelled examples: what to learn from and what to measure it on."""

    name: str
    train: list[tuple[str, str]]
    eval: list[tuple[str, str]]


def clinc150(
    path: Path,
    domains: Sequence[str] | None = None,
    train_per_label: int | None = None,
    seed: int = 0,
    eval_splits: Sequence[str] = ("val", "test"),
    tasks_file: Path | None = None,
) -> list[TaskData]:
    """CLINC150 as one task per domain, in the order of ``domains.json``; ``eval_splits`` become eval.

    ``tasks_file`` groups the labels into tasks another way (the same layout: task name → labels);
    ``path`` may hold any data of CLINC150's layout (``data_full.json``: split → [text, label] lists).

    The file lists examples grouped by intent; within a task both splits are shuffled (seeded), as a
    real stream of one domain's requests would arrive. ``train_per_label`` keeps only the first N training
    examples of each intent (for quick runs).
    """
    rng = random.Random(seed)
    data = json.loads((path / "data_full.json").read_text())
    domain_intents: dict[str, list[str]] = json.loads((tasks_file or path / "domains.json").read_text())
    chosen = list(domains) if domains is not None else list(domain_intents)
    unknown = [d for d in chosen if d not in domain_intents]
    if unknown:
        raise ValueError(f"unknown task(s): {', '.join(unknown)}")
    tasks = []
    for domain in chosen:
        intents = set(domain_intents[domain])
        train = [(text, label) for text, label in data["train"] if label in intents]
        if train_per_label is not None:
            counts: dict[str, int] = {}
            kept = []
            for text, label in train:
                counts[label] = counts.get(label, 0) + 1
                if counts[label] <= train_per_label:
                    kept.append((text, label))
            train = kept
        rng.shuffle(train)
        held_out = [(text, label) for split in eval_splits for text, label in data[split] if label in intents]
        rng.shuffle(held_out)
        tasks.append(TaskData(name=domain, train=train, eval=held_out))
    return tasks


# Words that are single tokens in BERT's uncased vocabulary: keywords mark a label, fillers are noise.
_KEYWORDS = """
    apple banana cherry grape lemon mango melon peach pear plum
    lion tiger zebra horse camel eagle shark whale snake mouse
    red blue green yellow purple orange brown black white pink
    car train plane boat truck bus bicycle rocket ship taxi
    piano guitar violin drum flute trumpet harp organ cello bell
    doctor lawyer farmer teacher pilot nurse chef judge artist baker
""".split()  # noqa: SIM905 (a word list reads better as text)
_FILLERS = """
    please tell me about the a my your this that some any more less now today really just
    could would should can will know want need find show give see
""".split()  # noqa: SIM905


def synthetic(
    num_tasks: int = 3,
    labels_per_task: int = 4,
    train_per_label: int = 40,
    eval_per_label: int = 10,
    seed: int = 0,
) -> list[TaskData]:
    """Small tasks whose labels are told apart by keywords among filler words; deterministic per seed."""
    words_per_label = 2
    needed = num_tasks * labels_per_task * words_per_label
    if needed > len(_KEYWORDS):
        raise ValueError(
            f"synthetic data has keywords for at most {len(_KEYWORDS) // words_per_label} labels"
        )
    rng = random.Random(seed)
    keywords = list(_KEYWORDS)
    rng.shuffle(keywords)
    tasks = []
    for t in range(num_tasks):
        labels = {}
        for i in range(labels_per_task):
            start = (t * labels_per_task + i) * words_per_label
            labels[f"label{i}"] = keywords[start : start + words_per_label]

        def sample(label: str, words: dict[str, list[str]] = labels) -> str:
            parts = rng.sample(_FILLERS, rng.randint(3, 7))
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(words[label]))
            return " ".join(parts)

        train = [(sample(lbl), lbl) for _ in range(train_per_label) for lbl in labels]
        held_out = [(sample(lbl), lbl) for _ in range(eval_per_label) for lbl in labels]
        tasks.append(TaskData(name=f"synthetic-{t}", train=train, eval=held_out))
    return tasks


def records(tasks: Sequence[TaskData]) -> Iterator[Record]:
    """The stream: each task in turn, its training records first, then its eval records."""
    for task in tasks:
        splits: tuple[tuple[Split, list[tuple[str, str]]], ...] = (("train", task.train), ("eval", task.eval))
        for split, rows in splits:
            for i, (text, label) in enumerate(rows):
                yield Record(
                    id=f"{task.name}/{split}/{i}", task=task.name, text=text, label=label, split=split
                )
