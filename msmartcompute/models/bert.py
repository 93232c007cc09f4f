"""BERT-family encoders (BERT, MiniLM-style sentence encoders) on our ops, from Hugging Face names.

Post-LayerNorm blocks (attention -> residual -> LayerNorm, GELU MLP -> residual ->
LayerNorm), learned absolute positions and token types (a single segment: type 0), and
bidirectional attention through the attention context. `pool` turns the last hidden
states into one vector per row: `mean` over real tokens or the `cls` token, then an
optional L2 normalisation, as a sentence-transformers folder's modules say."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention_context import AttentionContext, MultiHeadConfig, NoCache
from .hf import Target
from .spec import SpecError

FAMILIES = ("bert",)
POOLINGS = ("mean", "cls")


@dataclass
class BertConfig(MultiHeadConfig):
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    max_sequence_length: int = 0    # the served limit (pretrained.py sets it at load)

    @classmethod
    def from_hf(cls, cfg: dict) -> "BertConfig":
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise SpecError("model_path", f"config.json hidden_act {cfg['hidden_act']!r} is not supported (BERT uses gelu)")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise SpecError("model_path", "only absolute position embeddings are supported")
        return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                   num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                   intermediate_size=cfg["intermediate_size"],
                   max_position_embeddings=cfg.get("max_position_embeddings", 512),
                   type_vocab_size=cfg.get("type_vocab_size", 2), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12))


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.attn_out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.out_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, ctx: AttentionContext):
        b, s, c = x.shape
        h, d = self.cfg.num_heads, self.cfg.head_dim
        q, k, v = (t.view(b, s, h, d) for t in self.qkv(x).split(c, dim=-1))    # [B, S, H, D], strided views
        y = ctx.attend(self.layer, q, k, v).reshape(b, s, c)                     # [B, S, C]
        x = self.attn_norm(x + self.attn_out(y))
        return self.out_norm(x + self.out(F.gelu(self.fc(x))))


class Bert(nn.Module):
    """forward(input_ids [B, S], positions [B, S], ctx) -> last hidden states [B, S, C]."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))

    def reset_buffers(self) -> None:
        pass

    def forward(self, input_ids, positions, ctx: AttentionContext) -> torch.Tensor:
        x = self.embed(input_ids) + self.pos_embed(positions) + self.type_embed.weight[0]
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, ctx)
        return x

    # ---- checkpoint names ---------------------------------------------------------------------
    PREFIXES = ("bert.",)
    IGNORED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")  # BertModel's pooler is unused

    def weight_targets(self) -> tuple[dict[str, Target], dict[str, Target]]:
        e = "embeddings."
        body = {e + "word_embeddings.weight": Target(self.embed.weight),
                e + "position_embeddings.weight": Target(self.pos_embed.weight),
                e + "token_type_embeddings.weight": Target(self.type_embed.weight),
                e + "LayerNorm.weight": Target(self.embed_norm.weight),
                e + "LayerNorm.bias": Target(self.embed_norm.bias)}
        c = self.cfg.hidden_size
        for i, layer in enumerate(self.layers):
            p = f"encoder.layer.{i}."
            for j, name in enumerate(("query", "key", "value")):
                body[p + f"attention.self.{name}.weight"] = Target(layer.qkv.weight[j * c:(j + 1) * c])
                body[p + f"attention.self.{name}.bias"] = Target(layer.qkv.bias[j * c:(j + 1) * c])
            for ours, theirs in ((layer.attn_out, "attention.output.dense"), (layer.attn_norm, "attention.output.LayerNorm"),
                                 (layer.fc, "intermediate.dense"), (layer.out, "output.dense"),
                                 (layer.out_norm, "output.LayerNorm")):
                body[p + theirs + ".weight"] = Target(ours.weight)
                body[p + theirs + ".bias"] = Target(ours.bias)
        return body, {}


def pool(hidden: torch.Tensor, valid: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """hidden [B, S, C], valid [B, S] -> [B, C] float32: mean over real tokens or the first (CLS)."""
    hidden = hidden.float()
    if pooling == "cls":
        out = hidden[:, 0]
    else:
        w = valid.float()[:, :, None]
        out = (hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9)
    return F.normalize(out, p=2, dim=-1) if normalize else out


class SentenceEncoder(nn.Module):
    """The served encoder: Bert plus its pooling. forward(tokens [B, S], lengths [B] or None
    (every token real)) -> pooled [B, C] float32, the home encoder's interface, which
    training and optimization call."""

    def __init__(self, bert: Bert, pooling: str, normalize: bool):
        super().__init__()
        self.bert, self.pooling, self.normalize = bert, pooling, normalize

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, s = tokens.shape
        positions = torch.arange(s, device=tokens.device).expand(b, s)
        valid = torch.ones_like(tokens, dtype=torch.bool) if lengths is None else positions < lengths[:, None]
        hidden = self.bert(tokens, positions, NoCache(causal=False, valid=valid))
        return pool(hidden, valid, self.pooling, self.normalize)
