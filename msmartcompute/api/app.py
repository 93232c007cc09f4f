"""The app factory: routes wired to thin resources over an injected Runtime."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import falcon
import numpy as np
import orjson

from ..runtime.instruments import Instruments
from ..runtime.keys import KeyStore
from . import errors, openai_compat
from .allocations import AllocationResource, AllocationsResource
from .health import HealthResource
from .jobs import JobsResource
from .inference import (AsyncInferenceResource, BatchInferenceResource, InferenceResource,
                        InferenceResultResource)
from .metrics import MetricsHistoryResource, MetricsResource, PrometheusResource
from .middleware import Auth, BodyLimit, RateLimit, RequestContext
from .models import ModelResource, ModelsResource, OptimizeResource
from .openapi import OpenApiResource
from .pages import STATIC_DIR, STATIC_PREFIX, PageResource
from .ratelimit import RateLimitConfig, RateLimiter
from .sessions import SessionResource, SessionsResource
from .training import AsyncTrainingResource, TrainingResource, TrainingResultResource
from .virtualization import VirtualGpuResource, VirtualGpusResource

API_PREFIX = "/api/v1"


@dataclass
class ApiConfig:
    max_body_bytes: int = 64 * 1024 * 1024
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    # No keys and open_mode: every request is served with full access (loopback only; the CLI checks).
    open_mode: bool | None = None  # None: open exactly when no key exists
    # Browser origins allowed to call the API (CORS), e.g. ("https://app.example",) or ("*",).
    # Empty (the default): no CORS headers, so browsers refuse cross-origin calls.
    cors_origins: tuple[str, ...] = ()


def _orjson_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")


# orjson: big float arrays are the common payload; it renders numpy arrays natively.
_JSON = falcon.media.JSONHandler(
    dumps=partial(orjson.dumps, default=_orjson_default, option=orjson.OPT_SERIALIZE_NUMPY),
    loads=orjson.loads,
)


class _App(falcon.App):
    """Answers HEAD wherever it answers GET: GET's status and headers, no body (RFC 9110 9.3.2:
    load balancers and uptime monitors probe with HEAD; falcon itself answers 405 to a resource
    without an on_head). falcon drops the body of a HEAD response and keeps its Content-Length."""

    def add_route(self, uri_template, resource, **kwargs):
        suffix = kwargs.get("suffix")
        get, head = (f"on_get_{suffix}", f"on_head_{suffix}") if suffix else ("on_get", "on_head")
        if hasattr(resource, get) and not hasattr(resource, head):
            setattr(resource, head, getattr(resource, get))
        super().add_route(uri_template, resource, **kwargs)


def create_app(runtime, config: ApiConfig | None = None, keys: KeyStore | None = None,
               limiter=None) -> falcon.App:
    """runtime: a Runtime (one process, tests) or a serving.EngineClient (a front process: the
    same services, answered by the engine process); keys: the key store (default: the runtime's);
    limiter: the rate limiter (default: one in this process; a front uses the engine's)."""
    config = config or ApiConfig()
    keys = keys if keys is not None else KeyStore(runtime.store)
    open_mode = config.open_mode if config.open_mode is not None else keys.count() == 0
    limiter = limiter if limiter is not None else RateLimiter(config.rate_limit)
    # one process, one Instruments: in-process the runtime's, in a front its own (multiprocess files)
    meter = getattr(runtime, "meter", None)
    instruments = meter.instruments if meter is not None else Instruments()
    cors = [falcon.CORSMiddleware(
        allow_origins="*" if "*" in config.cors_origins else list(config.cors_origins),
        expose_headers=["X-Request-ID", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
                        "Retry-After"])] if config.cors_origins else []
    app = _App(middleware=[
        *cors,
        RequestContext(instruments),
        BodyLimit(config.max_body_bytes),
        Auth(keys, open_mode, limiter),
        RateLimit(limiter),
    ])
    app.req_options.media_handlers.update({falcon.MEDIA_JSON: _JSON})
    app.resp_options.media_handlers.update({falcon.MEDIA_JSON: _JSON})
    app.req_options.strip_url_path_trailing_slash = True
    app.req_options.keep_blank_qs_values = True  # `?interval=` is a bad value (400), not an absent one
    errors.install(app)

    health = HealthResource(runtime)
    app.add_route("/health", health)
    app.add_route(f"{API_PREFIX}/health", health)
    app.add_route(f"{API_PREFIX}/openapi.json", OpenApiResource())
    app.add_route(f"{API_PREFIX}/docs", PageResource("docs.html"))
    app.add_route("/dashboard", PageResource("dashboard.html"))
    app.add_static_route(STATIC_PREFIX.rstrip("/"), str(STATIC_DIR))
    app.add_route("/metrics", PrometheusResource(runtime, instruments))
    routes = {
        "/models": ModelsResource(runtime),
        "/models/{model_id}": ModelResource(runtime),
        "/models/{model_id}/optimize": OptimizeResource(runtime),
        "/inference": InferenceResource(runtime),
        "/inference/async": AsyncInferenceResource(runtime),
        "/inference/batch": BatchInferenceResource(runtime),
        "/inference/{request_id}": InferenceResultResource(runtime),
        "/training": TrainingResource(runtime),
        "/training/async": AsyncTrainingResource(runtime),
        "/training/{request_id}": TrainingResultResource(runtime),
        "/jobs": JobsResource(runtime),
        "/sessions": SessionsResource(runtime),
        "/sessions/{session_id}": SessionResource(runtime),
        "/metrics": MetricsResource(runtime),
        "/metrics/history": MetricsHistoryResource(runtime),
        "/resources": AllocationsResource(runtime),
        "/resources/{allocation_id}": AllocationResource(runtime),
        "/virtualization/gpus": VirtualGpusResource(runtime),
        "/virtualization/gpus/{virtual_gpu_id}": VirtualGpuResource(runtime),
    }
    for path, resource in routes.items():
        app.add_route(API_PREFIX + path, resource)
    openai_compat.install(app, runtime)
    return app
