"""The inference engine: the workers of a server that run the model, and nothing else does.

Requests put *jobs* (one or more rows: a text and the adapter it goes through, or none for the base
model) in a bounded queue and wait on a future. An engine worker takes the first job, then the jobs
already waiting (never holding an idle engine back, so a lone request costs one forward), up to
``max_batch_size`` rows, waiting at most ``max_batch_wait_ms`` for a batch that is still filling or
while another worker's forward runs, and runs them all in one encoder forward (on real tokens only:
``service.packed_encoder``), a row per text through its own adapter (``service.lora_bank``; base-model
rows through none). Each adapter row then goes through its version's head.

``workers`` threads run batches at once on the one model, each with ``threads`` of torch's own. On a
CPU that beats one batch at a time on every core: a small batch does not keep several threads busy
(measured on 2 cores: batches of 8 run at 228 texts/s on one worker with 2 threads, 486/s on two
workers with 1 each; batches of 32 at 413/s against 537/s), and closed-loop clients split into half
batches anyway. Batches are formed one worker at a time, in queue order.

Everything else that touches the model (loading a version, unloading one) is handed to the engine
and done between batches, once no forward is running, so no lock is ever held around a forward. An
adapter is unloaded only when no queued job needs it: a request always finishes on the version it
was given.

Loaded adapters are a cache of ``capacity`` (least recently used out first): a row whose adapter is
not in the model has it loaded (``weights(adapter)``, checked by the registry) before its batch runs,
and an adapter that queued rows still need is never the one evicted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from service.errors import CorruptVersion, DeadlineExceeded, ResourceExhausted
from service.served_model import ServedModel
from service.server_metrics import ServerMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Workers at most when the settings leave their number to the engine (``inference_workers`` 0).
MAX_AUTO_WORKERS = 8


def engine_shape(workers: int, threads: int) -> tuple[int, int]:
    """Inference workers, and torch threads for each, from the settings (0 for either: chosen here):
    a worker per usable core, at most ``MAX_AUTO_WORKERS``, and the cores shared out among them."""
    cores = len(os.sched_getaffinity(0))
    workers = workers or min(cores, MAX_AUTO_WORKERS)
    return workers, threads or max(1, cores // workers)


@dataclass(frozen=True)
class Row:
    """One text to run: through ``adapter`` (its head's probabilities come back), or, when None,
    through the base model alone (its base features come back: ``service.model.base_features``)."""

    text: str
    adapter: str | None = None


@dataclass(eq=False)
class Job:
    """Rows that one request needs together, answered all at once (in order) on ``future``."""

    rows: Sequence[Row]
    deadline: float | None
    future: Future[list[torch.Tensor]] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class InferenceEngine:
    """Owns the model in a server: batches jobs, runs them, applies loads and unloads in between."""

    def __init__(
        self,
        model: ServedModel,
        metrics: ServerMetrics,
        max_batch_size: int,
        max_batch_wait_ms: float,
        queue_size: int,
        capacity: int = 1_000_000,
        weights: Callable[[str], dict[str, torch.Tensor]] | None = None,
        workers: int = 1,
        threads: int = 0,
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_ms / 1000
        self.capacity = capacity
        self.threads = threads
        self._weights = weights
        # Adapters in the model, least recently used first (adapters loaded by others count too).
        self._resident: OrderedDict[str, None] = OrderedDict((name, None) for name in model.names())
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._tasks: queue.SimpleQueue[tuple[Callable[[], object], Future[object]]] = queue.SimpleQueue()
        # Rows queued or running per adapter, and adapters waiting to be unloaded when that reaches 0.
        self._needed: Counter[str] = Counter()
        self._retired: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._held: Job | None = None  # a job taken from the queue that did not fit the last batch
        # The worker that holds this forms the next batch and alone may change the model, once
        # ``_running`` (forwards in flight, guarded by ``_idle``) is 0.
        self._forming = threading.Lock()
        self._idle = threading.Condition()
        self._running = 0
        self._threads = [
            threading.Thread(target=self._run, name=f"inference-engine-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        """Start the engine's workers."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop after the batch in progress; jobs queued, or submitted from now on, fail with
        ResourceExhausted (no request waits for an engine that is gone)."""
        with self._lock:
            self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        leftover = [self._held] if self._held is not None else []
        self._held = None
        while True:
            try:
                leftover.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        for job in leftover:
            self._finish(job, error=ResourceExhausted("the server is shutting down"))

    # --- from request threads ------------------------------------------------------------------------

    def submit(self, rows: Sequence[Row], deadline: float | None = None) -> Future[list[torch.Tensor]]:
        """Queue ``rows`` as one job; ResourceExhausted at once when the queue is full.

        ``deadline`` (time.monotonic()) drops the job, with DeadlineExceeded, if it is still queued then.
        An adapter not in the model is loaded before the job's batch runs. The pool submits under its
        serving lock, which it also holds while it retires versions, so no job names a retired one.
        """
        job = Job(rows, deadline)
        with self._lock:
            if self._stop.is_set():
                raise ResourceExhausted("the server is shutting down")
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                self.metrics.queue_rejections.inc()
                raise ResourceExhausted(
                    f"the inference queue is full ({self._jobs.maxsize} requests, inference_queue_size); "
                    "retry with backoff"
                ) from None
            self._needed.update(row.adapter for row in rows if row.adapter is not None)
        return job.future

    def run(self, rows: Sequence[Row], deadline: float | None = None) -> list[torch.Tensor]:
        """Submit and wait for the answers (the job's error is raised here)."""
        return self.submit(rows, deadline).result()

    def between_batches(self, work: Callable[[], T]) -> T:
        """Run ``work`` on an engine worker while no forward runs, and return its result (or raise)."""
        if not any(thread.is_alive() for thread in self._threads):
            return work()  # not started (or stopped): nothing runs a forward meanwhile
        done: Future[object] = Future()
        self._tasks.put((work, done))
        # An empty job wakes an idle engine at once (a full queue means it is busy anyway).
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(Job([], None))
        return done.result()  # type: ignore[return-value]

    def retire(self, adapter: str) -> None:
        """Unload ``adapter`` once no queued or running job needs it."""
        with self._lock:
            self._retired.add(adapter)

    def load(self, adapter: str, weights: dict[str, torch.Tensor] | None = None) -> None:
        """On an engine worker (``between_batches``): have ``adapter`` in the model, the most recently
        used, from ``weights`` if given; one retired but still loaded is kept rather than loaded twice.
        CorruptVersion if its weights do not check or do not fit."""
        with self._lock:
            self._retired.discard(adapter)
        self._make_resident(adapter, keep={adapter}, weights=weights)

    def is_resident(self, adapter: str) -> bool:
        """Whether ``adapter`` is in the model now (it may be evicted at any later batch)."""
        return adapter in self._resident

    def has_room(self) -> bool:
        """Whether one more adapter fits without evicting another."""
        return len(self._resident) < self.capacity

    # --- the engine's workers -------------------------------------------------------------------------

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # this thread's own OpenMP team
        while not self._stop.is_set():
            with self._forming:
                batch = self._next_batch()
                if self._model_changes(batch):
                    with self._idle:
                        self._idle.wait_for(lambda: self._running == 0)
                    self._do_tasks()
                batch = self._with_adapters(batch)  # loads only what _model_changes saw missing
                if not batch:
                    continue
                with self._idle:
                    self._running += 1
            try:
                self._forward(batch)
            except Exception as exc:  # one bad batch must not end the engine
                log.exception("a batch of %d job(s) failed", len(batch))
                for job in batch:
                    self._finish(job, error=exc)
            finally:
                with self._idle:
                    self._running -= 1
                    self._idle.notify_all()

    def _model_changes(self, batch: list[Job]) -> bool:
        """Whether the model must change before ``batch`` runs: work handed in, a retired adapter no
        one needs any more, more adapters loaded than the capacity, or one the batch needs not loaded."""
        with self._lock:
            unused = any(self._needed[adapter] == 0 for adapter in self._retired)
        missing = any(row.adapter not in self._resident for job in batch for row in job.rows if row.adapter)
        return unused or missing or not self._tasks.empty() or len(self._resident) > self.capacity

    def _do_tasks(self) -> None:
        while True:
            try:
                work, done = self._tasks.get_nowait()
            except queue.Empty:
                break
            try:
                done.set_result(work())
            except Exception as exc:
                done.set_exception(exc)
        with self._lock:
            unused = {adapter for adapter in self._retired if self._needed[adapter] == 0}
            self._retired -= unused
        for adapter in unused:
            self._unload(adapter)

    def _make_resident(
        self, adapter: str, keep: set[str], weights: dict[str, torch.Tensor] | None = None
    ) -> None:
        if adapter in self._resident:
            self._resident.move_to_end(adapter)
            self._trim(keep)
            return
        if weights is None:
            if self._weights is None:
                raise CorruptVersion(f"adapter {adapter} is not loaded and this engine cannot load it")
            weights = self._weights(adapter)
        try:
            self.model.load(adapter, weights)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CorruptVersion(f"{adapter}: weights do not load: {exc}") from None
        self._resident[adapter] = None
        self.metrics.adapter_loads.inc()
        self.metrics.adapters_loaded.set(len(self._resident))
        self._trim(keep)

    def _trim(self, keep: set[str]) -> None:
        """Evict least recently used adapters down to the capacity, sparing ``keep`` and any adapter
        that queued rows need (the cache may stay over capacity until they are answered)."""
        for name in list(self._resident):
            if len(self._resident) <= self.capacity:
                break
            with self._lock:
                needed = self._needed[name] > 0
            if name not in keep and not needed:
                self._unload(name)

    def _unload(self, adapter: str) -> None:
        if self._resident.pop(adapter, False) is None:
            self.model.remove(adapter)
            self.metrics.adapters_loaded.set(len(self._resident))

    def _next_batch(self) -> list[Job]:
        """The first job (waiting for one while idle), then those already queued, up to the batch size.

        A lone request on an idle engine runs at once. Once a second job was waiting, or while another
        worker's forward runs (the cores are busy anyway, and a fuller batch costs less per row), the
        batch waits at most ``max_batch_wait_ms`` for more to fill it.
        """
        first = self._held or self._take(timeout=0.1)
        self._held = None
        if first is None or not first.rows:  # idle, or woken for work between batches
            return []
        batch, rows = [first], len(first.rows)
        deadline = time.monotonic() + self.max_batch_wait_s
        while rows < self.max_batch_size:
            job = self._take(timeout=0)
            if job is None and (len(batch) > 1 or self._running > 0):
                job = self._take(timeout=deadline - time.monotonic())
            if job is None:
                break
            if not job.rows:  # a wake-up: the work waiting between batches goes first
                break
            if rows + len(job.rows) > self.max_batch_size:
                self._held = job  # first in the next batch: order is kept
                break
            batch.append(job)
            rows += len(job.rows)
        return [job for job in batch if self._alive(job)]

    def _take(self, timeout: float) -> Job | None:
        try:
            return self._jobs.get(timeout=timeout) if timeout > 0 else self._jobs.get_nowait()
        except queue.Empty:
            return None

    def _alive(self, job: Job) -> bool:
        """False (and the job failed) if its deadline passed while it waited: no forward for it."""
        if job.deadline is not None and time.monotonic() > job.deadline:
            self.metrics.deadline_drops.inc()
            self._finish(job, error=DeadlineExceeded("the deadline passed while the request was queued"))
            return False
        return True

    @torch.inference_mode()
    def _forward(self, batch: list[Job]) -> None:
        """Every row of the batch in forwards of at most ``max_batch_size`` rows; then each job's answers."""
        started = time.perf_counter()
        rows = [row for job in batch for row in job.rows]
        outputs: list[torch.Tensor] = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            outputs.extend(self.model.outputs([row.text for row in chunk], [row.adapter for row in chunk]))
        self.metrics.batch_rows.observe(len(rows))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        offset = 0
        for job in batch:
            self._finish(job, result=outputs[offset : offset + len(job.rows)])
            offset += len(job.rows)

    def _with_adapters(self, batch: list[Job]) -> list[Job]:
        """Load the adapters the batch's rows need and are not in the model; the jobs of one that
        cannot be loaded fail with its error, the rest go on."""
        wanted = {row.adapter for job in batch for row in job.rows if row.adapter is not None}
        failed: dict[str, Exception] = {}
        for adapter in wanted:
            try:
                self._make_resident(adapter, keep=wanted)
            except Exception as exc:
                failed[adapter] = exc
        kept = []
        for job in batch:
            error = next((failed[row.adapter] for row in job.rows if row.adapter in failed), None)
            if error is None:
                kept.append(job)
            else:
                self._finish(job, error=error)
        return kept

    def _finish(
        self, job: Job, result: list[torch.Tensor] | None = None, error: BaseException | None = None
    ) -> None:
        with self._lock:
            self._needed.subtract(row.adapter for row in job.rows if row.adapter is not None)
        if not job.future.done():
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result or [])
