"""mlp: float rows -> float rows through Linear, act, ..., Linear.

The module IS an nn.Sequential, so a state dict saved from the equivalent plain
Sequential (keys 0.weight, 0.bias, 2.weight, ...) loads as is."""
from __future__ import annotations

import torch
from torch import nn

from .base import Output, Prepared, ServedModel, float_rows, to_numpy
from .layers import activation
from .spec import MAX_DIMENSION, MAX_LAYERS, build_module, flag, int_param, tensor_cores


class MLP(nn.Sequential):
    def __init__(self, input_size: int, hidden_sizes: list[int], output_size: int, act: str = "relu"):
        sizes = [input_size, *hidden_sizes, output_size]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(activation(act))
        super().__init__(*layers)


def _hidden_sizes(params: dict) -> list[int]:
    sizes = params.get("hidden_sizes", [])
    if not isinstance(sizes, (list, tuple)) or len(sizes) > MAX_LAYERS or not all(
            isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_DIMENSION for s in sizes):
        raise ValueError(f"parameters.hidden_sizes must be a list of at most {MAX_LAYERS} integers in "
                         f"[1, {MAX_DIMENSION}], got {str(sizes)[:200]}")
    return list(sizes)


class MLPModel(ServedModel):
    model_type = "mlp"
    trainable = optimizable = True

    def __init__(self, spec: dict, device: torch.device):
        params = spec.get("parameters") or {}
        self.input_size = int_param(params, "input_size")
        self.output_size = int_param(params, "output_size")
        hidden = _hidden_sizes(params)
        act = params.get("activation", "relu")
        activation(act)  # validate the name before building
        self.device = device
        self.tensor_cores = flag(spec, "enable_tensor_cores")
        self.module, self.dtype = build_module(
            lambda: MLP(self.input_size, hidden, self.output_size, act), spec, device)

    def prepare(self, input_data, options: dict) -> Prepared:
        x = float_rows(input_data, self.input_size)  # [rows, input_size]
        return Prepared(tensor=x.to(self.device), options=dict(options or {}),
                        batch_key=("rows", self.input_size), rows=x.shape[0])

    def data_rows(self, data) -> torch.Tensor:
        return float_rows(data, self.input_size)

    def outputs(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # float rows in the module's own dtype (a half-precision copy takes half input)
        first = next((t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()), None)
        return module(x.to(first.dtype if first is not None else torch.float32)).float()

    @property
    def output_width(self) -> int:
        return self.output_size

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, input_size] -> [N, output_size] float32."""
        with tensor_cores(self.tensor_cores, self.device):
            return self.module(x.to(self.device, self.dtype)).float()

    def run(self, batch: list[Prepared]) -> list[Output]:
        y = to_numpy(self.forward(batch[0].tensor if len(batch) == 1 else torch.cat([p.tensor for p in batch])))
        outs, start = [], 0
        for p in batch:  # numpy views of the one result: a torch slice and conversion per request cost more
            outs.append(Output(output_data=y[start:start + p.rows], tokens_generated=0))
            start += p.rows
        return outs
