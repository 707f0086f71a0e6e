"""The generation engine: the one thread of a server that runs the language model.

A request (a prompt's tokens, the adapter it goes through or none for the language model alone, and
how to sample) goes into a bounded queue and receives its text piece by piece on a queue of its own.
The engine thread takes the requests waiting, up to ``max_batch_size``, and decodes them together:
one prefill of the left-padded prompts, then one forward per step for every row still running, each
row through its own adapter in the same forward (PEFT's mixed-adapter batches, ``adapter_names``;
``__base__`` rows through none), a key/value cache for the whole batch. Requests that arrive while a
batch decodes join it between two steps: their prompts are prefilled on their own and their cache
rows padded onto the batch's (``_join``), so a new stream does not wait for the longest one to end.
A row leaves the batch as soon as it is done (an end of turn, a stop sequence, ``max_new_tokens``,
its deadline, or its client gone), and its slot is free for the next request.

Loading and unloading adapters is handed to the engine and done between steps, so nothing else ever
touches the model while it decodes; an adapter is unloaded only once no request holds it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import DynamicCache

from service.errors import ResourceExhausted
from service.generative import GenerativeAdapters
from service.server_metrics import ServerMetrics

log = logging.getLogger(__name__)

#: PEFT's name for rows of a mixed batch that go through no adapter.
BASE_ROWS = "__base__"


@dataclass(frozen=True)
class Sampling:
    """How a request's tokens are chosen: greedy at temperature 0, else sampled (nucleus ``top_p``)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Piece:
    """Text a request produced since its last piece; the last piece says why it ended."""

    text: str
    done: bool = False
    #: ``stop`` (end of turn or a stop sequence), ``length``, ``deadline`` or ``cancelled``.
    reason: str = ""
    tokens: int = 0


@dataclass(eq=False)
class Generation:
    """One request in the engine: what to decode, and where its pieces go."""

    prompt_ids: list[int]
    adapter: str | None
    sampling: Sampling
    deadline: float | None = None
    pieces: queue.Queue[Piece] = field(default_factory=queue.Queue)
    #: Set by the caller when its client is gone: the row leaves the batch at the next step.
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    # Decoding state, the engine's own.
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    generator: torch.Generator | None = None
    finished: bool = False


