"""POST /models/{model_id}/optimize: int8 quantization or half precision, measured.

convert() builds the optimized module from a COPY of the served one (the runtime swaps it in
atomically, like training); it is also what a restart replays from the registry spec's
"optimizations" list, so a restored model is the optimized one.

- quantization / int8: every nn.Linear becomes int8 per output channel. W8A8 (activations
  quantized per row too) through ops.int8_linear(mode="w8a8") when that op exists and
  options.weight_only is not true; else weight-only W8A16 (models.layers.QuantizedLinear).
- mixed_precision (or target fp16 / bf16): the module in half precision; bf16 on the CPU
  (CPU fp16 matmuls are slow and no more exact), fp16 on CUDA only when asked or when the
  card has no bf16.

accuracy_loss is measured on calibration_data, old vs new module: top-1 disagreement for a
classifier, relative output error ||new - old|| / ||old|| for regression outputs, next-token
(argmax) disagreement for a transformer. A model trained here with cross_entropy counts as a
classifier; options.accuracy_metric overrides.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .. import ops
from ..models.base import is_out_of_memory, module_bytes
from ..models.layers import QuantizedLinear
from .access import authorize
from .caller import Caller
from .errors import InvalidInputData, insufficient_memory

TYPES = ("quantization", "mixed_precision")
PRECISIONS = {"int8": "int8", "fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16"}
METRICS = ("top1_disagreement", "relative_error", "next_token_disagreement")


class W8A8Linear(QuantizedLinear):
    """QuantizedLinear whose activations are quantized per row as well (ops.int8_linear w8a8)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.weight_q, self.weight_scale, self.bias, mode="w8a8")


def _bad(field_name: str, message: str, **details) -> InvalidInputData:
    return InvalidInputData(f"{field_name} {message}", {"field": field_name, **details})


def _is_quantized(module: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in module.modules())


def parse_step(request: dict, model) -> dict:
    """The conversion a request asks for, resolved for this model's device:
    {"optimization_type", "target_precision", "mode"}. Raises InvalidInputData."""
    if not model.optimizable:
        raise InvalidInputData(f"a {model.model_type} model cannot be optimized: it is a fixed program, "
                               "served as is", {"field": "model_id", "model_type": model.model_type})
    kind = request.get("optimization_type")
    if kind not in TYPES:
        raise _bad("optimization_type", f"must be one of {', '.join(TYPES)}, got {kind!r}")
    options = request.get("options") or {}
    if not isinstance(options, dict):
        raise _bad("options", "must be an object")
    target = request.get("target_precision")
    if target is None:
        target = "int8" if kind == "quantization" else None
    elif target not in PRECISIONS:
        raise _bad("target_precision", f"must be one of {', '.join(PRECISIONS)}, got {target!r}")
    else:
        target = PRECISIONS[target]
    if _is_quantized(model.module):
        raise InvalidInputData("this model is already int8-quantized", {"field": "model_id", "quantized": True})
    if target == "int8":
        if kind != "quantization":
            raise _bad("target_precision", "int8 needs optimization_type quantization")
        weight_only = options.get("weight_only", False)
        if not isinstance(weight_only, bool):
            raise _bad("options.weight_only", "must be true or false")
        if not any(isinstance(m, nn.Linear) for m in model.module.modules()):
            raise InvalidInputData("the model has no linear layers to quantize", {"field": "model_id"})
        mode = "w8a8" if not weight_only and hasattr(ops, "int8_linear") else "w8a16"
        return {"optimization_type": "quantization", "target_precision": "int8", "mode": mode}
    # half precision, whichever type named it
    if target is None:
        target = "bf16"
    if model.device.type == "cpu":
        target = "bf16"
    elif target == "bf16" and not torch.cuda.is_bf16_supported():
        target = "fp16"
    return {"optimization_type": kind, "target_precision": target, "mode": target}


def convert(model, step: dict) -> tuple[nn.Module, torch.dtype]:
    """A new module (and its compute dtype) with the step applied; model.module is not touched."""
    module = copy.deepcopy(model.module)
    if step["target_precision"] == "int8":
        cls = W8A8Linear if step.get("mode") == "w8a8" and hasattr(ops, "int8_linear") else QuantizedLinear
        _quantize(module, cls)
        return module.eval(), model.dtype
    dtype = torch.float16 if step["target_precision"] == "fp16" else torch.bfloat16
    return module.to(dtype).eval(), dtype


def _quantize(module: nn.Module, cls) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, cls.from_linear(child))
        else:
            _quantize(child, cls)


