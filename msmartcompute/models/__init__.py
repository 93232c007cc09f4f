"""Model families built on ops: build_model(spec, device) -> ServedModel.

Families: transformer (decoder LM with KV cache), encoder (token ids -> pooled vectors),
mlp (float rows -> float rows), torchscript / exported (a user's own program file).
A transformer or encoder whose model_path is a Hugging Face-format checkpoint (a folder
with config.json, or a GPT-2 / Llama / BERT weights file) is built by pretrained.py
(llama.py, gpt2.py, bert.py); otherwise by the home transformer.py / encoder.py."""
from __future__ import annotations

import torch

from .base import Output, Prepared, ServedModel, module_bytes
from .encoder import EncoderModel
from .mlp import MLPModel
from . import pretrained
from .layers import quantized_bytes
from .programs import ProgramModel
from .spec import flag
from .transformer import TransformerModel

_FAMILIES = {
    "transformer": lambda spec, device: pretrained.build(spec, device, "transformer") or TransformerModel(spec, device),
    "encoder": lambda spec, device: pretrained.build(spec, device, "encoder") or EncoderModel(spec, device),
    "mlp": MLPModel,
    "torchscript": lambda spec, device: ProgramModel(spec, device, "torchscript"),
    "exported": lambda spec, device: ProgramModel(spec, device, "exported"),
}
MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)


def planned_bytes(spec: dict) -> int | None:
    """The bytes of parameters and buffers build_model(spec, ...) will hold, from a build on the
    meta device (shapes only: no memory, no checkpoint read), so a quota refuses a model before
    it is built. None when only loading tells (user programs, or a plan that fails for a reason
    the real build would report itself). Raises ValueError for a bad spec, like build_model."""
    model_type = spec.get("model_type")
    if model_type not in ("mlp", "transformer", "encoder"):
        if model_type not in _FAMILIES:
            raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
        return None
    planned = pretrained.planned_bytes(spec)
    if planned is not None:
        return planned
    try:  # the home families: built on meta, the checkpoint (if any) not read, quantization computed
        plain = {k: v for k, v in spec.items() if k not in ("model_path", "enable_quantization")}
        module = _FAMILIES[model_type](plain, torch.device("meta")).module
        return quantized_bytes(module) if flag(spec, "enable_quantization") else module_bytes(module)
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - a meta build the real one does differently: no plan
        return None


def build_model(spec: dict, device: torch.device) -> ServedModel:
    """Build and load the model a POST /models body describes. Raises ValueError."""
    model_type = spec.get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    params = spec.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ValueError("parameters must be an object")
    return _FAMILIES[model_type](spec, torch.device(device))


__all__ = ["MODEL_TYPES", "Output", "Prepared", "ServedModel", "build_model", "planned_bytes"]
