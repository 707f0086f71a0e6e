"""One LoRA adapter and one head per task: old tasks are untouched by construction."""

from __future__ import annotations

from strategies.base import Strategy, register


@register("lora-per-task")
class LoraPerTask(Strategy):
    """Each task trains only its own adapter and head, so nothing it learns can overwrite another task.

    It needs no extra loss and no memory; isolation comes from the model keeping a separate adapter per
    task, which is why every hook keeps its default.
    """

    isolates_tasks = True
