"""transformer: a GPT-style decoder LM with a KV cache, and the blocks the encoder reuses.

Pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> GELU MLP -> residual),
rotary positions (no learned position table, so no length-sized parameter and per-row
position ids make left-padded batches exact), grouped-query attention when num_kv_heads
< num_heads, untied lm_head. Generation: prefill the prompt, then decode_one_token per
new token against the cache; temperature 0 is greedy, else nucleus sampling with top_p
drawn from a per-request torch.Generator, so a request's tokens depend only on its seed.

Batches: prompts of different lengths are left-padded; a padding mask keeps every row's
attention on its own tokens and rotary positions start at 0 at each row's first token,
so a row generates what it would alone (up to float rounding of the batched matmuls)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msmartcompute import ops

from .base import Output, Prepared, ServedModel, to_numpy, token_rows
from .sampling import sampling_options
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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, causal: bool,
                mask: torch.Tensor | None, cache: KVCache | None, start: int) -> torch.Tensor:
        """x [B, S, C] -> [B, S, C]; with a cache, x holds positions [start, start + S)."""
        cfg = self.cfg
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim], -1)
        q = q.view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)     # [B, H, S, D]
        k = k.view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, H_kv, S, D]
        v = v.view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q = apply_rope(q, positions, cfg.rope_base)
        k = apply_rope(k, positions, cfg.rope_base)
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


# ---- generation --------------------------------------------------------------------------------

def prefill(model: Decoder, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
            caches: list[KVCache]) -> torch.Tensor:
    """tokens [B, S] -> logits of the last position [B, V]; fills caches[:, :, :S]."""
    return model(tokens, positions, mask, caches, start=0, last_only=True)[:, -1]


def decode_one_token(model: Decoder, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None,
                     caches: list[KVCache], start: int) -> torch.Tensor:
    """token [B, 1] at cache index `start` -> logits [B, V]."""
    return model(token, position, mask, caches, start=start)[:, -1]


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits [R, V] -> token ids [R]: argmax at temperature 0, else nucleus sampling.

    One uniform draw per row from `generator`, mapped through the cumulative distribution of
    the smallest set of most likely tokens whose mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)    # [R, V]
    before = sorted_probs.cumsum(dim=-1) - sorted_probs           # mass of the tokens ahead
    kept = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept[:, 0] = sorted_probs[:, 0]                               # the top token always stays
    cdf = kept.cumsum(dim=-1)                                     # [R, V]
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).clamp_(max=logits.shape[-1] - 1)  # [R, 1]
    return order.gather(-1, pick).squeeze(-1)


@torch.inference_mode()
def generate(model: Decoder, prompts: list[torch.Tensor], max_tokens: int, temperature: float,
             top_p: float, generators: list[torch.Generator | None]) -> list[torch.Tensor]:
    """prompts[i] [R_i, S_i] token ids -> generated ids [R_i, max_tokens] per request, as one
    left-padded batch. generators[i] draws request i's samples (None when greedy)."""
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

    def pick(logits: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B], each request its own draws
        if temperature == 0:
            return logits.argmax(dim=-1)
        return torch.cat([sample(part, temperature, top_p, g)
                          for part, g in zip(logits.split(rows), generators)])

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
    """Options: temperature (>= 0, default 1; 0 = greedy), top_p (in (0, 1], default 1),
    max_tokens (>= 1, default min(16, room left); prompt + max_tokens <= max_sequence_length),
    seed (integer; default a fresh random one, returned in the normalised options).
    batch_key = (temperature, top_p, max_tokens): the seed is not in it because every request
    samples from its own generator inside the shared batch."""

    model_type = "transformer"
    trainable = optimizable = language_model = True

    def __init__(self, spec: dict, device: torch.device):
        self.config = TransformerConfig.from_spec(spec)
        self.device = device
        self.tensor_cores = flag(spec, "enable_tensor_cores")
        self.module, self.dtype = build_module(lambda: Decoder(self.config), spec, device)

    def prepare(self, input_data, options: dict) -> Prepared:
        limit = self.config.max_sequence_length
        tokens = token_rows(input_data, self.config.vocab_size, limit)  # [rows, S]
        options = sampling_options(options, tokens.shape[1], limit)
        temperature, top_p, max_tokens = options["temperature"], options["top_p"], options["max_tokens"]
        return Prepared(tensor=tokens.to(self.device), options=options,
                        batch_key=("generate", temperature, top_p, max_tokens), rows=tokens.shape[0])

    def data_rows(self, data) -> torch.Tensor:
        return token_rows(data, self.config.vocab_size, self.config.max_sequence_length)

    @property
    def output_width(self) -> int:
        return self.config.vocab_size

    def _generator(self, seed: int, temperature: float) -> torch.Generator | None:
        if temperature == 0:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    def run(self, batch: list[Prepared]) -> list[Output]:
        first = batch[0].options
        if any(p.batch_key != batch[0].batch_key for p in batch):
            raise ValueError("run() was given requests with different batch keys")
        with tensor_cores(self.tensor_cores, self.device):
            results = generate(self.module, [p.tensor for p in batch], first["max_tokens"],
                               first["temperature"], first["top_p"],
                               [self._generator(p.options["seed"], first["temperature"]) for p in batch])
        return [Output(output_data=to_numpy(r), tokens_generated=r.numel()) for r in results]

    def generate(self, token_ids, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> torch.Tensor:
        """One request's generated ids [rows, max_tokens]."""
        p = self.prepare(token_ids, {"max_tokens": max_tokens, "temperature": temperature,
                                     "top_p": top_p, "seed": seed})
        return torch.from_numpy(self.run([p])[0].output_data)
