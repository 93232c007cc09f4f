"""GET /jobs: the latest async inference and training jobs (the dashboard's jobs and loss curves)."""
from __future__ import annotations

from ..runtime.errors import InvalidInputData
from .envelope import ok

MAX_JOBS = 500


class JobsResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_get(self, req, resp):
        raw = req.get_param("limit", default="50")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_JOBS:
            raise InvalidInputData(f"query.limit must be an integer in 1..{MAX_JOBS}",
                                   {"field": "query.limit", "value": raw})
        resp.media = ok({"jobs": self.runtime.list_jobs(int(raw), req.context.caller)})
