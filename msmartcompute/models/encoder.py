"""encoder: token ids -> mean-pooled float vectors [rows, hidden_size].

The transformer's pre-norm blocks with bidirectional attention (rotary positions).
Requests of different lengths are right-padded into one batch; attention runs over the real
tokens only (the varlen kernel on the packed batch) and padding is left out of the mean, so a row
pools what it would alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Output, Prepared, ServedModel, to_numpy, token_rows
from .spec import build_module, flag, tensor_cores
from .attention_context import NoCache
from .transformer import Block, TransformerConfig


class Encoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] (row b real for its first lengths[b] ids) -> pooled [B, C] float32."""
        b, s = tokens.shape
        positions = torch.arange(s, device=tokens.device).expand(b, s)
        valid = None if lengths is None else positions < lengths[:, None]   # [B, S]
        ctx = NoCache(causal=False, valid=valid)
        x = self.embed(tokens)                                               # [B, S, C]
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, ctx, i)
        x = self.norm(x).float()
        if valid is None:
            return x.mean(dim=1)
        weights = valid.float()[:, :, None]                                  # [B, S, 1]
        return (x * weights).sum(dim=1) / weights.sum(dim=1)


class EncoderModel(ServedModel):
    model_type = "encoder"
    trainable = optimizable = True

    def __init__(self, spec: dict, device: torch.device):
        self.config = TransformerConfig.from_spec(spec)
        self.device = device
        self.tensor_cores = flag(spec, "enable_tensor_cores")
        self.module, self.dtype = build_module(lambda: Encoder(self.config), spec, device)

    def prepare(self, input_data, options: dict) -> Prepared:
        tokens = token_rows(input_data, self.config.vocab_size, self.config.max_sequence_length)
        # Any lengths share a batch: run() pads.
        return Prepared(tensor=tokens.to(self.device), options=dict(options or {}),
                        batch_key=("tokens",), rows=tokens.shape[0])

    def data_rows(self, data) -> torch.Tensor:
        return token_rows(data, self.config.vocab_size, self.config.max_sequence_length)

    @property
    def output_width(self) -> int:
        return self.config.hidden_size  # pooled vectors

    @torch.inference_mode()
    def run(self, batch: list[Prepared]) -> list[Output]:
        s = max(p.tensor.shape[1] for p in batch)
        tokens = torch.cat([F.pad(p.tensor, (0, s - p.tensor.shape[1])) for p in batch])  # [B, S]
        lengths = torch.cat([torch.full((p.rows,), p.tensor.shape[1], device=self.device) for p in batch])
        with tensor_cores(self.tensor_cores, self.device):
            pooled = self.module(tokens, lengths)                                          # [B, C]
        return [Output(output_data=to_numpy(part), tokens_generated=0)
                for part in pooled.split([p.rows for p in batch])]
