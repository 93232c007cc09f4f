"""GPT-2 on our ops, loaded from Hugging Face names.

Learned absolute positions, pre-LayerNorm blocks, GELU (tanh approximation) MLP, attention
through the attention context, lm_head tied to the token embedding. GPT-2 stores its
projections as Conv1D weights [in, out]: `weight_targets` marks them transposed, so they
land in ordinary nn.Linear layers (which quantization and training treat like any other)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention_context import AttentionContext, MultiHeadConfig, NoCache
from .hf import Target
from .spec import SpecError


@dataclass
class GPT2Config(MultiHeadConfig):
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    layer_norm_eps: float = 1e-5
    scale_attn_by_inverse_layer_idx: bool = False
    max_sequence_length: int = 0    # the served limit (pretrained.py sets it at load)

    @classmethod
    def from_hf(cls, cfg: dict) -> "GPT2Config":
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise SpecError("model_path", f"config.json activation_function {act!r} is not supported "
                                          "(GPT-2 uses gelu_new)")
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            raise SpecError("model_path", "config.json scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                                          "are not supported")
        if cfg.get("scale_attn_weights", True) is False:
            raise SpecError("model_path", "config.json scale_attn_weights=false is not supported")
        hidden = cfg.get("n_embd", 768)
        return cls(vocab_size=cfg.get("vocab_size", 50257), hidden_size=hidden,
                   num_layers=cfg.get("n_layer", 12), num_heads=cfg.get("n_head", 12),
                   intermediate_size=cfg.get("n_inner") or 4 * hidden,
                   max_position_embeddings=cfg.get("n_positions", 1024),
                   layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5))


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, ctx: AttentionContext):
        b, s, c = x.shape
        h, d = self.cfg.num_heads, self.cfg.head_dim
        q, k, v = (t.view(b, s, h, d) for t in self.qkv(x).split(c, dim=-1))  # [B, S, H, D], strided views
        y = ctx.attend(self.layer, q, k, v)
        return self.proj(y.reshape(b, s, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, ctx):
        x = x + self.attn(self.ln_1(x), ctx)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """forward(input_ids [B, S], positions [B, S], ctx) -> logits [B, S, V] float32."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def reset_buffers(self) -> None:
        pass

    def hidden(self, input_ids, positions, ctx: AttentionContext) -> torch.Tensor:
        x = self.embed(input_ids) + self.pos_embed(positions)                    # [B, S, C]
        for block in self.layers:
            x = block(x, ctx)
        return self.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.embed.weight).float()                            # tied lm_head

    def forward(self, input_ids, positions=None, ctx: AttentionContext | None = None) -> torch.Tensor:
        """Without positions and ctx: the whole sequence, causal (training, scoring)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
        return self.logits(self.hidden(input_ids, positions, ctx or NoCache(causal=True)))

    # ---- checkpoint names ---------------------------------------------------------------------
    PREFIXES = ("transformer.",)
    IGNORED = (".attn.bias", ".attn.masked_bias", "lm_head.weight")  # causal-mask buffers; the tied head

    def weight_targets(self) -> tuple[dict[str, Target], dict[str, Target]]:
        body = {"wte.weight": Target(self.embed.weight), "wpe.weight": Target(self.pos_embed.weight),
                "ln_f.weight": Target(self.ln_f.weight), "ln_f.bias": Target(self.ln_f.bias)}
        for i, block in enumerate(self.layers):
            p = f"h.{i}."
            for ours, theirs in ((block.attn.qkv, "attn.c_attn"), (block.attn.proj, "attn.c_proj"),
                                 (block.mlp.fc, "mlp.c_fc"), (block.mlp.proj, "mlp.c_proj")):
                body[p + theirs + ".weight"] = Target(ours.weight, transposed=True)  # Conv1D [in, out]
                body[p + theirs + ".bias"] = Target(ours.bias)
            for ln in ("ln_1", "ln_2"):
                body[p + ln + ".weight"] = Target(getattr(block, ln).weight)
                body[p + ln + ".bias"] = Target(getattr(block, ln).bias)
        return body, {}
