"""Resource allocations: POST/GET /resources, GET/DELETE /resources/{allocation_id}."""
from __future__ import annotations

from .envelope import ok
from .schemas import Allocation, parse


class AllocationsResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        body = parse(req, Allocation)
        resp.media = ok(self.runtime.allocations.allocate(body, req.context.caller))

    def on_get(self, req, resp):
        resp.media = ok({"allocations": self.runtime.allocations.list(req.context.caller)})


class AllocationResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_get(self, req, resp, allocation_id):
        resp.media = ok(self.runtime.allocations.get(allocation_id, req.context.caller))

    def on_delete(self, req, resp, allocation_id):
        resp.media = ok(self.runtime.allocations.deallocate(allocation_id, req.context.caller))
