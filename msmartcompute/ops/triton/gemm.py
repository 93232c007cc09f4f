"""Triton GEMMs: int8 x int8 -> int32 with a dequantize epilogue (int8_matmul, int8_linear
w8a8 with the per-token quantization fused into the A loads) and a float GEMM with fp32
accumulation and a bias + activation epilogue (mixed_gemm, and int8_linear w8a16 where the
int8 weight tile is converted to the activation dtype in registers).

Every B operand is [N, K] (nn.Linear layout), read through strides as a [K, N] tile.
On a GPU each kernel is autotuned over a short config list; the interpreter runs one config.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .quant import _quantize, row_scales

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ACTIVATION = {None: 0, "relu": 1, "gelu": 2, "silu": 3}


def _configs(shapes):
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) -> triton.Config list."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in shapes]


# Small-M configs first: decoding (M = 1..16) wants narrow M tiles and many N blocks. BLOCK_K
# spans 128 bytes of a row (128 int8, 64 half) so Hopper's wgmma reads 128-byte swizzled smem
# rows; the 128x256 tiles with 8 warps are the sm_90 throughput configs (two warpgroups).
INT8_CONFIGS = _configs([(16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 128, 128, 4, 4),
                         (128, 128, 128, 3, 8), (128, 256, 128, 3, 8)])
FLOAT_CONFIGS = _configs([(16, 64, 64, 4, 4), (32, 128, 64, 4, 4), (64, 128, 64, 4, 4),
                          (128, 128, 64, 4, 8), (128, 256, 64, 3, 8)])
# The interpreter cannot autotune; small tiles so that the tests' odd sizes hit every tail.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-blocks share the B tiles they read while those are in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * grid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == 2:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 3:
        x = x / (1.0 + tl.exp(-x))
    return x


@triton.jit
def _store_epilogue(acc, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
                    HAS_A_SCALE: tl.constexpr, HAS_B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ACTIVATION: tl.constexpr):
    # out = act(acc * a_scale[m] * b_scale[n] + bias[n]) in float32, stored as c's dtype.
    mask_m = offs_m < M
    mask_n = offs_n < N
    out = acc.to(tl.float32)
    if HAS_A_SCALE:
        out = out * tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    if HAS_B_SCALE:
        out = out * tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = _activation(out, ACTIVATION)
    c = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn  # M*N may pass 2**31
    tl.store(c, out.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _int8_matmul_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr,  # [M,K] i8, [N,K] i8, [M] f32, [N] f32, [N], [M,N]
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a_tile = tl.load(a, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0)
        b_tile = tl.load(b, mask=(offs_n[None, :] < N) & (offs_k[:, None] < k_left), other=0)
        acc = tl.dot(a_tile, b_tile, acc, out_dtype=tl.int32)
        a += BLOCK_K * stride_ak
        b += BLOCK_K * stride_bk
    if OUT_INT32:
        c = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    else:
        _store_epilogue(acc, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
                        True, True, HAS_BIAS, 0)


@triton.jit
def _w8a8_linear_kernel(
    x_ptr, w_ptr, x_scale_ptr, x_inv_ptr, w_scale_ptr, bias_ptr, c_ptr,  # [M,K] float, [N,K] i8, [M] f32 x2, [N] f32, [N], [M,N]
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Per-token quantization fused into the A loads: each x tile is quantized in registers
    # right before the int8 dot, with the row's reciprocal scale computed once for the whole
    # row by triton/quant.py's row-scale kernel (not per N block, and no division per element).
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    x_inv = tl.load(x_inv_ptr + offs_m, mask=mask_m, other=0.0)[:, None]  # [BLOCK_M, 1]
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    w = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k * BLOCK_K + offs_k
        xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
        x_q = _quantize(xt.to(tl.float32), x_inv)
        w_tile = tl.load(w, mask=(offs_n[None, :] < N) & (kk[:, None] < K), other=0)
        acc = tl.dot(x_q, w_tile, acc, out_dtype=tl.int32)
        w += BLOCK_K * stride_wk
    _store_epilogue(acc, c_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
                    True, True, HAS_BIAS, 0)


@triton.jit
def _float_gemm_kernel(
    a_ptr, b_ptr, b_scale_ptr, bias_ptr, c_ptr,  # [M,K] float, [N,K] float or i8, [N] f32, [N], [M,N]
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    B_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # mixed_gemm (B float) and w8a16 (B int8, converted to A's dtype in registers: exact,
    # |q| <= 127; the per-channel scale is applied once in the epilogue).
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a_tile = tl.load(a, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b_tile = tl.load(b, mask=(offs_n[None, :] < N) & (offs_k[:, None] < k_left), other=0)
        if B_INT8:
            b_tile = b_tile.to(a_ptr.dtype.element_ty)
        acc = tl.dot(a_tile, b_tile, acc, input_precision=INPUT_PRECISION)
        a += BLOCK_K * stride_ak
        b += BLOCK_K * stride_bk
    _store_epilogue(acc, c_ptr, b_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
                    False, B_INT8, HAS_BIAS, ACTIVATION)


# Tuned per (M bucket, N, K): M_BUCKET is M's next power of two (an argument the kernels do
# not read), so a new batch size re-uses its bucket's config instead of tuning again.
_TUNING_KEY = ["M_BUCKET", "N", "K"]
_int8_matmul_tuned = triton.autotune(INT8_CONFIGS, key=_TUNING_KEY)(_int8_matmul_kernel)
_w8a8_linear_tuned = triton.autotune(INT8_CONFIGS, key=_TUNING_KEY)(_w8a8_linear_kernel)
_float_gemm_tuned = triton.autotune(FLOAT_CONFIGS, key=_TUNING_KEY)(_float_gemm_kernel)


def _launch(kernel, tuned, M, N, *args, **constexprs):
    if M == 0 or N == 0:
        return
    if INTERPRET:
        grid = (triton.cdiv(M, INTERPRET_CONFIG["BLOCK_M"]) * triton.cdiv(N, INTERPRET_CONFIG["BLOCK_N"]),)
        kernel[grid](*args, **constexprs, **INTERPRET_CONFIG)
    else:
        tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](*args, **constexprs)


def int8_matmul(a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    (M, K), N = a_q.shape, b_q.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    a_scale, b_scale = a_scale.contiguous(), b_scale.contiguous()
    bias_arg = bias.contiguous() if bias is not None else b_scale
    _launch(_int8_matmul_kernel, _int8_matmul_tuned, M, N,
            a_q, b_q, a_scale, b_scale, bias_arg, c, M, N, K, triton.next_power_of_2(M),
            a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), c.stride(0), c.stride(1),
            HAS_BIAS=bias is not None, OUT_INT32=out_dtype == torch.int32)
    return c


def _float_gemm(a, b, b_scale, bias, activation, out_dtype):
    (M, K), N = a.shape, b.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    dummy = c if b_scale is None else b_scale
    _launch(_float_gemm_kernel, _float_gemm_tuned, M, N,
            a, b, dummy if b_scale is None else b_scale.contiguous(),
            dummy if bias is None else bias.contiguous(), c, M, N, K, triton.next_power_of_2(M),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            B_INT8=b.dtype == torch.int8, HAS_BIAS=bias is not None, ACTIVATION=_ACTIVATION[activation],
            INPUT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32")
    return c


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                mode: str = "w8a8") -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # [M, K], a view when x allows it
    (M, K), N = x2.shape, w_q.shape[0]
    if mode == "w8a16":
        c = _float_gemm(x2, w_q, w_scale, bias, None, x.dtype)
    else:
        c = torch.empty((M, N), dtype=x.dtype, device=x.device)
        x_scale, x_inv = row_scales(x2)  # [M], [M]: absmax / 127 and its capped reciprocal 127 / absmax
        w_scale = w_scale.contiguous()
        _launch(_w8a8_linear_kernel, _w8a8_linear_tuned, M, N,
                x2, w_q, x_scale, x_inv, w_scale, w_scale if bias is None else bias.contiguous(), c,
                M, N, K, triton.next_power_of_2(M),
                x2.stride(0), x2.stride(1), w_q.stride(0), w_q.stride(1), c.stride(0), c.stride(1),
                HAS_BIAS=bias is not None)
    return c.view(*x.shape[:-1], N)


def mixed_gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return _float_gemm(a, b, None, bias, activation, out_dtype or a.dtype)


_STRIDES = {name: "i32" for name in ("M", "N", "K", "M_BUCKET", "stride_am", "stride_ak", "stride_bn", "stride_bk",
                                     "stride_cm", "stride_cn")}
_X_STRIDES = {name: "i32" for name in ("M", "N", "K", "M_BUCKET", "stride_xm", "stride_xk", "stride_wn", "stride_wk",
                                       "stride_cm", "stride_cn")}
_BIG_INT8 = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}
_BIG_OPTIONS = {"num_warps": 8, "num_stages": 3}  # as the 128x256 autotune configs
_SMALL_INT8 = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}
_BIG_FLOAT = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}
_SMALL_FLOAT = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}

# (kernel, signature, constexprs) lowered ahead of time for sm_80/sm_90 by CI.
AOT_SPECS = [
    (_int8_matmul_kernel,
     dict(a_ptr="*i8", b_ptr="*i8", a_scale_ptr="*fp32", b_scale_ptr="*fp32", bias_ptr="*bf16", c_ptr="*bf16",
          **_STRIDES), dict(HAS_BIAS=True, OUT_INT32=False, **_BIG_INT8), _BIG_OPTIONS),
    (_int8_matmul_kernel,
     dict(a_ptr="*i8", b_ptr="*i8", a_scale_ptr="*fp32", b_scale_ptr="*fp32", bias_ptr="*fp32", c_ptr="*i32",
          **_STRIDES), dict(HAS_BIAS=False, OUT_INT32=True, **_SMALL_INT8)),
    (_w8a8_linear_kernel,
     dict(x_ptr="*fp16", w_ptr="*i8", x_scale_ptr="*fp32", x_inv_ptr="*fp32", w_scale_ptr="*fp32", bias_ptr="*fp16", c_ptr="*fp16", **_X_STRIDES),
     dict(HAS_BIAS=True, **_BIG_INT8), _BIG_OPTIONS),
    (_w8a8_linear_kernel,
     dict(x_ptr="*bf16", w_ptr="*i8", x_scale_ptr="*fp32", x_inv_ptr="*fp32", w_scale_ptr="*fp32", bias_ptr="*bf16", c_ptr="*bf16", **_X_STRIDES),
     dict(HAS_BIAS=False, **_SMALL_INT8)),
    (_float_gemm_kernel,
     dict(a_ptr="*fp16", b_ptr="*fp16", b_scale_ptr="*fp16", bias_ptr="*fp16", c_ptr="*fp16", **_STRIDES),
     dict(B_INT8=False, HAS_BIAS=True, ACTIVATION=2, INPUT_PRECISION="tf32", **_BIG_FLOAT), _BIG_OPTIONS),
    (_float_gemm_kernel,
     dict(a_ptr="*bf16", b_ptr="*bf16", b_scale_ptr="*bf16", bias_ptr="*bf16", c_ptr="*bf16", **_STRIDES),
     dict(B_INT8=False, HAS_BIAS=True, ACTIVATION=3, INPUT_PRECISION="tf32", **_BIG_FLOAT), _BIG_OPTIONS),
    (_float_gemm_kernel,
     dict(a_ptr="*bf16", b_ptr="*i8", b_scale_ptr="*fp32", bias_ptr="*bf16", c_ptr="*bf16", **_STRIDES),
     dict(B_INT8=True, HAS_BIAS=True, ACTIVATION=0, INPUT_PRECISION="tf32", **_SMALL_FLOAT)),
    (_float_gemm_kernel,
     dict(a_ptr="*fp16", b_ptr="*i8", b_scale_ptr="*fp32", bias_ptr="*fp16", c_ptr="*fp16", **_STRIDES),
     dict(B_INT8=True, HAS_BIAS=False, ACTIVATION=1, INPUT_PRECISION="tf32", **_BIG_FLOAT), _BIG_OPTIONS),
]
