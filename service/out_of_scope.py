"""Out of scope: a request that names no task and belongs to none of the served tasks.

Such a text still gets the best guess, with ``out_of_scope`` set when its *scope score* falls below a
threshold. The score joins two views of the frozen base model's features, which every task-less
request computes anyway for routing (so judging it costs no forward):

- the router's confidence, the log-probability of its most probable (task, label) row: low where the
  text sits between labels (discriminative);
- how close the text is to anything learned, the cosine to the nearest label prototype, times
  ``prototype_weight``: low where the text is far from every label's mean (a density view, which a
  softmax cannot give: it is confident far from all data as long as one label is less far).

The threshold is calibrated by the trainer after every router fit on a memory of eval records (in
scope by construction): the score below which ``reject_rate`` of them fall. That is the one figure a
person sets, the share of in-scope requests they accept to see turned away. When the stream also
carries eval records of texts that belong to no task (``"label": null``), the threshold is lowered to
just above the highest of them it turns away: the same ones caught, fewer in-scope ones lost; and the
share caught, the out-of-scope recall, is measured on them. The weight of the
prototype view (5) was chosen on CLINC150's val and oos_val records (bench/README.md, "Out of scope"),
the middle of a plateau from 2 to 20.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional

#: Below this many eval records the threshold would be a guess: no rule (nothing judged out of scope).
MIN_CALIBRATION_RECORDS = 50
#: Fewer out-of-scope eval records than this say too little to move the threshold or measure recall.
MIN_OUTSIDE_RECORDS = 10
#: Keys of the scope memories' tensors in the trainer's learner file (in-scope eval records, and
#: out-of-scope ones, all under one label).
SCOPE_MEMORY_PREFIX = "scope_memory."
OUTSIDE_MEMORY_PREFIX = "scope_outside."
OUTSIDE_LABEL = "(out of scope)"


@dataclass(frozen=True)
class ScopeRule:
    """Out of scope below ``threshold``; the score weights the prototype cosine by ``prototype_weight``."""

    threshold: float
    prototype_weight: float
    #: The share of in-scope eval records the threshold turns away, and how many it was judged on.
    reject_rate: float
    calibration_records: int
    #: Out-of-scope eval records it was checked on, and the share of them it turns away.
    outside_records: int = 0
    outside_recall: float | None = None

    def scores(
        self, row_probabilities: torch.Tensor, embeddings: torch.Tensor, prototypes: torch.Tensor
    ) -> torch.Tensor:
        """Each text's scope score (see ``scope_scores``)."""
        return scope_scores(row_probabilities, embeddings, prototypes, self.prototype_weight)

    def out_of_scope(
        self, row_probabilities: torch.Tensor, embeddings: torch.Tensor, prototypes: torch.Tensor
    ) -> torch.Tensor:
        """Per text, whether it belongs to none of the tasks."""
        return self.scores(row_probabilities, embeddings, prototypes) < self.threshold

    def manifest(self) -> dict[str, float | int | None]:
        """The rule as the router manifest holds it."""
        return {
            "threshold": self.threshold,
            "prototype_weight": self.prototype_weight,
            "reject_rate": self.reject_rate,
            "calibration_records": self.calibration_records,
            "outside_records": self.outside_records,
            "outside_recall": self.outside_recall,
        }

    @classmethod
    def from_manifest(cls, body: dict[str, Any] | None) -> ScopeRule | None:
        """The rule ``manifest()`` wrote (None for a router written before rules existed)."""
        if not body:
            return None
        recall = body.get("outside_recall")
        return cls(
            float(body["threshold"]),
            float(body["prototype_weight"]),
            float(body["reject_rate"]),
            int(body["calibration_records"]),
            int(body.get("outside_records", 0)),
            None if recall is None else float(recall),
        )


@torch.no_grad()
def scope_scores(
    row_probabilities: torch.Tensor,
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    prototype_weight: float,
) -> torch.Tensor:
    """log max row probability + ``prototype_weight`` · max cosine to ``prototypes`` (unit rows).

    ``row_probabilities``: per text, the router's probability of each (task, label) row;
    ``embeddings``: the texts' base-model embeddings (any length: they are normalised here)."""
    confidence = row_probabilities.max(dim=-1).values.clamp_min(1e-30).log()
    if not len(prototypes):
        return confidence
    closeness = (functional.normalize(embeddings, dim=-1) @ prototypes.T).max(dim=-1).values
    return confidence + prototype_weight * closeness


def calibrated(
    scores: torch.Tensor,
    reject_rate: float,
    prototype_weight: float,
    outside: torch.Tensor | None = None,
) -> ScopeRule | None:
    """The rule whose threshold turns away ``reject_rate`` of these in-scope ``scores``, lowered to
    just above the highest ``outside`` score (out-of-scope eval records) it turns away when there are
    enough of them; None with fewer than ``MIN_CALIBRATION_RECORDS`` in-scope scores, or when nothing
    is to be turned away."""
    if reject_rate <= 0 or len(scores) < MIN_CALIBRATION_RECORDS:
        return None
    threshold = torch.quantile(scores.double(), reject_rate)
    if outside is None or len(outside) < MIN_OUTSIDE_RECORDS:
        return ScopeRule(float(threshold), prototype_weight, reject_rate, len(scores))
    caught = outside.double()[outside.double() < threshold]
    if len(caught):
        threshold = torch.nextafter(caught.max(), threshold)
    recall = float((outside.double() < threshold).double().mean())
    return ScopeRule(float(threshold), prototype_weight, reject_rate, len(scores), len(outside), recall)
