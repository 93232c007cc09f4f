"""The OpenAPI 3 document, built from the same msgspec Structs that decode request bodies
(schemas.py), with an example for every operation, and from the one code -> status table of
api/errors.py."""
from __future__ import annotations

import msgspec

import msmartcompute

from . import schemas
from .errors import STATUS_BY_CODE

_NUM = {"type": "number"}
_NULLABLE_NUM = {"type": "number", "nullable": True}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}
_ROWS = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
_MODEL = {"type": "object", "properties": {
    "model_id": _STR, "model_type": _STR, "status": _STR, "memory_usage": _INT, "load_time": _TIME,
    "virtual_gpu_id": {"type": "string", "nullable": True}, "device": _STR}}
_SESSION = {"session_id": _STR, "user_id": _STR, "model_id": _STR, "created_at": _TIME, "expires_at": _TIME}
_ALLOCATION = {"allocation_id": _STR, "user_id": _STR, "gpu_id": _INT, "memory_size": _INT,
               "compute_units": _INT, "start_time": _TIME, "end_time": _TIME}
_VGPU = {"virtual_gpu_id": _STR, "physical_gpu_id": _INT, "memory_size": _INT, "compute_units": _INT,
         "status": _STR, "created_at": _TIME, "scheduling_policy": _STR}
_METRICS = {"gpu_utilization": _NULLABLE_NUM, "memory_utilization": _NULLABLE_NUM, "temperature": _NULLABLE_NUM,
            "power_usage": _NULLABLE_NUM, "throughput": _NUM, "latency": _NULLABLE_NUM,
            "active_requests": _INT, "queued_requests": _INT, "total_requests": _INT,
            "successful_requests": _INT, "failed_requests": _INT}
_ERROR_ITEM = {"type": "object", "properties": {"code": _STR, "message": _STR, "details": {"type": "object"}}}
# extension: with input_text, the generated text per row (and why each row stopped)
_TEXT_OUT = {"output_text": {"type": "array", "items": _STR,
                             "description": "decoded output rows (requests sent as input_text)"},
             "finish_reasons": {"type": "array", "items": {"type": "string", "enum": ["stop", "length"]},
                                "description": "per generated row: stop (end-of-sequence token) or length"},
             "prompt_tokens": {"type": "integer", "description": "tokens the input_text became"}}
_INFERENCE_RESULT = {"request_id": _STR, "status": _STR, "output_data": {**_ROWS, "nullable": True},
                     "inference_time": _NULLABLE_NUM, "completion_time": {**_TIME, "nullable": True},
                     "error": {**_ERROR_ITEM, "nullable": True}, **_TEXT_OUT}
_TRAINING_RESULT = {"request_id": _STR, "status": _STR, "final_loss": _NULLABLE_NUM,
                    "loss_history": {"type": "array", "items": _NUM}, "training_time": _NULLABLE_NUM,
                    "completion_time": {**_TIME, "nullable": True}, "epochs": _INT, "epochs_completed": _INT,
                    "current_loss": _NULLABLE_NUM, "model_updated": {"type": "boolean", "nullable": True},
                    "error": {**_ERROR_ITEM, "nullable": True}}
_NULLABLE_STR = {"type": "string", "nullable": True}
_JOB = {"type": "object", "properties": {
    "request_id": _STR, "kind": {"type": "string", "enum": ["inference", "training"]}, "status": _STR,
    "model_id": _NULLABLE_STR, "owner": _NULLABLE_STR, "created_at": _TIME, "started_at": {**_TIME, "nullable": True},
    "completed_at": {**_TIME, "nullable": True}, "error": _NULLABLE_STR, "epochs": {"type": "integer", "nullable": True},
    "epochs_completed": _INT, "current_loss": _NULLABLE_NUM, "loss_history": {"type": "array", "items": _NUM}}}

