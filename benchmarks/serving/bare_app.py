"""The lower bound of serving overhead: Falcon + waitress running the model in-process.

No auth, validation, batching, metrics or logging: parse the JSON, one forward under
inference_mode, render the JSON. Same request/response shape as our POST /api/v1/inference
(input_data in, output_data out), so the load generator treats both alike.

    python -m benchmarks.serving.bare_app --model mlp_small --weights W --port P [--threads 8]
"""
from __future__ import annotations

import argparse

import falcon
import orjson
import torch

from .model import load


class Predict:
    def __init__(self, module):
        self.module = module

    def on_post(self, req, resp):
        body = orjson.loads(req.bounded_stream.read())
        with torch.inference_mode():
            y = self.module(torch.tensor(body["input_data"], dtype=torch.float32))
        resp.data = orjson.dumps({"output_data": y.numpy()}, option=orjson.OPT_SERIALIZE_NUMPY)
        resp.content_type = falcon.MEDIA_JSON


def main() -> None:
    import waitress

    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=8)
    args = p.parse_args()
    app = falcon.App()
    app.add_route("/predict", Predict(load(args.model, args.weights)))
    app.add_route("/health", type("Health", (), {"on_get": lambda self, req, resp: None})())
    waitress.serve(app, host="127.0.0.1", port=args.port, threads=args.threads, ident="bare")


if __name__ == "__main__":
    main()
