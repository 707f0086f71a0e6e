"""Task inference for requests that name no task: a linear router over every label, on base features.

The trainer refits the router after each round on its feature memory (``service.feature_memory``): a
linear classifier over every (task, label) seen, on the frozen base model's features (its last layers'
pooled outputs, ``service.model.base_features``), fitted to convergence (a frozen joint linear head,
kept current as tasks arrive). A label's probability summed over a task's labels is the task's
probability. Unlike label prototypes it is discriminative: it learns which directions tell apart
intents of one product, where nearest-mean routing is weakest.

A request is then answered by the candidate tasks' own versions, most probable first, until they
cover ``routing_coverage`` of the probability (at most ``routing_max_candidates``): each answers
within its labels. By default (``routing_label_scores: router-times-adapter``) the (task, label) whose
router probability times its adapter's probability is highest wins: an ensemble of the frozen joint
head and the fine-tuned adapters, which on CLINC150 val beat the adapters' own scoring
(bench/README.md); with ``adapter``, the label with the highest p(task) · p(label | task). A confident
route costs one adapter forward, an unsure one a few. Servers and the benchmark both answer through
``answer_without_task``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch
from torch.nn import functional

from service.errors import CorruptVersion
from service.feature_memory import FeatureMemory
from service.out_of_scope import ScopeRule, calibrated, scope_scores
from service.registry import Registry
from service.settings import Settings

#: L2 penalty of the router's weights (the frozen-embedding reference's: ample data, little to fear).
ROUTER_WEIGHT_DECAY = 1e-4
#: L-BFGS iterations; it converges well before on CLINC150-sized memories.
ROUTER_MAX_ITERATIONS = 100
ROUTER_WEIGHT = "router.weight"
ROUTER_BIAS = "router.bias"


@dataclass(frozen=True, eq=False)
class Router:
    """A linear classifier over (task, label) rows of base features."""

    rows: tuple[tuple[str, str], ...]
    weight: torch.Tensor
    bias: torch.Tensor
    #: When a text belongs to none of the tasks (``service.out_of_scope``); None: never judged.
    scope: ScopeRule | None = None
    #: Each task's newest version when the router was fitted (None: not recorded, a router from before).
    versions: dict[str, int] | None = None

    def speaks_for(self, task: str, version: int) -> bool:
        """Whether the router may answer alone for ``task`` served at ``version``: only the version it
        was fitted beside, so a rolled-back task (or one the gate held back) is answered by its adapters."""
        return self.versions is not None and self.versions.get(task) == version

    def tasks(self) -> set[str]:
        """The tasks the router can route to."""
        return {task for task, _ in self.rows}

    @torch.no_grad()
    def route(
        self,
        features: torch.Tensor,
        tasks: Sequence[str],
        labels: Sequence[Sequence[str]] | None,
        prototypes: torch.Tensor,
    ) -> Route:
        """Everything a request naming no task needs of the router, out of one softmax over the rows
        of ``tasks``: their probabilities, the label priors (with ``labels``, as ``label_priors``) and
        the out-of-scope judgement (``prototypes`` as for ``out_of_scope``)."""
        plan = self._plan(tasks, labels)
        probabilities = self._softmax(features, plan)
        return Route(
            plan.task_totals(probabilities, len(tasks)),
            plan.priors(probabilities) if labels is not None else None,
            self._judged(probabilities, features, prototypes),
        )

    @torch.no_grad()
    def label_priors(
        self, features: torch.Tensor, tasks: Sequence[str], labels: Sequence[Sequence[str]]
    ) -> list[torch.Tensor] | None:
        """Per task of ``tasks``, each text's probability of each of the task's ``labels`` (in
        that order), out of one softmax over every label of ``tasks``; None if the router lacks one
        (a version published before the router was refitted on its labels)."""
        plan = self._plan(tasks, labels)
        return plan.priors(self._softmax(features, plan))

    @torch.no_grad()
    def task_probabilities(self, features: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor:
        """Per text, each of ``tasks``' probability (rows of other tasks left out of the softmax)."""
        plan = self._plan(tasks, None)
        return plan.task_totals(self._softmax(features, plan), len(tasks))

    @torch.no_grad()
    def label_probabilities(
        self, features: torch.Tensor, tasks: Sequence[str]
    ) -> tuple[list[tuple[str, str]], torch.Tensor]:
        """The (task, label) rows of ``tasks`` and, per text, each row's probability."""
        plan = self._plan(tasks, None)
        return list(plan.rows), self._softmax(features, plan)

    def _softmax(self, features: torch.Tensor, plan: _Plan) -> torch.Tensor:
        if plan.kept is None:  # a server routing to every task it has: no rows to pick out
            return torch.softmax(self.inputs(features) @ self.weight.T + self.bias, dim=-1)
        logits = self.inputs(features) @ self.weight[plan.kept].T + self.bias[plan.kept]
        return torch.softmax(logits, dim=-1)

    def _plan(self, tasks: Sequence[str], labels: Sequence[Sequence[str]] | None) -> _Plan:
        """Which rows a question over ``tasks`` (and ``labels``) reads, and where its answers go: worked
        out once per set of served versions, not per request (a thousand tasks are 15,000 rows)."""
        key = (tuple(tasks), None if labels is None else tuple(tuple(names) for names in labels))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 16:  # the served set changed many times: start over
                self._plans.clear()
            plan = self._plans[key] = _Plan.of(self.rows, self._tasks, tasks, labels)
        return plan

    @torch.no_grad()
    def out_of_scope(
        self, features: torch.Tensor, tasks: Sequence[str], prototypes: torch.Tensor
    ) -> torch.Tensor | None:
        """Per text, whether it belongs to none of ``tasks`` (whose unit label prototypes are
        ``prototypes``); None without a calibrated rule."""
        if self.scope is None:
            return None
        return self._judged(self.label_probabilities(features, tasks)[1], features, prototypes)

    def _judged(
        self, probabilities: torch.Tensor, features: torch.Tensor, prototypes: torch.Tensor
    ) -> torch.Tensor | None:
        if self.scope is None:
            return None
        embeddings = features[:, -prototypes.shape[-1] :] if len(prototypes) else features
        return self.scope.out_of_scope(probabilities, embeddings, prototypes)

    @cached_property
    def _tasks(self) -> frozenset[str]:
        return frozenset(self.tasks())

    @cached_property
    def _plans(self) -> dict[tuple[Any, ...], _Plan]:
        return {}

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        """The columns of base features (``service.model.base_features``) this router was fitted on:
        the last ones, as many as it has weights for (one layer's for a router from before)."""
        width = self.weight.shape[1]
        if features.shape[1] < width:
            raise ValueError(f"the router reads {width} features per text, got {features.shape[1]}")
        return features[:, -width:]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights, ready for safetensors."""
        return {ROUTER_WEIGHT: self.weight.contiguous(), ROUTER_BIAS: self.bias.contiguous()}

    @classmethod
    def from_tensors(
        cls,
        rows: Sequence[Sequence[str]],
        tensors: dict[str, torch.Tensor],
        scope: ScopeRule | None = None,
        versions: dict[str, int] | None = None,
    ) -> Router:
        """A router from ``tensors()`` and its rows; ValueError if they do not fit together."""
        weight, bias = tensors[ROUTER_WEIGHT], tensors[ROUTER_BIAS]
        if weight.shape[0] != len(rows) or bias.shape != (len(rows),):
            raise ValueError(f"router weights have {weight.shape[0]} rows, its manifest lists {len(rows)}")
        beside = {str(task): int(v) for task, v in versions.items()} if versions else None
        return cls(tuple((str(task), str(label)) for task, label in rows), weight, bias, scope, beside)


@dataclass(frozen=True)
class Route:
    """What ``Router.route`` tells of texts: each task's probability, the label priors (None when not
    asked for or the router lacks a label) and which texts are out of scope (None: no rule)."""

    task_probabilities: torch.Tensor
    label_priors: list[torch.Tensor] | None
    out_of_scope: torch.Tensor | None


@dataclass(frozen=True)
class _Plan:
    """The router's rows a question reads (``kept``, None: all), the task of each (``owner``) and,
    with labels, where each task's labels sit among them (``columns``, None if one is missing)."""

    kept: torch.Tensor | None
    rows: list[tuple[str, str]]
    owner: torch.Tensor
    columns: torch.Tensor | None
    sizes: list[int]

    @classmethod
    def of(
        cls,
        rows: Sequence[tuple[str, str]],
        known: frozenset[str],
        tasks: Sequence[str],
        labels: Sequence[Sequence[str]] | None,
    ) -> _Plan:
        wanted = set(tasks)
        everything = wanted >= known
        kept = (
            list(range(len(rows)))
            if everything
            else [i for i, (task, _) in enumerate(rows) if task in wanted]
        )
        picked = [rows[i] for i in kept]
        index = {task: i for i, task in enumerate(tasks)}
        owner = torch.tensor([index[task] for task, _ in picked], dtype=torch.long)
        columns, sizes = None, [len(names) for names in labels or []]
        if labels is not None:
            column = {row: i for i, row in enumerate(picked)}
            wanted_rows = [
                (task, label) for task, names in zip(tasks, labels, strict=True) for label in names
            ]
            if all(row in column for row in wanted_rows):
                columns = torch.tensor([column[row] for row in wanted_rows], dtype=torch.long)
        return cls(
            None if everything else torch.tensor(kept, dtype=torch.long), picked, owner, columns, sizes
        )

    def task_totals(self, probabilities: torch.Tensor, tasks: int) -> torch.Tensor:
        """Each task's probability: its rows' summed."""
        totals = torch.zeros(len(probabilities), tasks, dtype=probabilities.dtype)
        return totals.index_add_(1, self.owner, probabilities)

    def priors(self, probabilities: torch.Tensor) -> list[torch.Tensor] | None:
        """Per task, its labels' probabilities in the order asked; None if the router lacks a label."""
        if self.columns is None:
            return None
        return list(probabilities[:, self.columns].split(self.sizes, dim=1))


