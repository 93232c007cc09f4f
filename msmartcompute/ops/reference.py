"""Plain-torch reference math. Every backend is tested against these."""
from __future__ import annotations

import torch


def quantize_int8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 along `dim`: scale = absmax/127 (1 for all-zero), round half to even."""
    xf = x.float()
    absmax = xf.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.squeeze(dim)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dim: int = -1,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(dim)).to(dtype)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        scale: float | None = None, *, compute_dtype: torch.dtype | None = None
                        ) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v, computed in `compute_dtype` and returned as q.dtype.

    q [B, H, Sq, D], k and v [B, Hkv, Sk, D] with H % Hkv == 0 (grouped-query: query head h
    reads kv head h // (H // Hkv)). The causal mask is aligned to the end: query i sees keys
    j <= Sk - Sq + i. compute_dtype defaults to float32 (float64 inputs stay float64).
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc = q.to(compute_dtype)
    kc = k.to(compute_dtype).repeat_interleave(group, dim=1)  # [B, H, Sk, D]
    vc = v.to(compute_dtype).repeat_interleave(group, dim=1)  # [B, H, Sk, D]
    s = (qc @ kc.transpose(-2, -1)) * scale  # [B, H, Sq, Sk]
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        hidden = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
        s = s.masked_fill(hidden, float("-inf"))
    return (torch.softmax(s, dim=-1) @ vc).to(q.dtype)
