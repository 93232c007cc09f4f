"""Fused attention: the Python face of msmartcompute::fused_attention_fwd / fused_attention_bwd."""
from __future__ import annotations

import torch

from ._backend import dispatch, extension_loaded, pow2

# Head dims the tiled GPU kernels are built for; the CPU kernel and the reference take any.
GPU_HEAD_DIMS = (32, 64, 128, 256)
_DTYPES = {"cuda": (torch.float16, torch.bfloat16), "cpu": (torch.float32, torch.bfloat16, torch.float16)}
# The attention schemas the built extension has CUDA kernels for, read once (torch.compile cannot
# trace the dispatcher query).
CUDA_SCHEMAS = frozenset(
    schema for schema in ("fused_attention_fwd", "varlen_attention_fwd", "paged_attention", "reshape_and_cache")
    if extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"msmartcompute::{schema}", "CUDA"))


def attention_impls(q: torch.Tensor, schema: str, ours, triton, torch_impl) -> dict:
    """The `impls` of `_backend.dispatch` for an attention op on q: `ours` (the extension's
    kernel, C++ schema `schema`) as cuda and cpu, `triton`, and `torch_impl`, each replaced by the
    reason it cannot take q where our kernels' limits (dtype, head dim, a kernel not registered
    for the device) rule it out. torch takes anything."""
    device_kind = "cuda" if q.device.type == "cuda" else "cpu"

    def limits(name, run):
        if name == "cuda" and schema not in CUDA_SCHEMAS:
            return f"the extension has no CUDA kernel for {schema}"
        if q.dtype not in _DTYPES[device_kind]:
            names = ", ".join(str(t).removeprefix("torch.") for t in _DTYPES[device_kind])
            return f"{name} backend on {device_kind} takes {names}, got {q.dtype}"
        if name in ("cuda", "triton") and q.shape[-1] not in GPU_HEAD_DIMS:
            return (f"head dim {q.shape[-1]} is not supported by the {name} kernels (q {tuple(q.shape)}); "
                    f"supported: {GPU_HEAD_DIMS}")
        return run

    return {"cuda": limits("cuda", ours), "cpu": limits("cpu", ours), "triton": limits("triton", triton),
            "torch": torch_impl}


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"fused_attention: expected q [B, H, Sq, D], k and v [B, Hkv, Sk, D], got {shapes}")
    if k.shape != v.shape:
        raise ValueError(f"fused_attention: k and v must have one shape, got {shapes}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"fused_attention: q and k must agree on batch (dim 0) and head dim (dim 3), got {shapes}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"fused_attention: q heads ({q.shape[1]}) must be a multiple of kv heads "
                         f"({k.shape[1]}), got {shapes}")
    if k.shape[2] == 0:
        raise ValueError(f"fused_attention: k and v need at least one key, got {shapes}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"fused_attention: causal needs Sq <= Sk (queries align to the last keys), got {shapes}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"fused_attention: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"fused_attention: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v, without materializing the score matrix.

    Args:
        q: [B, H, Sq, D]; k, v: [B, Hkv, Sk, D] with H % Hkv == 0 (grouped-query attention:
            query head h reads kv head h // (H // Hkv)). float16/bfloat16 on CUDA,
            float32/bfloat16 (and float16) on CPU. Head dim 32, 64, 128 or 256 on CUDA.
        causal: mask aligned to the end: query i sees keys j <= Sk - Sq + i, so one decode
            step (Sq = 1) against a KV cache is the same call. Needs Sq <= Sk.
        scale: score scale, default 1 / sqrt(D).
        backend: auto | cuda | triton | cpu | torch (default: $MSC_KERNEL_BACKEND or auto);
            torch is F.scaled_dot_product_attention.
    Returns:
        out [B, H, Sq, D] in q's dtype; differentiable with respect to q, k and v.
    """
    _check_inputs(q, k, v, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    B, H, Sq, D = q.shape
    key = (str(q.dtype), causal, k.shape[1] != H, pow2(B * H), pow2(Sq), pow2(k.shape[2]), D)
    return dispatch("fused_attention", backend, q.device, key, attention_impls(
        q, "fused_attention_fwd",
        lambda: torch.ops.msmartcompute.fused_attention_fwd(q, k, v, causal, scale)[0],
        lambda: _triton().attention(q, k, v, causal, scale),
        lambda: _sdpa(q, k, v, causal, scale)))


def _sdpa(q, k, v, causal, scale):
    """torch's own attention (F.scaled_dot_product_attention) with our causal alignment: query
    i sees keys j <= Sk - Sq + i (SDPA's is_causal aligns to the start when Sq != Sk)."""
    sq, sk = q.shape[-2], k.shape[-2]
    mask = None
    if causal and sq != sk:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)  # True: attend
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and sq == sk, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _triton():
    from .triton import attention

    return attention


if extension_loaded():
    # Fake (meta) implementations: shapes and dtypes only, for torch.compile and FakeTensor tracing.
    @torch.library.register_fake("msmartcompute::fused_attention_fwd")
    def _fused_attention_fwd_fake(q, k, v, causal, scale):
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                q.new_empty(q.shape[:-1], dtype=torch.float32))

    @torch.library.register_fake("msmartcompute::fused_attention_bwd")
    def _fused_attention_bwd_fake(grad_out, q, k, v, out, lse, causal, scale):
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                torch.empty_like(k, memory_format=torch.contiguous_format),
                torch.empty_like(v, memory_format=torch.contiguous_format))

    # Autograd: the forward saves out and the log-sum-exp; the backward op recomputes the
    # probabilities from them instead of keeping the [Sq, Sk] matrix. lse is a by-product for
    # the backward, not a differentiable output (its incoming gradient is ignored).
    def _setup_context(ctx, inputs, output):
        q, k, v, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale

    def _backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.msmartcompute.fused_attention_bwd(grad_out.contiguous(), q, k, v, out, lse,
                                                                 ctx.causal, ctx.scale)
        return dq, dk, dv, None, None

    torch.library.register_autograd("msmartcompute::fused_attention_fwd", _backward, setup_context=_setup_context)
