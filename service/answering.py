"""Answering predictions: validate a request, queue its rows with the inference engine, rank labels.

A request goes through four steps, so that many can be in flight at once (PredictBatch, PredictStream)
and share the engine's batches: ``start`` validates it and queues its first rows (its task's served
version; for a request naming no task, a base-model row for the router); ``advance`` queues a
task-less request's most probable candidate task once its embedding is back; ``narrow`` queues the
other candidates only if they could still win against the first one's answer (most requests are
settled by it); ``finish`` waits for the answers and ranks the labels. Errors are ContinualErrors,
raised by the step that meets them.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch

from service.engine import Row
from service.errors import ContinualError, FailedPrecondition, InvalidArgument, NotFound
from service.router import Router, answer_without_task, answered_by_router, candidates, could_still_win
from service.serving import AdapterPool, LoadedVersion, nearest_task
from service.settings import TASK_NAME

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One text to classify; ``task`` empty to infer it."""

    task: str
    text: str
    top_k: int = 1


@dataclass(frozen=True)
class Prediction:
    """Labels best first with their probabilities, and the version that produced them."""

    task: str
    version: int
    ranked: list[tuple[str, float]]
    task_inferred: bool = False
    task_confidence: float = 1.0
    #: A request naming no task that belongs to none of the served tasks (``service.out_of_scope``);
    #: ``ranked`` is still the best guess.
    out_of_scope: bool = False


@dataclass
class Pending:
    """A request on its way: the rows it waits for and what they will be read against."""

    request: Request
    deadline: float | None
    #: Whether drift sees this request (its base-model embedding comes with the answer).
    observed: bool
    future: Future[list[torch.Tensor]]
    #: The versions whose rows ``earlier`` and then ``future`` answer, in order; empty while a task-less
    #: request is routed; its candidates, the first one asked alone, until it is narrowed.
    versions: list[LoadedVersion] = field(default_factory=list)
    #: For a task-less request: every candidate's probability under the router (None: by prototypes).
    routed: torch.Tensor | None = None
    #: ...and, with ``routing_label_scores: router-times-adapter``, its labels' (one row each).
    priors: list[torch.Tensor] | None = None
    confidence: float = 1.0
    embedding: torch.Tensor | None = None
    #: Answers already back (a task-less request's first candidate's), before ``future``'s.
    earlier: list[torch.Tensor] = field(default_factory=list)
    out_of_scope: bool = False
    #: Answered by the router alone (``router_alone_above``): ``future`` holds its label probabilities.
    by_router: bool = False
    #: For a request naming its task scored by router x adapter: the router (its base row comes last).
    named_scorer: Router | None = None


