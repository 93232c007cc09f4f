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


def int8_matmul(a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a_q[M,K] @ b_q[N,K]^T accumulated exactly (float64 holds any int8 dot product of
    K < 2**38 exactly), then acc * a_scale[m] * b_scale[n] + bias[n] in float32."""
    acc = (a_q.double() @ b_q.double().t()).to(torch.int32)
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

    q [..., H, Sq, D], k and v [..., Hkv, Sk, D] with H % Hkv == 0 (grouped-query: query head h
    reads kv head h // (H // Hkv)). The causal mask is aligned to the end: query i sees keys
    j <= Sk - Sq + i; a query that sees no key (Sq > Sk) gets zeros. compute_dtype defaults to
    float32 (float64 inputs stay float64).
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[-3] // k.shape[-3]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc = q.to(compute_dtype)
    kc = k.to(compute_dtype).repeat_interleave(group, dim=-3)  # [..., H, Sk, D]
    vc = v.to(compute_dtype).repeat_interleave(group, dim=-3)  # [..., H, Sk, D]
    s = (qc @ kc.transpose(-2, -1)) * scale  # [..., H, Sq, Sk]
    if not causal:
        return (torch.softmax(s, dim=-1) @ vc).to(q.dtype)
    sq, sk = q.shape[-2], k.shape[-2]
    hidden = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
    blind = hidden.all(-1, keepdim=True)  # [Sq, 1]: rows that see no key
    # Fully hidden rows softmax over zeros (finite, so their gradient stays finite) and are zeroed.
    s = s.masked_fill(hidden & ~blind, float("-inf")).masked_fill(blind, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(blind, 0.0)
    return (p @ vc).to(q.dtype)


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, causal: bool = False, scale: float | None = None, *,
                               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention of each packed sequence on its own: q [total_q, H, D], k/v [total_k, Hkv, D],
    sequence b = rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q (and likewise of k, v).
    Returns [total_q, H, D] as q.dtype."""
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        heads_first = [t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1])]  # [heads, S, D]
        out[q0:q1] = attention_reference(*heads_first, causal, scale, compute_dtype=compute_dtype).transpose(0, 1)
    return out


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """Sequence b's first `length` rows of a paged cache [num_blocks, block_size, Hkv, D] -> [length, Hkv, D]."""
    block_size = cache.shape[1]
    j = torch.arange(length, device=cache.device)
    return cache[block_table[b, j // block_size].long(), j % block_size]


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None, *,
                              compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """q [B, Sq, H, D] against each sequence's seq_lens[b] keys in the paged caches, causal aligned
    to the end (query i sees keys j <= seq_lens[b] - Sq + i). Returns [B, Sq, H, D] as q.dtype."""
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    for b, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        k = gather_paged(k_cache, block_table, b, length).transpose(0, 1)  # [Hkv, len, D]
        v = gather_paged(v_cache, block_table, b, length).transpose(0, 1)
        out[b] = attention_reference(q[b].transpose(0, 1), k, v, True, scale,
                                     compute_dtype=compute_dtype).transpose(0, 1)
    return out


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Writes k/v [N, Hkv, D] into row slot % block_size of block slot // block_size of the caches,
    in place; negative slots are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = k[keep]
    v_cache[slots // block_size, slots % block_size] = v[keep]
