"""Request bodies as msgspec Structs: they decode and validate each body in one pass (unknown
fields refused) and generate the OpenAPI document (openapi.py), so the two cannot drift apart.
`input_data` and its kin then become numpy matrices (as_matrix)."""
from __future__ import annotations

import re
from typing import Annotated, Literal

import falcon
import msgspec
import numpy as np
from msgspec import Meta, Struct

from ..runtime.errors import InvalidInputData
from ..runtime.ids import ID_PATTERN, MAX_ID_LENGTH

# Limits on what one request may ask for; the body-size limit is in ApiConfig.
MAX_ROWS = 65_536
MAX_ELEMENTS = 16_777_216
MAX_SEED = 2**63 - 1

Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]
Path = Annotated[str, Meta(min_length=1, max_length=4096)]
Seed = Annotated[int, Meta(ge=0, le=MAX_SEED)]
Matrix = Annotated[list[list[int | float]], Meta(
    min_length=1, max_length=MAX_ROWS,
    description="rectangular rows of numbers (float features, or token ids for transformer/encoder)")]


def _int(low: int, high: int, description: str | None = None):
    return Annotated[int, Meta(ge=low, le=high, description=description)]


class Body(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A request body: a field it does not define is refused (a typo is never silently ignored);
    null reads as absent."""


# ---- POST /models: `parameters` typed per model_type -------------------------------------------
Activation = Literal["relu", "gelu", "silu", "tanh"]  # models.layers.ACTIVATIONS (a test keeps them equal)


class MLPParameters(Body):
    """parameters of an mlp: Linear, act, ..., Linear."""
    input_size: _int(1, 1 << 24)
    output_size: _int(1, 1 << 24)
    hidden_sizes: Annotated[list[_int(1, 1 << 24)], Meta(max_length=1024)] | None = None
    activation: Activation | None = None


class TransformerParameters(Body):
    """parameters of a transformer (decoder LM) or an encoder."""
    vocab_size: _int(1, 1 << 24)
    hidden_size: _int(1, 1 << 16)
    num_layers: _int(1, 1024)
    num_heads: _int(1, 1024)
    num_kv_heads: _int(1, 1024) | None = None
    intermediate_size: _int(1, 1 << 20) | None = None
    eos_token_id: _int(0, 1 << 24, "transformer: the token that ends a generated row") | None = None


class PretrainedParameters(Body):
    """parameters of a transformer or encoder loaded from model_path (a Hugging Face-format
    folder or a GPT-2 / Llama / BERT weights file): sizes are optional and must agree with the
    folder's config.json; a single weights file needs them."""
    architecture: Literal["llama", "mistral", "qwen2", "gpt2", "bert"] | None = None
    vocab_size: _int(1, 1 << 24) | None = None
    hidden_size: _int(1, 1 << 16) | None = None
    num_layers: _int(1, 1024) | None = None
    num_heads: _int(1, 1024) | None = None
    num_kv_heads: _int(1, 1024) | None = None
    intermediate_size: _int(1, 1 << 20) | None = None
    max_position_embeddings: _int(1, 1 << 24) | None = None
    rope_theta: Annotated[float, Meta(gt=0)] | None = None
    pooling: Annotated[Literal["mean", "cls"], Meta(description="encoder pooling without a "
                                                                 "sentence-transformers modules.json")] | None = None
    normalize: Annotated[bool, Meta(description="L2-normalise pooled encoder vectors")] | None = None


class ProgramParameters(Body):
    """parameters of a torchscript / exported program (model_path is the program file)."""
    input_size: _int(1, 1 << 24, "values per input row, when the program does not declare it") | None = None


PARAMETERS: dict[str, type] = {"mlp": MLPParameters, "transformer": TransformerParameters,
                               "encoder": TransformerParameters, "torchscript": ProgramParameters,
                               "exported": ProgramParameters}
MODEL_TYPES = list(PARAMETERS)


def parameters_type(model_type: str, model_path: str | None) -> type:
    """A transformer or encoder with a model_path may be a pretrained checkpoint."""
    if model_path and model_type in ("transformer", "encoder"):
        return PretrainedParameters
    return PARAMETERS[model_type]


class LoadModel(Body):
    model_id: Id
    model_type: Literal["transformer", "encoder", "mlp", "torchscript", "exported"]
    model_path: Annotated[Path, Meta(description="a weights file, or a Hugging Face-format checkpoint folder "
                                                 "(config.json, safetensors or .bin weights, tokenizer files)")] | None = None
    weights_path: Annotated[Path, Meta(description="extension: weights trained here (training save_path) for the "
                                                   "checkpoint folder in model_path")] | None = None
    max_batch_size: _int(1, 1024) | None = None
    max_sequence_length: _int(1, 65536) | None = None
    enable_quantization: bool | None = None
    enable_tensor_cores: bool | None = None
    enable_mixed_precision: bool | None = None
    virtual_gpu_id: Id | None = None
    priority: _int(0, 100, "scheduling priority on a vGPU with the priority policy") | None = None
    seed: Seed | None = None
    kv_cache_memory: Annotated[int, Meta(ge=1, le=2**50, description=(
        "transformer: bytes of its paged KV cache (default: enough for max_batch_size sequences of "
        "max_sequence_length, within the free memory of its virtual GPU or device)"))] | None = None
    parameters: Annotated[dict, Meta(description="by model_type: mlp -> MLPParameters; transformer, encoder "
                                                 "-> TransformerParameters (PretrainedParameters with a model_path); "
                                                 "torchscript, exported -> ProgramParameters")] | None = None


# ---- inference ----------------------------------------------------------------------------------
Timeout = Annotated[float, Meta(gt=0, le=3600)]


class InferenceOptions(Body):
    temperature: Annotated[float, Meta(ge=0, le=100)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    max_tokens: _int(1, 4096) | None = None
    seed: Seed | None = None
    timeout: Annotated[Timeout, Meta(description="seconds before REQUEST_TIMEOUT (default from the server "
                                                 "config)")] | None = None
    # extensions for decoders (transformer models), see models/sampling.py
    top_k: _int(0, 1 << 24, "keep the k most likely tokens (0: all)") | None = None
    stop_token_ids: Annotated[list[_int(0, 1 << 24)], Meta(
        max_length=64, description="token ids that end a row (not part of its output)")] | None = None
    stop: Annotated[str | list[str], Meta(description=(
        "a string or a list of strings that end a row at the token that completes one, across token "
        "boundaries (models with a tokenizer); the text is cut before it, and a stream never sends it"))] | None = None
    ignore_eos: Annotated[bool, Meta(description="keep generating past the model's EOS token")] | None = None
    stream: Annotated[bool, Meta(description=(
        "answer with Server-Sent Events (text/event-stream): one `data:` event {request_id, token_ids: "
        "[new ids per row]} per generation step (with input_text also text: [new text per row]), then "
        "`event: done` with the usual response envelope (or `event: error` with the error envelope)"))] | None = None


class Inference(Body):
    model_id: Id
    input_data: Matrix | None = None
    input_text: Annotated[str | Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1, max_length=MAX_ROWS)],
                          Meta(description="extension: text in place of input_data for a model whose checkpoint "
                                           "folder has a tokenizer (one row per string); the response then also "
                                           "carries output_text. One of input_data / input_text is required")] | None = None
    batch_size: _int(1, MAX_ROWS) | None = None
    sequence_length: _int(1, 1_048_576, "each input_data row is cut to its first sequence_length values or "
                                        "padded with 0 at the end (rows may then differ in length)") | None = None
    data_type: Literal["float32", "float16", "bfloat16", "int64", "int32"] | None = None
    session_id: Annotated[str, Meta(min_length=1, max_length=2 * MAX_ID_LENGTH)] | None = None
    timeout: Annotated[Timeout, Meta(description="same as options.timeout (kept for clients that send it "
                                                 "here)")] | None = None
    options: InferenceOptions | None = None


