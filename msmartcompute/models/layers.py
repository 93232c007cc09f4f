"""Layers shared by the model families (and by the optimizer): activations and the
int8 weight-only QuantizedLinear."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from msmartcompute import ops

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class QuantizedLinear(nn.Module):
    """A Linear whose weight is int8 per output channel (symmetric, scale = absmax / 127).

    The forward runs ops.int8_linear(mode="w8a16") when that op exists, else dequantizes
    the weight to the activation dtype and calls F.linear (same math, more memory traffic).
    """

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = weight_q.shape[1]
        self.out_features = weight_q.shape[0]
        self.register_buffer("weight_q", weight_q)          # [out, in] int8
        self.register_buffer("weight_scale", weight_scale)  # [out] float32
        self.register_buffer("bias", bias)                  # [out] compute dtype, or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuantizedLinear":
        w = linear.weight.detach()
        q, scale = ops.quantize_int8(w, dim=-1)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale, bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return ops.dequantize_int8(self.weight_q, self.weight_scale, dtype, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        int8_linear = getattr(ops, "int8_linear", None)
        if int8_linear is not None:
            return int8_linear(x, self.weight_q, self.weight_scale, self.bias, mode="w8a16")
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantized_bytes(module: nn.Module) -> int:
    """The bytes `module` will hold once quantize_linears() converts it (each Linear's weight:
    1 byte a value plus a float32 scale per output row), computed without converting it."""
    total, seen = 0, set()
    for m in module.modules():
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            is_weight = isinstance(m, nn.Linear) and t is m.weight
            total += t.numel() + 4 * m.out_features if is_weight else t.numel() * t.element_size()
    return total


def quantize_linears(module: nn.Module) -> nn.Module:
    """Replace every nn.Linear inside `module` (in place) by a QuantizedLinear; returns module."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, QuantizedLinear.from_linear(child))
        else:
            quantize_linears(child)
    return module
