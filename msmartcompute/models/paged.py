"""A decoder's paged KV cache and the attention context of one generation step.

PagedKVCache holds every layer's blocks, k/v [num_blocks, block_size, H_kv, D]; which blocks a
sequence owns is the runtime's business (runtime/generation/blocks.py), passed in here as block
tables. PagedStep packs one step's chunks (decode tokens and prefill chunks of many sequences)
into flat tensors and is the attention seam of the decoders: `attend(layer, q, k, v)` writes
the new k/v into the cache (ops.reshape_and_cache) and attends over each sequence's blocks
(ops.paged_attention, causal bottom-right). Chunks of equal length go through one
paged_attention call (all the decodes of a step are one call); the rest one call each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from msmartcompute import ops


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, device: torch.device, dtype: torch.dtype):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)


def kv_bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class ChunkInput:
    tokens: list[int]                  # the chunk's token ids
    start: int                         # position of its first token in its sequence
    block_table: list[int]             # the sequence's blocks (covering start + len(tokens))
    samples: bool                      # its last position's logits are wanted


@dataclass
class _Group:
    lo: int                            # rows [lo, hi) of the flat tokens
    hi: int
    q_len: int
    block_table: torch.Tensor          # [B, max_blocks] int32
    seq_lens: torch.Tensor             # [B] int32, keys per sequence including the new tokens


class PagedStep:
    def __init__(self, cache: PagedKVCache, chunks: list[ChunkInput], device: torch.device):
        self.cache = cache
        bs = cache.block_size
        tokens, positions, slots, sample_at = [], [], [], []
        for c in chunks:
            n = len(c.tokens)
            tokens += c.tokens
            for p in range(c.start, c.start + n):
                positions.append(p)
                slots.append(c.block_table[p // bs] * bs + p % bs)
            if c.samples:
                sample_at.append(len(tokens) - 1)
        self.tokens = torch.tensor(tokens, dtype=torch.long, device=device)          # [T]
        self.positions = torch.tensor(positions, dtype=torch.long, device=device)    # [T]
        self.slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)     # [T]
        self.sample_index = torch.tensor(sample_at, dtype=torch.long, device=device)  # [N]
        self.groups: list[_Group] = []
        lo, i = 0, 0
        while i < len(chunks):
            j, n = i, len(chunks[i].tokens)
            while j < len(chunks) and len(chunks[j].tokens) == n:
                j += 1
            run = chunks[i:j]
            width = max(len(c.block_table) for c in run)
            table = torch.tensor([c.block_table + [0] * (width - len(c.block_table)) for c in run],
                                 dtype=torch.int32, device=device)
            lens = torch.tensor([c.start + n for c in run], dtype=torch.int32, device=device)
            self.groups.append(_Group(lo, lo + n * len(run), n, table, lens))
            lo += n * len(run)
            i = j

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None = None) -> torch.Tensor:
        """q [T, H, D], k/v [T, H_kv, D] of the step's tokens -> [T, H, D]."""
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        ops.reshape_and_cache(k, v, k_cache, v_cache, self.slot_mapping)
        heads, dim = q.shape[1], q.shape[2]
        parts = []
        for g in self.groups:
            qg = q[g.lo:g.hi].reshape(-1, g.q_len, heads, dim)                         # [B, S_q, H, D]
            out = ops.paged_attention(qg, k_cache, v_cache, g.block_table, g.seq_lens, scale=scale)
            parts.append(out.reshape(-1, heads, dim))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
