"""The one place where failures become the seed's error envelope (OpenAI's error shape
on the OpenAI-compatible routes under /v1/).

Runtime errors carry their code; Falcon's own errors (unknown route, wrong
method, bad JSON) and anything unexpected are mapped here too. A 500 never
carries a traceback: it is logged with the request id instead.
"""
from __future__ import annotations

import logging

import falcon

from ..runtime import errors as rt
from .envelope import error

log = logging.getLogger("msmartcompute.api")

# Error code -> HTTP status. The OpenAPI document is generated from this table.
STATUS_BY_CODE = {
    rt.InvalidInputData.code: falcon.HTTP_400,
    rt.Unauthorized.code: falcon.HTTP_401,
    rt.Forbidden.code: falcon.HTTP_403,
    rt.InvalidModelId.code: falcon.HTTP_404,
    rt.NotFound.code: falcon.HTTP_404,
    rt.MethodNotAllowed.code: falcon.HTTP_405,
    rt.ModelAlreadyLoaded.code: falcon.HTTP_409,
    rt.RequestTimeout.code: falcon.HTTP_504,
    rt.RateLimitExceeded.code: falcon.HTTP_429,
    rt.InsufficientMemory.code: falcon.HTTP_503,
    rt.InternalError.code: falcon.HTTP_500,
    "QUEUE_FULL": falcon.HTTP_503,
    rt.EngineUnavailable.code: falcon.HTTP_503,  # the engine process is being restarted: retry shortly  # the model's queue is at its limit: retry later
}

# Falcon's HTTP errors that reach us without a runtime error behind them.
_CODE_BY_FALCON_STATUS = {
    400: rt.InvalidInputData.code,
    401: rt.Unauthorized.code,
    403: rt.Forbidden.code,
    404: rt.NotFound.code,
    405: rt.MethodNotAllowed.code,
    408: rt.RequestTimeout.code,
    413: rt.InvalidInputData.code,
    415: rt.InvalidInputData.code,
    429: rt.RateLimitExceeded.code,
}


def code_for_status(status: int) -> str:
    """The seed's error code for an HTTP error status raised outside the runtime (Falcon's, waitress')."""
    return _CODE_BY_FALCON_STATUS.get(status, rt.InternalError.code if status >= 500 else rt.InvalidInputData.code)


# OpenAI's error "type" by HTTP status, for the OpenAI-compatible routes under /v1/.
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                 429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}


def openai_error(status: str, code: str, message: str, details: dict | None) -> dict:
    """OpenAI's error shape: {"error": {message, type, param, code}} (also an event of a /v1/ stream)."""
    number = int(status.split()[0])
    kind = _OPENAI_TYPES.get(number, "server_error" if number >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": (details or {}).get("field"), "code": code.lower()}}


def openai_error_of(exc: rt.MSCError) -> dict:
    return openai_error(STATUS_BY_CODE.get(exc.code, falcon.HTTP_500), exc.code, exc.message, exc.details)


def _respond(req, resp: falcon.Response, status: str, code: str, message: str, details: dict | None) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON  # a resource may have set another type before it failed
    if req.path.startswith("/v1/"):
        resp.media = openai_error(status, code, message, details)
        return
    resp.media = error(code, message, details)


def handle_runtime_error(req, resp, exc: rt.MSCError, params) -> None:
    if exc.retry_after_s is not None:  # a 503 that may succeed later
        resp.set_header("Retry-After", str(exc.retry_after_s))
    _respond(req, resp, STATUS_BY_CODE.get(exc.code, falcon.HTTP_500), exc.code, exc.message, exc.details)


def handle_http_error(req, resp, exc: falcon.HTTPError, params) -> None:
    status = exc.status_code
    code = code_for_status(status)
    if status == 404:
        message = f"No route for {req.method} {req.path}"
    elif status == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"Method {req.method} is not allowed on {req.path}" + (f"; allowed: {allowed}" if allowed else "")
    elif status == 415:
        message = (f"Content-Type {req.content_type} is not accepted: send the body as JSON with the header "
                   "'Content-Type: application/json'")
    else:
        message = exc.description or exc.title or "Request failed"
    for name, value in (exc.headers or {}).items():
        resp.set_header(name, value)
    _respond(req, resp, exc.status, code, message, {})


def handle_unexpected(req, resp, exc: Exception, params) -> None:
    request_id = req.context.get("request_id")
    log.exception("unhandled error on %s %s (request %s)", req.method, req.path, request_id)
    _respond(req, resp, falcon.HTTP_500, rt.InternalError.code, "Internal server error",
             {"request_id": request_id} if request_id else {})


def install(app: falcon.App) -> None:
    # Falcon picks the most specific handler, so order does not matter.
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(rt.MSCError, handle_runtime_error)