class DriftSampler:
    """Which requests drift sees: a fraction of them (``rate``), and, once a named task's requests
    come faster than ``per_second`` a second, only that many of them a second (0: no cap).

    A sampled request costs a second row in its batch (its base-model embedding), so without a cap
    drift doubles the model's work under load. A busy task's requests are kept with probability
    ``per_second`` / its recent request rate (an exponentially decaying count over about a second),
    so the samples are spread evenly over its traffic rather than taken from the start of each burst,
    which would judge a biased window; a quiet task still has every request judged."""

    def __init__(
        self, rate: float, per_second: float, seed: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.per_second = rate, per_second
        self._random = random.Random(seed)
        self._clock = clock
        self._recent: dict[str, tuple[float, float]] = {}  # task: (requests a second, when counted)
        self._lock = threading.Lock()

    def __call__(self, task: str | None) -> bool:
        """Whether this request to ``task`` is judged. A request naming none (``task`` None) is never
        capped: its base features come with its routing, so drift costs it no row."""
        with self._lock:
            keep = self.rate
            if self.per_second and task is not None:
                now = self._clock()
                per_second, then = self._recent.get(task, (0.0, now))
                per_second = per_second * math.exp(then - now) + 1.0  # this request counted
                self._recent[task] = (per_second, now)
                keep *= min(1.0, self.per_second / per_second)
            return self._random.random() < keep


class Answerer:
    """Answers Predict, PredictBatch and PredictStream with the pool's served versions."""

    def __init__(self, pool: AdapterPool) -> None:
        self.pool = pool
        self.settings = pool.settings
        self._drift_sampler = DriftSampler(
            pool.settings.drift_sample_rate, pool.settings.drift_max_samples_per_s, pool.settings.seed
        )
        self._stack_lock = threading.Lock()
        self._stacked: tuple[tuple[LoadedVersion, ...], torch.Tensor] = ((), torch.empty(0))

    def predict(self, request: Request, deadline: float | None = None) -> Prediction:
        """One request, start to finish. ``deadline`` (time.monotonic()) drops it if still queued then."""
        return self._complete(self.start(request, deadline))

    def predict_many(
        self, requests: Sequence[Request], deadline: float | None = None
    ) -> list[Prediction | ContinualError]:
        """Many requests at once, each step for all of them before the next, so their rows share
        batches; an item's error is its answer and the others go on. InvalidArgument for the whole
        call when it holds none, or more than ``max_batch_items``."""
        limit = self.settings.max_batch_items
        if not 0 < len(requests) <= limit:
            raise InvalidArgument(f"a batch holds 1 to {limit} items (max_batch_items), got {len(requests)}")
        pending: list[Pending | ContinualError] = [attempt(self.start, r, deadline) for r in requests]
        for step in (self.advance, self.narrow):
            pending = [attempt(step, p) if isinstance(p, Pending) else p for p in pending]
        return [attempt(self.finish, p) if isinstance(p, Pending) else p for p in pending]

    def predict_stream(
        self, requests: Iterable[Request], deadline: float | None, window: int
    ) -> Iterator[Prediction | ContinualError]:
        """Answers in the order the requests come. Each is started as it arrives, on a reader thread,
        while earlier ones are answered; at most ``window`` are started and not yet answered (the
        reading waits). Ends when the requests do, or when the consumer stops taking answers."""
        started: queue.Queue[Pending | ContinualError | None] = queue.Queue(window)
        done = threading.Event()

        def read() -> None:
            try:
                for request in requests:
                    if not _put(started, attempt(self.start, request, deadline), done):
                        return
            except Exception:  # the requests failed (a client that went away): the stream ends
                log.info("a prediction stream's requests ended with an error", exc_info=True)
            finally:
                _put(started, None, done)

        threading.Thread(target=read, name="predict-stream-reader", daemon=True).start()
        try:
            while (item := started.get()) is not None:
                yield attempt(self._complete, item) if isinstance(item, Pending) else item
        finally:
            done.set()

    def _complete(self, pending: Pending) -> Prediction:
        return self.finish(self.narrow(self.advance(pending)))

    def start(self, request: Request, deadline: float | None = None) -> Pending:
        """Validate ``request`` and queue its first rows."""
        task, text = request.task, request.text
        if task and not TASK_NAME.fullmatch(task):
            raise InvalidArgument(f"task {task[:80]!r} is not a valid task name ({TASK_NAME.pattern})")
        if not text.strip():
            raise InvalidArgument("text is empty")
        if len(text) > self.settings.max_text_chars:
            raise InvalidArgument(
                f"text has {len(text)} characters, the limit is {self.settings.max_text_chars}"
            )
        if request.top_k < 0:
            raise InvalidArgument(f"top_k must not be negative, got {request.top_k}")
        if not task:
            observed = self.pool.drift is not None and self._drift_sampler(None)
            return Pending(request, deadline, observed, self.pool.engine.submit([Row(text)], deadline))
        with self.pool.serving() as (served, router):
            loaded = served.get(task)
            if loaded is None:
                if task in self.pool.generative:
                    raise FailedPrecondition(f"task {task!r} is generative: Predict answers classifiers")
                known = ", ".join(sorted(served)) or "none yet"
                raise NotFound(f"no adapter is served for task {task!r} (served tasks: {known})")
            # A sampled request brings a base row along for drift: the same forward, no other. (Asked
            # only for a served task: the sampler keeps a rate per task it is asked about.)
            observed = self.pool.drift is not None and self._drift_sampler(task)
            scorer = router if self._scores_named(router, loaded) else None
            rows = [Row(text, loaded.adapter)] + ([Row(text)] if observed or scorer else [])
            future = self.pool.engine.submit(rows, deadline)
            return Pending(request, deadline, observed, future, [loaded], named_scorer=scorer)

    def _scores_named(self, router: Router | None, loaded: LoadedVersion) -> bool:
        """Whether a request naming ``loaded``'s task is scored by router x adapter (the setting, and
        a router that knows the task)."""
        wanted = self.settings.named_label_scores == "router-times-adapter"
        return wanted and router is not None and loaded.task in router.tasks()

    def advance(self, pending: Pending) -> Pending:
        """For a request naming no task, once its embedding is back: choose its candidate tasks (the
        router's most probable, or the nearest prototypes' task) and queue the first one's row."""
        if pending.versions:
            return pending
        (features,) = pending.future.result()
        embedding = features[-self.pool.hidden_size :]
        coverage, most = self.settings.routing_coverage, self.settings.routing_max_candidates
        with self.pool.serving() as (served_by_task, router):
            served = [loaded for loaded in served_by_task.values() if len(loaded.prototypes)]
            if not served:
                raise NotFound("no served version has label prototypes yet, so a request must name its task")
            routed, priors, confidence, out_of_scope = None, None, 1.0, False
            if router is not None and {loaded.task for loaded in served} <= router.tasks():
                tasks = [loaded.task for loaded in served]
                scored = self.settings.routing_label_scores == "router-times-adapter"
                alone_above = self.settings.router_alone_above
                asked = scored or alone_above is not None
                labels = [loaded.labels for loaded in served] if asked else None
                route = router.route(features.unsqueeze(0), tasks, labels, self._prototypes(served))
                routed = route.task_probabilities
                out_of_scope = route.out_of_scope is not None and bool(route.out_of_scope[0])
                if route.label_priors is not None and alone_above is not None:
                    (alone,) = answered_by_router(route.label_priors, alone_above)
                    if alone is not None and router.speaks_for(tasks[alone.task], served[alone.task].version):
                        # No adapter forward: the router's answer is the answer.
                        answered: Future[list[torch.Tensor]] = Future()
                        answered.set_result([alone.label_probabilities])
                        return replace(
                            pending,
                            future=answered,
                            versions=[served[alone.task]],
                            confidence=alone.task_probability,
                            embedding=embedding,
                            out_of_scope=out_of_scope,
                            by_router=True,
                        )
                chosen = candidates(routed[0], coverage, most)
                if route.label_priors is not None and scored:
                    priors = [route.label_priors[i] for i in chosen]
            else:
                prototypes = [loaded.prototypes for loaded in served]
                choices, confidences = nearest_task(embedding.unsqueeze(0), prototypes)
                chosen, confidence = [int(choices[0])], float(confidences[0])
            future = self.pool.engine.submit(
                [Row(pending.request.text, served[chosen[0]].adapter)], pending.deadline
            )
        versions = [served[i] for i in chosen]
        if routed is not None:
            routed = routed[:, chosen]  # the candidates' probabilities under the router, in their order
        return replace(
            pending,
            future=future,
            versions=versions,
            routed=routed,
            priors=priors,
            confidence=confidence,
            embedding=embedding,
            out_of_scope=out_of_scope,
        )

    def _prototypes(self, served: Sequence[LoadedVersion]) -> torch.Tensor:
        """The served versions' label prototypes stacked, as the last request stacked them if the
        same versions are served (with a thousand tasks a fresh stack is megabytes per request)."""
        with self._stack_lock:
            cached, stacked = self._stacked
            if len(cached) != len(served) or any(a is not b for a, b in zip(cached, served, strict=False)):
                cached, stacked = tuple(served), torch.cat([loaded.prototypes for loaded in served])
                self._stacked = cached, stacked  # holding the versions, so none is freed while cached
            return stacked

    def narrow(self, pending: Pending) -> Pending:
        """For a request naming no task, once its first candidate has answered: queue the rows of the
        other candidates that could still win (``could_still_win``) as one job, and drop the rest (a
        candidate whose task was switched to another version meanwhile is dropped too)."""
        if pending.routed is None or len(pending.versions) == 1 or pending.earlier:
            return pending
        (first,) = pending.future.result()
        versions, routed = pending.versions, pending.routed
        priors = [prior[0] for prior in pending.priors] if pending.priors is not None else None
        rest = could_still_win(routed[0], first[: len(versions[0].labels)], priors)
        future: Future[list[torch.Tensor]] = Future()
        with self.pool.serving() as (served, _):
            rest = [i for i in rest if served.get(versions[i].task) is versions[i]]
            if rest:
                rows = [Row(pending.request.text, versions[i].adapter) for i in rest]
                future = self.pool.engine.submit(rows, pending.deadline)
            else:
                future.set_result([])
        kept = [0, *rest]
        return replace(
            pending,
            future=future,
            earlier=[first],
            versions=[versions[i] for i in kept],
            routed=routed[:, kept],
            priors=[pending.priors[i] for i in kept] if pending.priors is not None else None,
        )

    def finish(self, pending: Pending) -> Prediction:
        """Wait for the answers; the labels best first, the version that gave them, drift's sample."""
        outputs = pending.earlier + pending.future.result()
        own = [
            output[: len(loaded.labels)] for output, loaded in zip(outputs, pending.versions, strict=False)
        ]
        loaded, probabilities, confidence = pending.versions[0], own[0], pending.confidence
        if pending.named_scorer is not None:
            probabilities = _times_router(pending.named_scorer, loaded, outputs[-1], probabilities)
        if pending.routed is not None:
            (answer,) = answer_without_task(
                pending.routed,
                lambda task, _: own[task].unsqueeze(0),
                1.0,
                len(pending.versions),
                pending.priors,
            )
            loaded, probabilities, confidence = (
                pending.versions[answer.task],
                answer.label_probabilities,
                answer.task_probability,
            )
        k = min(max(pending.request.top_k, 1), len(loaded.labels))
        scores, indices = torch.topk(probabilities, k)
        ranked = [
            (loaded.labels[i], float(s)) for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
        ]
        embedding = (
            pending.embedding if pending.embedding is not None else outputs[-1][-self.pool.hidden_size :]
        )
        if self.pool.drift is not None and pending.observed:
            self.pool.drift.observe(loaded.task, embedding.numpy(), ranked[0][0])
        if not pending.request.task:
            self.pool.metrics.task_less_answers.labels(out_of_scope=str(pending.out_of_scope).lower()).inc()
            if pending.by_router:
                self.pool.metrics.router_alone_answers.inc()
        return Prediction(
            loaded.task, loaded.version, ranked, not pending.request.task, confidence, pending.out_of_scope
        )


def _times_router(
    router: Router, loaded: LoadedVersion, features: torch.Tensor, probabilities: torch.Tensor
) -> torch.Tensor:
    """A named task's label probabilities times the router's over its labels, renormalised; the
    adapter's alone if the router lacks one of the labels (a version newer than the router)."""
    priors = router.label_priors(features.unsqueeze(0), [loaded.task], [loaded.labels])
    if priors is None:
        return probabilities
    joint = probabilities * priors[0][0]
    total = joint.sum()
    return joint / total if float(total) > 0 else probabilities


def attempt(step: Callable[..., T], *args: object) -> T | ContinualError:
    """``step(*args)``, or the ContinualError it raised."""
    try:
        return step(*args)
    except ContinualError as exc:
        return exc


def _put(window: queue.Queue[T], item: T, done: threading.Event) -> bool:
    """Put ``item``, waiting for room while the stream lasts; False if it ended first."""
    while not done.is_set():
        try:
            window.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
