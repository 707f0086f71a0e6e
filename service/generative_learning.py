"""Generative tasks in the trainer: their pairs taken in, learned per round, measured, published.

A task whose first record is a (prompt, response) pair is generative (``service.records``). Its pairs
are learned by a LoRA adapter of its own on the causal language model (``service.generative``),
whatever strategy the classification tasks use: the model is loaded on the first generative record,
so a stream without any never pays for it. When a round closes each task with new pairs trains its
epochs over them, every step's batch carrying a few of the model's own answers to general
instructions (``service.general_anchor``: what keeps the model's own abilities), and is measured on
its eval pairs: exact match is its accuracy (the accuracy matrix, ACC, BWT and forgetting use it),
beside the mean token loss and the general probe (``service.general_probe``), all in the version's
manifest. Versions are gated against the served one on the same eval pairs and promoted once the
round is durable, as classification versions are (``service.checkpoint.Durability.persist``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from service.errors import CorruptVersion
from service.general_anchor import anchors
from service.general_probe import ProbeResult, measure
from service.generative import GenerativeAdapters, Pair, normalised
from service.generative_settings import GENERATIVE_KIND
from service.generative_strategy import SHARED_ADAPTER, GenerativeStrategy
from service.ingest import Incoming, Ingest
from service.language_model import generative_adapters
from service.metrics import TrainerMetrics
from service.promotion import Decision, gate
from service.publishing import Publisher
from service.records import GenerativeRecord, Record, Rejection
from service.registry import Registry
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class GenerativeTask:
    """What the trainer knows about one generative task (the attributes the assessment reads are
    named as a classification task's: ``accuracy`` is exact match)."""

    name: str
    eval_pairs: list[Pair] = field(default_factory=list)
    #: This round's training pairs.
    round_pairs: list[Pair] = field(default_factory=list)
    train_seen: int = 0
    version: int | None = None
    accuracy: float | None = None
    token_loss: float | None = None
    best_accuracy: float | None = None
    general_probe: dict[str, float] | None = None
    #: Whether the adapter moved since its last version (it no longer is that version).
    trained_since_published: bool = False
    #: How many eval pairs the live-accuracy watch has already judged the served version on.
    eval_judged: int = 0
    changed: bool = False
    #: Read by the assessment as a classification task's; a generative task has none.
    macro_accuracy: float | None = None
    labels: list[str] = field(default_factory=list)


class GenerativeLearning:
    """Owns the generative tasks, their adapters, and their versions on the way to durability."""

    def __init__(
        self, settings: Settings, registry: Registry, metrics: TrainerMetrics, publisher: Publisher
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.publisher = publisher
        self.tasks: dict[str, GenerativeTask] = {}
        self._adapters: GenerativeAdapters | None = None
        self._anchors: list[Pair] | None = None
        self.strategy = GenerativeStrategy.for_settings(settings)
        #: Called between steps so the consumer group knows the trainer lives.
        self.heartbeat: Callable[[], None] = lambda: None

    @property
    def adapters(self) -> GenerativeAdapters:
        """The language model and the tasks' adapters (loaded on first use)."""
        if self._adapters is None:
            log.info("loading the language model %s for generative tasks", self.settings.language_model)
            self._adapters = generative_adapters(self.settings)
        return self._adapters

    # --- records ------------------------------------------------------------------------------------

    def absorb(
        self, batch: Sequence[Incoming], classification: Iterable[str], ingest: Ingest | None
    ) -> tuple[list[Incoming], int]:
        """Take the batch's generative records (dead-lettering those that cannot be learned, and
        classification records of generative tasks); the records left to classification, and how
        many were taken."""
        rest, taken = [], 0
        # A task's kind is its first record's, in stream order: a classification task may start in
        # this very batch.
        classifiers = set(classification)
        for incoming in batch:
            record = incoming.record
            rejection = None
            if isinstance(record, Record):
                if record.task not in self.tasks:
                    classifiers.add(record.task)
                    rest.append(incoming)
                    continue
                rejection = Rejection(
                    "kind_mismatch", f"task {record.task!r} is generative: send prompt and response"
                )
            elif record.task in classifiers:
                rejection = Rejection(
                    "kind_mismatch", f"task {record.task!r} is classification: send text and label"
                )
            else:
                rejection = refusal(self.adapters, record)
            if rejection is None:
                assert isinstance(record, GenerativeRecord)
                self.take(record)
                taken += 1
            elif ingest is not None:
                ingest.dead_letter(
                    incoming.partition, incoming.offset, incoming.raw_key, incoming.raw_value, rejection
                )
        return rest, taken

    def take(self, record: GenerativeRecord) -> None:
        """File a valid pair under its task (a new task gets an adapter)."""
        task = self.tasks.get(record.task)
        if task is None:
            task = self.tasks[record.task] = GenerativeTask(record.task)
            if self.strategy.adapter(record.task) not in self.adapters.names():
                self.adapters.add(self.strategy.adapter(record.task))
            self.metrics.start_task(record.task)
            log.info("new generative task %r", record.task)
        pair = Pair(record.prompt, record.response)
        if record.split == "eval":
            task.eval_pairs.append(pair)
        else:
            task.round_pairs.append(pair)
            task.train_seen += 1
        task.changed = True

    # --- a round ------------------------------------------------------------------------------------

    def train_round(self, rng: random.Random) -> dict[str, int]:
        """Train on the round's new pairs as the strategy says, then measure every changed task; the
        pairs trained per task."""
        for task in self.tasks.values():
            self._watch_live(task)  # the served version on the new eval pairs, before any training
        new = {task.name: task.round_pairs for task in self.tasks.values() if task.round_pairs}
        for adapter, pairs in self.strategy.rounds_pairs(new).items():
            loss = self._train(adapter, pairs, rng)
            for name in new if adapter == SHARED_ADAPTER else [adapter]:
                self.metrics.training_loss.labels(task=name, strategy=self.strategy.name).set(loss)
        self.strategy.remember(new, rng)
        moved = new if self.strategy.isolates_tasks or not new else self.tasks  # a shared adapter: all
        for name in moved:
            task = self.tasks[name]
            task.round_pairs, task.trained_since_published, task.changed = [], True, True
        probes: dict[str, ProbeResult] = {}  # per adapter: the tasks of a shared one share its probe
        for task in self.tasks.values():
            if task.changed:
                self._measure(task, probes)
        return {name: len(pairs) for name, pairs in new.items()}

    def _train(self, adapter: str, pairs: list[Pair], rng: random.Random) -> float:
        """The epochs of one adapter over ``pairs`` as the strategy trains (``GenerativeStrategy.train``),
        each step with the model's own general answers beside them or kept; the mean loss."""
        return self.strategy.train(
            self.adapters,
            adapter,
            list(pairs),
            self.settings.generative_epochs,
            self.settings.generative_batch_size,
            rng,
            general=self._general_pairs(),
            general_per_step=self.settings.generative_anchor_pairs,
            distilled_per_step=self.settings.generative_keep_general,
            distilled_strength=self.settings.generative_keep_general_strength,
            between_steps=self.heartbeat,
        )

    def _general_pairs(self) -> list[Pair]:
        if self._anchors is None:
            wanted = self.settings.generative_anchor_pairs or self.settings.generative_keep_general
            self._anchors = anchors(self.adapters, self.heartbeat)[0] if wanted else []
        return self._anchors

    def _measure(self, task: GenerativeTask, probes: dict[str, ProbeResult]) -> None:
        """The task's exact match and its adapter's general probe (measured once per adapter a round)."""
        adapter = self.strategy.adapter(task.name)
        evaluation = self.adapters.evaluate(adapter, task.eval_pairs)
        task.accuracy, task.token_loss = evaluation.exact_match, evaluation.token_loss
        self.heartbeat()
        if adapter not in probes:
            probes[adapter] = measure(self.adapters, adapter)
        probe = probes[adapter]
        task.general_probe = {"accuracy": probe.accuracy, "perplexity": probe.perplexity}
        self.metrics.general_probe.labels(task=task.name).set(probe.accuracy)

    def publish(
        self, offsets: dict[int, int], round_number: int, done: Container[str]
    ) -> dict[str, tuple[int, Decision]]:
        """Write a version of every changed task not ``done`` already (a retried round), each with its
        gate's decision (applied once the round is durable)."""
        written = {}
        for task in self.tasks.values():
            if task.changed and task.name not in done:
                decision = self._gate(task)
                previous = task.version
                version = self.registry.publish(
                    task.name,
                    self.adapters.weights(self.strategy.adapter(task.name)),
                    [(p.prompt, p.response) for p in task.eval_pairs],
                    self._manifest(task, offsets, round_number),
                )
                task.version, task.changed, task.trained_since_published = version, False, False
                written[task.name] = (version, decision)
                self.metrics.versions_published.labels(task=task.name, strategy=self.strategy.name).inc()
                self.metrics.record_accuracy(task.name, version, previous, _or_nan(task.accuracy))
        return written

    def _gate(self, task: GenerativeTask) -> Decision:
        alias = self.registry.alias(task.name)
        tolerance = self.settings.promotion_tolerance
        if alias is None:
            return gate(task.accuracy, None, None, tolerance)
        if alias.pinned:
            return Decision(False, f"task is pinned to v{alias.served} ({alias.reason})")
        try:
            served = self._served_exact_match(task, alias.served)
        except CorruptVersion as exc:
            return Decision(True, f"served v{alias.served} cannot be read ({exc}); replacing it")
        return gate(task.accuracy, served, alias.served, tolerance)

    def _watch_live(self, task: GenerativeTask) -> None:
        """Judge the served version on the eval pairs that arrived since; roll back if it fails."""
        fresh = task.eval_pairs[task.eval_judged :]
        task.eval_judged = len(task.eval_pairs)
        alias = self.registry.alias(task.name)
        if alias is None or not fresh:
            return
        try:
            outcomes = self._served_outcomes(task, alias.served, fresh)
        except CorruptVersion as exc:
            log.error("task %r: cannot judge the served version: %s", task.name, exc)
            return
        self.publisher.judge_live(task.name, alias.served, outcomes)

    def _served_exact_match(self, task: GenerativeTask, version: int) -> float | None:
        """The served version's exact match on the task's eval pairs: its manifest's figure on the pairs
        it was published with (``Registry.measured_prefix``), the pairs after them measured now."""
        records = [(p.prompt, p.response) for p in task.eval_pairs]
        known, correct = self.registry.measured_prefix(task.name, version, records)
        outcomes = self._served_outcomes(task, version, task.eval_pairs[known:])
        total = known + len(outcomes)
        return (correct + sum(outcomes)) / total if total else None

    def _served_outcomes(self, task: GenerativeTask, version: int, pairs: list[Pair]) -> list[bool]:
        """Whether ``version`` answers each of ``pairs`` exactly: the task's own adapter when that is the
        version (not yet trained this round), else its weights loaded beside it for the measurement."""
        if not pairs:
            return []
        if version == task.version and not task.trained_since_published:
            answers = self.adapters.evaluate(self.strategy.adapter(task.name), pairs).answers
        else:
            reference = f"{task.name}@served"
            self.adapters.add(reference, self.registry.load_weights(task.name, version))
            try:
                answers = self.adapters.evaluate(reference, pairs).answers
            finally:
                self.adapters.remove(reference)
        return [normalised(a) == normalised(p.response) for a, p in zip(answers, pairs, strict=True)]

    def _manifest(self, task: GenerativeTask, offsets: dict[int, int], round_number: int) -> dict[str, Any]:
        lora = self.adapters.lora
        return {
            "kind": GENERATIVE_KIND,
            "base_model": self.settings.language_model,
            "strategy": self.strategy.name,
            "labels": [],
            "parent_version": task.version,
            "lora": {
                "r": lora.r,
                "alpha": lora.lora_alpha,
                "target_modules": sorted(lora.target_modules or []),
            },
            "max_prompt_tokens": self.settings.max_prompt_tokens,
            "max_response_tokens": self.settings.max_response_tokens,
            "metrics": {
                "accuracy": task.accuracy,
                "exact_match": task.accuracy,
                "token_loss": task.token_loss,
                "best_accuracy": max(task.best_accuracy or 0.0, task.accuracy or 0.0),
                "general_probe": task.general_probe,
                "eval_records": len(task.eval_pairs),
                "train_records": task.train_seen,
            },
            "kafka": {"topic": self.settings.kafka_topic, "offsets": {str(p): o for p, o in offsets.items()}},
            "round": round_number,
        }

    # --- durability ---------------------------------------------------------------------------------

    def saved(self) -> dict[str, Any]:
        """The checkpoint's part: every published task's version and training count, the strategy's
        memory."""
        tasks = {
            name: {"version": task.version, "train_seen": task.train_seen}
            for name, task in self.tasks.items()
            if task.version is not None
        }
        return {"tasks": tasks, "strategy": self.strategy.saved()} if tasks else {}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors (the strategy's regulariser's), for the trainer's learner file."""
        return self.strategy.tensors()

    def restore(self, saved: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Put back the tasks ``saved`` names, each from its checkpointed version in the registry (a
        shared adapter from the newest of them: every task's version of the last round holds it), and
        the strategy's ``tensors`` from the learner file."""
        self.strategy.restore(saved.get("strategy", {}))
        newest: tuple[int, str, int] | None = None
        for name, entry in saved.get("tasks", {}).items():
            version = int(entry["version"])
            manifest = self.registry.manifest(name, version)
            if self.strategy.isolates_tasks:
                self.adapters.add(name, self.registry.load_weights(name, version))
            elif newest is None or int(manifest.get("round", 0)) > newest[0]:
                newest = (int(manifest.get("round", 0)), name, version)
            eval_pairs = [Pair(p, r) for p, r in self.registry.eval_records(name, version)]
            metrics = manifest["metrics"]
            self.tasks[name] = GenerativeTask(
                name=name,
                eval_pairs=eval_pairs,
                train_seen=int(entry["train_seen"]),
                eval_judged=len(eval_pairs),  # judged before the checkpoint
                version=version,
                accuracy=metrics.get("accuracy"),
                token_loss=metrics.get("token_loss"),
                best_accuracy=metrics.get("best_accuracy"),
                general_probe=metrics.get("general_probe"),
            )
            self.metrics.start_task(name)
        if newest is not None:
            self.adapters.add(SHARED_ADAPTER, self.registry.load_weights(newest[1], newest[2]))
            self.strategy.restore_tensors(tensors or {}, self.adapters)


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def refusal(adapters: GenerativeAdapters, record: GenerativeRecord) -> Rejection | None:
    """Why ``record`` cannot be learned: a prompt or a response over ``adapters``' token limits."""
    prompt = adapters.token_count(record.prompt)
    if prompt > adapters.max_prompt_tokens:
        return Rejection(
            "too_many_tokens", f"prompt has {prompt} tokens, the limit is {adapters.max_prompt_tokens}"
        )
    response = adapters.token_count(record.response)
    if response >= adapters.max_response_tokens:  # the end-of-turn mark takes one more
        return Rejection(
            "too_many_tokens",
            f"response has {response} tokens, the limit is {adapters.max_response_tokens - 1}",
        )
    return None
