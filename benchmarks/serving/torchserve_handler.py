"""TorchServe custom handler for the benchmark MLPs: JSON {"input_data": rows} in, {"output_data": rows} out.

One call gets TorchServe's batch (up to batch_size requests within max_batch_delay): the rows of
every request are stacked into one forward, then split back, as our server does. Packed into the
.mar with model.py and the weights file; the model's name picks the network.
"""
import json
import os

import torch

from model import MODELS, load  # packed next to this file in the .mar


class MLPHandler:
    def __init__(self):
        self.module = None

    def initialize(self, context):
        props = context.system_properties
        model_dir = props.get("model_dir")
        name = context.manifest["model"]["modelName"]
        assert name in MODELS, name
        self.module = load(name, os.path.join(model_dir, f"{name}.safetensors"))

    def handle(self, data, context):
        rows, counts = [], []
        for item in data:
            body = item.get("body") if item.get("body") is not None else item.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            x = torch.tensor(body["input_data"], dtype=torch.float32)
            rows.append(x)
            counts.append(x.shape[0])
        with torch.inference_mode():
            y = self.module(torch.cat(rows))
        out, start = [], 0
        for n in counts:
            out.append({"output_data": y[start:start + n].tolist()})
            start += n
        return out