class GenerationEngine(threading.Thread):
    """Decodes the queued requests in batches on one model; see the module's docstring."""

    def __init__(
        self,
        adapters: GenerativeAdapters,
        metrics: ServerMetrics,
        max_batch_size: int,
        queue_size: int,
    ) -> None:
        super().__init__(name="generation-engine", daemon=True)
        self.adapters = adapters
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self._queue: queue.Queue[Generation] = queue.Queue(maxsize=queue_size)
        self._chores: queue.Queue[Callable[[], None]] = queue.Queue()
        self._stop_ids = set(adapters.stop_ids())
        self._holders: Counter[str] = Counter()
        self._retired: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        #: The rows decoding now (failed together if a forward raises).
        self._running: list[Generation] = []

    # --- the callers' side --------------------------------------------------------------------------

    def submit(self, generation: Generation) -> Generation:
        """Queue ``generation``; ResourceExhausted at once when the queue is full."""
        with self._lock:
            if generation.adapter is not None:
                self._holders[generation.adapter] += 1
        try:
            self._queue.put_nowait(generation)
        except queue.Full:
            self._release(generation)
            self.metrics.generations.labels(reason="queue_full").inc()
            raise ResourceExhausted(
                f"the generation queue is full ({self._queue.maxsize} requests waiting); retry with backoff"
            ) from None
        self._wake.set()
        return generation

    def between_steps(self, chore: Callable[[], None]) -> None:
        """Run ``chore`` on the engine thread between two decoding steps, and wait for it."""
        done: queue.Queue[BaseException | None] = queue.Queue()

        def run() -> None:
            try:
                chore()
                done.put(None)
            except BaseException as exc:  # handed back to the caller
                done.put(exc)

        self._chores.put(run)
        self._wake.set()
        error = done.get()
        if error is not None:
            raise error

    def retire(self, adapter: str) -> None:
        """Unload ``adapter`` once no queued or running request holds it."""
        with self._lock:
            self._retired.add(adapter)
        self._wake.set()

    def stop(self) -> None:
        """End the thread after its current step; queued requests are told they were cancelled."""
        self._stopping.set()
        self._wake.set()

    # --- the engine thread --------------------------------------------------------------------------

    def run(self) -> None:
        """Take requests and decode them until stopped; an error fails the batch, never the thread."""
        while not self._stopping.is_set():
            self._do_chores()
            batch = self._take(self.max_batch_size)
            if not batch:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self._decode(batch)
            except Exception:
                log.exception("generation failed")
                for generation in self._running:
                    self._finish(generation, "error")
            self._running = []
        for generation in self._take(self._queue.qsize()):
            self._finish(generation, "cancelled")

    def _take(self, most: int) -> list[Generation]:
        batch: list[Generation] = []
        while len(batch) < most:
            try:
                generation = self._queue.get_nowait()
            except queue.Empty:
                break
            if self._expired(generation):
                self._finish(generation, "deadline")
            elif generation.cancelled.is_set():
                self._finish(generation, "cancelled")
            else:
                batch.append(generation)
        return batch

    def _do_chores(self) -> None:
        while True:
            try:
                chore = self._chores.get_nowait()
            except queue.Empty:
                break
            chore()
        with self._lock:
            idle = [name for name in self._retired if self._holders[name] == 0]
            self._retired.difference_update(idle)
        for name in idle:
            self.adapters.remove(name)

    @torch.no_grad()
    def _decode(self, batch: list[Generation]) -> None:
        """Prefill ``batch``, then step every running row until none is left (joined by new ones)."""
        self._running = batch
        logits, cache, mask = self._prefill(batch)
        while batch:
            self._choose(batch, logits)
            keep = [i for i, g in enumerate(batch) if not self._done(g)]
            if len(keep) < len(batch):
                batch = [batch[i] for i in keep]
                if not batch:
                    break
                cache.batch_select_indices(torch.tensor(keep))
                mask = mask[keep]
            self._do_chores()
            room = self.max_batch_size - len(batch)
            newcomers = self._take(room) if room > 0 else []
            mask = torch.cat([mask, torch.ones(len(batch), 1, dtype=mask.dtype)], dim=1)
            step = torch.tensor([[g.tokens[-1]] for g in batch])
            logits = self._forward(batch, step, mask, cache)
            if newcomers:
                self._running = batch + newcomers
                logits, cache, mask = self._join(batch, logits, cache, mask, newcomers)
                batch = self._running
            self._running = batch

    def _prefill(self, batch: list[Generation]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        width = max(len(g.prompt_ids) for g in batch)
        pad = self.adapters.pad_id
        ids = torch.tensor([[pad] * (width - len(g.prompt_ids)) + g.prompt_ids for g in batch])
        mask = torch.tensor([[0] * (width - len(g.prompt_ids)) + [1] * len(g.prompt_ids) for g in batch])
        cache = DynamicCache()
        logits = self._forward(batch, ids, mask, cache)
        return logits, cache, mask

    def _forward(
        self, batch: Sequence[Generation], ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """The next-token logits of every row, after ``ids`` (the rows' newest tokens) and the cache."""
        # Left padding: a row's positions count its own tokens only.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        # Only the next token's logits are needed (a prompt's other positions would cost a vocabulary-
        # wide product each).
        with self._adapters_for(batch) as (model, extra):
            out = cast(Any, model)(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
        return cast(torch.Tensor, out.logits[:, -1, :].float())

    @contextmanager
    def _adapters_for(self, batch: Sequence[Generation]) -> Iterator[tuple[Any, dict[str, Any]]]:
        """The model and the arguments that put each row through its adapter: one adapter for all
        rows is set on the model (measured twice as fast on a CPU as PEFT's per-row split, which
        indexes every LoRA layer's input by adapter); several are named per row."""
        used = {g.adapter for g in batch}
        if not self.adapters.names():
            yield self.adapters.decoder(), {}
        elif len(used) > 1:
            yield self.adapters.decoder(), {"adapter_names": [g.adapter or BASE_ROWS for g in batch]}
        else:
            with self.adapters.using(next(iter(used))) as model:
                yield model, {}

    def _join(
        self,
        batch: list[Generation],
        logits: torch.Tensor,
        cache: DynamicCache,
        mask: torch.Tensor,
        newcomers: list[Generation],
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Prefill ``newcomers`` and append their rows to the running batch's cache, the shorter side
        padded on the left (masked out), so all rows decode together from the next step."""
        new_logits, new_cache, new_mask = self._prefill(newcomers)
        width = max(mask.shape[1], new_mask.shape[1])

        def left_pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - tensor.shape[dim]
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([torch.zeros(shape, dtype=tensor.dtype), tensor], dim=dim)

        # A Llama's cache layers hold keys and values as [batch, heads, positions, width].
        for old, new in zip(cast(Any, cache.layers), cast(Any, new_cache.layers), strict=True):
            old.keys = torch.cat([left_pad(old.keys, 2), left_pad(new.keys, 2)], dim=0)
            old.values = torch.cat([left_pad(old.values, 2), left_pad(new.values, 2)], dim=0)
        mask = torch.cat([left_pad(mask, 1), left_pad(new_mask, 1)], dim=0)
        return torch.cat([logits, new_logits], dim=0), cache, mask

    def _choose(self, batch: list[Generation], logits: torch.Tensor) -> None:
        """Each row's next token, its new text sent (held back while it may start a stop sequence)."""
        for generation, row in zip(batch, logits, strict=True):
            greedy = generation.sampling.temperature <= 0
            token = int(row.argmax()) if greedy else self._sample(generation, row)
            if not generation.tokens:
                self.metrics.generation_first_token.observe(time.monotonic() - generation.submitted)
            generation.tokens.append(token)
            self.metrics.generated_tokens.inc()

    def _sample(self, generation: Generation, row: torch.Tensor) -> int:
        sampling = generation.sampling
        if generation.generator is None:
            generation.generator = torch.Generator()
            if sampling.seed is not None:
                generation.generator.manual_seed(sampling.seed)
            else:
                generation.generator.seed()
        probabilities = torch.softmax(row / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            ordered, order = probabilities.sort(descending=True)
            outside = ordered.cumsum(dim=-1) - ordered > sampling.top_p  # the nucleus keeps its first
            ordered[outside] = 0.0
            probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
        return int(torch.multinomial(probabilities, 1, generator=generation.generator))

    def _done(self, generation: Generation) -> bool:
        """Send the row's new text; True (and its last piece sent) when it has ended."""
        tokens = generation.tokens
        ended = tokens[-1] in self._stop_ids
        text = str(self.adapters.tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True))
        stop = generation.sampling.stop
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        reason = ""
        if ended or cut >= 0:
            reason, text = "stop", text[:cut] if cut >= 0 else text
        elif len(tokens) >= generation.sampling.max_new_tokens:
            reason = "length"
        elif generation.cancelled.is_set():
            reason = "cancelled"
        elif self._expired(generation):
            reason = "deadline"
        if not reason:
            # A partial character, or text that may be the start of a stop sequence, waits.
            held = max((len(s) - 1 for s in stop), default=0)
            ready = len(text) - held
            while ready > generation.sent and text[ready - 1] == "\ufffd":
                ready -= 1
            if ready > generation.sent:
                generation.pieces.put(Piece(text[generation.sent : ready]))
                generation.sent = ready
            return False
        self._finish(generation, reason, text[generation.sent :])
        generation.sent = len(text)
        return True

    def _finish(self, generation: Generation, reason: str, text: str = "") -> None:
        if generation.finished:
            return
        generation.pieces.put(Piece(text, done=True, reason=reason, tokens=len(generation.tokens)))
        self.metrics.generations.labels(reason=reason).inc()
        self._release(generation)

    def _release(self, generation: Generation) -> None:
        generation.finished = True
        if generation.adapter is not None:
            with self._lock:
                self._holders[generation.adapter] -= 1

    @staticmethod
    def _expired(generation: Generation) -> bool:
        return generation.deadline is not None and time.monotonic() > generation.deadline
