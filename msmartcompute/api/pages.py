"""The browser pages: Swagger UI at /api/v1/docs and the live dashboard at /dashboard.

Static files (the pages' scripts and the vendored libraries in static/vendor/) are served from
/static/ with no key: they hold no data. The pages read the API with a key the user types in."""
from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/static/"


class PageResource:
    """One HTML page from static/, read once."""

    def __init__(self, filename: str):
        self.body = (STATIC_DIR / filename).read_bytes()

    def on_get(self, req, resp):
        resp.content_type = "text/html; charset=utf-8"
        resp.cache_control = ["no-cache"]
        resp.data = self.body
