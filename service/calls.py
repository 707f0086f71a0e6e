"""How every gRPC call of a server is handled, whichever API it belongs to: our errors become status
codes with their messages, every call is counted and timed by method and code, and the client's
deadline is read on the clock the inference engine uses."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from service.errors import status_of
from service.server_metrics import ServerMetrics

log = logging.getLogger(__name__)

Response = TypeVar("Response")


def handle(
    metrics: ServerMetrics,
    method: str,
    context: grpc.ServicerContext,
    handler: Callable[[], Response],
) -> Response:
    """``handler()``'s response, or the call aborted with the status its error maps to."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        return handler()
    except Exception as exc:
        code, message = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method)
        context.abort(code, message)
        raise  # abort raises; this keeps type checkers aware that nothing is returned
    finally:
        record(metrics, method, code, started)


def record(metrics: ServerMetrics, method: str, code: grpc.StatusCode, started: float) -> None:
    """Count one call of ``method`` that ended with ``code``, and time it from ``started``."""
    metrics.requests.labels(method=method, code=code.name).inc()
    metrics.latency.labels(method=method, code=code.name).observe(time.perf_counter() - started)


def deadline(context: grpc.ServicerContext) -> float | None:
    """The client's deadline on time.monotonic()'s clock (None: it set none)."""
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None