class BatchInference(Body):
    requests: Annotated[list[Inference], Meta(min_length=1, max_length=256)]


# ---- sessions, resources, virtual GPUs ----------------------------------------------------------
class Session(Body):
    user_id: Id
    model_id: Id


class Allocation(Body):
    user_id: Id
    memory_size: _int(1, 2**50)
    compute_units: _int(1, 1_000_000)
    duration: _int(1, 30 * 86400)
    gpu_id: _int(0, 1024) | None = None


class VirtualGpu(Body):
    virtual_gpu_id: Id
    memory_size: _int(1, 2**50)
    compute_units: _int(1, 1_000_000)
    scheduling_policy: Literal["round_robin", "priority", "fair_share"] | None = None
    physical_gpu_id: _int(0, 1024) | None = None
    priority: _int(0, 100) | None = None


# ---- training and optimization ------------------------------------------------------------------
class Hyperparameters(Body):
    batch_size: _int(1, MAX_ROWS) | None = None
    gradient_clip_norm: Annotated[float, Meta(gt=0, le=1e6)] | None = None
    weight_decay: Annotated[float, Meta(ge=0, le=10)] | None = None
    momentum: Annotated[float, Meta(ge=0, le=1)] | None = None


class Training(Body):
    model_id: Id
    training_data: Matrix
    labels: Annotated[list[int | float | list[int | float]], Meta(
        min_length=1, max_length=MAX_ROWS,
        description="one row per training row: one-hot / target rows, or class indices (a flat list); for a "
                    "transformer, target token ids shaped like training_data (omit for next-token)")] | None = None
    epochs: _int(1, 10_000) | None = None
    learning_rate: Annotated[float, Meta(gt=0, le=10)] | None = None
    optimizer: Literal["adam", "adamw", "sgd"] | None = None
    loss_function: Literal["cross_entropy", "mse"] | None = None
    seed: Seed | None = None
    save_path: Path | None = None
    hyperparameters: Hyperparameters | None = None


