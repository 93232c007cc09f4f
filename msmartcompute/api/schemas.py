"""Request schemas (a JSON Schema subset) used both to validate bodies and to
generate the OpenAPI document, so the two cannot drift apart."""
from __future__ import annotations

import re

import numpy as np

from ..runtime.errors import InvalidInputData
from ..runtime.ids import ID_PATTERN, MAX_ID_LENGTH

# Limits on what one request may ask for; the body-size limit is in ApiConfig.
MAX_ROWS = 65_536
MAX_ELEMENTS = 16_777_216

_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": ID_PATTERN}
_MATRIX = {
    "type": "array", "minItems": 1, "maxItems": MAX_ROWS,
    "items": {"type": "array", "minItems": 1, "items": {"type": "number"}},
    "description": "rectangular rows of numbers (float features, or token ids for transformer/encoder)",
}

MODEL_TYPES = ["transformer", "encoder", "mlp", "torchscript", "exported"]

LOAD_MODEL = {
    "type": "object",
    "required": ["model_id", "model_type"],
    "properties": {
        "model_id": _ID,
        "model_type": {"type": "string", "enum": MODEL_TYPES},
        "model_path": {"type": "string", "minLength": 1, "maxLength": 4096},
        "max_batch_size": {"type": "integer", "minimum": 1, "maximum": 1024},
        "max_sequence_length": {"type": "integer", "minimum": 1, "maximum": 65536},
        "enable_quantization": {"type": "boolean"},
        "enable_tensor_cores": {"type": "boolean"},
        "enable_mixed_precision": {"type": "boolean"},
        "virtual_gpu_id": _ID,
        "priority": {"type": "integer", "minimum": 0, "maximum": 100,
                     "description": "scheduling priority on a vGPU with the priority policy"},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        "parameters": {"type": "object"},
    },
}

INFERENCE_OPTIONS = {
    "type": "object",
    "properties": {
        "temperature": {"type": "number", "minimum": 0, "maximum": 100},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4096},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600,
                    "description": "seconds before REQUEST_TIMEOUT (default from the server config)"},
    },
}

INFERENCE = {
    "type": "object",
    "required": ["model_id", "input_data"],
    "properties": {
        "model_id": _ID,
        "input_data": _MATRIX,
        "batch_size": {"type": "integer", "minimum": 1, "maximum": MAX_ROWS},
        "sequence_length": {"type": "integer", "minimum": 1, "maximum": 1_048_576,
                            "description": "each input_data row is cut to its first sequence_length values or "
                                           "padded with 0 at the end (rows may then differ in length)"},
        "data_type": {"type": "string", "enum": ["float32", "float16", "bfloat16", "int64", "int32"]},
        "session_id": {"type": "string", "minLength": 1, "maxLength": 2 * MAX_ID_LENGTH},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600,
                    "description": "same as options.timeout (kept for clients that send it here)"},
        "options": INFERENCE_OPTIONS,
    },
}

BATCH_INFERENCE = {
    "type": "object",
    "required": ["requests"],
    "properties": {"requests": {"type": "array", "minItems": 1, "maxItems": 256, "items": INFERENCE}},
}

SESSION = {
    "type": "object",
    "required": ["user_id", "model_id"],
    "properties": {"user_id": _ID, "model_id": _ID},
}

ALLOCATION = {
    "type": "object",
    "required": ["user_id", "memory_size", "compute_units", "duration"],
    "properties": {
        "user_id": _ID,
        "memory_size": {"type": "integer", "minimum": 1, "maximum": 2**50},
        "compute_units": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "duration": {"type": "integer", "minimum": 1, "maximum": 30 * 86400},
        "gpu_id": {"type": "integer", "minimum": 0, "maximum": 1024},
    },
}

VGPU = {
    "type": "object",
    "required": ["virtual_gpu_id", "memory_size", "compute_units"],
    "properties": {
        "virtual_gpu_id": _ID,
        "memory_size": {"type": "integer", "minimum": 1, "maximum": 2**50},
        "compute_units": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "scheduling_policy": {"type": "string", "enum": ["round_robin", "priority", "fair_share"]},
        "physical_gpu_id": {"type": "integer", "minimum": 0, "maximum": 1024},
        "priority": {"type": "integer", "minimum": 0, "maximum": 100},
    },
}

_LABELS = {
    "type": "array", "minItems": 1, "maxItems": MAX_ROWS,
    "description": "one row per training row: one-hot / target rows, or class indices (a flat list); "
                   "for a transformer, target token ids shaped like training_data (omit for next-token)",
}

TRAINING = {
    "type": "object",
    "required": ["model_id", "training_data"],
    "properties": {
        "model_id": _ID,
        "training_data": _MATRIX,
        "labels": _LABELS,
        "epochs": {"type": "integer", "minimum": 1, "maximum": 10_000},
        "learning_rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
        "optimizer": {"type": "string", "enum": ["adam", "adamw", "sgd"]},
        "loss_function": {"type": "string", "enum": ["cross_entropy", "mse"]},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        "save_path": {"type": "string", "minLength": 1, "maxLength": 4096},
        "hyperparameters": {"type": "object", "properties": {
            "batch_size": {"type": "integer", "minimum": 1, "maximum": MAX_ROWS},
            "gradient_clip_norm": {"type": "number", "exclusiveMinimum": 0, "maximum": 1e6},
            "weight_decay": {"type": "number", "minimum": 0, "maximum": 10},
            "momentum": {"type": "number", "minimum": 0, "maximum": 1},
        }},
    },
}

