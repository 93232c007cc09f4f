"""The iteration-level scheduler of one decoder: which tokens the next model step computes.

Every sequence has `tokens` (prompt + output so far) of which the first `num_computed` have
their k/v in the cache; the rest are computed in chunks. A step holds, in this order:
1. one token for every running sequence that is decoding (its last sampled token);
2. the next prompt chunk of running sequences still prefilling (chunked, so a long prompt
   never stalls the decodes: at most `max_step_tokens` tokens per step in all);
3. waiting sequences, first come first served (preempted ones first), admitted while fewer
   than `max_running` run and the free blocks hold the whole of their tokens plus one.
When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it waits at the head of the queue to be recomputed (its
prompt and output so far are prefilled again; its random stream is not rewound, so its
tokens stay those it would have drawn anyway). A chunk that reaches the end of a sequence's
tokens yields the logits its next token is sampled from.
"""
from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

from .blocks import BlockManager

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    owner: object = None               # what the runtime attaches (its request and row)
    output: list[int] = field(default_factory=list)
    num_computed: int = 0              # tokens with k/v in the cache
    preemptions: int = 0
    seq_id: int = field(default_factory=lambda: next(_ids))

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass
class Chunk:
    seq: Sequence
    start: int                         # index of its first token in seq.tokens
    count: int                         # tokens computed now
    samples: bool                      # reaches the end of seq.tokens: sample the next token


class Scheduler:
    def __init__(self, blocks: BlockManager, max_running: int, max_step_tokens: int):
        self.blocks = blocks
        self.max_running = max(1, max_running)
        self.max_step_tokens = max(1, max_step_tokens)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []   # in admission order: the last is the newest
        self.preempted_total = 0

    def add(self, seq: Sequence) -> None:
        if self.blocks.blocks_for(seq.length + 1) > self.blocks.num_blocks:
            raise ValueError(f"a sequence of {seq.length} tokens cannot fit in the KV pool "
                             f"({self.blocks.num_blocks} blocks of {self.blocks.block_size})")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence (finished, failed or cancelled) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        seq.preemptions += 1
        self.preempted_total += 1
        self.waiting.appendleft(seq)

    def _chunk(self, seq: Sequence, budget: int) -> Chunk:
        count = min(seq.length - seq.num_computed, budget)
        return Chunk(seq, seq.num_computed, count, seq.num_computed + count == seq.length)

    def schedule(self) -> list[Chunk]:
        """The chunks of the next step (empty when there is nothing to do)."""
        budget = self.max_step_tokens
        plan: list[Chunk] = []
        decoding = [s for s in self.running if s.length - s.num_computed == 1]
        prefilling = [s for s in self.running if s.length - s.num_computed > 1]
        for seq in decoding + prefilling:
            if budget <= 0:
                break
            if seq not in self.running:      # preempted below for an older sequence
                continue
            chunk = self._chunk(seq, budget)
            while not self.blocks.grow(seq.seq_id, chunk.start + chunk.count):
                victim = self.running[-1]
                self._preempt(victim)
                for planned in [c for c in plan if c.seq is victim]:  # a newer decode, planned already
                    plan.remove(planned)
                    budget += planned.count
                if victim is seq:
                    break
            else:
                plan.append(chunk)
                budget -= chunk.count
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if self.blocks.missing(seq.seq_id, seq.length + 1) > self.blocks.free_blocks:
                break
            chunk = self._chunk(seq, budget)
            self.blocks.grow(seq.seq_id, chunk.start + chunk.count)
            self.waiting.popleft()
            self.running.append(seq)
            plan.append(chunk)
            budget -= chunk.count
        return plan

    def computed(self, plan: list[Chunk]) -> None:
        """Record that the step ran: the chunks' k/v are in the cache now."""
        for chunk in plan:
            chunk.seq.num_computed = chunk.start + chunk.count
