"""Sequential fine-tuning of the shared learner: the baseline that forgets."""

from __future__ import annotations

from strategies.base import Strategy, register


@register("naive")
class Naive(Strategy):
    """Every task trains the one shared adapter and head on its new data only, nothing else.

    Old tasks are protected by nothing, so their accuracy falls as new tasks overwrite the shared
    weights: the lower bound every other strategy is measured against. Sharing the learner
    (``isolates_tasks`` False) is the whole strategy, so every hook keeps its default.
    """
