"""Triton int8 quantize / dequantize: one program per row of a [rows, cols] view."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reciprocal_scale(absmax):
    # 127 / absmax, one IEEE division per row (capped at float32's max: an all-zero row gives 0s).
    return tl.minimum(tl.math.div_rn(127.0, absmax), 3.4028234663852886e38)


@triton.jit
def _quantize(x, inv):
    # round_half_even(x * inv) clamped to +-127, as reference.quantize_int8. Clamping first keeps
    # the multiply from fusing into the rounding add (an FMA would round once, not twice); the
    # 1.5 * 2**23 add-subtract rounds half to even exactly for |v| < 2**22.
    v = tl.minimum(tl.maximum(x * inv, -127.0), 127.0)
    return ((v + 12582912.0) - 12582912.0).to(tl.int8)


@triton.jit
def _quantize_int8_kernel(
    x_ptr, q_ptr, scale_ptr,  # [rows, cols], [rows, cols] int8, [rows] float32
    cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * cols
    q_row = q_ptr + row * cols
    absmax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < cols, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    amax = tl.max(absmax, axis=0)
    tl.store(scale_ptr + row, tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0))
    inv = _reciprocal_scale(amax)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < cols, other=0.0).to(tl.float32)
        tl.store(q_row + offs, _quantize(x, inv), mask=offs < cols)


@triton.jit
def _row_scales_kernel(
    x_ptr, scale_ptr, inv_ptr,  # [rows, cols] (row stride stride_x), [rows] float32, [rows] float32
    cols, stride_x,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    absmax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < cols, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    amax = tl.max(absmax, axis=0)
    tl.store(scale_ptr + row, tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0))
    tl.store(inv_ptr + row, _reciprocal_scale(amax))


@triton.jit
def _dequantize_int8_kernel(
    q_ptr, scale_ptr, out_ptr,  # [rows, cols] int8, [rows] float32, [rows, cols]
    cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        q = tl.load(q_ptr + row * cols + offs, mask=offs < cols, other=0).to(tl.float32)
        tl.store(out_ptr + row * cols + offs, (q * scale).to(out_ptr.dtype.element_ty), mask=offs < cols)


def _block(cols: int) -> int:
    return max(16, min(4096, triton.next_power_of_2(max(cols, 1))))


def quantize_int8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    moved = x.movedim(dim, -1).contiguous()
    rows = moved.view(-1, moved.shape[-1])  # [R, C]
    q = torch.empty(rows.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    if rows.shape[0] > 0:
        _quantize_int8_kernel[(rows.shape[0],)](rows, q, scale, rows.shape[1], BLOCK=_block(rows.shape[1]))
    q = q.view(moved.shape).movedim(-1, dim).contiguous()
    return q, scale.view(moved.shape[:-1])


def row_scales(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, inv) float32 [rows] of a [rows, cols] x with unit column stride: quantize_int8's
    scale and the reciprocal its rounding multiplies by (the w8a8 GEMM quantizes x with it)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    inv = torch.empty_like(scale)
    if x.shape[0] > 0:
        _row_scales_kernel[(x.shape[0],)](x, scale, inv, x.shape[1], x.stride(0), BLOCK=_block(x.shape[1]))
    return scale, inv


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dim: int = -1,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    moved = q.movedim(dim, -1).contiguous()
    rows = moved.view(-1, moved.shape[-1])  # [R, C]
    out = torch.empty(rows.shape, dtype=dtype, device=q.device)
    if rows.numel() > 0:
        _dequantize_int8_kernel[(rows.shape[0],)](rows, scale.contiguous(), out, rows.shape[1],
                                                  BLOCK=_block(rows.shape[1]))
    return out.view(moved.shape).movedim(-1, dim).contiguous()


# (kernel, signature, constexprs) lowered ahead of time for sm_80/sm_90 by CI.
AOT_SPECS = [
    (_quantize_int8_kernel, {"x_ptr": "*fp16", "q_ptr": "*i8", "scale_ptr": "*fp32", "cols": "i32"}, {"BLOCK": 1024}),
    (_quantize_int8_kernel, {"x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32", "cols": "i32"}, {"BLOCK": 1024}),
    (_quantize_int8_kernel, {"x_ptr": "*fp32", "q_ptr": "*i8", "scale_ptr": "*fp32", "cols": "i32"}, {"BLOCK": 1024}),
    (_row_scales_kernel, {"x_ptr": "*bf16", "scale_ptr": "*fp32", "inv_ptr": "*fp32", "cols": "i32", "stride_x": "i32"},
     {"BLOCK": 1024}),
    (_dequantize_int8_kernel, {"q_ptr": "*i8", "scale_ptr": "*fp32", "out_ptr": "*bf16", "cols": "i32"}, {"BLOCK": 1024}),
    (_dequantize_int8_kernel, {"q_ptr": "*i8", "scale_ptr": "*fp32", "out_ptr": "*fp32", "cols": "i32"}, {"BLOCK": 1024}),
]
