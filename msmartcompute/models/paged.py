"""Every served decoder on the paged KV cache: the one face the generation engine drives
(`PagedDecoder`: the home transformer.py and the pretrained GPT-2 / Llama family alike), the
step's chunks packed for it, and the dense reference it is tested against.

A decoder's module offers `hidden(tokens [B, S], positions [B, S], ctx) -> [B, S, C]` and
`logits(h) -> float32 [.., V]`, with `cfg` giving num_layers, num_kv_heads, head_dim; attention
goes through the context (attention_context.py), so a paged step is `hidden(...,
PagedCache(caches, CacheStep(...)))` for every family.

One engine step holds decode tokens and prefill chunks of many sequences (ChunkInput); they run
as at most two batches (ChunkGroup: the decodes as [B, 1], the prefill chunks left-padded), each
with its block tables, cache slots and key counts. Which blocks a sequence owns is the
runtime's business (runtime/generation/blocks.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .attention_context import CacheStep, PagedCache, PagedKVCache
from .base import Output, Prepared, ServedModel
from .sampling import SamplingParams, StopChecker, sample_rows
from .spec import tensor_cores

KV_BLOCK_SIZE = 16  # tokens per cache block of the dense reference


@dataclass
class ChunkInput:
    tokens: list[int]                  # the chunk's token ids
    start: int                         # position of its first token in its sequence
    block_table: list[int]             # the sequence's blocks (covering start + len(tokens))
    samples: bool                      # its last position's logits are wanted


@dataclass
class ChunkGroup:
    tokens: torch.Tensor               # [B, n] long, each chunk left-padded to the longest
    positions: torch.Tensor            # [B, n] long, each row's token indices (padding: any valid one)
    block_table: torch.Tensor          # [B, max_blocks] int32
    slot_mapping: torch.Tensor         # [B * n] int64, cache slot of every new token (-1: padding)
    seq_lens: torch.Tensor             # [B] int32, keys per row including the new tokens
    sampled_rows: list[int]            # rows whose last-position logits are wanted
    sampled_chunks: list[int]          # their indices in the step's chunks


def group_chunks(chunks: list[ChunkInput], block_size: int, device: torch.device) -> list[ChunkGroup]:
    """At most two forwards per step: the single-token chunks (decodes) as one [B, 1] batch and the
    longer ones (prefill chunks) left-padded into one [B, n] batch. Padding is token 0 at slot -1:
    never stored, and the paged kernel's end-aligned causal mask keeps the real tokens exact (a
    padding query's output is not used)."""
    groups = []
    for rows in ([i for i, c in enumerate(chunks) if len(c.tokens) == 1],
                 [i for i, c in enumerate(chunks) if len(c.tokens) > 1]):
        if not rows:
            continue
        run = [chunks[i] for i in rows]
        n = max(len(c.tokens) for c in run)
        width = max(len(c.block_table) for c in run)
        table = torch.tensor([c.block_table + [0] * (width - len(c.block_table)) for c in run],
                             dtype=torch.int32, device=device)
        starts = torch.tensor([c.start for c in run], dtype=torch.long, device=device)
        lengths = torch.tensor([len(c.tokens) for c in run], dtype=torch.long, device=device)
        index = starts[:, None] + torch.arange(n, device=device) - (n - lengths)[:, None]  # [B, n] token index
        positions = index.clamp(min=0)
        block = table.long().gather(1, positions // block_size)
        slots = torch.where(index >= starts[:, None], block * block_size + positions % block_size, -1)
        sampled = [r for r, c in enumerate(run) if c.samples]
        groups.append(ChunkGroup(torch.tensor([[0] * (n - len(c.tokens)) + c.tokens for c in run], dtype=torch.long,
                                              device=device),
                                 positions, table, slots.flatten(), (starts + lengths).to(torch.int32), sampled,
                                 [rows[r] for r in sampled]))
    return groups


def kv_bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def cache_bytes(caches: list) -> int:
    """Measured bytes of a decoder's paged caches (one k/v pair per layer)."""
    return sum(c.k.nbytes + c.v.nbytes for c in caches)


def new_caches(cfg, num_blocks: int, block_size: int, device, dtype) -> list[PagedKVCache]:
    return [PagedKVCache(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, device, dtype)
            for _ in range(cfg.num_layers)]


@torch.inference_mode()
def generate(module, prompts: list[list[int]], stops: list[StopChecker],
             generators: list[torch.Generator | None]) -> None:
    """The dense reference of the engine: the prompts (any lengths) as one left-padded batch in
    a paged cache of their own (row b owns its blocks; padding is never stored), prefilled in one
    forward, then one token per step for the rows still running. stops[b] takes row b's tokens
    (its params say how to sample, when to stop) and keeps its output; generators[b] draws its
    samples (None when greedy)."""
    device = module.embed.weight.device
    b, s = len(prompts), max(map(len, prompts))
    lengths = torch.tensor([len(p) for p in prompts], device=device)                            # [B]
    tokens = torch.tensor([[0] * (s - len(p)) + p for p in prompts], device=device)              # [B, S]
    blocks_per_row = -(-(s + max(st.params.max_tokens for st in stops)) // KV_BLOCK_SIZE)
    table = torch.arange(b * blocks_per_row, device=device, dtype=torch.int32).view(b, blocks_per_row)
    caches = new_caches(module.cfg, b * blocks_per_row, KV_BLOCK_SIZE, device, module.embed.weight.dtype)

    def slots(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # token indices [R, n] -> slots
        block = table[rows].gather(1, index.clamp(min=0) // KV_BLOCK_SIZE).long()
        return torch.where(index >= 0, block * KV_BLOCK_SIZE + index % KV_BLOCK_SIZE, -1)

    rows = torch.arange(b, device=device)
    index = torch.arange(s, device=device)[None, :] - (s - lengths)[:, None]                    # [B, S], < 0: padding
    step = CacheStep(table, slots(rows, index).flatten(), lengths.to(torch.int32))
    logits = module.logits(module.hidden(tokens, index.clamp(min=0), PagedCache(caches, step))[:, -1])
    active, fed = list(range(b)), lengths.clone()                                               # fed: tokens cached
    while True:
        picked = sample_rows(logits, [stops[i].params for i in active], [generators[i] for i in active])
        running = [(i, t) for i, t in zip(active, picked) if not stops[i].add(t)]
        if not running:
            return
        active = [i for i, _ in running]
        rows = torch.tensor(active, device=device)
        index = fed[rows][:, None]                                                               # [R, 1]
        step = CacheStep(table[rows], slots(rows, index).flatten(), (fed[rows] + 1).to(torch.int32))
        new = torch.tensor([[t] for _, t in running], device=device)
        logits = module.logits(module.hidden(new, index, PagedCache(caches, step))[:, -1])
        fed[rows] += 1


def output_rows(rows: list[list[int]]):
    """Generated id rows as output_data: an int64 matrix when they have one length, else lists."""
    return np.array(rows, dtype=np.int64) if len({len(r) for r in rows}) == 1 else rows


class PagedDecoder(ServedModel):
    """A served decoder LM. Subclasses set module, config (vocab_size, max_sequence_length and the
    cache shape), device, dtype, tensor_cores, eos_ids, tokenizer (or None) and `prompt_rows`.

    Options (models/sampling.py): temperature, top_p, top_k, max_tokens, seed, stop_token_ids,
    stop (strings; needs a tokenizer), ignore_eos. Served by the generation engine
    (runtime/generation/) through `new_kv_cache` / `step`; `run` is the dense reference (any
    requests in one left-padded batch) the engine is tested against."""

    model_type = "transformer"
    generative = True
    trainable = optimizable = language_model = True
    eos_ids: frozenset = frozenset()

    def prompt_rows(self, input_data) -> list[torch.Tensor]:
        """One request's prompts: 1-D id tensors (ValueError on bad input)."""
        raise NotImplementedError

    @property
    def decode(self):
        """token ids -> text (stop strings, output_text), or None without a tokenizer."""
        return None if self.tokenizer is None else self.tokenizer.decode

    @property
    def output_width(self) -> int:
        return self.config.vocab_size

    def decode_text(self, output_data) -> list[str] | None:
        return None if self.tokenizer is None else [self.tokenizer.decode(row) for row in output_data]

    def prepare(self, input_data, options: dict) -> Prepared:
        rows = self.prompt_rows(input_data)
        lengths = [r.numel() for r in rows]
        longest = max(lengths)
        options = dict(options or {})
        params = SamplingParams.from_options(options, prompt_len=longest, limit=self.config.max_sequence_length,
                                             vocab_size=self.config.vocab_size, has_tokenizer=self.decode is not None)
        options.update(params.normalised())
        padded = torch.stack([F.pad(r, (longest - r.numel(), 0)) for r in rows])  # [rows, S] left-padded
        return Prepared(tensor=padded, options=options, batch_key=("generate",), rows=len(rows), sampling=params,
                        lengths=None if len(set(lengths)) == 1 else lengths)

    def run(self, batch: list[Prepared]) -> list[Output]:
        """The dense reference: every request of the batch in one left-padded generation."""
        stops = [StopChecker(p.sampling, self.eos_ids, self.decode) for p in batch for _ in range(p.rows)]
        generators = [p.sampling.generator(r, self.device) for p in batch for r in range(p.rows)]
        with tensor_cores(self.tensor_cores, self.device):
            generate(self.module, [row for p in batch for row in p.prompts()], stops, generators)
        outputs, start = [], 0
        for p in batch:
            mine = stops[start:start + p.rows]
            start += p.rows
            outputs.append(Output(output_data=output_rows([s.tokens for s in mine]),
                                  tokens_generated=sum(len(s.tokens) for s in mine),
                                  finish_reasons=[s.finish_reason for s in mine],
                                  texts=[s.output_text() for s in mine] if self.decode else None))
        return outputs

    def generate(self, token_ids, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> torch.Tensor:
        """One request's generated ids [rows, n] through the dense reference (rows of one length)."""
        p = self.prepare(token_ids, {"max_tokens": max_tokens, "temperature": temperature,
                                     "top_p": top_p, "seed": seed})
        return torch.as_tensor(np.asarray(self.run([p])[0].output_data))

    # ---- the generation engine's face ------------------------------------------------------
    def kv_bytes_per_block(self, block_size: int) -> int:
        cfg = self.module.cfg
        return kv_bytes_per_block(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype)

    def new_kv_cache(self, num_blocks: int, block_size: int) -> list[PagedKVCache]:
        """The decoder's paged KV cache: one PagedKVCache per layer."""
        return new_caches(self.module.cfg, num_blocks, block_size, self.device, self.dtype)

    def step(self, caches: list[PagedKVCache], chunks: list[ChunkInput]) -> torch.Tensor:
        """One generation step over many sequences -> logits [N, V] of the sampling chunks, in
        their order: one paged forward for the decodes and one for the prefill chunks
        (group_chunks), lm_head on the sampled rows only."""
        logits, order = [], []
        with tensor_cores(self.tensor_cores, self.device):
            for g in group_chunks(chunks, caches[0].k.shape[1], self.device):
                ctx = PagedCache(caches, CacheStep(g.block_table, g.slot_mapping, g.seq_lens))
                h = self.module.hidden(g.tokens, g.positions, ctx)                         # [B, n, C]
                logits.append(self.module.logits(h[g.sampled_rows, -1]))
                order += g.sampled_chunks
        out = torch.cat(logits)
        return out if order == sorted(order) else out[torch.tensor(order).argsort()]
