"""Per-request middleware: request id, auth, rate limit, body limit, access log, metrics."""
from __future__ import annotations

import logging
import re
import time

import falcon

from ..runtime.errors import MSCError, Unauthorized
from ..runtime.ids import random_hex
from . import errors
from .pages import STATIC_PREFIX
from .ratelimit import RateLimiter, refusal

access_log = logging.getLogger("msmartcompute.access")

# Open to everyone, keys or not: health, the API's description and the browser pages (which hold
# no data: they call the API with the key the user types in).
PUBLIC_PATHS = frozenset({"/health", "/api/v1/health", "/api/v1/openapi.json", "/api/v1/docs", "/dashboard"})


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(STATIC_PREFIX)

# A client's X-Request-ID is echoed and logged only if it is a short plain token; anything
# else (long, spaces, control characters: a forged log line) is replaced by a fresh random id.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestContext:
    """Request id, timing, the access log line and the request counters (runtime/instruments.py:
    labels route (the URI template), method, status)."""

    def __init__(self, instruments):
        self.instruments = instruments

    def process_request(self, req, resp):
        given = req.get_header("X-Request-ID")
        req.context.request_id = (given if given and _CLIENT_REQUEST_ID.fullmatch(given)
                                  else f"r_{random_hex()}")
        req.context.started = time.perf_counter()
        req.context.caller = None

    def process_response(self, req, resp, resource, req_succeeded):
        elapsed = time.perf_counter() - req.context.get("started", time.perf_counter())
        resp.set_header("X-Request-ID", req.context.get("request_id", ""))
        status = resp.status_code if hasattr(resp, "status_code") else int(str(resp.status)[:3])
        access_log.info("%s %s %d %.1fms %s", req.method, req.path, status, elapsed * 1000,
                        req.context.get("request_id"))
        if not is_public(req.path) and req.path != "/metrics":
            route = req.uri_template or "unmatched"  # a template, never the raw path: label values stay few
            try:
                self.instruments.labelled(self.instruments.requests, route, req.method, str(status)).inc()
                self.instruments.labelled(self.instruments.request_seconds, route).observe(elapsed)
            except Exception:  # metrics must never turn a served response into an error
                access_log.exception("recording metrics failed")


class BodyLimit:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def process_request(self, req, resp):
        if req.content_length is not None and req.content_length > self.max_bytes:
            raise falcon.HTTPContentTooLarge(
                description=f"request body of {req.content_length} bytes is over the limit of {self.max_bytes}")


class Auth:
    """Bearer keys; with no keys configured the server is open (loopback only, checked at start).
    A request that fails authentication spends a token of its client address (ratelimit.py)."""

    def __init__(self, keys, open_mode: bool, limiter: RateLimiter | None = None):
        self.keys = keys
        self.open_mode = open_mode
        self.limiter = limiter

    def _refuse(self, req, resp, message: str):
        if self.limiter is not None and self.limiter.config.enabled:
            check_rate(self.limiter, f"ip:{req.remote_addr}", resp)
        raise Unauthorized(message)

    def process_request(self, req, resp):
        if is_public(req.path) or req.method == "OPTIONS":
            return
        if self.open_mode and self.keys.is_open():  # started open: closed by the first key created
            req.context.caller = None  # full access
            return
        header = req.get_header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self._refuse(req, resp, "Authentication required: send 'Authorization: Bearer <api key>'")
        caller = self.keys.authenticate(token.strip())
        if caller is None:
            self._refuse(req, resp, "Invalid API key")
        req.context.caller = caller


class RateLimit:
    """Every request but public ones and preflights spends a token of its caller. In one process
    the limiter decides at once; in a front process (RemoteRateLimiter.deferred) the token goes
    with the request's first engine call, one message for both, and the headers are set from
    that call's decision when the response is finished."""

    def __init__(self, limiter: RateLimiter):
        self.limiter = limiter

    def process_request(self, req, resp):
        if not self.limiter.config.enabled or is_public(req.path) or req.method == "OPTIONS":
            return
        caller = req.context.get("caller")
        key = f"user:{caller.user_id}" if caller is not None else f"ip:{req.remote_addr}"
        if getattr(self.limiter, "deferred", False):
            self.limiter.defer(key)
            req.context.rate_deferred = True
        else:
            check_rate(self.limiter, key, resp)

    def process_response(self, req, resp, resource, req_succeeded):
        if not req.context.get("rate_deferred"):
            return
        try:
            decision, carried = self.limiter.settle()
        except MSCError as exc:  # no engine to decide: the request answers its error (503)
            _answer_error(req, resp, exc)
            return
        if decision is None:
            return
        set_rate_headers(resp, decision)
        if not decision.allowed and not carried:  # nothing ran: the request is refused after all
            _answer_error(req, resp, refusal(decision, self.limiter.config))


def _answer_error(req, resp, exc: MSCError) -> None:
    """Replace the response already made with exc's error envelope."""
    resp.text = resp.data = resp.stream = None
    errors.handle_runtime_error(req, resp, exc, {})


def set_rate_headers(resp, decision) -> None:
    resp.set_header("X-RateLimit-Limit", str(decision.limit))
    resp.set_header("X-RateLimit-Remaining", str(decision.remaining))
    resp.set_header("X-RateLimit-Reset", str(decision.reset))
    if not decision.allowed:
        resp.set_header("Retry-After", str(max(1, int(decision.retry_after + 0.999))))


def check_rate(limiter: RateLimiter, key: str, resp) -> None:
    """Spend one token of `key`; set the X-RateLimit-* headers; raise RATE_LIMIT_EXCEEDED when refused."""
    decision = limiter.check(key)
    set_rate_headers(resp, decision)
    if not decision.allowed:
        raise refusal(decision, limiter.config)
