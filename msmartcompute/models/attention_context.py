"""The one seam between every model's attention and the kernels / the KV cache.

Every attention block (transformer.py, encoder.py, llama.py, gpt2.py, bert.py) computes q, k, v
for the tokens of this forward (positions already applied) and calls `ctx.attend(layer, q, k, v)`;
the context owns whatever cache there is and picks the kernel. A model's forward therefore knows
nothing of caches, padding or sampling, and the generation engine drives every decoder the same
way (models/paged.py).

Shapes: q [B, S, H, D]; k, v [B, S, H_kv, D] with H % H_kv == 0, UNEXPANDED: every kernel maps
query head h to kv head h // (H / H_kv). Returns [B, S, H, D]. No path calls torch's SDPA.

- `NoCache(causal, valid=None)`: this forward's tokens only. Full rows run `ops.fused_attention`
  on strided views; a padded batch (valid [B, S] False at padding, left or right) runs
  `ops.varlen_attention` on its real tokens only (`Packing`): no padding is computed, padding
  positions give zeros.
- `PagedCache(caches, step)`: one `PagedKVCache` of fixed-size blocks per layer. The new k/v go
  to their slots (`ops.reshape_and_cache`, slot -1 = padding, skipped) and q attends to each
  row's cached keys through its block table (`ops.paged_attention`, causal aligned to the end:
  exactly where a left-padded row's tokens sit; a padding column sees no key and gives zeros).
  Prefill, chunked prefill and decode are the same call."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from msmartcompute import ops


@dataclass
class Packing:
    """The real tokens of a padded [B, S] batch as the varlen kernel takes them."""
    index: torch.Tensor       # [N] positions of the real tokens in the flattened [B * S]
    cu_seqlens: torch.Tensor  # int32 [B + 1]: row b's tokens are index[cu[b]:cu[b + 1]]
    max_len: int

    @classmethod
    def of(cls, valid: torch.Tensor) -> "Packing":
        """valid [B, S] bool, True at real tokens (left or right padding alike)."""
        lengths = valid.sum(dim=1)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cls(valid.flatten().nonzero().squeeze(1), cu_seqlens, int(lengths.max()))


class PagedKVCache:
    """Keys and values of one layer in fixed-size blocks: k/v [num_blocks, block_size, H_kv, D].
    Which blocks a batch row owns, and where its new tokens go, is a CacheStep."""

    def __init__(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, device, dtype):
        self.k = torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)


@dataclass
class CacheStep:
    """One forward against the paged caches: row b's keys live in blocks block_table[b] from slot 0
    on (no padding stored); the forward's [B, S] new tokens are written to slot_mapping (-1 for
    padding columns), after which row b has seq_lens[b] keys, its new tokens the last ones."""
    block_table: torch.Tensor   # int32 [B, max_blocks]
    slot_mapping: torch.Tensor  # int64 [B * S]
    seq_lens: torch.Tensor      # int32 [B]


class MultiHeadConfig:
    """For configs of architectures whose every query head has its own k/v head (GPT-2, BERT):
    the head_dim and num_kv_heads the contexts and the KV cache read."""
    hidden_size: int
    num_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads


class AttentionContext:
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, S, H, D], k/v [B, S, H_kv, D] of the tokens in this forward -> [B, S, H, D]."""
        raise NotImplementedError


class NoCache(AttentionContext):
    def __init__(self, causal: bool, valid: torch.Tensor | None = None):
        self.causal = causal
        self.packing = None if valid is None or bool(valid.all()) else Packing.of(valid)

    def attend(self, layer, q, k, v):
        b, s, h, d = q.shape
        p = self.packing
        if p is None:
            return ops.fused_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       causal=self.causal and s > 1).transpose(1, 2)

        def pack(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(0, 1)[p.index]
        out = ops.varlen_attention(pack(q), pack(k), pack(v), p.cu_seqlens, p.cu_seqlens, p.max_len, p.max_len,
                                   causal=self.causal)
        return q.new_zeros(b * s, h, d).index_copy_(0, p.index, out).view(b, s, h, d)


class PagedCache(AttentionContext):
    def __init__(self, caches: list[PagedKVCache], step: CacheStep):
        self.caches, self.step = caches, step

    def attend(self, layer, q, k, v):
        cache = self.caches[layer]
        ops.reshape_and_cache(k.flatten(0, 1), v.flatten(0, 1), cache.k, cache.v, self.step.slot_mapping)
        return ops.paged_attention(q, cache.k, cache.v, self.step.block_table, self.step.seq_lens)