# (method, path, summary, request schema or None, response fields, auth needed, admin only)
OPERATIONS = [
    ("get", "/health", "Health of the platform (also at /api/v1/health)", None,
     {"status": _STR, "version": _STR, "uptime": _NUM, "gpu_status": _STR, "memory_usage": _NUM}, False),
    ("post", "/api/v1/models", "Load a model (admin)", schemas.LoadModel,
     {"model_id": _STR, "message": _STR, "memory_allocated": _INT, "load_time": _NUM}, True),
    ("get", "/api/v1/models", "List loaded models", None, {"models": {"type": "array", "items": _MODEL}}, True),
    ("get", "/api/v1/models/{model_id}", "One loaded model", None, _MODEL["properties"], True),
    ("delete", "/api/v1/models/{model_id}", "Unload a model (admin)", None, {"model_id": _STR, "message": _STR}, True),
    ("post", "/api/v1/inference", "Synchronous inference (decoders: options.stream for Server-Sent Events)",
     schemas.Inference,
     {**_TEXT_OUT, "request_id": _STR, "output_data": _ROWS, "inference_time": _NUM, "tokens_generated": _INT,
      "memory_used": _INT}, True),
    ("post", "/api/v1/inference/async", "Queue asynchronous inference", schemas.Inference,
     {"request_id": _STR, "status": _STR, "estimated_completion": _TIME}, True),
    ("get", "/api/v1/inference/{request_id}", "Result of an asynchronous inference", None, _INFERENCE_RESULT, True),
    ("post", "/api/v1/inference/batch", "Several inference requests in one call", schemas.BatchInference,
     {"results": {"type": "array", "items": {"type": "object", "properties": {
         "request_id": _STR, "output_data": _ROWS, "inference_time": _NUM, "error": _ERROR_ITEM,
         **_TEXT_OUT}}},
      "total_time": _NUM}, True),
    ("post", "/api/v1/models/{model_id}/optimize", "Quantize (int8) or convert to half precision (admin)",
     schemas.Optimize,
     {"model_id": _STR, "optimization_type": _STR, "target_precision": _STR, "mode": _STR,
      "original_size": _INT, "optimized_size": _INT, "compression_ratio": _NUM, "accuracy_loss": _NULLABLE_NUM,
      "accuracy_metric": _NULLABLE_STR, "accuracy_note": _NULLABLE_STR, "optimization_time": _NUM,
      "model_updated": {"type": "boolean"}, "reason": _NULLABLE_STR}, True),
    ("post", "/api/v1/training", "Synchronous training", schemas.Training,
     {"request_id": _STR, "final_loss": _NUM, "loss_history": {"type": "array", "items": _NUM},
      "training_time": _NUM, "epochs_completed": _INT, "model_updated": {"type": "boolean"}, "seed": _INT}, True),
    ("post", "/api/v1/training/async", "Queue asynchronous training", schemas.Training,
     {"request_id": _STR, "status": _STR, "estimated_completion": _TIME}, True),
    ("get", "/api/v1/training/{request_id}", "Progress or result of an asynchronous training", None,
     _TRAINING_RESULT, True),
    ("delete", "/api/v1/training/{request_id}",
     "Cancel an asynchronous training (extension): a queued one at once, a running one at its next mini-batch",
     None, {"request_id": _STR, "status": _STR, "message": _STR}, True),
    ("get", "/api/v1/jobs", "The latest async inference and training jobs, newest first (a user sees theirs)",
     None, {"jobs": {"type": "array", "items": _JOB}}, True),
    ("post", "/api/v1/sessions", "Create a session", schemas.Session, _SESSION, True),
    ("get", "/api/v1/sessions/{session_id}", "Read a session", None, _SESSION, True),
    ("delete", "/api/v1/sessions/{session_id}", "End a session", None, {"session_id": _STR, "message": _STR}, True),
    ("get", "/api/v1/metrics", "Current performance metrics (null where unmeasurable)", None,
     {"metrics": {"type": "object", "properties": _METRICS}}, True),
    ("get", "/api/v1/metrics/history", "Historical metrics aggregated by interval", None,
     {"history": {"type": "array", "items": {"type": "object"}}}, True),
    ("post", "/api/v1/resources", "Allocate compute resources", schemas.Allocation, _ALLOCATION, True),
    ("get", "/api/v1/resources", "List allocations (a user sees their own)", None,
     {"allocations": {"type": "array", "items": {"type": "object", "properties": _ALLOCATION}}}, True),
    ("get", "/api/v1/resources/{allocation_id}", "Read an allocation", None, _ALLOCATION, True),
    ("delete", "/api/v1/resources/{allocation_id}", "Free an allocation", None,
     {"allocation_id": _STR, "message": _STR}, True),
    ("post", "/api/v1/virtualization/gpus", "Create a virtual GPU (admin)", schemas.VirtualGpu, _VGPU, True),
    ("get", "/api/v1/virtualization/gpus", "List virtual GPUs", None,
     {"virtual_gpus": {"type": "array", "items": {"type": "object", "properties": _VGPU}}}, True),
    ("get", "/api/v1/virtualization/gpus/{virtual_gpu_id}", "Read a virtual GPU", None, _VGPU, True),
    ("delete", "/api/v1/virtualization/gpus/{virtual_gpu_id}", "Destroy a virtual GPU (admin)", None,
     {"virtual_gpu_id": _STR, "message": _STR}, True),
]

_QUERY = {
    "/api/v1/metrics/history": [
        {"name": "start_time", "in": "query", "schema": {"type": "string", "format": "date-time"},
         "example": "2026-01-01T00:00:00Z"},
        {"name": "end_time", "in": "query", "schema": {"type": "string", "format": "date-time"},
         "example": "2026-01-01T01:00:00Z"},
        {"name": "interval", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 86400},
         "example": 300},
    ],
    "/api/v1/jobs": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                      "example": 20}],
}


