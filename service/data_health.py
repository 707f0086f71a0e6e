"""Whether a task's data can carry fine-tuning: enough training records for the task and for each of
its labels, and how far apart its labels' sizes are.

The people who stream tasks in are rarely continual-learning researchers, so the service judges this
itself and says so in every place they look: each version's manifest, the trainer's metrics (and the
alert rules on them), ``GetAdapter`` / ``continual adapters`` and ``continual status``. Nothing here
refuses to train or serve: a task's fast first version serves from a handful of records by design;
the judgement is there so that a person knows what its accuracy rests on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DataHealth:
    """A task's training data against the minimums (``min_task_train_records``,
    ``min_label_train_records``), at the time a version was published."""

    train_records: int
    eval_records: int
    min_task_train_records: int
    min_label_train_records: int
    #: Labels with fewer training records than the minimum, with their counts (labels known only from
    #: eval records count 0), smallest first.
    short_labels: tuple[tuple[str, int], ...]
    #: Training records of the largest label over those of the smallest one that has any (1 with fewer
    #: than two such labels). A label with none is already a short label; counting it here would make
    #: the ratio infinite and say nothing more.
    imbalance_ratio: float
    #: Eval records set aside because they repeat a training record (``service.duplicates``), exactly
    #: or nearly; ``eval_records`` counts the rest, the eval set that gates versions.
    exact_duplicates: int = 0
    near_duplicates: int = 0

    @property
    def sufficient(self) -> bool:
        """Enough training records for the task and for every one of its labels."""
        return self.train_records >= self.min_task_train_records and not self.short_labels

    def to_manifest(self) -> dict[str, Any]:
        """The judgement as stored in a version's manifest (``"data"``)."""
        return {
            "sufficient": self.sufficient,
            "train_records": self.train_records,
            "eval_records": self.eval_records,
            "min_task_train_records": self.min_task_train_records,
            "min_label_train_records": self.min_label_train_records,
            "short_labels": dict(self.short_labels),
            "imbalance_ratio": self.imbalance_ratio,
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
        }

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> DataHealth | None:
        """The judgement stored with a version (None for versions published before it was made)."""
        data = manifest.get("data")
        if data is None:
            return None
        return cls(
            train_records=int(data["train_records"]),
            eval_records=int(data["eval_records"]),
            min_task_train_records=int(data["min_task_train_records"]),
            min_label_train_records=int(data["min_label_train_records"]),
            short_labels=tuple((str(label), int(n)) for label, n in data["short_labels"].items()),
            imbalance_ratio=float(data["imbalance_ratio"]),
            exact_duplicates=int(data.get("exact_duplicates", 0)),
            near_duplicates=int(data.get("near_duplicates", 0)),
        )

    def summary(self) -> str:
        """One line for a person: "ok", or what falls short (and eval records set aside)."""
        problems = self.shortfalls()
        repeats = self.exact_duplicates + self.near_duplicates
        if repeats:
            problems.append(f"{repeats} eval record(s) repeat training ones, set aside")
        return "; ".join(problems) or "ok"

    def shortfalls(self) -> list[str]:
        """What keeps the data from being enough (none when it is)."""
        problems = []
        if self.train_records < self.min_task_train_records:
            problems.append(f"{self.train_records} of {self.min_task_train_records} records")
        if self.short_labels:
            names = ", ".join(label for label, _ in self.short_labels[:3])
            more = f" +{len(self.short_labels) - 3}" if len(self.short_labels) > 3 else ""
            problems.append(
                f"{len(self.short_labels)} label(s) under {self.min_label_train_records}: {names}{more}"
            )
        return problems


def assess(
    labels: Sequence[str],
    label_counts: Mapping[str, int],
    eval_records: int,
    min_task_train_records: int,
    min_label_train_records: int,
    duplicates: Mapping[str, int] | None = None,
) -> DataHealth:
    """Judge a task's data from its labels (every label it knows, eval-only ones included), its
    training records per label, and its eval records set aside as repeats (by kind: exact, near)."""
    counts = {label: int(label_counts.get(label, 0)) for label in labels}
    short = sorted(
        ((label, n) for label, n in counts.items() if n < min_label_train_records), key=lambda x: (x[1], x[0])
    )
    present = [n for n in counts.values() if n > 0]
    ratio = max(present) / min(present) if len(present) >= 2 else 1.0
    return DataHealth(
        train_records=sum(counts.values()),
        eval_records=eval_records,
        min_task_train_records=min_task_train_records,
        min_label_train_records=min_label_train_records,
        short_labels=tuple(short),
        imbalance_ratio=round(ratio, 3),
        exact_duplicates=int((duplicates or {}).get("exact", 0)),
        near_duplicates=int((duplicates or {}).get("near", 0)),
    )


def normalized(text: str) -> str:
    """A text as compared for exact duplicates: lower-cased, punctuation and extra spacing dropped
    ("What's my  balance?" becomes "what s my balance")."""
    kept = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower())
    return " ".join(kept.split())
