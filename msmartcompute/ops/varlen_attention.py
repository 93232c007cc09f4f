"""Variable-length attention over packed sequences: the Python face of
msmartcompute::varlen_attention_fwd / varlen_attention_bwd."""
from __future__ import annotations

import torch

from . import reference
from ._backend import dispatch, extension_loaded, pow2
from .attention import attention_impls


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k) -> None:
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention: expected q [total_q, H, D], k and v [total_k, Hkv, D], got {shapes}")
    if k.shape != v.shape:
        raise ValueError(f"varlen_attention: k and v must have one shape, got {shapes}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"varlen_attention: q and k must agree on head dim, got {shapes}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"varlen_attention: q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"varlen_attention: {name} must be int32 [B + 1] with B >= 1, "
                             f"got {cu.dtype} {tuple(cu.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"varlen_attention: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
                         f"{tuple(cu_seqlens_k.shape)} must describe the same number of sequences")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"varlen_attention: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not all(t.device == q.device for t in (k, v, cu_seqlens_q, cu_seqlens_k)):
        raise ValueError(f"varlen_attention: every tensor must be on {q.device}")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention of B packed sequences, each on its own keys, with no padding.

    Args:
        q: [total_q, H, D]; k, v: [total_k, Hkv, D] with H % Hkv == 0 (grouped-query). Any
            strides on the token and head dims.
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1], the sequences' start offsets (0 first, the
            packed length last): sequence b is rows cu[b]:cu[b + 1].
        max_seqlen_q, max_seqlen_k: the longest sequence of each (bounds the kernels' grids).
        causal: mask aligned to the end of each sequence: query i sees keys
            j <= i + len_k - len_q; a query that sees no key gets zeros.
        scale: score scale, default 1 / sqrt(D).
        backend: auto | cuda | triton | cpu | torch (default: $MSC_KERNEL_BACKEND or auto).
    Returns:
        out [total_q, H, D] in q's dtype; differentiable with respect to q, k and v.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    key = (str(q.dtype), causal, k.shape[1] != q.shape[1], pow2(cu_seqlens_q.shape[0] - 1), pow2(q.shape[0]),
           pow2(k.shape[0]), pow2(max_seqlen_q), pow2(max_seqlen_k), q.shape[-1])
    return dispatch("varlen_attention", backend, q.device, key, attention_impls(
        q, "varlen_attention_fwd",
        lambda: torch.ops.msmartcompute.varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                             max_seqlen_k, causal, scale)[0],
        lambda: _triton().varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           causal, scale),
        lambda: reference.varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)))


def _triton():
    from .triton import varlen_attention

    return varlen_attention

if extension_loaded():
    # Fake (meta) implementations: shapes and dtypes only, for torch.compile and FakeTensor tracing.
    @torch.library.register_fake("msmartcompute::varlen_attention_fwd")
    def _varlen_attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))

    @torch.library.register_fake("msmartcompute::varlen_attention_bwd")
    def _varlen_attention_bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, causal, scale):
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                torch.empty_like(k, memory_format=torch.contiguous_format),
                torch.empty_like(v, memory_format=torch.contiguous_format))

    # Autograd as for fused attention: out and the log-sum-exp are saved and the backward op
    # recomputes the probabilities; the offsets and sizes have no gradient.
    def _setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.causal, ctx.scale = max_seqlen_q, max_seqlen_k, causal, scale

    def _backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        args = (grad_out.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q,
                ctx.max_seqlen_k, ctx.causal, ctx.scale)
        dq, dk, dv = torch.ops.msmartcompute.varlen_attention_bwd(*args)
        return dq, dk, dv, None, None, None, None, None, None

    torch.library.register_autograd("msmartcompute::varlen_attention_fwd", _backward, setup_context=_setup_context)
