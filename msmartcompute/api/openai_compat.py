"""OpenAI-compatible routes beside the seed's API: GET /v1/models, POST /v1/completions,
/v1/chat/completions and /v1/embeddings, on the same models and keys (Bearer).

Each resource turns an OpenAI body into one runtime inference request (prompts x n rows
of input_text, so they share one batch) and the result into OpenAI's response shape.
Errors on these paths use OpenAI's shape (api/errors.py). `stream=true` answers as
Server-Sent Events in OpenAI's chunk format; the finished result comes as one chunk per
choice (token-by-token streaming needs the generation engine), then `data: [DONE]`.

`stop` strings cut the generated text at the first one (finish_reason "stop"); the model
still generated up to max_tokens or its end-of-sequence token, so usage counts those."""
from __future__ import annotations

import base64
import time

import falcon
import numpy as np
import orjson

from ..runtime.errors import InvalidInputData
from .schemas import MAX_ROWS

MAX_N = 16
MAX_CHOICES = 256


def _bad(field: str, message: str):
    return InvalidInputData(message, {"field": field})


def _body(req) -> dict:
    body = req.get_media()
    if not isinstance(body, dict):
        raise _bad("body", "the request body must be a JSON object")
    return body


def _get(body: dict, name: str, kind, default=None, check=None, rule: str = ""):
    """body[name] of `kind` (None -> default), optionally passing `check`; else a 400 naming it."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) or (check and not check(value)):
        raise _bad(name, f"{name} must be {rule or kind.__name__}, got {value!r}"[:300])
    return value


def _model(body: dict, runtime, model_type: str) -> str:
    model_id = _get(body, "model", str, rule="a model id")
    if model_id is None:
        raise _bad("model", "model is required")
    found = runtime.registry.get(model_id)
    if found["model_type"] != model_type:
        kind = "completions and chat completions" if model_type == "transformer" else "embeddings"
        raise _bad("model", f"model {model_id!r} is a {found['model_type']} model; {kind} need a "
                            f"{model_type} model")
    return model_id


def _sampling(body: dict) -> dict:
    options = {"max_tokens": _get(body, "max_tokens", int, 16, lambda v: v >= 1, "an integer >= 1"),
               "temperature": _get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "in [0, 2]"),
               "top_p": _get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "in (0, 1]")}
    seed = _get(body, "seed", int, None, lambda v: v >= 0, "a non-negative integer")
    if seed is not None:
        options["seed"] = seed
    if body.get("max_completion_tokens") is not None:  # the chat API's newer name
        options["max_tokens"] = _get(body, "max_completion_tokens", int, 16, lambda v: v >= 1, "an integer >= 1")
    for name in ("logprobs", "top_logprobs", "suffix", "tools", "functions", "logit_bias"):
        if body.get(name) not in (None, False, {}, []):
            raise _bad(name, f"{name} is not supported by this server")
    if body.get("echo") or (body.get("best_of") or 1) > 1:
        raise _bad("echo" if body.get("echo") else "best_of", "echo and best_of are not supported by this server")
    return options


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", "stop must be a non-empty string or a list of up to 4 non-empty strings")
    return stops


def _cut(text: str, stops: list[str], reason: str) -> tuple[str, str]:
    """text up to the first stop string (finish_reason "stop"), else unchanged."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], "stop") if cut >= 0 else (text, reason)


def _generate(runtime, model_id: str, prompts: list[str], body: dict, *, framed: bool) -> tuple[dict, list]:
    """Run prompts x n through the model: (runtime result, [(text, finish_reason)] per choice)."""
    n = _get(body, "n", int, 1, lambda v: 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]")
    if len(prompts) * n > MAX_CHOICES:  # every choice is a row of one batch
        raise _bad("n", f"prompts x n = {len(prompts) * n} choices, more than the limit of {MAX_CHOICES}")
    stops = _stops(body)
    request = {"model_id": model_id, "input_text": [p for p in prompts for _ in range(n)],
               "options": _sampling(body)}
    if framed:  # the chat template already placed the special tokens
        request["add_special_tokens"] = False
    result = runtime.inference.infer(request)
    choices = [_cut(text, stops, reason) for text, reason in zip(result["output_text"], result["finish_reasons"])]
    return result, choices


