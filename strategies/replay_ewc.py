"""Replay and EWC together: remembered examples and anchored important weights."""

from __future__ import annotations

from strategies.base import register
from strategies.ewc import EWC
from strategies.replay import Replay


@register("replay+ewc")
class ReplayEWC(Replay, EWC):
    """Both hooks sets at once (each calls the next one's): steps replay the memory and pay the EWC
    penalty; after a round the memory is updated and the importances re-estimated."""
