"""transformer: the home GPT-style decoder LM, and the blocks the encoder reuses.

Pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> GELU MLP -> residual),
rotary positions (no learned position table, so no length-sized parameter and per-row
position ids make left-padded batches exact), grouped-query attention when num_kv_heads
< num_heads, untied lm_head.

Attention goes through the context (attention_context.py: fused / varlen / paged kernels, k/v
unexpanded). Serving, generation and its dense reference are every decoder's (models/paged.py);
rotary positions start from 0 at each row's first real token. Sampling: models/sampling.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention_context import AttentionContext, NoCache
from .base import token_rows
from .paged import PagedDecoder
from .spec import MAX_LAYERS, build_module, flag, int_param, max_sequence_length


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
                   num_layers=int_param(p, "num_layers", maximum=MAX_LAYERS), num_heads=heads, num_kv_heads=kv_heads,
                   intermediate_size=int_param(p, "intermediate_size", 4 * hidden),
                   max_sequence_length=max_sequence_length(spec))


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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext, layer: int) -> torch.Tensor:
        """x [B, S, C] -> [B, S, C]."""
        cfg = self.cfg
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim], -1)
        q = apply_rope(q.view(b, s, cfg.num_heads, cfg.head_dim), positions, cfg.rope_base)     # [B, S, H, D]
        k = apply_rope(k.view(b, s, cfg.num_kv_heads, cfg.head_dim), positions, cfg.rope_base)  # [B, S, H_kv, D]
        v = v.view(b, s, cfg.num_kv_heads, cfg.head_dim)
        y = ctx.attend(layer, q, k, v)                                                           # [B, S, H, D]
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

    def forward(self, x, positions, ctx: AttentionContext, layer: int):
        x = x + self.attn(self.attn_norm(x), positions, ctx, layer)
        return x + self.ffn(self.ffn_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """tokens [B, S] at positions [B, S] -> the last hidden states [B, S, C]."""
        x = self.embed(tokens)  # [B, S, C]
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, ctx, i)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h).float()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, V] (float32): the full causal forward, over the real
        tokens only when valid [B, S] marks padding (training, scoring)."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        return self.logits(self.hidden(tokens, positions, NoCache(causal=True, valid=valid)))


# ---- served model ------------------------------------------------------------------------------

class TransformerModel(PagedDecoder):
    """The home decoder: `parameters` size it, `parameters.eos_token_id` names its EOS; no
    tokenizer. Options and serving: PagedDecoder (models/paged.py)."""

    tokenizer = None

    def __init__(self, spec: dict, device: torch.device):
        self.config = TransformerConfig.from_spec(spec)
        self.device = device
        self.tensor_cores = flag(spec, "enable_tensor_cores")
        eos = (spec.get("parameters") or {}).get("eos_token_id")
        self.eos_ids = frozenset() if eos is None else frozenset({int_param(spec["parameters"], "eos_token_id", minimum=0)})
        self.module, self.dtype = build_module(lambda: Decoder(self.config), spec, device)

    def prompt_rows(self, input_data) -> list[torch.Tensor]:
        return list(token_rows(input_data, self.config.vocab_size, self.config.max_sequence_length))

    def data_rows(self, data) -> torch.Tensor:
        return token_rows(data, self.config.vocab_size, self.config.max_sequence_length)
