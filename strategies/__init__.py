"""Continual-learning strategies: small plugins behind one interface, registered by name."""

from strategies.base import Example, Strategy, create, register, registered, total
from strategies.ewc import EWC
from strategies.joint import Joint
from strategies.lora_per_task import LoraPerTask
from strategies.lwf import LwF
from strategies.naive import Naive
from strategies.replay import Replay
from strategies.replay_ewc import ReplayEWC

__all__ = [
    "EWC",
    "Example",
    "Joint",
    "LoraPerTask",
    "LwF",
    "Naive",
    "Replay",
    "ReplayEWC",
    "Strategy",
    "create",
    "register",
    "registered",
    "total",
]
