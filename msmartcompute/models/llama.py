"""Llama family decoders (Llama, Mistral, Qwen2) on our ops, loaded from Hugging Face names.

RMSNorm pre-norm blocks, rotary positions (rope_theta; rope_scaling linear / llama3 / yarn),
SwiGLU MLP, grouped-query attention through the attention context (see
attention_context.py: kv heads stay unexpanded), Qwen2's q/k/v bias, tied or untied
lm_head. q, k and v live in one fused Linear, gate and up in another; `weight_targets`
maps the checkpoint's separate q_proj / k_proj / v_proj and gate_proj / up_proj onto row
blocks of them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention_context import AttentionContext, NoCache
from .hf import Target
from .spec import SpecError

FAMILIES = ("llama", "mistral", "qwen2")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    family: str = "llama"
    max_sequence_length: int = 0    # the served limit (pretrained.py sets it at load)

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        family = cfg.get("model_type", "llama")
        heads = cfg["num_attention_heads"]
        if cfg.get("hidden_act", "silu") != "silu":
            raise SpecError("model_path", f"config.json hidden_act {cfg['hidden_act']!r} is not supported "
                                          "(the Llama family uses silu)")
        rope = dict(cfg.get("rope_parameters") or {})       # transformers >= 5 writes this
        scaling = cfg.get("rope_scaling") or rope            # older configs: rope_theta + rope_scaling
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                   num_layers=cfg["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   intermediate_size=cfg["intermediate_size"],
                   max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                   rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                   rope_scaling=None if kind == "default" else dict(scaling, rope_type=kind),
                   qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), family=family)


def rope_frequencies(cfg: LlamaConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] (float32) and the cos/sin scale, per rope_scaling's kind."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq, 1.0
    kind, factor = s["rope_type"], float(s.get("factor") or 1.0)
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old_len = s["original_max_position_embeddings"]
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled), 1.0
    if kind == "yarn":
        old_len = s.get("original_max_position_embeddings") or cfg.max_position_embeddings
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = s.get("attention_factor")
        if attention_factor is None:
            attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
                                if mscale and mscale_all else get_mscale(factor))
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def correction_dim(rotations):
            return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / ((hi - lo) or 0.001)).clamp(0, 1)
        extrapolate = 1 - ramp
        return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, float(attention_factor)
    raise SpecError("model_path", f"rope_scaling type {kind!r} is not supported "
                                  "(supported: default, linear, llama3, yarn)")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] rotated by cos/sin [B, S, 1, D] (Hugging Face's half-split layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, ctx: AttentionContext):
        cfg = self.cfg
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(b, s, cfg.num_heads, cfg.head_dim)                         # [B, S, H, D]
        k = k.view(b, s, cfg.num_kv_heads, cfg.head_dim)                      # [B, S, H_kv, D]
        v = v.view(b, s, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = ctx.attend(self.layer, q, k, v)                                   # [B, S, H, D]
        return self.wo(y.reshape(b, s, self.q_size))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.w_gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.w_gate_up(x).split(self.intermediate, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, ctx):
        x = x + self.attn(self.attn_norm(x), cos, sin, ctx)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """forward(input_ids [B, S], positions [B, S], ctx) -> logits [B, S, V] float32."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq, self.rope_scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the rotary frequencies in float32 (after a cast to the compute dtype)."""
        self.inv_freq = rope_frequencies(self.cfg)[0].to(self.inv_freq.device)

    def rotary(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, :, None, None] * self.inv_freq.float()   # [B, S, 1, D/2]
        angles = torch.cat((angles, angles), dim=-1)                             # [B, S, 1, D]
        return (angles.cos() * self.rope_scale).to(dtype), (angles.sin() * self.rope_scale).to(dtype)

    def hidden(self, input_ids, positions, ctx: AttentionContext) -> torch.Tensor:
        x = self.embed(input_ids)                                                # [B, S, C]
        cos, sin = self.rotary(positions, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, ctx)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.embed.weight if self.lm_head is None else None
        return (F.linear(h, head) if head is not None else self.lm_head(h)).float()

    def forward(self, input_ids, positions=None, ctx: AttentionContext | None = None) -> torch.Tensor:
        """Without positions and ctx: the whole sequence, causal (training, scoring)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
        return self.logits(self.hidden(input_ids, positions, ctx or NoCache(causal=True)))

    # ---- checkpoint names ---------------------------------------------------------------------
    PREFIXES = ("model.",)
    IGNORED = ("rotary_emb.inv_freq",)

    def weight_targets(self) -> tuple[dict[str, Target], dict[str, Target]]:
        """(base-model names -> targets, head names -> targets), Hugging Face naming."""
        body = {"embed_tokens.weight": Target(self.embed.weight), "norm.weight": Target(self.norm.weight)}
        for i, block in enumerate(self.layers):
            p, a = f"layers.{i}.", block.attn
            q, kv = a.q_size, a.kv_size
            for kind in ("weight", "bias") if self.cfg.qkv_bias else ("weight",):
                fused = getattr(a.wqkv, kind)
                body[p + f"self_attn.q_proj.{kind}"] = Target(fused[:q])
                body[p + f"self_attn.k_proj.{kind}"] = Target(fused[q:q + kv])
                body[p + f"self_attn.v_proj.{kind}"] = Target(fused[q + kv:])
            n = block.mlp.intermediate
            body |= {p + "self_attn.o_proj.weight": Target(a.wo.weight),
                     p + "mlp.gate_proj.weight": Target(block.mlp.w_gate_up.weight[:n]),
                     p + "mlp.up_proj.weight": Target(block.mlp.w_gate_up.weight[n:]),
                     p + "mlp.down_proj.weight": Target(block.mlp.w_down.weight),
                     p + "input_layernorm.weight": Target(block.attn_norm.weight),
                     p + "post_attention_layernorm.weight": Target(block.mlp_norm.weight)}
        head = {} if self.lm_head is None else {"lm_head.weight": Target(self.lm_head.weight)}
        return body, head
