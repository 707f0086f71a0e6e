"""Continual-learning strategies: small plugins behind one interface, registered by name."""

from strategies.base import Strategy, create, register, registered
from strategies.lora_per_task import LoraPerTask

__all__ = ["LoraPerTask", "Strategy", "create", "register", "registered"]
