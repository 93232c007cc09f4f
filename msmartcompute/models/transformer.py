"""transformer: a GPT-style decoder LM with a KV cache, and the blocks the encoder reuses.

Pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> GELU MLP -> residual),
rotary positions (no learned position table, so no length-sized parameter and per-row
position ids make left-padded batches exact), grouped-query attention when num_kv_heads
< num_heads, untied lm_head.

Served generation runs on the generation engine (runtime/generation/): `Decoder.forward_paged`
computes one step of many sequences' packed tokens over a paged KV cache (models/paged.py).
The dense path below (`generate`: prefill, then decode_one_token against a per-batch cache,
prompts left-padded with a padding mask and per-row rotary positions) is the reference it is
tested against. Sampling and its options: models/sampling.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msmartcompute import ops

from .base import Output, Prepared, ServedModel, to_numpy, token_rows
from .paged import ChunkInput, PagedKVCache, PagedStep, kv_bytes_per_block
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


# ---- attention: the one place the kernel is chosen ---------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, S, D], k/v [B, H, T, D] -> [B, H, S, D].

    causal aligns the last query with the last key (used only when S == T). mask [B, 1, S, T]
    (True = attend) replaces `causal` for padded batches; the fused op takes no mask, so a
    padded batch goes through torch's SDPA."""
    fused = getattr(ops, "fused_attention", None)
    if mask is None and fused is not None:
        return fused(q, k, v, causal=causal)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """x [B, H, S, D] rotated by positions [B, S] (pairs (x[2i], x[2i+1]), computed in fp32)."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # [D/2]
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq                      # [B, 1, S, D/2]
    cos, sin = angles.cos(), angles.sin()
    xf = x.float().unflatten(-1, (d // 2, 2))                                                # [B, H, S, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class KVCache:
    """Keys and values of one layer: k/v [B, H_kv, capacity, D]."""

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, H_kv, S, D] at [start, start + S); return everything up to there."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, bias=False)
        self.wo = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """x [B, S, C] -> q [B, H, S, D], k/v [B, H_kv, S, D], rotated to `positions` [B, S]."""
        cfg = self.cfg
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim], -1)
        q = q.view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)     # [B, H, S, D]
        k = k.view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, H_kv, S, D]
        v = v.view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        return apply_rope(q, positions, cfg.rope_base), apply_rope(k, positions, cfg.rope_base), v

    def paged(self, x: torch.Tensor, step: PagedStep, layer: int) -> torch.Tensor:
        """x [T, C], the packed tokens of a generation step -> [T, C] (cache in `step`)."""
        q, k, v = self.qkv(x[None], step.positions[None])                # [1, H, T, D]
        y = step.attend(layer, q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1))
        return self.wo(y.reshape(x.shape[0], -1))                         # [T, H, D] -> [T, C]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, causal: bool,
                mask: torch.Tensor | None, cache: KVCache | None, start: int) -> torch.Tensor:
        """x [B, S, C] -> [B, S, C]; with a cache, x holds positions [start, start + S)."""
        cfg = self.cfg
        b, s, _ = x.shape
        q, k, v = self.qkv(x, positions)
        if cache is not None:
            k, v = cache.update(start, k, v)                              # [B, H_kv, T, D]
        if cfg.num_kv_heads != cfg.num_heads:
            groups = cfg.num_heads // cfg.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = attention(q, k, v, causal=causal, mask=mask)                  # [B, H, S, D]
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


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

    def forward(self, x, positions, causal, mask=None, cache=None, start=0):
        x = x + self.attn(self.attn_norm(x), positions, causal, mask, cache, start)
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
                mask: torch.Tensor | None = None, caches: list[KVCache] | None = None,
                start: int = 0, last_only: bool = False) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, V] (float32), or [B, 1, V] with last_only (generation
        needs only the last position; this skips a [B, S, V] lm_head). Without caches: the full
        causal forward."""
        b, s = tokens.shape
        if positions is None:
            positions = torch.arange(start, start + s, device=tokens.device).expand(b, s)
        causal = s > 1
        x = self.embed(tokens)  # [B, S, C]
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, causal, mask, None if caches is None else caches[i], start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()

    def forward_paged(self, step: PagedStep) -> torch.Tensor:
        """The packed new tokens of a generation step -> logits [N, V] (float32) at its
        sampled positions; k/v go to the step's paged cache."""
        x = self.embed(step.tokens)                                      # [T, C]
        for i, layer in enumerate(self.layers):
            x = x + layer.attn.paged(layer.attn_norm(x), step, i)
            x = x + layer.ffn(layer.ffn_norm(x))
        return self.lm_head(self.norm(x[step.sample_index])).float()


