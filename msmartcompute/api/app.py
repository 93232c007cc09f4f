"""The app factory: routes wired to thin resources over an injected Runtime."""
from __future__ import annotations

import falcon

from ..runtime.engine import Runtime
from . import errors
from .health import HealthResource

API_PREFIX = "/api/v1"


def create_app(runtime: Runtime) -> falcon.App:
    app = falcon.App()
    errors.install(app)
    health = HealthResource(runtime)
    app.add_route("/health", health)
    app.add_route(f"{API_PREFIX}/health", health)
    return app
