"""Reading a model spec (the seed's POST /models body) and the steps every built-in
family shares: seeded construction, checkpoint, device, precision, quantization."""
from __future__ import annotations

import contextlib
import threading
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


# Upper bounds on sizing parameters (the API's schemas hold the same): beyond any model served
# here; what they allow is then held to the memory quota by its plan (models.planned_bytes)
MAX_DIMENSION = 1 << 24   # a width, a vocabulary
MAX_LAYERS = 1024         # num_layers, and the hidden_sizes of an MLP


def int_param(params: dict, name: str, default: int | None = None, minimum: int = 1,
              maximum: int = MAX_DIMENSION) -> int:
    value = params.get(name, default)
    if value is None:
        raise ValueError(f"parameters.{name} is required")
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"parameters.{name} must be an integer in [{minimum}, {maximum}], got {value!r}")
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


_INIT_FUNCTIONS = ("kaiming_uniform_", "uniform_", "normal_", "ones_", "zeros_")
_init_lock = threading.Lock()


@contextlib.contextmanager
def no_init():
    """Modules built without initialising their parameters (the checkpoint overwrites every
    one): torch.nn.init's fillers do nothing meanwhile, so parameters are uninitialised
    memory on the target device and the load writes each byte once. (Building on the meta
    device with the fillers on costs 4-13 s the first time in a process, measured: meta
    normal_ imports torch._dynamo.) The fillers are module globals, hence the lock."""
    with _init_lock:
        saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(torch.nn.init, name, fn)


def build_module(make: Callable[[], nn.Module], spec: dict, device: torch.device
                 ) -> tuple[nn.Module, torch.dtype]:
    """Construct (seeded, on the CPU so the weights do not depend on the device), load
    model_path if given, move to the device and compute dtype, quantize if asked."""
    seed = spec.get("seed", 0)
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    planning = device.type == "meta"  # shapes and dtypes only, no memory: models.planned_bytes
    with torch.random.fork_rng(devices=[]), \
            torch.device("meta") if planning else contextlib.nullcontext(), no_init() if planning else contextlib.nullcontext():
        torch.manual_seed(seed)
        module = make()
    if spec.get("model_path") and not planning:
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
