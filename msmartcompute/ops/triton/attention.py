"""Triton fused attention, forward and backward (FlashAttention-2 style).

Forward: one program per (query block, batch x head); K/V blocks streamed through an
online softmax in base 2 (log2(e) folded into the scale), causal blocks past the
diagonal skipped. Backward: delta = rowsum(dO * O) in torch, then one kernel for dK/dV
(one program per kv block and kv head, looping over the query heads of its group, so
no atomics) and one for dQ, both recomputing P from the saved log-sum-exp.
The forward reads q/k/v through their strides; the backward makes them contiguous first.
Every grid is one-dimensional (block x batch x head folded into x, whose limit is 2^31 - 1):
y and z stop at 65535, which B * H passes.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,  # [B, H, SQ, D], [B, HKV, SK, D] x2 (any strides, unit on D), out
                                            # [B, H, SQ, D] and lse [B, H, SQ] fp32 contiguous
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    H, GROUP, SQ, SK, M_BLOCKS,
    scale_log2,  # scale * log2(e)
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % M_BLOCKS
    bh = (pid // M_BLOCKS).to(tl.int64)
    b, h = bh // H, bh % H
    kv_h = h // GROUP
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    cols0 = tl.arange(0, BLOCK_N)
    offset = SK - SQ  # causal: query i sees keys j <= i + offset

    q = tl.load(q_base + rows[:, None] * stride_qs + dims[None, :], mask=rows[:, None] < SQ, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = SK
    if CAUSAL:
        hi = tl.minimum(SK, (pid_m + 1) * BLOCK_M + offset)
    for start in range(0, hi, BLOCK_N):
        cols = start + cols0
        kt = tl.load(k_base + cols[None, :] * stride_ks + dims[:, None], mask=cols[None, :] < SK, other=0.0)
        s = tl.dot(q, kt) * scale_log2  # [BLOCK_M, BLOCK_N]
        valid = cols[None, :] < SK
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + offset)
        s = tl.where(valid, s, float("-inf"))
        # Every row sees key 0 in the first block (Sq <= Sk when causal), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vs + dims[None, :], mask=cols[:, None] < SK, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(out_ptr + bh * SQ * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] < SQ)
    tl.store(lse_ptr + bh * SQ + rows, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=rows < SQ)


@triton.jit
def _bwd_dkdv_step(dk, dv, k, v, q, do, lse_log2, delta, rows, cols, n_rows, n_cols, offset, scale_log2,
                   CAUSAL: tl.constexpr):
    """dK (unscaled) and dV of a key block [BLOCK_N, D] plus one query block's share: P^T recomputed
    from the base-2 log-sum-exp, dV += P^T dO, dK += (P^T * (V dO^T - delta)) Q. Shared by the fused
    and the varlen backward; rows/cols index the sequence, n_rows/n_cols are its lengths."""
    st = tl.dot(k, tl.trans(q)) * scale_log2  # [BLOCK_N, BLOCK_M]
    valid = (rows[None, :] < n_rows) & (cols[:, None] < n_cols)
    if CAUSAL:
        valid = valid & (cols[:, None] <= rows[None, :] + offset)
    pt = tl.where(valid, tl.math.exp2(st - lse_log2[None, :]), 0.0)
    dv += tl.dot(pt.to(do.dtype), do)
    dpt = tl.dot(v, tl.trans(do))  # [BLOCK_N, BLOCK_M]
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q)
    return dk, dv


@triton.jit
def _bwd_dq_step(dq, q, do, k, v, lse_log2, delta, rows, cols, n_rows, n_cols, offset, scale_log2,
                 CAUSAL: tl.constexpr):
    """dQ (unscaled) of a query block plus one key block's share: dQ += (P * (dO V^T - delta)) K."""
    s = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_M, BLOCK_N]
    valid = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    if CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None] + offset)
    p = tl.where(valid, tl.math.exp2(s - lse_log2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,  # [B,H,SQ,D], [B,HKV,SK,D] x2, [B,H,SQ,D], [B,H,SQ] x2
    dk_ptr, dv_ptr,  # [B, HKV, SK, D] x2
    H, GROUP, SQ, SK, N_BLOCKS,
    scale, scale_log2,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = pid % N_BLOCKS
    kv_head = (pid // N_BLOCKS).to(tl.int64)  # b * HKV + kv head
    hkv = H // GROUP
    b = kv_head // hkv
    first_head = b * H + (kv_head % hkv) * GROUP
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    rows0 = tl.arange(0, BLOCK_M)
    offset = SK - SQ
    kv_offs = kv_head * SK * HEAD_DIM + cols[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(k_ptr + kv_offs, mask=cols[:, None] < SK, other=0.0)  # [BLOCK_N, D]
    v = tl.load(v_ptr + kv_offs, mask=cols[:, None] < SK, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # queries before start - offset see none of this block
        lo = tl.maximum(0, pid_n * BLOCK_N - offset) // BLOCK_M * BLOCK_M
    for g in range(0, GROUP):
        head = first_head + g
        for start in range(lo, SQ, BLOCK_M):
            rows = start + rows0
            q_offs = head * SQ * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
            q = tl.load(q_ptr + q_offs, mask=rows[:, None] < SQ, other=0.0)  # [BLOCK_M, D]
            do = tl.load(do_ptr + q_offs, mask=rows[:, None] < SQ, other=0.0)
            lse = tl.load(lse_ptr + head * SQ + rows, mask=rows < SQ, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_ptr + head * SQ + rows, mask=rows < SQ, other=0.0)
            dk, dv = _bwd_dkdv_step(dk, dv, k, v, q, do, lse, delta, rows, cols, SQ, SK, offset, scale_log2, CAUSAL)
    tl.store(dk_ptr + kv_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=cols[:, None] < SK)
    tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=cols[:, None] < SK)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,  # as _attn_bwd_dkdv_kernel
    dq_ptr,  # [B, H, SQ, D]
    H, GROUP, SQ, SK, M_BLOCKS,
    scale, scale_log2,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % M_BLOCKS
    bh = (pid // M_BLOCKS).to(tl.int64)
    b, h = bh // H, bh % H
    kv_head = b * (H // GROUP) + h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    cols0 = tl.arange(0, BLOCK_N)
    offset = SK - SQ
    q_offs = bh * SQ * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=rows[:, None] < SQ, other=0.0)
    do = tl.load(do_ptr + q_offs, mask=rows[:, None] < SQ, other=0.0)
    lse = tl.load(lse_ptr + bh * SQ + rows, mask=rows < SQ, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh * SQ + rows, mask=rows < SQ, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = SK
    if CAUSAL:
        hi = tl.minimum(SK, (pid_m + 1) * BLOCK_M + offset)
    for start in range(0, hi, BLOCK_N):
        cols = start + cols0
        kv_offs = kv_head * SK * HEAD_DIM + cols[:, None] * HEAD_DIM + dims[None, :]
        k = tl.load(k_ptr + kv_offs, mask=cols[:, None] < SK, other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_ptr + kv_offs, mask=cols[:, None] < SK, other=0.0)
        dq = _bwd_dq_step(dq, q, do, k, v, lse, delta, rows, cols, SQ, SK, offset, scale_log2, CAUSAL)
    tl.store(dq_ptr + q_offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=rows[:, None] < SQ)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fwd_config(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps); one config (the interpreter cannot autotune)."""
    if _interpreting():
        return 16, 32, 4
    if head_dim <= 64:
        return 128, 64, 4
    if head_dim <= 128:
        return 128, 64, 8
    return 64, 32, 8


def _bwd_config(head_dim: int) -> tuple[int, int, int]:
    if _interpreting():
        return 16, 32, 4
    if head_dim <= 128:
        return 64, 64, 4 if head_dim <= 64 else 8
    return 32, 32, 8


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Sq, D], lse float32 [B, H, Sq], natural log). q/k/v are read through their
    strides (a KV-cache slice is not copied); only a non-unit stride on D forces a copy."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, SQ, dtype=torch.float32, device=q.device)
    block_m, block_n, warps = _fwd_config(D)
    m_blocks = triton.cdiv(SQ, block_m)
    if q.numel() > 0:
        _attn_fwd_kernel[(m_blocks * B * H,)](
            q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], H, H // HKV, SQ, SK, m_blocks,
            scale * _LOG2E, CAUSAL=causal, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return out, lse


def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of fused attention, recomputing P from lse."""
    q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    lse = lse.contiguous()
    B, H, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # [B, H, SQ]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    block_m, block_n, warps = _bwd_config(D)
    meta = dict(CAUSAL=causal, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    n_blocks, m_blocks = triton.cdiv(SK, block_n), triton.cdiv(SQ, block_m)
    _attn_bwd_dkdv_kernel[(n_blocks * B * HKV,)](
        q, k, v, grad_out, lse, delta, dk, dv, H, H // HKV, SQ, SK, n_blocks, scale, scale * _LOG2E, **meta)
    _attn_bwd_dq_kernel[(m_blocks * B * H,)](
        q, k, v, grad_out, lse, delta, dq, H, H // HKV, SQ, SK, m_blocks, scale, scale * _LOG2E, **meta)
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse = attention_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """Differentiable fused attention on the Triton kernels."""
    return _Attention.apply(q, k, v, causal, scale)


def _specs():
    """(kernel, signature, constexprs) lowered ahead of time for sm_80/sm_90 by CI."""
    specs = []
    ints = {"H": "i32", "GROUP": "i32", "SQ": "i32", "SK": "i32"}
    m_blocks, n_blocks = {"M_BLOCKS": "i32"}, {"N_BLOCKS": "i32"}
    for dtype in ("fp16", "bf16"):
        for head_dim, (bm, bn) in ((64, (128, 64)), (128, (128, 64))):
            fwd = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                   "lse_ptr": "*fp32", **{f"stride_{t}{d}": "i32" for t in "qkv" for d in "bhs"}, **ints, **m_blocks,
                   "scale_log2": "fp32"}
            bwd_in = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "do_ptr": f"*{dtype}",
                      "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
            for causal in (False, True):
                const = {"CAUSAL": causal, "HEAD_DIM": head_dim, "BLOCK_M": bm, "BLOCK_N": bn}
                specs.append((_attn_fwd_kernel, fwd, const))
                bconst = {"CAUSAL": causal, "HEAD_DIM": head_dim, "BLOCK_M": 64, "BLOCK_N": 64}
                specs.append((_attn_bwd_dkdv_kernel, {**bwd_in, "dk_ptr": f"*{dtype}", "dv_ptr": f"*{dtype}", **ints,
                                                      **n_blocks, "scale": "fp32", "scale_log2": "fp32"}, bconst))
                specs.append((_attn_bwd_dq_kernel, {**bwd_in, "dq_ptr": f"*{dtype}", **ints,
                                                    **m_blocks, "scale": "fp32", "scale_log2": "fp32"}, bconst))
    return specs


AOT_SPECS = _specs()
