"""POST /inference, /inference/async, /inference/batch; GET /inference/{request_id}."""
from __future__ import annotations

from ..runtime.errors import InvalidInputData
from .envelope import ok
from .schemas import BATCH_INFERENCE, INFERENCE, MAX_ROWS, as_matrix, parse


def _check_text(text, path: str) -> None:
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not text or not all(isinstance(t, str) and t for t in text):
        raise InvalidInputData(f"{path} must be a non-empty string or a non-empty list of non-empty strings",
                               {"field": path})
    if len(text) > MAX_ROWS:
        raise InvalidInputData(f"{path} has {len(text)} strings, more than the limit of {MAX_ROWS}", {"field": path})


def prepare_request(body: dict, path: str = "body") -> dict:
    """input_data as a numpy matrix, checked against batch_size / sequence_length when given;
    or input_text (a string or a list of strings), which the model's tokenizer turns into rows."""
    if body.get("input_text") is not None:
        if body.get("input_data") is not None:
            raise InvalidInputData(f"{path}: give input_data or input_text, not both", {"field": f"{path}.input_text"})
        _check_text(body["input_text"], f"{path}.input_text")
        request = dict(body)
        request["options"] = dict(body.get("options") or {})
        return request
    if body.get("input_data") is None:
        raise InvalidInputData(f"{path}.input_data is required (or input_text for a model with a tokenizer)",
                               {"field": f"{path}.input_data"})
    matrix = as_matrix(body["input_data"], f"{path}.input_data")
    rows, cols = matrix.shape
    if body.get("batch_size") is not None and body["batch_size"] != rows:
        raise InvalidInputData(f"{path}.batch_size is {body['batch_size']} but input_data has {rows} rows",
                               {"field": f"{path}.batch_size", "rows": rows})
    if body.get("sequence_length") is not None and body["sequence_length"] != cols:
        raise InvalidInputData(
            f"{path}.sequence_length is {body['sequence_length']} but input_data rows have {cols} values",
            {"field": f"{path}.sequence_length", "columns": cols})
    request = dict(body)
    request["input_data"] = matrix
    request["options"] = dict(body.get("options") or {})
    return request


class InferenceResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        request = prepare_request(parse(req, INFERENCE))
        resp.media = ok(self.runtime.infer(request, req.context.caller))


class AsyncInferenceResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        request = prepare_request(parse(req, INFERENCE))
        resp.media = ok(self.runtime.submit_inference(request, req.context.caller))


class InferenceResultResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_get(self, req, resp, request_id):
        resp.media = ok(self.runtime.get_inference(request_id, req.context.caller))


class BatchInferenceResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        body = parse(req, BATCH_INFERENCE)
        requests = [prepare_request(r, f"body.requests[{i}]") for i, r in enumerate(body["requests"])]
        resp.media = ok(self.runtime.infer_batch(requests, req.context.caller))
