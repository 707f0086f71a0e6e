"""The shared frozen base encoder with named LoRA adapters (PEFT) and one linear head per adapter.

The trainer's model: adapters are named by task. A server answers with ``service.served_model``,
which reads the weights files written from here. The class is not thread-safe; callers that share it
across threads hold a lock.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import AutoModel, AutoTokenizer, BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from service.settings import Settings

log = logging.getLogger(__name__)

LORA_PREFIX = "lora."
HEAD_PREFIX = "head."
#: Label prototypes stored beside an adapter's weights (base-model embedding sums and counts per label).
PROTOTYPE_SUMS = "prototype.sums"
PROTOTYPE_COUNTS = "prototype.counts"
#: Layers whose pooled outputs make a text's base features, the task router's input: the last four,
#: BERT's best feature-based reading. On CLINC150 val a linear router over every intent read them at
#: 97.2% against 96.1% on the last layer alone (bench/README.md, "The router reads the last four layers").
BASE_FEATURE_LAYERS = 4


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA shape every adapter of one model shares (recorded in each version's manifest)."""

    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]

    def config(self) -> LoraConfig:
        """The PEFT config for one adapter."""
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )


class AdapterModel:
    """A frozen base encoder, mean pooling, and per-name LoRA adapters with classification heads."""

    def __init__(
        self, base_path: Path, lora: LoraSpec, max_length: int, seed: int = 0, base_dropout: bool = True
    ) -> None:
        self.base_path = base_path
        self.lora = lora
        self.max_length = max_length
        self.seed = seed
        #: Whether the frozen base model's own dropout is on while an adapter trains.
        self.base_dropout = base_dropout
        self.tokenizer, base = load_frozen_base(base_path)
        self._base = base
        self._peft: PeftModel | None = None
        self.heads: dict[str, nn.Linear] = {}
        self.hidden_size = int(base.config.hidden_size)
        #: Layers of the base model's output (its embeddings' and each transformer layer's).
        self.output_layers = int(base.config.num_hidden_layers) + 1

    # --- adapters -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the adapters currently loaded."""
        return list(self.heads)

    def add(self, name: str, num_labels: int) -> None:
        """A fresh adapter and head, initialised from the seed and the name (so reruns match)."""
        if name in self.heads:
            raise ValueError(f"adapter {name!r} already exists")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            self._add_lora(name)
            self.heads[name] = nn.Linear(self.hidden_size, num_labels)

    def load(self, name: str, weights: dict[str, torch.Tensor]) -> None:
        """An adapter and head from weights that ``weights()`` produced."""
        if name in self.heads:
            raise ValueError(f"adapter {name!r} already exists; versions are never reloaded in place")
        lora = {k[len(LORA_PREFIX) :]: v for k, v in weights.items() if k.startswith(LORA_PREFIX)}
        head_weight = weights[HEAD_PREFIX + "weight"]
        self._add_lora(name)
        assert self._peft is not None
        result = set_peft_model_state_dict(self._peft, lora, adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            self.remove(name)
            raise ValueError(f"adapter weights do not fit the base model: {unexpected[:3]}")
        head = nn.Linear(self.hidden_size, head_weight.shape[0])
        head.load_state_dict({"weight": head_weight, "bias": weights[HEAD_PREFIX + "bias"]})
        self.heads[name] = head

    def remove(self, name: str) -> None:
        """Unload an adapter and its head."""
        self.heads.pop(name, None)
        if self._peft is not None and name in self._peft.peft_config:
            self._peft.delete_adapter(name)

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's LoRA and head tensors, flat, ready for safetensors."""
        assert self._peft is not None
        lora = get_peft_model_state_dict(self._peft, adapter_name=name)
        out = {LORA_PREFIX + k: v.detach().clone().contiguous() for k, v in lora.items()}
        for k, v in self.heads[name].state_dict().items():
            out[HEAD_PREFIX + k] = v.detach().clone().contiguous()
        return out

    def grow_head(self, name: str, num_labels: int) -> None:
        """Widen a head to ``num_labels`` outputs for labels seen for the first time; old rows are kept."""
        old = self.heads[name]
        if num_labels <= old.out_features:
            return
        new = nn.Linear(self.hidden_size, num_labels)
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
        self.heads[name] = new

    def parameters(self, name: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The trainable (LoRA, head) parameters of one adapter."""
        named = self.named_parameters(name)
        lora = [p for n, p in named.items() if not n.startswith(HEAD_PREFIX)]
        return lora, [p for n, p in named.items() if n.startswith(HEAD_PREFIX)]

    def named_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The trainable parameters of one adapter by name (``head.*`` for the head's)."""
        assert self._peft is not None
        named = {n: p for n, p in self._peft.named_parameters() if f".{name}." in n and "lora_" in n}
        for n, p in self.heads[name].named_parameters():
            named[HEAD_PREFIX + n] = p
        return named

    def _add_lora(self, name: str) -> None:
        training = self._peft is not None and self._peft.training
        if self._peft is None:
            self._peft = get_peft_model(self._base, self.lora.config(), adapter_name=name)
        else:
            self._peft.add_adapter(name, self.lora.config())
        # PEFT may leave the model in training mode (dropout on); it is in eval mode outside training().
        self._peft.train(training)

    # --- forward --------------------------------------------------------------------------------

    def logits(self, name: str, texts: Sequence[str]) -> torch.Tensor:
        """Head outputs for ``texts`` through adapter ``name`` (with gradients when training)."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return self.heads[name](self.pooled(name, batch["input_ids"], batch["attention_mask"]))

    def pooled(self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder outputs of tokenised texts through adapter ``name``, before any head."""
        assert self._peft is not None
        # Always: PEFT's active_adapter can name an adapter that was removed and loaded again, while
        # its layers have no active adapter left (the forward pass would then skip LoRA silently).
        self._peft.set_adapter(name)
        hidden = self._peft(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(hidden.last_hidden_state, attention_mask)

    @property
    def encoder(self) -> nn.Module:
        """The base encoder with every LoRA adapter (for callers that train it their own way)."""
        assert self._peft is not None
        return self._peft

    @torch.no_grad()
    def frozen_logits(self, name: str, texts: Sequence[str], restore: str) -> torch.Tensor:
        """Outputs of adapter ``name`` in eval mode without gradients, inside a training step.

        The training mode and the active adapter ``restore`` are put back afterwards, so the step's
        own forward and backward pass are unaffected.
        """
        assert self._peft is not None
        training = self._peft.training
        self._peft.eval()
        try:
            return self.logits(name, texts)
        finally:
            self._peft.train(training)
            self._peft.set_adapter(restore)

    @contextmanager
    def training(self, name: str) -> Iterator[None]:
        """Dropout on for ``name``'s adapter and head, and in the frozen base if ``base_dropout``."""
        assert self._peft is not None
        self._peft.train()
        if not self.base_dropout:
            # The base's weights never change; its dropout only adds noise to what the adapter sees.
            for module_name, module in self._peft.named_modules():
                if isinstance(module, nn.Dropout) and "lora_dropout" not in module_name:
                    module.eval()
        self.heads[name].train()
        try:
            yield
        finally:
            self._peft.eval()
            self.heads[name].eval()

    @torch.inference_mode()
    def base_embeddings(self, texts: Sequence[str], batch_size: int = 128, layers: int = 1) -> np.ndarray:
        """Mean-pooled embeddings of the frozen base model, every adapter switched off; with
        ``layers`` > 1, base features (``base_features``: that many last layers, deepest last)."""
        rows = []
        context = self._peft.disable_adapter() if self._peft is not None else nullcontext()
        with context:
            for batch in self._batches(texts, batch_size):
                hidden = self._base(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states=layers > 1,
                )
                if layers > 1:
                    rows.append(base_features(hidden.hidden_states, batch["attention_mask"], layers))
                else:
                    rows.append(mean_pool(hidden.last_hidden_state, batch["attention_mask"]))
        width = min(layers, self.output_layers) * self.hidden_size
        return torch.cat(rows).numpy() if rows else np.empty((0, width), dtype=np.float32)

    @torch.no_grad()  # not inference mode: callers fit on these (service/head_refit.py)
    def features(self, name: str, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """What ``name``'s head reads for each text (its adapter's pooled outputs), in eval mode."""
        rows = [
            self.pooled(name, batch["input_ids"], batch["attention_mask"])
            for batch in self._batches(texts, batch_size)
        ]
        return torch.cat(rows) if rows else torch.empty(0, self.hidden_size)

    def _batches(self, texts: Sequence[str], batch_size: int) -> Iterator[BatchEncoding]:
        """``texts`` tokenised ``batch_size`` at a time, padded within each batch."""
        for i in range(0, len(texts), batch_size):
            yield self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )

    @torch.inference_mode()
    def predict(self, name: str, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """Class probabilities, one row per text."""
        rows = [
            torch.softmax(self.logits(name, texts[i : i + batch_size]), dim=-1)
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(rows) if rows else torch.empty(0, self.heads[name].out_features)


def load_frozen_base(base_path: Path) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The base model's tokenizer, and the base model with every weight frozen, in eval mode."""
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    base: PreTrainedModel = AutoModel.from_pretrained(str(base_path))
    for parameter in base.parameters():
        parameter.requires_grad = False
    base.eval()
    return tokenizer, base


def unit_prototypes(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unit-length mean embeddings of the labels that have training examples (no rows if none stored)."""
    sums, counts = weights.get(PROTOTYPE_SUMS), weights.get(PROTOTYPE_COUNTS)
    if sums is None or counts is None or not bool((counts > 0).any()):
        return torch.empty(0, 0)
    means = sums[counts > 0] / counts[counts > 0].unsqueeze(-1)
    return nn.functional.normalize(means, dim=-1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of each text's token outputs, padding left out (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def base_features(
    hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor, layers: int = BASE_FEATURE_LAYERS
) -> torch.Tensor:
    """The mean-pooled outputs of the base model's last ``layers`` layers, concatenated deepest last.

    So the last ``hidden_size`` columns are the base-model embedding, and fewer layers' features are
    always a suffix: a reader fitted on narrower features (a router from before, a memory restored
    from an older checkpoint) takes its own width from the end.
    """
    return torch.cat([mean_pool(hidden, attention_mask) for hidden in hidden_states[-layers:]], dim=-1)


def lora_spec(settings: Settings) -> LoraSpec:
    """The LoRA shape the settings describe."""
    return LoraSpec(
        r=settings.lora_r,
        alpha=settings.lora_alpha,
        dropout=settings.lora_dropout,
        target_modules=tuple(settings.lora_target_modules),
    )


def build_model(settings: Settings) -> AdapterModel:
    """The base model and LoRA shape the settings describe, with no adapters loaded yet."""
    return AdapterModel(
        settings.base_model_path(),
        lora_spec(settings),
        max_length=settings.max_length,
        seed=settings.seed,
        base_dropout=settings.base_dropout,
    )


def save_tiny_model(path: Path, tokenizer_from: Path) -> Path:
    """Save a randomly initialised 2-layer BERT (hidden size 64) with ``tokenizer_from``'s tokenizer.

    A real model folder, loadable like any base model, for tests and soak runs that exercise the
    service's mechanics (Kafka, checkpoints, serving) and not its accuracy. Deterministic.
    """
    from transformers import BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
