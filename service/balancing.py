"""Class-balanced sampling: a round's further epochs see a task's small labels as often as its large
ones, so a model trained on labels far apart in size does not learn to favour the large ones.

Two remedies (``balance_method``), only for a task whose largest label has more than
``balance_labels_above`` times its smallest's training records (``far_apart``): near-balanced data
trains as it comes.

- ``oversample``: in the further epochs small labels are oversampled (every example repeated, then a
  seeded draw for the remainder) up to the largest label's count; nothing is dropped, so the large
  labels lose no data.
- ``logit-adjustment`` (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021): every
  training step, the first epoch's too, adds tau * log(label prior) to the logits its loss sees. A large
  label's examples then need less margin, a small label's more, and the plain logits the service
  answers with minimise the *balanced* error; it needs no repeated examples, so the model does not
  learn the small labels' few texts by heart.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import torch

from service.settings import Settings

Example = TypeVar("Example", bound=tuple[str, int])


def far_apart(counts: Iterable[int], above_ratio: float) -> bool:
    """Whether labels with these training record counts call for balancing: the largest has more than
    ``above_ratio`` times the smallest (labels with none are left out; 0 turns balancing off)."""
    present = [n for n in counts if n > 0]
    return above_ratio > 0 and len(present) >= 2 and max(present) > above_ratio * min(present)


def balanced_by(method: str, counts: Mapping[str, int], settings: Settings) -> bool:
    """Whether a task with these training record counts per label (all its records, so that a round
    which happens to hold few of one label of a balanced task is not balanced) is balanced by
    ``method`` (``oversample`` or ``logit-adjustment``) under the settings' ``balance_method``."""
    wanted = settings.balance_method in (method, "both")
    return wanted and far_apart(counts.values(), settings.balance_labels_above)


def oversampled(examples: Sequence[Example], rng: random.Random) -> list[Example]:
    """``examples`` (text, label index) with every label oversampled to the largest label's count.
    Labels in order of first appearance; callers shuffle."""
    by_label: dict[int, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example[1]].append(example)
    target = max((len(group) for group in by_label.values()), default=0)
    out: list[Example] = []
    for group in by_label.values():
        copies, remainder = divmod(target, len(group))
        out.extend(group * copies)
        out.extend(rng.sample(group, remainder))
    return out


def logit_adjustment(counts: Mapping[int, int], width: int, tau: float) -> torch.Tensor:
    """``tau`` * log(prior) per logit column (``width`` of them), the prior from ``counts`` (column ->
    training records); a column without records is left at 0, which its loss never meets as a target."""
    adjustment = torch.zeros(width)
    total = sum(n for n in counts.values() if n > 0)
    for column, n in counts.items():
        if n > 0:
            adjustment[column] = tau * torch.log(torch.tensor(n / total))
    return adjustment


def further_epoch(
    examples: Sequence[Example], counts: Mapping[str, int], settings: Settings, rng: random.Random
) -> list[Example]:
    """A further epoch's examples of a task (its round's ``examples``): oversampled where the task is
    balanced so (``balanced_by``), else as they are."""
    if balanced_by("oversample", counts, settings):
        return oversampled(examples, rng)
    return list(examples)


def loss_adjustment(
    labels: Sequence[str], counts: Mapping[str, int], settings: Settings
) -> torch.Tensor | None:
    """What the loss adds to the logits of a step on a task with these ``labels`` (the logit columns,
    in order) and training record ``counts``: the logit adjustment where it is balanced so, else None."""
    if not balanced_by("logit-adjustment", counts, settings):
        return None
    prior = {index: counts.get(label, 0) for index, label in enumerate(labels)}
    return logit_adjustment(prior, len(labels), settings.logit_adjustment_tau)