def _request_schemas() -> dict:
    """components.schemas for every request body, generated by msgspec from the Structs that
    decode them, in OpenAPI 3.0 form; `parameters` of POST /models typed per model_type."""
    bodies = sorted({op[3] for op in OPERATIONS if op[3] is not None} | set(schemas.PARAMETERS.values()),
                    key=lambda t: t.__name__)
    _, components = msgspec.json.schema_components(bodies, ref_template="#/components/schemas/{name}")
    out = {name: _openapi30(schema) for name, schema in components.items()}
    by_type = {}
    for model_type, params in schemas.PARAMETERS.items():
        by_type.setdefault(params.__name__, []).append(model_type)
    out["LoadModel"]["properties"]["parameters"] = {
        "anyOf": [{"$ref": f"#/components/schemas/{name}"} for name in by_type], "nullable": True,
        "description": "typed by model_type: " + "; ".join(f"{', '.join(types)} -> {name}"
                                                            for name, types in by_type.items())}
    return out


def _openapi30(node):
    """msgspec writes JSON Schema 2020-12; OpenAPI 3.0 wants `nullable` instead of a null type
    and exclusiveMinimum as a flag."""
    if isinstance(node, list):
        return [_openapi30(n) for n in node]
    if not isinstance(node, dict):
        return node
    if "anyOf" in node and {"type": "null"} in node["anyOf"]:
        rest = [n for n in node["anyOf"] if n != {"type": "null"}]
        extra = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
        if len(rest) == 1:
            base = _openapi30(rest[0])
            if "$ref" in base:
                return {"allOf": [base], "nullable": True, **extra}
            # OpenAPI 3.0.3: with an enum, null is allowed only when the enum lists it
            return {**base, "nullable": True, **extra, **({"enum": [*base["enum"], None]} if "enum" in base else {})}
        return {"anyOf": _openapi30(rest), "nullable": True, **extra}
    out = {}
    for key, value in node.items():
        if key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"], out[key] = value, True
        elif key == "required" and not value:
            continue
        elif key == "default" and value is None:
            continue
        else:
            out[key] = _openapi30(value)
    return out


_PATH_EXAMPLES = {"model_id": "classifier", "request_id": "req_1", "session_id": "alice_1",
                  "allocation_id": "alloc_1", "virtual_gpu_id": "vgpu-a"}


def _envelope(fields: dict) -> dict:
    return {"type": "object", "required": ["success", "error", "timestamp"], "properties": {
        "success": {"type": "boolean"}, "error": {"nullable": True}, "timestamp": _TIME, **fields}}


def build_document() -> dict:
    error_codes = sorted(STATUS_BY_CODE)
    paths: dict = {}
    for method, path, summary, request, response, secured in OPERATIONS:
        op = {
            "summary": summary,
            "operationId": f"{method}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "responses": {
                "200": {"description": "Success", "content": {"application/json": {"schema": _envelope(response)}}},
                "default": {"description": "Error (see components.schemas.Error for the codes)",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        }
        params = [{"name": name.strip("{}"), "in": "path", "required": True,
                   "schema": {"type": "string", "minLength": 1, "maxLength": 256},
                   "example": _PATH_EXAMPLES[name.strip("{}")]}
                  for name in path.split("/") if name.startswith("{")]
        params += _QUERY.get(path, [])
        if params:
            op["parameters"] = params
        if request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{request.__name__}"},
                "example": schemas.EXAMPLES[request]}}}
        if not secured:
            op["security"] = []
        paths.setdefault(path, {})[method] = op
    paths["/api/v1/inference"]["post"]["responses"]["200"]["content"]["text/event-stream"] = {
        "schema": {"type": "string", "description": "with options.stream (decoders): Server-Sent Events, one "
                   "`data:` event {request_id, token_ids: [new ids per row]} per generation step, then "
                   "`event: done` with the envelope above (or `event: error` with the error envelope)"}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "MSmartCompute API", "version": msmartcompute.__version__,
                 "description": "Every error uses the envelope in components.schemas.Error; the HTTP status "
                                "of each code: " + ", ".join(f"{c} {STATUS_BY_CODE[c][:3]}" for c in error_codes)},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {**_request_schemas(), "Error": {"type": "object", "required": ["success", "error", "timestamp"], "properties": {
                "success": {"type": "boolean", "enum": [False]},
                "error": {"type": "object", "required": ["code", "message", "details"], "properties": {
                    "code": {"type": "string", "enum": error_codes}, "message": _STR,
                    "details": {"type": "object"}}},
                "timestamp": _TIME}}},
        },
    }


class OpenApiResource:
    def __init__(self):
        self.document = build_document()

    def on_get(self, req, resp):
        resp.media = self.document