def fit_router(memory: FeatureMemory, heartbeat: Callable[[], None] = lambda: None) -> Router | None:
    """The router fitted to convergence on the memory (full batch, L-BFGS, from zero); None before
    two labels have examples. A function of the memory alone: a restart refits the same router.
    ``heartbeat`` is called at every evaluation of the loss (the trainer keeps its consumer group
    membership meanwhile: on a large memory with many labels the fit takes minutes)."""
    x, y, keys = memory.features()
    if len(keys) < 2:
        return None
    # Zeros made directly: an nn.Linear would draw its initial weights from torch's global generator,
    # and that would shift the dropout masks of every training step after the fit.
    weight = torch.zeros(len(keys), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(keys), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=ROUTER_MAX_ITERATIONS)

    def closure() -> torch.Tensor:
        heartbeat()
        optimizer.zero_grad()
        logits = functional.linear(x, weight, bias)
        loss = functional.cross_entropy(logits, y) + ROUTER_WEIGHT_DECAY * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return Router(tuple(keys), weight.detach().clone(), bias.detach().clone())


def scoped(
    router: Router,
    inside: FeatureMemory,
    outside: FeatureMemory,
    prototypes: torch.Tensor,
    settings: Settings,
) -> Router:
    """``router`` with its out-of-scope rule (``service.out_of_scope``) calibrated on ``inside``, base
    features of eval records (in scope by construction), and ``outside``, those of eval records of no
    task; ``prototypes`` are the unit label prototypes of its tasks. No rule while ``inside`` holds
    too few records."""
    tasks, weight = sorted(router.tasks()), settings.out_of_scope_prototype_weight

    def scores(memory: FeatureMemory) -> torch.Tensor:
        features, _, _ = memory.features()
        if not len(features):
            return torch.empty(0)
        _, probabilities = router.label_probabilities(features, tasks)
        return scope_scores(probabilities, features[:, -prototypes.shape[-1] :], prototypes, weight)

    rule = calibrated(scores(inside), settings.out_of_scope_reject_rate, weight, scores(outside))
    return replace(router, scope=rule)


