"""Model families built on ops: build_model(spec, device) -> ServedModel.

Families: transformer (decoder LM with KV cache), encoder (token ids -> pooled vectors),
mlp (float rows -> float rows), torchscript / exported (a user's own program file).
A transformer or encoder whose model_path is a Hugging Face-format checkpoint (a folder
with config.json, or a GPT-2 / Llama / BERT weights file) is built by pretrained.py
(llama.py, gpt2.py, bert.py); otherwise by the home transformer.py / encoder.py."""
from __future__ import annotations

import torch

from .base import Output, Prepared, ServedModel
from .encoder import EncoderModel
from .mlp import MLPModel
from . import pretrained
from .programs import ProgramModel
from .transformer import TransformerModel

_FAMILIES = {
    "transformer": lambda spec, device: pretrained.build(spec, device, "transformer") or TransformerModel(spec, device),
    "encoder": lambda spec, device: pretrained.build(spec, device, "encoder") or EncoderModel(spec, device),
    "mlp": MLPModel,
    "torchscript": lambda spec, device: ProgramModel(spec, device, "torchscript"),
    "exported": lambda spec, device: ProgramModel(spec, device, "exported"),
}
MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)


def build_model(spec: dict, device: torch.device) -> ServedModel:
    """Build and load the model a POST /models body describes. Raises ValueError."""
    model_type = spec.get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    params = spec.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ValueError("parameters must be an object")
    return _FAMILIES[model_type](spec, torch.device(device))


__all__ = ["MODEL_TYPES", "Output", "Prepared", "ServedModel", "build_model"]
