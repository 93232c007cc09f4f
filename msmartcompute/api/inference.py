"""POST /inference, /inference/async, /inference/batch; GET /inference/{request_id}."""
from __future__ import annotations

from typing import Iterator

import orjson

from ..runtime.errors import InvalidInputData, MSCError
from .envelope import error, ok
from .schemas import MAX_ELEMENTS, BatchInference, Inference, as_matrix, parse


def fit_rows(rows: list, width: int, path: str) -> list:
    """sequence_length: every row cut to its first `width` values or padded with 0 at the end."""
    if len(rows) * width > MAX_ELEMENTS:
        raise InvalidInputData(f"{path}.sequence_length {width} x {len(rows)} rows is more than the limit of "
                               f"{MAX_ELEMENTS} values", {"field": f"{path}.sequence_length"})
    return [row[:width] if len(row) >= width else row + [0] * (width - len(row)) for row in rows]


def prepare_request(body: dict, path: str = "body") -> dict:
    """input_data as a numpy matrix, fitted to sequence_length and checked against batch_size when
    given; or input_text (a string or a list of strings), which the model's tokenizer turns into rows."""
    if body.get("input_text") is not None:
        if body.get("input_data") is not None:
            raise InvalidInputData(f"{path}: give input_data or input_text, not both", {"field": f"{path}.input_text"})
        if body["input_text"] == "":
            raise InvalidInputData(f"{path}.input_text must not be empty", {"field": f"{path}.input_text"})
        request = dict(body)
        request["options"] = dict(body.get("options") or {})
        return request
    if body.get("input_data") is None:
        raise InvalidInputData(f"{path}.input_data is required (or input_text for a model with a tokenizer)",
                               {"field": f"{path}.input_data"})
    rows = body["input_data"]
    if body.get("sequence_length") is not None:
        rows = fit_rows(rows, body["sequence_length"], path)
    matrix = as_matrix(rows, f"{path}.input_data")
    if body.get("batch_size") is not None and body["batch_size"] != matrix.shape[0]:
        raise InvalidInputData(f"{path}.batch_size is {body['batch_size']} but input_data has "
                               f"{matrix.shape[0]} rows", {"field": f"{path}.batch_size", "rows": matrix.shape[0]})
    request = dict(body)
    request["input_data"] = matrix
    request["options"] = dict(body.get("options") or {})
    return request


class InferenceResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        request = prepare_request(parse(req, Inference))
        if request["options"].get("stream"):
            # call first: an error before the first event is a plain JSON error, not an SSE response
            events = self.runtime.inference.infer_stream(request)
            resp.content_type = "text/event-stream"
            resp.set_header("Cache-Control", "no-cache")
            resp.stream = server_sent_events(events)
            return
        resp.media = ok(self.runtime.inference.infer(request))


def server_sent_events(events) -> Iterator[bytes]:
    """Inference.infer_stream's events as SSE: `data:` per token event, then `event: done` with
    the success envelope or `event: error` with the error envelope. When the client goes away,
    waitress closes this iterator, which closes `events`: the request is cancelled."""
    try:
        for event in events:
            if "output_data" in event:
                yield b"event: done\ndata: " + orjson.dumps(ok(event), option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"
            else:
                yield b"data: " + orjson.dumps(event) + b"\n\n"
    except MSCError as exc:
        yield b"event: error\ndata: " + orjson.dumps(error(exc.code, exc.message, exc.details)) + b"\n\n"
    finally:
        events.close()


class AsyncInferenceResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        request = prepare_request(parse(req, Inference))
        resp.media = ok(self.runtime.inference.submit(request, req.context.caller))


class InferenceResultResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_get(self, req, resp, request_id):
        resp.media = ok(self.runtime.inference.get(request_id, req.context.caller))


class BatchInferenceResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        body = parse(req, BatchInference)
        requests = [prepare_request(r, f"body.requests[{i}]") for i, r in enumerate(body["requests"])]
        resp.media = ok(self.runtime.inference.infer_batch(requests))
