"""POST/GET /models, GET/DELETE /models/{model_id}, POST /models/{model_id}/optimize."""
from __future__ import annotations

from .envelope import ok
from .schemas import LoadModel, Optimize, as_matrix, parse


class ModelsResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        body = parse(req, LoadModel)
        resp.media = ok(self.runtime.registry.load(body, req.context.caller))

    def on_get(self, req, resp):
        resp.media = ok({"models": self.runtime.registry.list()})


class ModelResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_get(self, req, resp, model_id):
        resp.media = ok(self.runtime.registry.get(model_id))

    def on_delete(self, req, resp, model_id):
        resp.media = ok(self.runtime.registry.unload(model_id, req.context.caller))


class OptimizeResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp, model_id):
        body = parse(req, Optimize)
        request = dict(body)
        if body.get("calibration_data") is not None:
            request["calibration_data"] = as_matrix(body["calibration_data"], "body.calibration_data")
        resp.media = ok(self.runtime.optimization.optimize(model_id, request, req.context.caller))
