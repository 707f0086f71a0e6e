"""The generative tasks a server answers: each task's served version as an adapter on the language
model, swapped as its alias moves, and the generation engine that decodes the requests.

The language model is loaded when the registry first shows a generative task, so a server of
classifiers alone never pays for it. A version is checked before it is served (its manifest names
the language model this server runs; its weights' hashes are checked by the registry) and loaded by
the engine between two decoding steps under a name of its own (``task@vN``); the version it replaces
is unloaded once no request holds it, so a request always finishes on the version it began with.
"""

from __future__ import annotations

import logging
import threading
import time

from service.errors import CorruptVersion, InvalidArgument, NotFound
from service.generation_engine import Generation, GenerationEngine, Sampling
from service.generative import GenerativeAdapters
from service.language_model import generative_adapters
from service.registry import Alias, Registry
from service.server_metrics import ServerMetrics
from service.settings import Settings

log = logging.getLogger(__name__)


class GenerationPool:
    """Served generative versions, and the engine they answer through."""

    def __init__(self, settings: Settings, registry: Registry, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self._adapters: GenerativeAdapters | None = None
        self._engine: GenerationEngine | None = None
        #: The version each generative task is answered with.
        self._served: dict[str, int] = {}
        self._failed: set[tuple[str, int]] = set()
        self._lock = threading.RLock()

    @property
    def engine(self) -> GenerationEngine:
        """The engine, with the language model loaded and its thread started on first use."""
        with self._lock:
            if self._engine is None:
                started = time.monotonic()
                self._adapters = generative_adapters(self.settings)
                self._engine = GenerationEngine(
                    self._adapters,
                    self.metrics,
                    self.settings.max_generation_batch,
                    self.settings.inference_queue_size,
                )
                self._engine.start()
                log.info(
                    "language model %s loaded for generation in %.1fs",
                    self.settings.language_model,
                    time.monotonic() - started,
                )
            return self._engine

    @property
    def adapters(self) -> GenerativeAdapters:
        """The language model and the served versions' adapters."""
        _ = self.engine
        assert self._adapters is not None
        return self._adapters

    def served(self) -> dict[str, int]:
        """The version each generative task is answered with right now."""
        return dict(self._served)

    def sync_task(self, task: str, alias: Alias | None) -> int | None:
        """Serve the alias's version, loading it if needed; CorruptVersion if it cannot be."""
        with self._lock:
            current = self._served.get(task)
            if alias is None or alias.served == current or (task, alias.served) in self._failed:
                return current
            self.load(task, alias.served)
            self._served[task] = alias.served
            if current is not None:
                self.engine.retire(f"{task}@v{current}")
            self.metrics.served_version.labels(task=task).set(alias.served)
            self.metrics.version_swaps.labels(task=task).inc()
            log.info("generative task %r now served by v%d (was %s)", task, alias.served, current)
            return alias.served

    def load(self, task: str, version: int) -> None:
        """Check ``version`` and load its adapter (once); CorruptVersion if it cannot be served."""
        name = f"{task}@v{version}"
        with self._lock:
            if name in self.adapters.names():
                return
            try:
                _, weights = self.registry.servable(
                    task, version, self.settings.language_model, "language model"
                )
                adapters = self.adapters
                self.engine.between_steps(lambda: adapters.add(name, weights))
            except CorruptVersion:
                self._failed.add((task, version))
                self.metrics.load_failures.labels(task=task).inc()
                raise

    def forget_failure(self, task: str, version: int) -> None:
        """Let an operator's call try ``version`` again."""
        self._failed.discard((task, version))

    def submit(
        self, task: str, prompt: str, sampling: Sampling, deadline: float | None
    ) -> tuple[Generation, int]:
        """Queue ``prompt`` for ``task``'s served version (no task: the language model alone); the
        generation and the version answering (0 for the language model alone)."""
        adapters = self.adapters
        tokens, limit = adapters.token_count(prompt), self.settings.max_prompt_tokens
        if tokens > limit:
            raise InvalidArgument(f"prompt has {tokens} tokens, max_prompt_tokens is {limit}")
        # Under the lock: a swap cannot retire the version between its choice and the request's hold.
        with self._lock:
            version = self._served.get(task, 0) if task else 0
            if task and not version:
                raise NotFound(f"no generative version is served for task {task!r}")
            adapter = f"{task}@v{version}" if task else None
            return self.engine.submit(
                Generation(adapters.prompt_ids(prompt), adapter, sampling, deadline)
            ), version

    def stop(self) -> None:
        """Stop the engine (queued requests end as cancelled)."""
        if self._engine is not None:
            self._engine.stop()
            self._engine.join(timeout=30)