OPTIMIZE = {
    "type": "object",
    "required": ["optimization_type"],
    "properties": {
        "optimization_type": {"type": "string", "enum": ["quantization", "mixed_precision"]},
        "target_precision": {"type": "string", "enum": ["int8", "fp16", "float16", "half", "bf16", "bfloat16"]},
        "calibration_data": _MATRIX,
        "options": {"type": "object", "properties": {
            "preserve_accuracy": {"type": "boolean"},
            "max_accuracy_loss": {"type": "number", "minimum": 0, "maximum": 1},
            "weight_only": {"type": "boolean"},
            "accuracy_metric": {"type": "string",
                                "enum": ["top1_disagreement", "relative_error", "next_token_disagreement"]},
            "compression_ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                                  "description": "informational: the ratio reached is measured and returned"},
        }},
    },
}


def parse(req, schema: dict) -> dict:
    """The request's JSON body, validated against `schema`."""
    body = req.get_media()
    validate(schema, body)
    return body


_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool,
}


def validate(schema: dict, value, path: str = "body") -> None:
    """Raise InvalidInputData naming the first field that breaks `schema`."""
    kind = schema.get("type")
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"must be an integer, got {_name(value)}", value)
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"must be a number, got {_name(value)}", value)
    elif kind is not None and not isinstance(value, _TYPES[kind]):
        _fail(path, f"must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {_name(value)}", value)
    if "enum" in schema and value not in schema["enum"]:
        _fail(path, f"must be one of {', '.join(map(str, schema['enum']))}", value)
    if "minimum" in schema and value < schema["minimum"]:
        _fail(path, f"must be >= {schema['minimum']}", value)
    if "maximum" in schema and value > schema["maximum"]:
        _fail(path, f"must be <= {schema['maximum']}", value)
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        _fail(path, f"must be > {schema['exclusiveMinimum']}", value)
    if kind == "string":
        if len(value) < schema.get("minLength", 0):
            _fail(path, f"must have at least {schema['minLength']} characters", value)
        if len(value) > schema.get("maxLength", 1 << 30):
            _fail(path, f"must have at most {schema['maxLength']} characters", None)
        if "pattern" in schema and not re.match(schema["pattern"], value):
            _fail(path, "may contain only letters, digits and . _ : @ - (starting with a letter or digit)", value)
    elif kind == "array":
        if len(value) < schema.get("minItems", 0):
            _fail(path, f"must have at least {schema['minItems']} items", None)
        if len(value) > schema.get("maxItems", 1 << 62):
            _fail(path, f"must have at most {schema['maxItems']} items", None)
        items = schema.get("items")
        if items is not None and items.get("type") in ("object", "string"):  # numeric matrices: see as_matrix
            for i, item in enumerate(value):
                validate(items, item, f"{path}[{i}]")
    elif kind == "object":
        for name in schema.get("required", []):
            if name not in value or value[name] is None:  # null reads as absent
                _fail(f"{path}.{name}", "is required", None)
        for name, sub in schema.get("properties", {}).items():
            if name in value and value[name] is not None and name != "input_data":
                validate(sub, value[name], f"{path}.{name}")
            elif name == "input_data" and name in value:
                validate({k: v for k, v in sub.items() if k != "items"}, value[name], f"{path}.{name}")


def as_matrix(value, path: str = "body.input_data") -> np.ndarray:
    """Rows of numbers -> a 2-D numpy array (int64 if all integers, else float32).

    NaN/Inf cannot arrive through JSON numbers, but NaN/Infinity literals some
    encoders emit are refused by the parser; the models refuse non-finite values too.
    """
    if not isinstance(value, list) or not value:
        _fail(path, "must be a non-empty array of rows", None)
    if not all(isinstance(row, list) for row in value):
        _fail(path, "must be an array of rows (arrays of numbers)", None)
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        _fail(path, "rows must all have the same length", None)
    if array.ndim != 2 or array.shape[1] == 0:
        _fail(path, "must be a rectangular 2-D array of numbers with at least one column", None)
    if array.size > MAX_ELEMENTS:
        _fail(path, f"has {array.size} elements, more than the limit of {MAX_ELEMENTS}", None)
    if array.dtype.kind in "iu":
        if array.dtype.kind == "u" and array.max() > np.iinfo(np.int64).max:  # would wrap around
            _fail(path, "holds an integer beyond the int64 range", None)
        return array.astype(np.int64, copy=False)
    if array.dtype.kind == "f":
        with np.errstate(over="ignore"):  # overflow becomes inf, refused just below
            array = array.astype(np.float32)
        if not np.isfinite(array).all():
            _fail(path, "must contain only finite numbers within float32 range", None)
        return array
    _fail(path, "must contain only numbers", None)


def _name(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null", int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _fail(path: str, problem: str, value) -> None:
    details = {"field": path}
    if value is not None and isinstance(value, (int, float, str, bool)) and len(str(value)) <= 200:
        details["value"] = value
    raise InvalidInputData(f"{path} {problem}", details)
