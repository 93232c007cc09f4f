"""transformer: a GPT-style decoder LM with a KV cache, and the blocks the encoder reuses.

Pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> GELU MLP -> residual),
rotary positions (no learned position table, so no length-sized parameter and per-row
position ids make left-padded batches exact), grouped-query attention when num_kv_heads
< num_heads, untied lm_head.

Served generation runs on the generation engine (runtime/generation/): `TransformerModel.step`
runs one iteration of many sequences over the paged KV cache (the same `Decoder.forward` with
`caches` and a `CacheStep`). The dense path below (`generate`: one left-padded batch, each row
keeping only its real tokens in its own blocks, rotary positions from 0 at each row's first
token) is the reference it is tested against. Sampling and its options: models/sampling.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msmartcompute import ops

from .base import Output, Prepared, ServedModel, to_numpy, token_rows
from .paged import ChunkInput, group_chunks, kv_bytes_per_block
from .sampling import SamplingParams, sample
from .spec import build_module, flag, int_param, max_sequence_length, tensor_cores


@dataclass
class TransformerConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_sequence_length: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_spec(cls, spec: dict) -> "TransformerConfig":
        p = spec.get("parameters") or {}
        hidden = int_param(p, "hidden_size")
        heads = int_param(p, "num_heads")
        kv_heads = int_param(p, "num_kv_heads", heads)
        if hidden % heads:
            raise ValueError(f"parameters.hidden_size ({hidden}) must be divisible by num_heads ({heads})")
        if (hidden // heads) % 2:
            raise ValueError(f"hidden_size / num_heads = {hidden // heads} must be even (rotary positions)")
        if heads % kv_heads:
            raise ValueError(f"parameters.num_heads ({heads}) must be divisible by num_kv_heads ({kv_heads})")
        return cls(vocab_size=int_param(p, "vocab_size"), hidden_size=hidden,
                   num_layers=int_param(p, "num_layers"), num_heads=heads, num_kv_heads=kv_heads,
                   intermediate_size=int_param(p, "intermediate_size", 4 * hidden),
                   max_sequence_length=max_sequence_length(spec))


# ---- attention: the one place the kernels are chosen --------------------------------------------

@dataclass
class Packing:
    """The real tokens of a padded [B, S] batch as the varlen kernel takes them: no padding computed."""
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, packing: Packing | None = None,
              cache: PagedKVCache | None = None, step: CacheStep | None = None) -> torch.Tensor:
    """q [B, S, H, D], k/v [B, S, H_kv, D] (grouped-query heads stay unexpanded: the kernels map
    query head h to kv head h // (H / H_kv)) -> [B, S, H, D].

    With a cache: k/v are written into it and q attends to each row's cached keys (the paged
    kernel; its causal mask is aligned to the end, which is where a left-padded row's tokens are,
    and padding columns see no key). Else a padded batch runs the varlen kernel on its real tokens
    only, and a full batch the fused kernel on strided views (no copies)."""
    b, s, h, d = q.shape
    if cache is not None:
        ops.reshape_and_cache(k.flatten(0, 1), v.flatten(0, 1), cache.k, cache.v, step.slot_mapping)
        return ops.paged_attention(q, cache.k, cache.v, step.block_table, step.seq_lens)
    if packing is not None:
        def pack(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(0, 1)[packing.index]
        out = ops.varlen_attention(pack(q), pack(k), pack(v), packing.cu_seqlens, packing.cu_seqlens,
                                   packing.max_len, packing.max_len, causal=causal)
        return q.new_zeros(b * s, h, d).index_copy_(0, packing.index, out).view(b, s, h, d)
    return ops.fused_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """x [B, S, H, D] rotated by positions [B, S] (pairs (x[2i], x[2i+1]), computed in fp32)."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # [D/2]
    angles = positions.to(torch.float32)[:, :, None, None] * inv_freq                      # [B, S, 1, D/2]
    cos, sin = angles.cos(), angles.sin()
    xf = x.float().unflatten(-1, (d // 2, 2))                                                # [B, S, H, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, bias=False)
        self.wo = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, causal: bool, packing: Packing | None,
                cache: PagedKVCache | None, step: CacheStep | None) -> torch.Tensor:
        """x [B, S, C] -> [B, S, C]."""
        cfg = self.cfg
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim], -1)
        q = apply_rope(q.view(b, s, cfg.num_heads, cfg.head_dim), positions, cfg.rope_base)     # [B, S, H, D]
        k = apply_rope(k.view(b, s, cfg.num_kv_heads, cfg.head_dim), positions, cfg.rope_base)  # [B, S, H_kv, D]
        v = v.view(b, s, cfg.num_kv_heads, cfg.head_dim)
        y = attention(q, k, v, causal, packing, cache, step)                                     # [B, S, H, D]
        return self.wo(y.reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, positions, causal, packing=None, cache=None, step=None):
        x = x + self.attn(self.attn_norm(x), positions, causal, packing, cache, step)
        return x + self.ffn(self.ffn_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, caches: list[PagedKVCache] | None = None,
                step: CacheStep | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, V] (float32), or [B, 1, V] with last_only (generation
        needs only the last position; this skips a [B, S, V] lm_head). Without caches: the full
        causal forward, over the real tokens only when valid [B, S] marks padding."""
        b, s = tokens.shape
        if positions is None:
            positions = torch.arange(s, device=tokens.device).expand(b, s)
        packing = None if valid is None or caches is not None or bool(valid.all()) else Packing.of(valid)
        x = self.embed(tokens)  # [B, S, C]
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, s > 1, packing, None if caches is None else caches[i], step)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()


# ---- generation --------------------------------------------------------------------------------

def prefill(model: Decoder, tokens: torch.Tensor, positions: torch.Tensor, caches: list[PagedKVCache],
            step: CacheStep) -> torch.Tensor:
    """tokens [B, S] (left-padded) -> logits of the last position [B, V]; writes the real tokens'
    keys and values to the caches."""
    return model(tokens, positions, caches=caches, step=step, last_only=True)[:, -1]


def decode_one_token(model: Decoder, token: torch.Tensor, position: torch.Tensor, caches: list[PagedKVCache],
                     step: CacheStep) -> torch.Tensor:
    """token [B, 1] at position [B, 1] -> logits [B, V]; its keys and values join the caches."""
    return model(token, position, caches=caches, step=step)[:, -1]


KV_BLOCK_SIZE = 16  # tokens per cache block


@torch.inference_mode()
def generate(model: Decoder, prompts: list[torch.Tensor], max_tokens: int, temperature: float,
             top_p: float, generators: list[torch.Generator | None]) -> list[torch.Tensor]:
    """prompts[i] [R_i, S_i] token ids -> generated ids [R_i, max_tokens] per request, as one
    left-padded batch. generators[r] draws the samples of row r of the batch (None when greedy)."""
    cfg = model.cfg
    device = model.embed.weight.device
    dtype = model.embed.weight.dtype
    rows = [p.shape[0] for p in prompts]
    s = max(p.shape[1] for p in prompts)
    lengths = torch.cat([torch.full((p.shape[0],), p.shape[1], device=device) for p in prompts])  # [B]
    tokens = torch.cat([F.pad(p.to(device), (s - p.shape[1], 0)) for p in prompts])              # [B, S]
    b = tokens.shape[0]
    blocks_per_row = -(-(s + max_tokens) // KV_BLOCK_SIZE)
    block_table = torch.arange(b * blocks_per_row, device=device, dtype=torch.int32).view(b, blocks_per_row)
    caches = [PagedKVCache(b * blocks_per_row, KV_BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, device, dtype)
              for _ in range(cfg.num_layers)]

    def slots(index: torch.Tensor) -> torch.Tensor:  # token indices [B, n] of each row -> cache slots
        block = block_table.gather(1, index.clamp(min=0) // KV_BLOCK_SIZE).long()
        return torch.where(index >= 0, block * KV_BLOCK_SIZE + index % KV_BLOCK_SIZE, -1)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B], each row its own draws
        if temperature == 0:
            return logits.argmax(dim=-1)
        return torch.cat([sample(logits[r:r + 1], temperature, top_p, g) for r, g in enumerate(generators)])

    index = torch.arange(s, device=device)[None, :] - (s - lengths)[:, None]  # [B, S]: token index, < 0 = padding
    step = CacheStep(block_table, slots(index).flatten(), lengths.to(torch.int32))
    out = torch.empty(b, max_tokens, dtype=torch.long, device=device)
    out[:, 0] = pick(prefill(model, tokens, index.clamp(min=0), caches, step))
    for i in range(1, max_tokens):
        fed = lengths + i - 1                                    # [B]: token index of the fed token
        step = CacheStep(block_table, slots(fed[:, None]).flatten(), (fed + 1).to(torch.int32))
        out[:, i] = pick(decode_one_token(model, out[:, i - 1:i], fed[:, None], caches, step))
    return list(out.split(rows))


# ---- served model ------------------------------------------------------------------------------

class TransformerModel(ServedModel):
    """Options (models/sampling.py): temperature (>= 0, default 1; 0 = greedy), top_p (in
    (0, 1], default 1), top_k, max_tokens (>= 1, default min(16, room left); prompt +
    max_tokens <= max_sequence_length), seed (default a fresh random one, returned in the
    normalised options), stop_token_ids, ignore_eos; `parameters.eos_token_id` names the EOS.

    Served by the generation engine (runtime/generation/): `new_kv_cache` and `step` run one
    iteration over a paged cache. `run` is the dense path, one left-padded batch run to
    max_tokens (batch_key = (temperature, top_p, max_tokens)); it is the reference the engine
    is tested against and what `generate` uses."""

    model_type = "transformer"
    generative = True
    decode = None                    # token ids -> text; the home decoder has no tokenizer
    trainable = optimizable = language_model = True

    def __init__(self, spec: dict, device: torch.device):
        self.config = TransformerConfig.from_spec(spec)
        self.device = device
        self.tensor_cores = flag(spec, "enable_tensor_cores")
        eos = (spec.get("parameters") or {}).get("eos_token_id")
        self.eos_token_id = None if eos is None else int_param(spec["parameters"], "eos_token_id", minimum=0)
        self.module, self.dtype = build_module(lambda: Decoder(self.config), spec, device)

    def prepare(self, input_data, options: dict) -> Prepared:
        limit = self.config.max_sequence_length
        tokens = token_rows(input_data, self.config.vocab_size, limit)  # [rows, S]
        options = dict(options or {})
        params = SamplingParams.from_options(options, prompt_len=tokens.shape[1], limit=limit,
                                             vocab_size=self.config.vocab_size, has_tokenizer=self.decode is not None)
        options.update(params.normalised())
        return Prepared(tensor=tokens.to(self.device), options=options, rows=tokens.shape[0], sampling=params,
                        batch_key=("generate", params.temperature, params.top_p, params.max_tokens))

    def data_rows(self, data) -> torch.Tensor:
        return token_rows(data, self.config.vocab_size, self.config.max_sequence_length)

    @property
    def output_width(self) -> int:
        return self.config.vocab_size

    def run(self, batch: list[Prepared]) -> list[Output]:
        first = batch[0].sampling
        if any(p.batch_key != batch[0].batch_key for p in batch):
            raise ValueError("run() was given requests with different batch keys")
        with tensor_cores(self.tensor_cores, self.device):
            results = generate(self.module, [p.tensor for p in batch], first.max_tokens,
                               first.temperature, first.top_p,
                               [p.sampling.generator(r, self.device) for p in batch for r in range(p.rows)])
        return [Output(output_data=to_numpy(r), tokens_generated=r.numel()) for r in results]

    def generate(self, token_ids, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> torch.Tensor:
        """One request's generated ids [rows, max_tokens] (the dense path)."""
        p = self.prepare(token_ids, {"max_tokens": max_tokens, "temperature": temperature,
                                     "top_p": top_p, "seed": seed})
        return torch.from_numpy(self.run([p])[0].output_data)

    # ---- the generation engine's face ------------------------------------------------------
    def kv_bytes_per_block(self, block_size: int) -> int:
        cfg = self.config
        return kv_bytes_per_block(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype)

    def new_kv_cache(self, num_blocks: int, block_size: int) -> list[PagedKVCache]:
        """The decoder's paged KV cache: one PagedKVCache per layer."""
        cfg = self.config
        return [PagedKVCache(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, self.device, self.dtype)
                for _ in range(cfg.num_layers)]

    def step(self, caches: list[PagedKVCache], chunks: list[ChunkInput]) -> torch.Tensor:
        """One generation step over many sequences -> logits [N, V] of the sampling chunks, in
        order: one paged forward per group of equal-length chunks (models/paged.py)."""
        logits = []
        with tensor_cores(self.tensor_cores, self.device):
            for g in group_chunks(chunks, caches[0].k.shape[1], self.device):
                step = CacheStep(g.block_table, g.slot_mapping, g.seq_lens)
                out = self.module(g.tokens, g.positions, caches=caches, step=step, last_only=True)  # [B, 1, V]
                logits.append(out[g.sampled_rows, -1])
        return torch.cat(logits)