def load_router(registry: Registry, manifest: dict[str, Any] | None = None) -> Router | None:
    """The router ``manifest`` names (default: the registry's current one; None before the first);
    CorruptVersion if it does not check."""
    manifest = manifest or registry.router_manifest()
    if manifest is None:
        return None
    try:
        scope = ScopeRule.from_manifest(manifest.get("out_of_scope"))
        versions = manifest.get("versions")
        return Router.from_tensors(manifest["rows"], registry.load_router(manifest), scope, versions)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CorruptVersion(f"router {manifest.get('file')}: {exc}") from None


def candidates(task_probabilities: torch.Tensor, coverage: float, most: int) -> list[int]:
    """Tasks most probable first, until they cover ``coverage`` of the probability (at most ``most``)."""
    order = torch.argsort(task_probabilities, descending=True).tolist()
    chosen, covered = [], 0.0
    for task in order[:most]:
        chosen.append(task)
        covered += float(task_probabilities[task])
        if covered >= coverage:
            break
    return chosen


def could_still_win(
    task_probabilities: torch.Tensor, first: torch.Tensor, priors: Sequence[torch.Tensor] | None = None
) -> list[int]:
    """For one text whose candidate tasks (``task_probabilities``, one each, most probable first, and
    ``priors`` as in ``answer_without_task``) have had only the first one answered (``first``, its label
    probabilities): the other candidates that ``answer_without_task`` could still choose.

    A candidate's score is at most what it would be if its version gave its best label probability 1,
    so one whose bound is below the first's score cannot win, and leaving it out changes no answer's
    task or label. Most texts are settled by their first candidate, which spares the others' rows."""
    if priors is not None:
        score = float((priors[0] * first).max())
        bounds = [float(prior.max()) for prior in priors]
    else:
        score = float(task_probabilities[0]) * float(first.max())
        bounds = [float(probability) for probability in task_probabilities]
    return [i for i in range(1, len(bounds)) if bounds[i] >= score]


