"""One hierarchy of runtime errors, each carrying its API error code.

The API turns these into the seed's error envelope in one place
(msmartcompute/api/errors.py); the runtime never knows about HTTP.
"""
from __future__ import annotations


class MSCError(Exception):
    """Base: a failure the caller can act on, with a stable code and details."""

    code = "INTERNAL_ERROR"
    retry_after_s: int | None = None  # a 503 that may succeed later says when to retry (Retry-After)

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidModelId(MSCError):
    code = "INVALID_MODEL_ID"


class ModelAlreadyLoaded(MSCError):
    code = "MODEL_ALREADY_LOADED"


class InsufficientMemory(MSCError):
    """Does not fit now, may once memory is freed (a request that can never fit is an
    InvalidInputData instead, so clients do not retry it)."""

    code = "INSUFFICIENT_MEMORY"
    retry_after_s = 5


def last_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's last non-empty line: what a client may see of it (a TorchScript error
    carries the program's traceback, which goes to the log only)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:limit]


def insufficient_memory(exc: BaseException, during: str, **details) -> InsufficientMemory:
    """The one mapping of an out-of-memory failure (models.base.is_out_of_memory) to the API's
    INSUFFICIENT_MEMORY, for every stage: loading, inference, training, optimization."""
    return InsufficientMemory(f"out of memory while {during}: {last_line(exc)}", {"during": during, **details})


class InvalidInputData(MSCError):
    code = "INVALID_INPUT_DATA"


class RequestTimeout(MSCError):
    code = "REQUEST_TIMEOUT"


class RateLimitExceeded(MSCError):
    code = "RATE_LIMIT_EXCEEDED"


class Unauthorized(MSCError):
    code = "UNAUTHORIZED"


class Forbidden(MSCError):
    code = "FORBIDDEN"


class NotFound(MSCError):
    code = "NOT_FOUND"


class MethodNotAllowed(MSCError):
    code = "METHOD_NOT_ALLOWED"


class InternalError(MSCError):
    code = "INTERNAL_ERROR"


class Cancelled(MSCError):
    """The work was cancelled on request (DELETE /training/{id}); nothing it did was kept.
    Only a job's stored error carries it (a cancelled request never answers HTTP itself)."""

    code = "CANCELLED"


class EngineUnavailable(MSCError):
    """The engine process is down (the supervisor is restarting it): a front answers HTTP 503."""

    code = "ENGINE_UNAVAILABLE"
    retry_after_s = 1


class QueueFull(MSCError):
    """A model's request queue is at RuntimeConfig.max_queue_size: rejected at once (HTTP 503)."""

    code = "QUEUE_FULL"
    retry_after_s = 1
