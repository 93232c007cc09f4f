"""Generation for the pretrained decoders (llama.py, gpt2.py) over one dense KV cache.

One batch of prompts (any lengths, left-padded) is prefilled in one forward, then decoded
one token per step. Each row stops at its first end-of-sequence id (not returned) or after
max_tokens; the batch stops when every row has. Sampling is transformer.sample: greedy at
temperature 0, else nucleus sampling from each request's own generator. A caller's
should_stop() ends it between steps (the runtime: every request's deadline has passed)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .attention_context import DenseKVCache
from .base import Stopped
from .sampling import sample


def new_cache(model, batch: int, capacity: int, pad: torch.Tensor) -> DenseKVCache:
    cfg, weight = model.cfg, model.embed.weight
    return DenseKVCache(cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim, capacity,
                        weight.device, weight.dtype, pad)


@torch.inference_mode()
def generate(model, prompts: list[torch.Tensor], max_tokens: int, temperature: float, top_p: float,
             generators: list[torch.Generator | None], rows_per_generator: list[int],
             eos_ids: frozenset[int] = frozenset(),
             should_stop: Callable[[], bool] | None = None) -> tuple[list[list[int]], list[str]]:
    """prompts: 1-D id tensors, one per row. generators[i] draws for the next
    rows_per_generator[i] rows. Returns each row's generated ids and its finish reason
    ("stop" at an end-of-sequence id, else "length"). should_stop() is polled before every
    decode step; True raises base.Stopped (nobody waits for the rows any more)."""
    device = model.embed.weight.device
    b, s = len(prompts), max(p.numel() for p in prompts)
    pad = torch.tensor([s - p.numel() for p in prompts], device=device)                 # [B]
    tokens = torch.stack([F.pad(p.to(device), (s - p.numel(), 0)) for p in prompts])     # [B, S]
    positions = (torch.arange(s, device=device)[None, :] - pad[:, None]).clamp(min=0)    # [B, S]
    cache = new_cache(model, b, s + max_tokens, pad)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B]
        if temperature == 0:
            return logits.argmax(dim=-1)
        return torch.cat([sample(part, temperature, top_p, g)
                          for part, g in zip(logits.split(rows_per_generator), generators)])

    out = torch.empty(b, max_tokens, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.full((b,), max_tokens, dtype=torch.long, device=device)
    h = model.hidden(tokens, positions, cache)
    cache.advance(s)
    next_ids = pick(model.logits(h[:, -1]))
    for i in range(max_tokens):
        out[:, i] = next_ids
        stopped = ~done & torch.isin(next_ids, eos)
        lengths = torch.where(stopped, i, lengths)
        done |= stopped
        if i == max_tokens - 1 or bool(done.all()):
            break
        if should_stop is not None and should_stop():
            raise Stopped(f"after {i + 1} of {max_tokens} tokens")
        position = positions[:, -1:] + i + 1                                              # [B, 1]
        h = model.hidden(next_ids[:, None], position, cache)
        cache.advance(1)
        next_ids = pick(model.logits(h[:, -1]))
    ids = out.tolist()
    lengths = lengths.tolist()
    reasons = ["stop" if d else "length" for d in done.tolist()]
    return [row[:n] for row, n in zip(ids, lengths)], reasons
