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
