"""int8 quantization ops: the Python face of msmartcompute::quantize_int8 / dequantize_int8."""
from __future__ import annotations

import torch

from . import reference
from ._backend import dispatch, extension_loaded, pow2

_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def _check_dim(op: str, x: torch.Tensor, dim: int) -> None:
    if x.dim() == 0:
        raise ValueError(f"{op}: expected a tensor with at least 1 dimension, got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: dim {dim} out of range for a tensor of shape {tuple(x.shape)}")


def quantize_int8(x: torch.Tensor, dim: int = -1, *, backend: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization along `dim`.

    Args:
        x: float32, float16 or bfloat16 tensor.
        dim: the dimension reduced for the scale (-1: per row; 0 of a [K, N] weight: per column).
        backend: auto | cuda | triton | cpu | torch (default: $MSC_KERNEL_BACKEND or auto).
    Returns:
        (q, scale): q int8 shaped like x, with q = round_half_even(x * (127 / absmax))
        clamped to [-127, 127] (the reciprocal computed once per slice, in float32, capped at
        float32's max so an all-zero slice gives zeros); scale float32 shaped like x
        without `dim`, absmax / 127 (1 for an all-zero slice). Every backend gives the
        same bits.
    """
    if x.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"quantize_int8: expected float32, float16 or bfloat16 input, got {x.dtype}")
    _check_dim("quantize_int8", x, dim)
    return dispatch("quantize_int8", backend, x.device, _key(x, dim), {
        "cuda": lambda: torch.ops.msmartcompute.quantize_int8(x, dim),
        "cpu": lambda: torch.ops.msmartcompute.quantize_int8(x, dim),
        "triton": lambda: _triton().quantize_int8(x, dim),
        "torch": lambda: reference.quantize_int8(x, dim),
    })


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                    dim: int = -1, backend: str | None = None) -> torch.Tensor:
    """q * scale broadcast along `dim`, as `dtype`: the inverse of quantize_int8."""
    if q.dtype != torch.int8:
        raise ValueError(f"dequantize_int8: expected int8 q, got {q.dtype}")
    if scale.dtype != torch.float32:
        raise ValueError(f"dequantize_int8: expected float32 scale, got {scale.dtype}")
    _check_dim("dequantize_int8", q, dim)
    expected = q.shape[:dim % q.dim()] + q.shape[dim % q.dim() + 1:]
    if scale.shape != expected:
        raise ValueError(f"dequantize_int8: scale has shape {tuple(scale.shape)} but q of shape "
                         f"{tuple(q.shape)} along dim {dim} needs {tuple(expected)}")
    if q.device != scale.device:
        raise ValueError(f"dequantize_int8: q is on {q.device} but scale is on {scale.device}")
    return dispatch("dequantize_int8", backend, q.device, _key(q, dim) + (str(dtype),), {
        "cuda": lambda: torch.ops.msmartcompute.dequantize_int8(q, scale, dim, dtype),
        "cpu": lambda: torch.ops.msmartcompute.dequantize_int8(q, scale, dim, dtype),
        "triton": lambda: _triton().dequantize_int8(q, scale, dim, dtype),
        "torch": lambda: reference.dequantize_int8(q, scale, dim, dtype),
    })


def _key(x: torch.Tensor, dim: int) -> tuple:
    """Inputs that run alike: dtype, whether the reduced dim is the last, rows and columns bucketed."""
    cols = x.shape[dim]
    rows = x.numel() // cols if cols else 0
    return (str(x.dtype), dim % x.dim() == x.dim() - 1, pow2(rows), pow2(cols))


def _triton():
    from .triton import quant

    return quant


if extension_loaded():
    # Fake (meta) implementations: shapes and dtypes only, so torch.compile and
    # FakeTensor tracing can reason about the ops without running them.
    @torch.library.register_fake("msmartcompute::quantize_int8")
    def _quantize_int8_fake(x, dim=-1):
        scale_shape = x.shape[:dim % x.dim()] + x.shape[dim % x.dim() + 1:]
        return (torch.empty_like(x, dtype=torch.int8, memory_format=torch.contiguous_format),
                x.new_empty(scale_shape, dtype=torch.float32))

    @torch.library.register_fake("msmartcompute::dequantize_int8")
    def _dequantize_int8_fake(q, scale, dim=-1, dtype=None):
        return torch.empty_like(q, dtype=dtype or torch.float32, memory_format=torch.contiguous_format)
