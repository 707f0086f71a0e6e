"""continual's own errors, and the one place that maps them to gRPC status codes."""

from __future__ import annotations

import grpc


class ContinualError(Exception):
    """Base of every error the service reports to a caller."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ContinualError):
    """The request itself is wrong (empty text, bad task name, negative top_k, ...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ContinualError):
    """The task or version does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ContinualError):
    """An admin call without the configured token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(ContinualError):
    """The request is valid but the system is not in a state to do it (e.g. nothing to roll back to)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class CorruptVersion(ContinualError):
    """A version's files do not match its manifest; it is refused and never served."""

    code = grpc.StatusCode.DATA_LOSS


class ResourceExhausted(ContinualError):
    """The server cannot take the request now (its queue is full); the client should back off."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ContinualError):
    """The client's deadline passed before the request was run."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception raised while handling a call."""
    if isinstance(exc, ContinualError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
