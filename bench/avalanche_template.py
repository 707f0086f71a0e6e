"""The same replay and EWC configurations run through Avalanche's own training template.

The model is the one the service trains (MiniLM, the same LoRA shape and seed, mean pooling) with
Avalanche's ``IncrementalClassifier`` as the head (it grows per experience and masks classes not seen
yet, as the service's shared head does); Avalanche's ``Naive`` template drives training with its
``ReplayPlugin`` (a ``ClassBalancedBuffer`` of the same size, as many replayed examples per step as
new ones) or ``EWCPlugin`` (online, same lambda and decay). Same epochs, batch size, optimiser and
learning rates as the service. Each CLINC150 domain is one experience.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
from avalanche.models import IncrementalClassifier
from avalanche.training.plugins import EvaluationPlugin, EWCPlugin, ReplayPlugin
from avalanche.training.storage_policy import ClassBalancedBuffer
from avalanche.training.supervised import Naive
from torch import nn

from service.datasets import TaskData
from service.model import AdapterModel, build_model
from service.router import Router
from service.settings import Settings

#: The adapter name the template trains.
ADAPTER = "avalanche"
TEMPLATES = ("avalanche-replay", "avalanche-ewc")


class TextClassifier(nn.Module):
    """Token ids and attention mask stacked as one tensor per text → class scores (what Avalanche feeds)."""

    def __init__(self, model: AdapterModel, head: IncrementalClassifier) -> None:
        super().__init__()
        self.model = model
        self.encoder = model.encoder  # registered, so the template sees (and EWC weighs) its parameters
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        width = int(mask.sum(1).max())  # padded like the service's batches: to the longest text
        return self.head(self.model.pooled(ADAPTER, ids[:, :width], mask[:, :width]))


class _TwoLearningRates(Naive):
    """Avalanche's naive template with the service's optimiser: AdamW, one rate for LoRA, one for the head."""

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        self._settings = settings
        super().__init__(*args, **kwargs)

    def make_optimizer(self, **kwargs: Any) -> None:
        model: TextClassifier = self.model
        lora = [p for n, p in model.encoder.named_parameters() if f".{ADAPTER}." in n and "lora_" in n]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": lora, "lr": self._settings.learning_rate},
                {"params": list(model.head.parameters()), "lr": self._settings.head_learning_rate},
            ],
            weight_decay=0.01,
        )


class AvalancheLearner:
    """Learns CLINC150 domains one experience at a time with Avalanche's template; answers like a trainer."""

    def __init__(self, template: str, settings: Settings) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
        torch.manual_seed(settings.seed)
        self.settings = settings
        self.model = build_model(settings)
        self.model.add(ADAPTER, num_labels=2)  # its LoRA adapter is trained; the head is Avalanche's
        head = IncrementalClassifier(self.model.hidden_size, initial_out_features=2)
        self.network = TextClassifier(self.model, head)
        for name, parameter in self.network.encoder.named_parameters():
            parameter.requires_grad_(f".{ADAPTER}." in name and "lora_" in name)
        plugin: Any
        if template == "avalanche-replay":
            size = settings.replay_memory_size
            plugin = ReplayPlugin(mem_size=size, storage_policy=ClassBalancedBuffer(size, adaptive_size=True))
        else:
            plugin = EWCPlugin(ewc_lambda=settings.ewc_lambda, mode="online", decay_factor=settings.ewc_decay)
        self.template = _TwoLearningRates(
            model=self.network,
            optimizer=torch.optim.AdamW(self.network.parameters()),  # replaced by make_optimizer
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=settings.batch_size,
            train_epochs=settings.epochs,
            eval_mb_size=settings.eval_batch_size,
            plugins=[plugin],
            evaluator=EvaluationPlugin(loggers=[]),
            settings=settings,
        )
        #: Class ids in order of arrival (the head grows to the largest id seen).
        self.classes: dict[str, int] = {}
        self.task_labels: dict[str, list[str]] = {}
        #: Avalanche learners fit no task router: task-less texts go by label prototypes.
        self.router: Router | None = None

    def learn(self, task: TaskData) -> None:
        """One experience: the domain's training examples, ``epochs`` passes."""
        self.learn_all([task])

    def learn_all(self, tasks: list[TaskData]) -> None:
        """One experience of every domain's training examples (joint training)."""
        rows = [row for task in tasks for row in task.train]
        for task in tasks:
            labels = self.task_labels.setdefault(task.name, [])
            for _, label in task.train:
                if label not in self.classes:
                    self.classes[label] = len(self.classes)
                    labels.append(label)
        x = self._tokens([text for text, _ in rows])
        y = torch.tensor([self.classes[label] for _, label in rows])
        dataset = _make_taskaware_classification_dataset(
            torch.utils.data.TensorDataset(x, y), targets=y.tolist(), task_labels=0
        )
        benchmark = with_classes_timeline(benchmark_from_datasets(train=[dataset]))
        self.template.train(benchmark.train_stream[0], num_workers=0)

    @torch.inference_mode()
    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        """Scores over every class id seen so far (unseen ones are masked)."""
        self.network.eval()
        rows = []
        for i in range(0, len(texts), self.settings.eval_batch_size):
            rows.append(self.network(self._tokens(texts[i : i + self.settings.eval_batch_size])))
        return torch.cat(rows)

    def labels(self, task: str) -> list[str]:
        """``task``'s labels, in the order of ``within``'s columns."""
        return self.task_labels[task]

    def within(self, task: str, texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
        """``task``'s labels and each text's probabilities over them (a softmax over its columns)."""
        labels = self.task_labels[task]
        scores = self.scores(texts)[:, [self.classes[label] for label in labels]]
        return labels, torch.softmax(scores, dim=-1)

    def global_answers(self, texts: Sequence[str]) -> list[str]:
        """Each text's label among every label learned so far."""
        scores = self.scores(texts)[:, : len(self.classes)]
        names = {column: label for label, column in self.classes.items()}
        return [names[i] for i in scores.argmax(-1).tolist()]

    def _tokens(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.model.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.model.max_length,
            return_tensors="pt",
        )
        return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1)
