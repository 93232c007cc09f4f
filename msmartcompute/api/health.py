"""GET /health and GET /api/v1/health."""
from __future__ import annotations

from .envelope import ok


class HealthResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_get(self, req, resp):
        resp.media = ok(self.runtime.health())
