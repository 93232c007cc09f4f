"""POST /training, /training/async; GET /training/{request_id}; DELETE /training/{request_id}
(an extension: cancels an async training)."""
from __future__ import annotations

import numpy as np

from .envelope import ok
from .schemas import Training, _fail, as_matrix, parse


def prepare_training(body: dict) -> dict:
    """training_data as a numpy matrix; labels as a numpy array (a flat list of class indices
    or rows); the runtime checks them against the model."""
    request = dict(body)
    request["training_data"] = as_matrix(body["training_data"], "body.training_data")
    labels = body.get("labels")
    if labels is not None:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels):
            array = np.asarray(labels)
        else:
            array = as_matrix(labels, "body.labels")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            _fail("body.labels", "must contain only finite numbers", None)
        request["labels"] = array
    return request


class TrainingResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        resp.media = ok(self.runtime.training.train(prepare_training(parse(req, Training)), req.context.caller))


class AsyncTrainingResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        resp.media = ok(self.runtime.training.submit(prepare_training(parse(req, Training)), req.context.caller))


class TrainingResultResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_get(self, req, resp, request_id):
        resp.media = ok(self.runtime.training.get(request_id, req.context.caller))

    def on_delete(self, req, resp, request_id):
        resp.media = ok(self.runtime.training.cancel(request_id, req.context.caller))