def _usage(result: dict) -> dict:
    prompt, completion = int(result["prompt_tokens"]), int(result["tokens_generated"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _stream(resp, chunks: list[dict]) -> None:
    """Server-Sent Events: one `data:` line per chunk, then [DONE]."""
    resp.content_type = "text/event-stream"
    resp.set_header("Cache-Control", "no-cache")
    resp.data = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class ModelsResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_get(self, req, resp):
        models = [m for m in self.runtime.registry.list() if m["status"] == "loaded"]
        resp.media = {"object": "list", "data": [
            {"id": m["model_id"], "object": "model", "created": int(time.time()), "owned_by": "msmartcompute",
             "model_type": m["model_type"]} for m in models]}


class CompletionsResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        body = _body(req)
        model_id = _model(body, self.runtime, "transformer")
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or len(prompts) > MAX_ROWS \
                or not all(isinstance(p, str) and p for p in prompts):
            raise _bad("prompt", "prompt must be a non-empty string or a list of non-empty strings")
        result, choices = _generate(self.runtime, model_id, prompts, body, framed=False)
        rid, created = "cmpl-" + result["request_id"], int(time.time())
        items = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                 for i, (text, reason) in enumerate(choices)]
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_id}
        if body.get("stream") is True:
            chunks = [{**head, "choices": [item]} for item in items]
            if _include_usage(body):
                chunks.append({**head, "choices": [], "usage": _usage(result)})
            return _stream(resp, chunks)
        resp.media = {**head, "choices": items, "usage": _usage(result)}


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with a role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is served here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise _bad(f"messages[{i}].content", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": content})
    return out


class ChatCompletionsResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        body = _body(req)
        model_id = _model(body, self.runtime, "transformer")
        prompt = self.runtime.inference.chat_prompt(model_id, _messages(body))
        result, choices = _generate(self.runtime, model_id, [prompt], body, framed=True)
        rid, created = "chatcmpl-" + result["request_id"], int(time.time())
        head = {"id": rid, "created": created, "model": model_id}
        if body.get("stream") is True:
            chunks = []
            for i, (text, reason) in enumerate(choices):
                chunks.append({**head, "object": "chat.completion.chunk", "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]})
                chunks.append({**head, "object": "chat.completion.chunk", "choices": [
                    {"index": i, "delta": {}, "finish_reason": reason}]})
            if _include_usage(body):
                chunks.append({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(result)})
            return _stream(resp, chunks)
        resp.media = {**head, "object": "chat.completion", "usage": _usage(result), "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            for i, (text, reason) in enumerate(choices)]}


class EmbeddingsResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_post(self, req, resp):
        body = _body(req)
        model_id = _model(body, self.runtime, "encoder")
        value = body.get("input")
        request = {"model_id": model_id}
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            request["input_text"] = [value] if isinstance(value, str) else value
        elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            request["input_data"] = [value]
        elif isinstance(value, list) and value and all(isinstance(r, list) and r for r in value):
            request["input_data"] = value  # token id rows, any lengths
        else:
            raise _bad("input", "input must be a string, a list of strings, or token ids (a list or a list of lists)")
        encoding = _get(body, "encoding_format", str, "float", lambda v: v in ("float", "base64"), "float or base64")
        if body.get("dimensions") is not None:
            raise _bad("dimensions", "dimensions is not supported: the model's embedding size is fixed")
        result = self.runtime.inference.infer(request)
        rows = np.asarray(result["output_data"], dtype=np.float32)
        prompt_tokens = result.get("prompt_tokens") or sum(len(r) for r in request.get("input_data", []))
        resp.media = {"object": "list", "model": model_id,
                      "data": [{"object": "embedding", "index": i,
                                "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode()
                                if encoding == "base64" else row.tolist()} for i, row in enumerate(rows)],
                      "usage": {"prompt_tokens": int(prompt_tokens), "total_tokens": int(prompt_tokens)}}


def install(app: falcon.App, runtime) -> None:
    app.add_route("/v1/models", ModelsResource(runtime))
    app.add_route("/v1/completions", CompletionsResource(runtime))
    app.add_route("/v1/chat/completions", ChatCompletionsResource(runtime))
    app.add_route("/v1/embeddings", EmbeddingsResource(runtime))
