"""Drift detectors: has what a task sees moved away from what it learned from?

Four detectors (the ``detector`` label of the drift metrics), each judged per task:
- ``input`` (servers) and ``training_input`` (trainer): MMD² between the base-model embeddings of a
  window of recent Predict texts, or of new training texts, and of the task's reference texts, with a
  permutation p-value (a two-sample test that assumes nothing about shape);
- ``prediction`` (servers): the labels predicted over a window against the label mix of the training
  data, with a chi-square p-value;
- ``accuracy`` (trainer): a Page-Hinkley test on the served version's right/wrong answers on new eval
  records.

The detectors are pure (numpy in, results out); DriftMonitor wires them to embeddings and metrics.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from service.serving_settings import DriftSettings

log = logging.getLogger(__name__)

#: Fewer reference texts than this make no test worth reporting.
MIN_REFERENCE = 10


@dataclass(frozen=True)
class DriftResult:
    """One judged window."""

    detector: str
    statistic: float
    p_value: float
    drifted: bool
    samples: int


def _sq_distances(x: np.ndarray) -> np.ndarray:
    norms = (x * x).sum(1)
    return np.maximum(norms[:, None] + norms[None, :] - 2.0 * x @ x.T, 0.0)


def _mmd2_from_kernel(kernel: np.ndarray, first: np.ndarray, second: np.ndarray) -> float:
    """Unbiased MMD² of two index sets into one kernel matrix."""
    n, m = len(first), len(second)
    kxx = kernel[np.ix_(first, first)]
    kyy = kernel[np.ix_(second, second)]
    kxy = kernel[np.ix_(first, second)]
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


class MMDDrift:
    """Two-sample test between a fixed reference sample and successive windows of new samples.

    The RBF bandwidth is the median pairwise distance in the reference (the median heuristic). The
    p-value counts how often a random split of reference + window gives an MMD² at least as large.
    """

    def __init__(
        self,
        reference: np.ndarray,
        window: int,
        permutations: int,
        alpha: float,
        seed: int = 0,
        detector: str = "input",
    ) -> None:
        if len(reference) < 2 or window < 2:
            raise ValueError("MMD needs at least two reference samples and a window of two or more")
        self.reference = np.asarray(reference, dtype=np.float64)
        self.window = window
        self.permutations = permutations
        self.alpha = alpha
        self.detector = detector
        self._rng = np.random.default_rng(seed)
        distances = _sq_distances(self.reference)
        median = float(np.median(distances[np.triu_indices(len(self.reference), k=1)]))
        self._gamma = 1.0 / max(median, 1e-12)
        self._pending: list[np.ndarray] = []

    def pending(self) -> list[np.ndarray]:
        """Samples waiting for their window to fill."""
        return list(self._pending)

    def add(self, samples: np.ndarray) -> list[DriftResult]:
        """Add new samples; returns a result for every window they complete."""
        self._pending.extend(np.asarray(samples, dtype=np.float64))
        results = []
        while len(self._pending) >= self.window:
            window, self._pending = np.stack(self._pending[: self.window]), self._pending[self.window :]
            results.append(self.test(window))
        return results

    def test(self, window: np.ndarray) -> DriftResult:
        """MMD² and its permutation p-value for one window against the reference."""
        pooled = np.concatenate([self.reference, window])
        kernel = np.exp(-self._gamma * _sq_distances(pooled))
        n = len(self.reference)
        indices = np.arange(len(pooled))
        observed = _mmd2_from_kernel(kernel, indices[:n], indices[n:])
        at_least = 0
        for _ in range(self.permutations):
            shuffled = self._rng.permutation(indices)
            if _mmd2_from_kernel(kernel, shuffled[:n], shuffled[n:]) >= observed:
                at_least += 1
        p_value = (at_least + 1) / (self.permutations + 1)
        return DriftResult(self.detector, observed, p_value, p_value < self.alpha, len(window))


class PredictionDrift:
    """Predicted labels over a window against the training label mix (chi-square goodness of fit)."""

    def __init__(self, expected: Mapping[str, int], window: int, alpha: float) -> None:
        total = sum(expected.values())
        if total == 0:
            raise ValueError("prediction drift needs the training label counts")
        self.labels = sorted(expected)
        # A little smoothing: a label never trained on must not make the expectation zero.
        counts = np.array([expected[label] for label in self.labels], dtype=np.float64) + 0.5
        self.expected = counts / counts.sum()
        self.window = window
        self.alpha = alpha
        self._pending: list[str] = []

    def add(self, predicted: Sequence[str]) -> list[DriftResult]:
        """Add predicted labels; returns a result for every window they complete."""
        self._pending.extend(predicted)
        results = []
        while len(self._pending) >= self.window:
            window, self._pending = self._pending[: self.window], self._pending[self.window :]
            counts = Counter(window)
            observed = np.array([counts.get(label, 0) for label in self.labels], dtype=np.float64)
            statistic, p_value = stats.chisquare(observed, self.expected * observed.sum())
            results.append(
                DriftResult("prediction", float(statistic), float(p_value), p_value < self.alpha, len(window))
            )
        return results


class PageHinkley:
    """Detects a drop in the mean of a stream (here: 1 for a right answer, 0 for a wrong one)."""

    def __init__(self, delta: float = 0.05, threshold: float = 15.0, min_samples: int = 30) -> None:
        self.delta = delta
        self.threshold = threshold
        self.min_samples = min_samples
        self.reset()

    def reset(self) -> None:
        """Start over (after a detected drift has been acted on)."""
        self._n = 0
        self._mean = 0.0
        self._cumulative = 0.0
        self._minimum = 0.0

    def add(self, values: Sequence[float]) -> DriftResult:
        """Add observations; the result holds the Page-Hinkley statistic after the last one."""
        for value in values:
            self._n += 1
            self._mean += (value - self._mean) / self._n
            # Grows while values fall below the running mean.
            self._cumulative += self._mean - value - self.delta
            self._minimum = min(self._minimum, self._cumulative)
        statistic = self._cumulative - self._minimum
        drifted = self._n >= self.min_samples and statistic > self.threshold
        return DriftResult("accuracy", statistic, float("nan"), drifted, self._n)


class DriftMonitor:
    """Per-task input and prediction drift, computed off the request path on a background thread.

    ``observe`` takes an input's base-model embedding, which serving computes anyway (a routing pass,
    or a base row added to the request's batch), and only enqueues it (dropped, counted, when the queue
    is full); the thread feeds the detectors. ``reference`` gives a task's reference: a key (the served
    version), its texts and its training label counts; ``embed`` embeds those texts. When the key
    changes the detectors are rebuilt on the new reference, keeping the inputs not judged yet.
    """

    def __init__(
        self,
        settings: DriftSettings,
        embed: Callable[[Sequence[str]], np.ndarray],
        reference: Callable[[str], tuple[object, list[str], dict[str, int]]],
        on_result: Callable[[str, DriftResult], None],
        on_dropped: Callable[[], None],
    ) -> None:
        self.settings = settings
        self._embed = embed
        self._reference = reference
        self._on_result = on_result
        self._on_dropped = on_dropped
        self._queue: queue.Queue[tuple[str, np.ndarray, str | None]] = queue.Queue(
            maxsize=settings.queue_size
        )
        self._inputs: dict[str, MMDDrift] = {}
        self._predictions: dict[str, PredictionDrift] = {}
        self._keys: dict[str, object] = {}
        self._drifted: dict[tuple[str, str], bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drift", daemon=True)

    def start(self) -> None:
        """Start the background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread (what is queued is dropped)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def observe(self, task: str, embedding: np.ndarray, predicted: str | None) -> None:
        """Note one input's base-model embedding (and the label predicted for it, if any); never blocks."""
        try:
            self._queue.put_nowait((task, embedding, predicted))
        except queue.Full:
            self._on_dropped()

    def drain(self) -> None:
        """Block until everything observed so far has been judged."""
        self._queue.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < 64:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._judge(batch)
            except Exception:
                log.exception("drift judging failed; carrying on")
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _judge(self, batch: list[tuple[str, np.ndarray, str | None]]) -> None:
        by_task: dict[str, list[tuple[np.ndarray, str | None]]] = {}
        for task, embedding, predicted in batch:
            by_task.setdefault(task, []).append((embedding, predicted))
        for task, items in by_task.items():
            if not self._prepare(task):
                continue
            results = self._inputs[task].add(np.stack([embedding for embedding, _ in items]))
            labels = [label for _, label in items if label is not None]
            if task in self._predictions and labels:
                results += self._predictions[task].add(labels)
            for result in results:
                self._report(task, result)

    def _prepare(self, task: str) -> bool:
        """Make sure the task's detectors use its current reference; False while it has none."""
        key, texts, label_counts = self._reference(task)
        if task in self._inputs and self._keys.get(task) == key:
            return True
        texts = texts[: self.settings.reference_size]
        if len(texts) < MIN_REFERENCE:
            return False
        carried = self._inputs[task].pending() if task in self._inputs else []
        detector = MMDDrift(
            self._embed(texts), self.settings.window, self.settings.permutations, self.settings.alpha
        )
        self._inputs[task] = detector
        if carried:
            for result in detector.add(np.stack(carried)):
                self._report(task, result)
        if label_counts:
            self._predictions[task] = PredictionDrift(label_counts, self.settings.window, self.settings.alpha)
        self._keys[task] = key
        return True

    def _report(self, task: str, result: DriftResult) -> None:
        key = (task, result.detector)
        if result.drifted != self._drifted.get(key, False):
            level = logging.WARNING if result.drifted else logging.INFO
            log.log(
                level,
                "drift %s: task %r %s drift (statistic %.4f, p %.4g over %d samples)",
                "detected" if result.drifted else "cleared",
                task,
                result.detector,
                result.statistic,
                result.p_value,
                result.samples,
            )
        self._drifted[key] = result.drifted
        self._on_result(task, result)