# ---- generation --------------------------------------------------------------------------------

def prefill(model: Decoder, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
            caches: list[KVCache]) -> torch.Tensor:
    """tokens [B, S] -> logits of the last position [B, V]; fills caches[:, :, :S]."""
    return model(tokens, positions, mask, caches, start=0, last_only=True)[:, -1]


def decode_one_token(model: Decoder, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None,
                     caches: list[KVCache], start: int) -> torch.Tensor:
    """token [B, 1] at cache index `start` -> logits [B, V]."""
    return model(token, position, mask, caches, start=start)[:, -1]


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
    pad = torch.cat([torch.full((p.shape[0],), s - p.shape[1], device=device) for p in prompts])  # [B]
    tokens = torch.cat([F.pad(p.to(device), (s - p.shape[1], 0)) for p in prompts])              # [B, S]
    b, capacity = tokens.shape[0], s + max_tokens
    caches = [KVCache(b, cfg.num_kv_heads, capacity, cfg.head_dim, device, dtype) for _ in range(cfg.num_layers)]

    index = torch.arange(capacity, device=device)
    valid = index[None, :] >= pad[:, None]                       # [B, capacity]: not padding
    padded = bool(pad.any())
    positions = (index[None, :s] - pad[:, None]).clamp(min=0)   # [B, S]
    mask = None
    if padded:  # causal and not padding; a padding query sees itself so its softmax is defined
        causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
        mask = (causal & valid[:, None, None, :s]) | torch.eye(s, dtype=torch.bool, device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B], each row its own draws
        if temperature == 0:
            return logits.argmax(dim=-1)
        return torch.cat([sample(logits[r:r + 1], temperature, top_p, g) for r, g in enumerate(generators)])

    out = torch.empty(b, max_tokens, dtype=torch.long, device=device)
    out[:, 0] = pick(prefill(model, tokens, positions, mask, caches))
    for i in range(1, max_tokens):
        t = s + i - 1                                            # cache index of the fed token
        step_mask = valid[:, None, None, :t + 1] if padded else None
        logits = decode_one_token(model, out[:, i - 1:i], (t - pad)[:, None], step_mask, caches, t)
        out[:, i] = pick(logits)
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

    def __init__(self, spec: dict, device: torch.device):
        self.config = TransformerConfig.from_spec(spec)
        self.device = device
        self.tensor_cores = flag(spec, "enable_tensor_cores")
        eos = (spec.get("parameters") or {}).get("eos_token_id")
        self.eos_token_id = None if eos is None else int_param(spec["parameters"], "eos_token_id", minimum=0)
        self.module, self.dtype = build_module(lambda: Decoder(self.config), spec, device)

    def prepare(self, input_data, options: dict) -> Prepared:
        options = dict(options or {})
        limit = self.config.max_sequence_length
        tokens = token_rows(input_data, self.config.vocab_size, limit)  # [rows, S]
        params = SamplingParams.from_options(options, prompt_len=tokens.shape[1], limit=limit,
                                             vocab_size=self.config.vocab_size, has_tokenizer=self.decode is not None)
        options.update(params.normalised())
        return Prepared(tensor=tokens.to(self.device), options=options, rows=tokens.shape[0], sampling=params,
                        batch_key=("generate", params.temperature, params.top_p, params.max_tokens))

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

    def new_kv_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        cfg = self.config
        return PagedKVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                            self.device, self.dtype)

    def step(self, cache: PagedKVCache, chunks: list[ChunkInput]) -> torch.Tensor:
        """One generation step over many sequences -> logits [N, V] of the sampling chunks."""
        with tensor_cores(self.tensor_cores, self.device):
            return self.module.forward_paged(PagedStep(cache, chunks, self.device))