def calibration(request: dict, model) -> torch.Tensor | None:
    data = request.get("calibration_data")
    if data is None:
        return None
    try:
        return model.data_rows(data).to(model.device)
    except ValueError as exc:
        raise _bad("calibration_data", f"does not fit the model: {exc}") from None


def default_metric(model, task: str | None) -> str:
    if model.language_model:
        return "next_token_disagreement"
    return "top1_disagreement" if task == "classification" else "relative_error"


@torch.inference_mode()
def accuracy_loss(model, old: nn.Module, new: nn.Module, x: torch.Tensor, metric: str) -> float:
    a, b = model.outputs(old, x), model.outputs(new, x)
    if metric == "relative_error":
        return float(torch.linalg.vector_norm(b - a) / torch.linalg.vector_norm(a).clamp_min(1e-12))
    return float((a.argmax(-1) != b.argmax(-1)).float().mean())


def optimize(model, request: dict, task: str | None) -> tuple[dict, nn.Module, torch.dtype]:
    """Convert and measure. Returns (response fields with the resolved step under "step", the new
    module, its compute dtype); the caller swaps the module in when fields["model_updated"]."""
    step = parse_step(request, model)
    options = request.get("options") or {}
    preserve = options.get("preserve_accuracy", False)
    if not isinstance(preserve, bool):
        raise _bad("options.preserve_accuracy", "must be true or false")
    max_loss = options.get("max_accuracy_loss", 0.01)
    if isinstance(max_loss, bool) or not isinstance(max_loss, (int, float)) or not 0 <= max_loss <= 1:
        raise _bad("options.max_accuracy_loss", f"must be a number in [0, 1], got {max_loss!r}")
    metric = options.get("accuracy_metric") or default_metric(model, task)
    if metric not in METRICS:
        raise _bad("options.accuracy_metric", f"must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "next_token_disagreement" and not model.language_model:
        raise _bad("options.accuracy_metric", "next_token_disagreement applies to language models (transformer) only")
    x = calibration(request, model)
    if preserve and x is None:
        raise _bad("calibration_data", "is required with options.preserve_accuracy (the loss must be measured)")

    t0 = time.perf_counter()
    old = model.module
    new, dtype = convert(model, step)
    elapsed = time.perf_counter() - t0
    original, optimized = module_bytes(old), module_bytes(new)
    fields = {
        "optimization_type": request["optimization_type"], "target_precision": step["target_precision"],
        "mode": step["mode"], "original_size": original, "optimized_size": optimized,
        "compression_ratio": optimized / original if original else None,
        "accuracy_loss": None, "accuracy_metric": None, "accuracy_note": None,
        "optimization_time": elapsed, "model_updated": True, "reason": None, "step": step,
    }
    if x is None:
        fields["accuracy_note"] = "no calibration_data was given, so the accuracy loss was not measured"
    else:
        fields["accuracy_loss"] = accuracy_loss(model, old, new, x, metric)
        fields["accuracy_metric"] = metric
        fields["optimization_time"] = time.perf_counter() - t0
        if preserve and fields["accuracy_loss"] > max_loss:
            fields["model_updated"] = False
            fields["reason"] = (f"preserve_accuracy: the measured {metric} {fields['accuracy_loss']:.6g} exceeds "
                                f"max_accuracy_loss {max_loss}; the model was left unchanged")
    return fields, new, dtype



class Optimization:
    """The optimize service: POST /models/{model_id}/optimize. Quantize (int8) or convert to
    half precision, measured; the converted copy is swapped in when model_updated, and the step
    is recorded in the spec so a restart replays it."""

    def __init__(self, registry, lock_wait_s: float):
        self.registry = registry
        self.lock_wait_s = lock_wait_s  # a training of the model runs: wait this long, then QUEUE_FULL

    def optimize(self, model_id: str, request: dict, caller: Caller | None = None) -> dict:
        """{model_id, optimization_type, target_precision, mode, original_size, optimized_size,
        compression_ratio, accuracy_loss, accuracy_metric, accuracy_note, optimization_time,
        model_updated, reason}."""
        authorize(caller, "optimization.optimize")
        self.registry.entry(model_id)
        with self.registry.exclusive(model_id, self.lock_wait_s):
            entry = self.registry.entry(model_id)
            try:
                fields, module, dtype = optimize(entry.model, request, entry.spec.get("trained_task"))
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise insufficient_memory(exc, "optimizing") from None
                raise
            step = fields.pop("step")
            if fields["model_updated"]:
                self.registry.swap(entry, module, dtype,
                                   {"optimizations": [*(entry.spec.get("optimizations") or []), step]})
        return {"model_id": model_id, **fields}
