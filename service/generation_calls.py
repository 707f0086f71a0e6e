"""The generative calls of continual.v1.Continual, Generate and GenerateBatch: requests checked and
turned into generations on the server's generation pool (``service.generation_pool``), their text
streamed back piece by piece. Mixed into the servicer (``service.server``)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import grpc

from service import calls
from service.api import continual_pb2
from service.errors import ContinualError, FailedPrecondition, InvalidArgument, status_of
from service.generation_engine import Generation, Piece, Sampling
from service.server_metrics import ServerMetrics
from service.serving import AdapterPool
from service.settings import TASK_NAME

#: Stop sequences one request may give, and the longest.
MAX_STOPS = 4
MAX_STOP_CHARS = 64
#: The highest sampling temperature taken.
MAX_TEMPERATURE = 2.0


class GenerationCalls:
    """Generate and GenerateBatch, on ``self.pool``'s generation pool."""

    pool: AdapterPool
    metrics: ServerMetrics

    def Generate(
        self, request: continual_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[continual_pb2.GenerateReply]:
        """Stream the answer to one prompt, piece by piece; the last message says why it ended."""
        started = time.perf_counter()
        try:
            generation, version = self._submit(request, calls.deadline(context))
        except Exception as exc:
            code, message = status_of(exc)
            calls.record(self.metrics, "Generate", code, started)
            context.abort(code, message)
            raise
        # A client gone (cancelled, disconnected, past its deadline) frees the request's place at once.
        context.add_callback(generation.cancelled.set)
        code = grpc.StatusCode.OK
        try:
            while True:
                piece = generation.pieces.get()
                if piece.done and piece.reason == "deadline" and not piece.tokens:
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    context.abort(code, "the deadline passed before generation began")
                yield _reply(request.task, version, piece)
                if piece.done:
                    return
        finally:
            generation.cancelled.set()
            calls.record(self.metrics, "Generate", code, started)

    def GenerateBatch(
        self, request: continual_pb2.GenerateBatchRequest, context: grpc.ServicerContext
    ) -> continual_pb2.GenerateBatchResponse:
        """Answer many prompts; an item that fails carries its error, the others are answered."""

        def handle() -> continual_pb2.GenerateBatchResponse:
            items = list(request.requests)
            most = self.pool.settings.max_batch_items
            if not items or len(items) > most:
                raise InvalidArgument(
                    f"a batch holds 1 to max_batch_items ({most}) requests, got {len(items)}"
                )
            deadline = calls.deadline(context)
            started: list[tuple[Generation, int] | ContinualError] = []
            for item in items:
                try:
                    started.append(self._submit(item, deadline))
                except ContinualError as exc:
                    started.append(exc)
            return continual_pb2.GenerateBatchResponse(
                results=[_whole(item.task, outcome) for item, outcome in zip(items, started, strict=True)]
            )

        return calls.handle(self.metrics, "GenerateBatch", context, handle)

    def _submit(
        self, request: continual_pb2.GenerateRequest, deadline: float | None
    ) -> tuple[Generation, int]:
        settings = self.pool.settings
        task, prompt = request.task, request.prompt
        if task and not TASK_NAME.fullmatch(task):
            raise InvalidArgument(f"task {task[:80]!r} is not a valid task name ({TASK_NAME.pattern})")
        if task in self.pool.served():
            raise FailedPrecondition(f"task {task!r} is a classifier: call Predict")
        if not prompt.strip():
            raise InvalidArgument("prompt is empty")
        if len(prompt) > settings.max_text_chars:
            raise InvalidArgument(
                f"prompt has {len(prompt)} characters, the limit is {settings.max_text_chars}"
            )
        most = settings.max_response_tokens
        if not 0 <= request.max_new_tokens <= most:
            raise InvalidArgument(
                f"max_new_tokens must be 0 to max_response_tokens ({most}), got {request.max_new_tokens}"
            )
        if not (math.isfinite(request.temperature) and 0 <= request.temperature <= MAX_TEMPERATURE):
            raise InvalidArgument(f"temperature must be 0 to {MAX_TEMPERATURE}, got {request.temperature}")
        if not (math.isfinite(request.top_p) and 0 <= request.top_p <= 1):
            raise InvalidArgument(f"top_p must be 0 to 1, got {request.top_p}")
        stops = tuple(request.stop)
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise InvalidArgument(f"at most {MAX_STOPS} stop sequences of 1 to {MAX_STOP_CHARS} characters")
        sampling = Sampling(
            max_new_tokens=request.max_new_tokens or most,
            temperature=request.temperature,
            top_p=request.top_p or 1.0,
            stop=stops,
            seed=request.seed or None,
        )
        return self.pool.generation.submit(task, prompt, sampling, deadline)


def _reply(task: str, version: int, piece: Piece) -> continual_pb2.GenerateReply:
    return continual_pb2.GenerateReply(
        text=piece.text,
        task=task,
        version=version,
        done=piece.done,
        finish_reason=piece.reason,
        tokens=piece.tokens,
    )


def _whole(task: str, outcome: tuple[Generation, int] | ContinualError) -> continual_pb2.GenerateResult:
    """An item's result: its whole answer, or the error that kept it from being answered."""
    if isinstance(outcome, ContinualError):
        code, message = status_of(outcome)
        return continual_pb2.GenerateResult(
            error=continual_pb2.ItemError(code=code.value[0], message=message)
        )
    generation, version = outcome
    parts = []
    while True:
        piece = generation.pieces.get()
        parts.append(piece.text)
        if piece.done:
            whole = Piece("".join(parts), done=True, reason=piece.reason, tokens=piece.tokens)
            return continual_pb2.GenerateResult(reply=_reply(task, version, whole))