class OptimizeOptions(Body):
    preserve_accuracy: bool | None = None
    max_accuracy_loss: Annotated[float, Meta(ge=0, le=1)] | None = None
    weight_only: bool | None = None
    accuracy_metric: Literal["top1_disagreement", "relative_error", "next_token_disagreement"] | None = None
    compression_ratio: Annotated[float, Meta(
        gt=0, le=1, description="informational: the ratio reached is measured and returned")] | None = None


class Optimize(Body):
    optimization_type: Literal["quantization", "mixed_precision"]
    target_precision: Literal["int8", "fp16", "float16", "half", "bf16", "bfloat16"] | None = None
    calibration_data: Matrix | None = None
    options: OptimizeOptions | None = None


# An example body for every operation that takes one (the OpenAPI document shows them).
EXAMPLES: dict[type, dict] = {
    LoadModel: {"model_id": "classifier", "model_type": "mlp", "max_batch_size": 8,
                "parameters": {"input_size": 4, "hidden_sizes": [16], "output_size": 3}},
    Inference: {"model_id": "classifier", "input_data": [[0.1, 0.2, 0.3, 0.4]], "options": {"timeout": 5}},
    BatchInference: {"requests": [{"model_id": "classifier", "input_data": [[0.1, 0.2, 0.3, 0.4]]},
                                  {"model_id": "classifier", "input_data": [[0.5, 0.6, 0.7, 0.8]]}]},
    Session: {"user_id": "alice", "model_id": "classifier"},
    Allocation: {"user_id": "alice", "memory_size": 1048576, "compute_units": 1, "duration": 3600},
    VirtualGpu: {"virtual_gpu_id": "vgpu-a", "memory_size": 268435456, "compute_units": 1,
                 "scheduling_policy": "fair_share"},
    Training: {"model_id": "classifier", "training_data": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]],
               "labels": [0, 2], "epochs": 5, "learning_rate": 0.01, "optimizer": "adam",
               "loss_function": "cross_entropy", "hyperparameters": {"batch_size": 2}},
    Optimize: {"optimization_type": "quantization", "target_precision": "int8",
               "calibration_data": [[0.1, 0.2, 0.3, 0.4]], "options": {"preserve_accuracy": True,
                                                                        "max_accuracy_loss": 0.05}},
}


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def parse(req, body_type: type) -> dict:
    """The request's JSON body decoded into `body_type` (unknown fields refused), as a dict of
    the fields it sets; the error names the field."""
    if req.content_type and not _is_json(req.content_type):
        # a form or text/plain body (curl -d without -H, a cross-site form) is refused, not guessed at:
        # read as JSON it would let any web page post to an open loopback server without a preflight
        raise falcon.HTTPUnsupportedMediaType()
    raw = req.bounded_stream.read()
    if not raw:
        raise InvalidInputData("the request body is empty: send a JSON object", {"field": "body"})
    try:
        body = msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidInputData(f"the request body is not valid JSON: {exc}", {"field": "body"}) from None
    out = _fields(body)
    if body_type is LoadModel and body.parameters is not None:
        validate(parameters_type(body.model_type, body.model_path), body.parameters, "body.parameters")
    return out


