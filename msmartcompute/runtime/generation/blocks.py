"""The block manager: which KV-cache blocks each sequence owns.

The pool is `num_blocks` fixed-size blocks of `block_size` token slots (the tensors live in
the model, models/paged.py; this file only hands out their indices). A sequence's block table
lists its blocks in order: token t of the sequence is slot `table[t // block_size] *
block_size + t % block_size`. Blocks are freed when a sequence ends or is preempted.
"""
from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs blocks: num_blocks={num_blocks}, block_size={block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low indices first
        self.tables: dict[object, list[int]] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def missing(self, seq_id, tokens: int) -> int:
        """Blocks `seq_id` still needs to hold `tokens` tokens."""
        return max(0, self.blocks_for(tokens) - len(self.tables.get(seq_id, ())))

    def grow(self, seq_id, tokens: int) -> bool:
        """Extend seq_id's table to hold `tokens` tokens; False (and nothing taken) when the
        free blocks do not suffice."""
        need = self.missing(seq_id, tokens)
        if need > len(self._free):
            return False
        table = self.tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._free.pop())
        return True

    def free(self, seq_id) -> int:
        """Give seq_id's blocks back; returns how many."""
        table = self.tables.pop(seq_id, [])
        self._free.extend(reversed(table))
        return len(table)

    def slots(self, seq_id, start: int, end: int) -> list[int]:
        """Cache slots of the sequence's tokens [start, end)."""
        table, bs = self.tables[seq_id], self.block_size
        return [table[t // bs] * bs + t % bs for t in range(start, end)]
