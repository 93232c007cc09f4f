"""Plain-torch reference math. Every backend is tested against these."""
from __future__ import annotations

import torch


def quantize_int8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 along `dim`: scale = absmax/127 (1 for all-zero); q = x times the
    reciprocal 127/absmax (one float32 division per slice, capped at float32's max so an
    all-zero slice gives zeros), rounded half to even, clamped to [-127, 127]."""
    xf = x.float()
    absmax = xf.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    # a tensor divided by a tensor: `127.0 / absmax` would be reciprocal(absmax) * 127, off by an ulp
    inv = (torch.full_like(absmax, 127.0) / absmax).clamp_(max=torch.finfo(torch.float32).max)
    q = torch.round(xf * inv).clamp_(-127, 127).to(torch.int8)
    return q, scale.squeeze(dim)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dim: int = -1,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(dim)).to(dtype)


def int8_matmul(a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a_q[M,K] @ b_q[N,K]^T accumulated exactly (float64 holds any int8 dot product of
    K < 2**38 exactly), then acc * a_scale[m] * b_scale[n] + bias[n] in float32."""
    return int8_epilogue((a_q.double() @ b_q.double().t()).to(torch.int32), a_scale, b_scale, bias, out_dtype)


def int8_epilogue(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """The int32 accumulator acc[M, N] as int8_matmul returns it: itself for int32, else
    acc * a_scale[m] * b_scale[n] + bias[n] in float32, as out_dtype."""
    if out_dtype == torch.int32:
        return acc
    out = acc.float() * a_scale[:, None] * b_scale[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                mode: str = "w8a8") -> torch.Tensor:
    """x[..., K] @ dequant(w_q[N,K])^T + bias as x.dtype; w8a8 quantizes x per token first."""
    x2 = x.reshape(-1, x.shape[-1])
    if mode == "w8a8":
        x_q, x_scale = quantize_int8(x2)
        out = int8_matmul(x_q, w_q, x_scale, w_scale, bias, x.dtype)
    else:
        w = dequantize_int8(w_q, w_scale)
        out = torch.nn.functional.linear(x2.float(), w, None if bias is None else bias.float()).to(x.dtype)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


ACTIVATIONS = {
    None: lambda t: t,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,  # erf form
    "silu": torch.nn.functional.silu,
}


def mixed_gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
               out_dtype: torch.dtype | None = None, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """activation(a[M,K] @ b[N,K]^T + bias) computed in compute_dtype, returned as out_dtype
    (a.dtype when None). Tests use compute_dtype=float64 for the truth and a.dtype for
    torch's own same-dtype error."""
    out = torch.nn.functional.linear(a.to(compute_dtype), b.to(compute_dtype),
                                     None if bias is None else bias.to(compute_dtype))
    return ACTIVATIONS[activation](out).to(out_dtype or a.dtype)
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