def validate(body_type: type, value, path: str = "body"):
    """A decoded JSON value checked against `body_type`; raises InvalidInputData naming the field."""
    try:
        return msgspec.convert(value, body_type)
    except msgspec.ValidationError as exc:
        raise _invalid(exc, path) from None


def _fields(struct) -> dict:
    """The fields a body sets (null and absent alike left out), nested bodies as dicts."""
    out = {}
    for name in struct.__struct_fields__:
        value = getattr(struct, name)
        if value is None:
            continue
        if isinstance(value, Struct):
            value = _fields(value)
        elif isinstance(value, list) and value and isinstance(value[0], Struct):
            value = [_fields(v) for v in value]
        out[name] = value
    return out


_A = {"int": "an integer", "float": "a number", "int | float": "a number", "str": "a string", "bool": "a boolean",
      "array": "an array", "object": "an object", "null": "null"}


def _invalid(exc: msgspec.ValidationError, root: str = "body") -> InvalidInputData:
    """msgspec's message as ours: `<field> <problem>` with details.field."""
    message, _, where = str(exc).partition(" - at `$")
    path = root + where.rstrip("`")
    if m := re.fullmatch(r"Object (missing required|contains unknown) field `(.+)`", message):
        field = f"{path}.{m[2]}"
        problem = "is required" if m[1] == "missing required" else \
            "is not a field of this request (check its spelling in the API documentation)"
        return InvalidInputData(f"{field} {problem}", {"field": field})
    if m := re.fullmatch(r"Expected `([^`]+)`, got `([^`]+)`", message):
        problem = "is required" if m[2] == "null" else f"must be {_A.get(m[1], m[1])}, got {_A.get(m[2], m[2])}"
    elif m := re.fullmatch(r"Expected `[^`]+` (>=|<=|>|<) (\S+)", message):
        problem = f"must be {m[1]} {m[2].removesuffix('.0')}"
    elif m := re.fullmatch(r"Expected `(str|array|object)` of length (>=|<=) (\d+)", message):
        unit = "characters" if m[1] == "str" else "items"
        problem = f"must have {'at least' if m[2] == '>=' else 'at most'} {m[3]} {unit}"
    elif message.startswith("Expected `str` matching regex"):
        problem = "may contain only letters, digits and . _ : @ - (starting with a letter or digit)"
    elif m := re.fullmatch(r"Invalid enum value (.+)", message):
        problem = f"has an unknown value {m[1]}"
    else:
        problem = message
    return InvalidInputData(f"{path} {problem}", {"field": path})


_FLOAT32_MAX = float(np.finfo(np.float32).max)


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
        largest = np.abs(array).max()
        # numpy turns an integer past int64 into a float silently: look for one, only when a
        # value that large is there at all (a vectorized test; the scan is the rare path)
        if largest >= 2.0 ** 63 and any(
                type(x) is int and not -2 ** 63 <= x < 2 ** 63 for row in value for x in row):
            _fail(path, "holds an integer beyond the int64 range", None)
        if largest <= _FLOAT32_MAX:  # the common case: every value fits, no overflow to look for
            return array.astype(np.float32)
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
