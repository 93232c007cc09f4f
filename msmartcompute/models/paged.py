"""One step of the generation engine as a decoder runs it: the step's chunks (decode tokens
and prefill chunks of many sequences, ChunkInput) grouped into batches of equal length
(ChunkGroup), each with the block tables, cache slots and key counts the paged attention path
takes (`Decoder.forward(..., caches=, step=CacheStep(...))`). All the decodes of a step are one
group (one forward of [B, 1]); a prefill chunk is its own group unless others have its length.
Which blocks a sequence owns is the runtime's business (runtime/generation/blocks.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkInput:
    tokens: list[int]                  # the chunk's token ids
    start: int                         # position of its first token in its sequence
    block_table: list[int]             # the sequence's blocks (covering start + len(tokens))
    samples: bool                      # its last position's logits are wanted


@dataclass
class ChunkGroup:
    tokens: torch.Tensor               # [B, n] long
    positions: torch.Tensor            # [B, n] long, each row's token indices
    block_table: torch.Tensor          # [B, max_blocks] int32
    slot_mapping: torch.Tensor         # [B * n] int64, cache slot of every new token
    seq_lens: torch.Tensor             # [B] int32, keys per row including the new tokens
    sampled_rows: list[int]            # rows whose last-position logits are wanted


def group_chunks(chunks: list[ChunkInput], block_size: int, device: torch.device) -> list[ChunkGroup]:
    """Consecutive chunks of equal length share a group; the groups keep the chunks' order."""
    groups, i = [], 0
    while i < len(chunks):
        n, j = len(chunks[i].tokens), i
        while j < len(chunks) and len(chunks[j].tokens) == n:
            j += 1
        run = chunks[i:j]
        width = max(len(c.block_table) for c in run)
        table = torch.tensor([c.block_table + [0] * (width - len(c.block_table)) for c in run],
                             dtype=torch.int32, device=device)
        starts = torch.tensor([c.start for c in run], dtype=torch.long, device=device)
        positions = starts[:, None] + torch.arange(n, device=device)                  # [B, n]
        block = table.long().gather(1, positions // block_size)
        groups.append(ChunkGroup(torch.tensor([c.tokens for c in run], dtype=torch.long, device=device),
                                 positions, table, (block * block_size + positions % block_size).flatten(),
                                 (starts + n).to(torch.int32), [r for r, c in enumerate(run) if c.samples]))
        i = j
    return groups


def kv_bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def cache_bytes(caches: list) -> int:
    """Measured bytes of a decoder's paged caches (one k/v pair per layer)."""
    return sum(c.k.nbytes + c.v.nbytes for c in caches)
