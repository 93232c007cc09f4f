"""Triton variable-length attention over packed sequences, forward and backward.

The kernels of attention.py with two changes: a program finds its sequence's rows from
cu_seqlens (programs past a short sequence's end return at once), and q/k/v are read through
their token and head strides, so views (a fused qkv projection, a cache slice) are not copied.
The grid is one-dimensional (query block x sequence x head folded into x), so no grid dimension
meets the 65535 limit of y and z. Rows that see no key (causal with len_q > len_k) get zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _LOG2E, _bwd_config, _bwd_dkdv_step, _bwd_dq_step, _fwd_config


@triton.jit
def _varlen_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,  # [total_q, H, D], [total_k, HKV, D] x2, out contiguous, lse [H, total_q]
    cu_q_ptr, cu_k_ptr,  # int32 [B + 1]
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    H, GROUP, TOTAL_Q, M_BLOCKS,
    scale_log2,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % M_BLOCKS
    bh = pid // M_BLOCKS
    b, h = bh // H, bh % H
    q0 = tl.load(cu_q_ptr + b).to(tl.int64)
    len_q = tl.load(cu_q_ptr + b + 1) - q0
    if pid_m * BLOCK_M >= len_q:
        return
    k0 = tl.load(cu_k_ptr + b).to(tl.int64)
    len_k = tl.load(cu_k_ptr + b + 1) - k0
    kv_h = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    cols0 = tl.arange(0, BLOCK_N)
    offset = len_k - len_q  # causal: query i sees keys j <= i + offset
    q = tl.load(q_ptr + (q0 + rows)[:, None] * stride_qt + h * stride_qh + dims[None, :],
                mask=rows[:, None] < len_q, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, (pid_m + 1) * BLOCK_M + offset)
    for start in range(0, hi, BLOCK_N):
        cols = start + cols0
        kt = tl.load(k_ptr + (k0 + cols)[None, :] * stride_kt + kv_h * stride_kh + dims[:, None],
                     mask=cols[None, :] < len_k, other=0.0)
        s = tl.dot(q, kt) * scale_log2  # [BLOCK_M, BLOCK_N]
        valid = cols[None, :] < len_k
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + offset)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps max -inf: shift by 0 there, not by -inf (NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (k0 + cols)[:, None] * stride_vt + kv_h * stride_vh + dims[None, :],
                    mask=cols[:, None] < len_k, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(out_ptr + ((q0 + rows) * H + h)[:, None] * HEAD_DIM + dims[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] < len_q)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + h * TOTAL_Q + q0 + rows, lse, mask=rows < len_q)


@triton.jit
def _varlen_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,  # q, k, v contiguous; do like q; lse, delta [H, total_q]
    dk_ptr, dv_ptr,  # [total_k, HKV, D]
    cu_q_ptr, cu_k_ptr,
    H, GROUP, TOTAL_Q, N_BLOCKS,
    scale, scale_log2,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = pid % N_BLOCKS
    bkv = pid // N_BLOCKS  # b * HKV + kv head
    hkv = H // GROUP
    b, kv_h = bkv // hkv, bkv % hkv
    q0 = tl.load(cu_q_ptr + b).to(tl.int64)
    len_q = tl.load(cu_q_ptr + b + 1) - q0
    k0 = tl.load(cu_k_ptr + b).to(tl.int64)
    len_k = tl.load(cu_k_ptr + b + 1) - k0
    if pid_n * BLOCK_N >= len_k:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    rows0 = tl.arange(0, BLOCK_M)
    offset = len_k - len_q
    kv_offs = ((k0 + cols) * hkv + kv_h)[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(k_ptr + kv_offs, mask=cols[:, None] < len_k, other=0.0)  # [BLOCK_N, D]
    v = tl.load(v_ptr + kv_offs, mask=cols[:, None] < len_k, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # queries before pid_n * BLOCK_N - offset see none of this block
        lo = tl.maximum(0, pid_n * BLOCK_N - offset) // BLOCK_M * BLOCK_M
    for g in range(0, GROUP):
        h = kv_h * GROUP + g
        for start in range(lo, len_q, BLOCK_M):
            rows = start + rows0
            q_offs = ((q0 + rows) * H + h)[:, None] * HEAD_DIM + dims[None, :]
            q = tl.load(q_ptr + q_offs, mask=rows[:, None] < len_q, other=0.0)  # [BLOCK_M, D]
            do = tl.load(do_ptr + q_offs, mask=rows[:, None] < len_q, other=0.0)
            lse = tl.load(lse_ptr + h * TOTAL_Q + q0 + rows, mask=rows < len_q, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_ptr + h * TOTAL_Q + q0 + rows, mask=rows < len_q, other=0.0)
            dk, dv = _bwd_dkdv_step(dk, dv, k, v, q, do, lse, delta, rows, cols, len_q, len_k, offset, scale_log2,
                                    CAUSAL)
    tl.store(dk_ptr + kv_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=cols[:, None] < len_k)
    tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=cols[:, None] < len_k)


@triton.jit
def _varlen_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,  # as _varlen_bwd_dkdv_kernel
    dq_ptr,  # [total_q, H, D]
    cu_q_ptr, cu_k_ptr,
    H, GROUP, TOTAL_Q, M_BLOCKS,
    scale, scale_log2,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % M_BLOCKS
    bh = pid // M_BLOCKS
    b, h = bh // H, bh % H
    hkv = H // GROUP
    kv_h = h // GROUP
    q0 = tl.load(cu_q_ptr + b).to(tl.int64)
    len_q = tl.load(cu_q_ptr + b + 1) - q0
    if pid_m * BLOCK_M >= len_q:
        return
    k0 = tl.load(cu_k_ptr + b).to(tl.int64)
    len_k = tl.load(cu_k_ptr + b + 1) - k0
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    cols0 = tl.arange(0, BLOCK_N)
    offset = len_k - len_q
    q_offs = ((q0 + rows) * H + h)[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=rows[:, None] < len_q, other=0.0)
    do = tl.load(do_ptr + q_offs, mask=rows[:, None] < len_q, other=0.0)
    lse = tl.load(lse_ptr + h * TOTAL_Q + q0 + rows, mask=rows < len_q, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + h * TOTAL_Q + q0 + rows, mask=rows < len_q, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, (pid_m + 1) * BLOCK_M + offset)
    for start in range(0, hi, BLOCK_N):
        cols = start + cols0
        kv_offs = ((k0 + cols) * hkv + kv_h)[:, None] * HEAD_DIM + dims[None, :]
        k = tl.load(k_ptr + kv_offs, mask=cols[:, None] < len_k, other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_ptr + kv_offs, mask=cols[:, None] < len_k, other=0.0)
        dq = _bwd_dq_step(dq, q, do, k, v, lse, delta, rows, cols, len_q, len_k, offset, scale_log2, CAUSAL)
    tl.store(dq_ptr + q_offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=rows[:, None] < len_q)


def varlen_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [total_q, H, D] contiguous, lse float32 [H, total_q], natural log)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    total_q, H, D = q.shape
    hkv = k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(H, total_q, dtype=torch.float32, device=q.device)
    block_m, block_n, warps = _fwd_config(D)
    m_blocks = triton.cdiv(max(max_seqlen_q, 1), block_m)
    if total_q > 0:
        _varlen_fwd_kernel[(m_blocks * batch * H,)](
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), H, H // hkv, total_q, m_blocks, scale * _LOG2E,
            CAUSAL=causal, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return out, lse


def varlen_attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         causal, scale):
    """(dq, dk, dv) of varlen attention, recomputing P from lse."""
    q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    total_q, H, D = q.shape
    hkv = k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    delta = (grad_out.float() * out.float()).sum(-1).t().contiguous()  # [H, total_q]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if total_q == 0 or k.shape[0] == 0:
        return dq, dk, dv
    block_m, block_n, warps = _bwd_config(D)
    meta = dict(CAUSAL=causal, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    n_blocks = triton.cdiv(max(max_seqlen_k, 1), block_n)
    m_blocks = triton.cdiv(max(max_seqlen_q, 1), block_m)
    _varlen_bwd_dkdv_kernel[(n_blocks * batch * hkv,)](
        q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, H, H // hkv, total_q, n_blocks,
        scale, scale * _LOG2E, **meta)
    _varlen_bwd_dq_kernel[(m_blocks * batch * H,)](
        q, k, v, grad_out, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, H, H // hkv, total_q, m_blocks,
        scale, scale * _LOG2E, **meta)
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
        out, lse = varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                        scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = varlen_attention_bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    """Differentiable varlen attention on the Triton kernels."""
    return _VarlenAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)


def _specs():
    """(kernel, signature, constexprs) lowered ahead of time for sm_80/sm_90 by CI."""
    specs = []
    sizes = {"H": "i32", "GROUP": "i32", "TOTAL_Q": "i32"}
    for dtype in ("fp16", "bf16"):
        tensors = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}"}
        cu = {"cu_q_ptr": "*i32", "cu_k_ptr": "*i32"}
        strides = {name: "i32" for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                                            "stride_vh")}
        grads = {"do_ptr": f"*{dtype}", "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
        for causal in (False, True):
            fwd = {"CAUSAL": causal, "HEAD_DIM": 128, "BLOCK_M": 128, "BLOCK_N": 64}
            bwd = {"CAUSAL": causal, "HEAD_DIM": 128, "BLOCK_M": 64, "BLOCK_N": 64}
            specs.append((_varlen_fwd_kernel, {**tensors, "out_ptr": f"*{dtype}", "lse_ptr": "*fp32", **cu,
                                               **strides, **sizes, "M_BLOCKS": "i32", "scale_log2": "fp32"}, fwd))
            if dtype == "fp16":  # the backward differs from bf16 only in its element type: lowered once
                continue
            specs.append((_varlen_bwd_dkdv_kernel, {**tensors, **grads, "dk_ptr": f"*{dtype}", "dv_ptr": f"*{dtype}",
                                                    **cu, **sizes, "N_BLOCKS": "i32", "scale": "fp32",
                                                    "scale_log2": "fp32"}, bwd))
            specs.append((_varlen_bwd_dq_kernel, {**tensors, **grads, "dq_ptr": f"*{dtype}", **cu, **sizes,
                                                  "M_BLOCKS": "i32", "scale": "fp32", "scale_log2": "fp32"}, bwd))
    return specs


AOT_SPECS = _specs()
