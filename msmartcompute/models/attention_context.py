"""The one seam between the pretrained architectures and attention / the KV cache.

Every block of llama.py, gpt2.py and bert.py computes q, k, v for its new tokens (rotary
already applied) and calls `ctx.attend(layer, q, k, v)`; the context owns whatever cache
there is and picks the kernel. A model's `forward(input_ids, positions, ctx)` therefore
knows nothing of caches or sampling, and a scheduler can drive it with its own context
(a paged cache on `ops.paged_attention` / `ops.varlen_attention`) by implementing `attend`.

Shapes: q [B, H, S, D]; k, v [B, H_kv, S, D] with H % H_kv == 0. Grouped-query heads are
passed UNEXPANDED to `ops.fused_attention`, which reads kv head h // (H / H_kv).

- `NoCache`: the whole sequence in one forward (logits for scoring and training, encoders).
- `DenseKVCache`: one dense [B, H_kv, capacity, D] cache per layer for one batch of
  left-padded rows; `advance(n)` after each forward moves the write position."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from msmartcompute import ops
from msmartcompute.ops.attention import GPU_HEAD_DIMS


class AttentionContext:
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, H, S, D], k/v [B, H_kv, S, D] of the tokens in this forward -> [B, H, S, D]."""
        raise NotImplementedError


def _fused_takes(q: torch.Tensor) -> bool:
    """The GPU kernels take fp16/bf16 and head dims GPU_HEAD_DIMS; the CPU kernel takes any."""
    return q.device.type != "cuda" or (q.dtype in (torch.float16, torch.bfloat16)
                                       and q.shape[-1] in GPU_HEAD_DIMS)


def _attention(q, k, v, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """The kernel choice: ops.fused_attention (GQA unexpanded, causal aligned to the last key)
    when no padding mask is needed and the kernels take the dtype and head dim; torch's SDPA
    otherwise (the fused op takes no mask)."""
    if mask is None and _fused_takes(q):
        return ops.fused_attention(q, k, v, causal=causal and q.shape[2] > 1)
    if mask is None and causal and q.shape[2] > 1:  # SDPA's is_causal aligns to the first key
        t = k.shape[2]
        mask = torch.ones(q.shape[2], t, dtype=torch.bool, device=q.device).tril(t - q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


class NoCache(AttentionContext):
    """Attention over the tokens of this forward only. valid [B, S] (True = a real token)
    masks padding out as keys; a padding query still sees itself so its softmax is defined."""

    def __init__(self, causal: bool, valid: torch.Tensor | None = None):
        self.causal = causal
        self.mask = None
        if valid is not None and not bool(valid.all()):
            s = valid.shape[1]
            eye = torch.eye(s, dtype=torch.bool, device=valid.device)
            allowed = valid[:, None, None, :]                                    # [B, 1, 1, S]
            if causal:
                allowed = allowed & torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
            self.mask = allowed | eye                                            # [B, 1, S, S]

    def attend(self, layer, q, k, v):
        return _attention(q, k, v, self.causal, self.mask)


class DenseKVCache(AttentionContext):
    """Keys and values of one batch for every layer. Rows are left-padded: pad[b] leading
    slots of row b are padding and never attended to."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 device, dtype, pad: torch.Tensor | None = None):
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0                                                          # slots written
        self.valid = None                                                        # [B, capacity]
        if pad is not None and bool(pad.any()):
            self.valid = torch.arange(capacity, device=device)[None, :] >= pad[:, None]

    def advance(self, n: int) -> None:
        self.length += n

    def attend(self, layer, q, k, v):
        start, s = self.length, q.shape[2]
        end = start + s
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]     # [B, H_kv, T, D]
        mask = None
        if self.valid is not None:
            allowed = self.valid[:, None, None, :end]                            # [B, 1, 1, T]
            if s > 1:  # causal within this chunk, aligned to the end
                allowed = allowed & torch.ones(s, end, dtype=torch.bool, device=q.device).tril(start)
                allowed = allowed | _diagonal(s, end, start, q.device)
            mask = allowed
        return _attention(q, keys, values, True, mask)


def _diagonal(s: int, t: int, start: int, device) -> torch.Tensor:
    """[S, T] True at (i, start + i): a padding query always sees its own slot."""
    d = torch.zeros(s, t, dtype=torch.bool, device=device)
    d[torch.arange(s, device=device), start + torch.arange(s, device=device)] = True
    return d
