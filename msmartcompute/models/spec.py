"""Reading a model spec (the seed's POST /models body) and the steps every built-in
family shares: seeded construction, checkpoint, device, precision, quantization."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .layers import quantize_linears


class SpecError(ValueError):
    """A load spec the model cannot be built from; `field` names the request field at fault
    (the API puts it in details.field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def int_param(params: dict, name: str, default: int | None = None, minimum: int = 1) -> int:
    value = params.get(name, default)
    if value is None:
        raise ValueError(f"parameters.{name} is required")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"parameters.{name} must be an integer >= {minimum}, got {value!r}")
    return value


def flag(spec: dict, name: str) -> bool:
    value = spec.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def max_sequence_length(spec: dict, default: int = 512) -> int:
    value = spec.get("max_sequence_length")
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_sequence_length must be an integer >= 1, got {value!r}")
    return value


def compute_dtype(spec: dict, device: torch.device) -> torch.dtype:
    """float32, or with enable_mixed_precision bf16 (CPU, and CUDA cards with bf16) / fp16."""
    if not flag(spec, "enable_mixed_precision"):
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def build_module(make: Callable[[], nn.Module], spec: dict, device: torch.device
                 ) -> tuple[nn.Module, torch.dtype]:
    """Construct (seeded, on the CPU so the weights do not depend on the device), load
    model_path if given, move to the device and compute dtype, quantize if asked."""
    seed = spec.get("seed", 0)
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
    if spec.get("model_path"):
        load_checkpoint(module, spec["model_path"])
    dtype = compute_dtype(spec, device)
    module = module.to(device=device, dtype=dtype)
    if flag(spec, "enable_quantization"):
        quantize_linears(module)
    return module.eval(), dtype


@contextlib.contextmanager
def tensor_cores(enabled: bool, device: torch.device):
    """TF32 matmuls on CUDA for the duration of a forward when enable_tensor_cores is set.
    (Half-precision matmuls use tensor cores by themselves.) The flag is process-wide, so it
    is set around each run rather than once at load."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
