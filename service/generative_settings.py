"""The settings of generative tasks: the causal language model they are learned on and the limits of
their records. ``service.settings.Settings`` inherits them, so they are still one settings object."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings

#: A version's ``kind`` in its manifest when its task is generative (classification versions have none).
GENERATIVE_KIND = "generative"
#: The packaged SmolLM2-135M-Instruct (``service.language_model``).
PACKAGED_LANGUAGE_MODEL = "smollm2-135m-instruct"


class GenerativeSettings(BaseSettings):
    """The knobs of generative tasks (records of a prompt and the response wanted)."""

    language_model: str = Field(
        default=PACKAGED_LANGUAGE_MODEL,
        description="The causal LM generative tasks learn on: the packaged SmolLM2-135M-Instruct, or the "
        "path of a Hugging Face causal-LM folder.",
    )
    models_dir: Path = Field(
        default=Path(".continual/models"), description="Where the packaged model is converted, once."
    )
    max_prompt_tokens: int = Field(default=256, ge=8, description="A longer prompt is dead-lettered.")
    max_response_tokens: int = Field(default=128, ge=1, description="A longer response is dead-lettered.")
    generative_strategy: Literal["lora-per-task", "naive", "replay", "ewc", "lwf", "joint"] = Field(
        default="lora-per-task",
        description="How generative tasks share the language model (service/generative_strategy.py): an "
        "adapter each, or one shared adapter trained naively, with replay, EWC, LwF, or on everything seen.",
    )
    generative_ewc_lambda: float = Field(
        default=100.0,
        ge=0,
        description="Weight of the EWC penalty on a shared generative adapter (generative_strategy ewc; "
        "ewc_decay and ewc_fisher_examples are shared with the classifiers). Its scale: where the penalty "
        "of a second task's naive movement matches that task's token loss (bench/README.md).",
    )
    generative_lwf_alpha: float = Field(
        default=1.0,
        ge=0,
        description="Weight of LwF's distillation on a shared generative adapter (generative_strategy "
        "lwf; lwf_temperature is shared with the classifiers).",
    )
    generative_rank: int = Field(default=8, ge=1, description="Rank of a generative task's LoRA adapter.")
    generative_learning_rate: float = Field(
        default=1e-3, gt=0, description="AdamW learning rate of generative tasks' adapters."
    )
    generative_epochs: int = Field(
        default=2, ge=1, description="Passes over a round's new pairs of a generative task."
    )
    generative_batch_size: int = Field(default=16, ge=1, description="Pairs of a task per training step.")
    generative_anchor_pairs: int = Field(
        default=0,
        ge=0,
        description="Pairs of the language model's own answers to general instructions added to every "
        "training step (service.general_anchor; 0: none). Off by default: on the generative benchmark it "
        "kept the general probe's answers but doubled the paragraph's perplexity (bench/README.md).",
    )
    generative_keep_general: int = Field(
        default=4,
        ge=0,
        description="General instructions (with the language model's own answers) per training step on "
        "which the adapter's next-token distributions are kept equal to the model's alone "
        "(service.generative_regularisers.GeneralDistillation; 0: none). Chosen on the generative "
        "benchmark's val: held-out general answers kept 43% (3% without) at 0.5 points of exact match, "
        "plain-text perplexity at the model's own (bench/README.md).",
    )
    generative_keep_general_strength: float = Field(
        default=1.0,
        gt=0,
        description="Weight of the divergence from the language model alone on the general instructions "
        "kept (generative_keep_general) against the task's answer loss. Chosen on val: 10 kept more "
        "held-out general answers (67%) but cost 2.5 points of exact match (bench/README.md).",
    )
    max_generation_batch: int = Field(
        default=16,
        ge=1,
        description="Generate requests a server decodes together (new ones join between steps).",
    )