@dataclass(frozen=True)
class Answer:
    """The task chosen for one text, its probability, and its version's label probabilities."""

    task: int
    task_probability: float
    label_probabilities: torch.Tensor


def answer_without_task(
    task_probabilities: torch.Tensor,
    answer: Callable[[int, list[int]], torch.Tensor],
    coverage: float,
    most: int,
    priors: Sequence[torch.Tensor] | None = None,
) -> list[Answer]:
    """For each text (a row of task probabilities), the candidate task whose best label has the highest
    p(task) · p(label | task). ``answer(task, rows)`` gives the label probabilities of that task's
    version for those texts (rows of ``task_probabilities``), one call per task.

    With ``priors`` (per task, each text's router probability of each of its labels), the (task, label)
    with the highest prior · p(label | task) wins instead; the answer's label probabilities are those
    products over the chosen task's labels, and its task probability their share of all candidates'."""
    chosen = [candidates(row, coverage, most) for row in task_probabilities]
    asked: dict[int, list[int]] = {}
    for row, tasks in enumerate(chosen):
        for task in tasks:
            asked.setdefault(task, []).append(row)
    answers: dict[tuple[int, int], torch.Tensor] = {}
    for task, rows in asked.items():
        for row, probabilities in zip(rows, answer(task, rows), strict=True):
            answers[(row, task)] = probabilities
    best: list[Answer] = []
    for row, tasks in enumerate(chosen):
        if priors is not None:
            joint = {task: priors[task][row] * answers[(row, task)] for task in tasks}
            total = float(sum(float(scores.sum()) for scores in joint.values())) or 1.0
            _, task = max((float(joint[task].max()), task) for task in tasks)
            mass = float(joint[task].sum())
            labels = joint[task] / mass if mass > 0 else answers[(row, task)]
            best.append(Answer(task, mass / total, labels))
            continue
        scored = [
            (float(task_probabilities[row, task]) * float(answers[(row, task)].max()), task) for task in tasks
        ]
        _, task = max(scored)
        best.append(Answer(task, float(task_probabilities[row, task]), answers[(row, task)]))
    return best


def answered_by_router(priors: Sequence[torch.Tensor], above: float) -> list[Answer | None]:
    """For each text, the router's own answer if its most probable (task, label) is at least ``above``
    probable, else None (the candidates' adapters answer it). ``priors``: per task, each text's router
    probability of each of its labels, out of one softmax over all of them (``Route.label_priors``);
    the answer's label probabilities are its task's, renormalised within the task."""
    answers: list[Answer | None] = []
    for row in range(len(priors[0]) if priors else 0):
        best, task = max((float(prior[row].max()), task) for task, prior in enumerate(priors))
        mass = priors[task][row].sum()
        confident = best >= above and float(mass) > 0
        answers.append(Answer(task, float(mass), priors[task][row] / mass) if confident else None)
    return answers
