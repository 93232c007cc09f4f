"""OpenAI-compatible routes beside the seed's API: GET /v1/models, POST /v1/completions,
/v1/chat/completions and /v1/embeddings, on the same models and keys (Bearer).

Each resource turns an OpenAI body into one runtime inference request (prompts x n rows
of input_text, generated together by the generation engine) and the result into OpenAI's
response shape. Errors on these paths use OpenAI's shape (api/errors.py). `stream=true`
answers as Server-Sent Events in OpenAI's chunk format, token by token: each engine step's
text deltas (`Inference.infer_stream`) become one chunk per choice that has new text, then a
chunk with each choice's finish_reason, the usage chunk when `stream_options.include_usage`,
and `data: [DONE]`; an error after the first chunk is an `{"error": ...}` event. Closing the
connection cancels the generation at its next step.

`stop` strings end a choice's generation at the token that completes one (finish_reason
"stop"; the text is cut before it, and a stream never sends any of it). Extensions (as vLLM
takes them): `top_k`, `ignore_eos`."""
from __future__ import annotations

import base64
import time
from typing import Iterator

import falcon
import numpy as np
import orjson

from ..runtime.errors import InvalidInputData, MSCError
from .errors import openai_error_of
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
    top_k = _get(body, "top_k", int, None, lambda v: v >= -1, "an integer >= -1 (-1 or 0: off)")
    if top_k is not None:
        options["top_k"] = max(0, top_k)
    if _get(body, "ignore_eos", bool, False):
        options["ignore_eos"] = True
    stops = _stops(body)
    if stops:
        options["stop"] = stops
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


def _request(model_id: str, prompts: list[str], body: dict, *, framed: bool) -> dict:
    """The runtime request for prompts x n choices (choice i is row i: prompt i // n)."""
    n = _get(body, "n", int, 1, lambda v: 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]")
    if len(prompts) * n > MAX_CHOICES:  # every choice is a row of one request
        raise _bad("n", f"prompts x n = {len(prompts) * n} choices, more than the limit of {MAX_CHOICES}")
    request = {"model_id": model_id, "input_text": [p for p in prompts for _ in range(n)],
               "options": _sampling(body)}
    if framed:  # the chat template already placed the special tokens
        request["add_special_tokens"] = False
    return request


def _usage(result: dict) -> dict:
    prompt, completion = int(result["prompt_tokens"]), int(result["tokens_generated"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _answer(runtime, resp, body: dict, request: dict, reply, head, choice) -> None:
    """Run the request: `reply(result)` is the whole response body; with stream=true the chunks
    go out as they are generated, each `head(request_id)` plus choices built by
    `choice(index, text delta or None, finish_reason or None)`."""
    if body.get("stream") is not True:
        resp.media = reply(runtime.inference.infer(request))
        return
    events = runtime.inference.infer_stream(request)   # a bad request fails here, as a plain JSON error
    resp.content_type = "text/event-stream"
    resp.set_header("Cache-Control", "no-cache")
    resp.stream = _server_sent_events(_chunks(events, head, choice, _include_usage(body)))


def _chunks(events, head, choice, include_usage: bool) -> Iterator[dict]:
    """The engine's events -> OpenAI chunks, one choice each (as OpenAI sends them): each step's
    new text per choice, then every choice's finish_reason, then the usage when asked."""
    try:
        for event in events:
            top = head(event["request_id"])
            if "output_data" in event:  # the final response
                for i, why in enumerate(event["finish_reasons"]):
                    yield {**top, "choices": [choice(i, None, why)]}
                if include_usage:
                    yield {**top, "choices": [], "usage": _usage(event)}
                return
            for i, text in enumerate(event["text"]):
                if text:
                    yield {**top, "choices": [choice(i, text, None)]}
    finally:
        events.close()


def _server_sent_events(chunks) -> Iterator[bytes]:
    """Chunks as `data:` events, then [DONE]; an error mid-stream is an error event in OpenAI's
    shape. When the client goes away waitress closes this iterator, which closes the engine's
    stream: the generation is cancelled at its next step."""
    try:
        for chunk in chunks:
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        yield b"data: [DONE]\n\n"
    except MSCError as exc:
        yield b"data: " + orjson.dumps(openai_error_of(exc)) + b"\n\n"
    finally:
        chunks.close()


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
        request = _request(model_id, prompts, body, framed=False)
        head = {"object": "text_completion", "created": int(time.time()), "model": model_id}

        def reply(result):
            return {"id": "cmpl-" + result["request_id"], **head, "usage": _usage(result), "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                for i, (text, reason) in enumerate(zip(result["output_text"], result["finish_reasons"]))]}

        def choice(i, text, reason):
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}

        _answer(self.runtime, resp, body, request, reply, lambda rid: {"id": "cmpl-" + rid, **head}, choice)


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
        request = _request(model_id, [prompt], body, framed=True)
        head = {"created": int(time.time()), "model": model_id}

        def reply(result):
            return {"id": "chatcmpl-" + result["request_id"], **head, "object": "chat.completion",
                    "usage": _usage(result), "choices": [
                        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                        for i, (text, reason) in enumerate(zip(result["output_text"], result["finish_reasons"]))]}

        started = set()

        def choice(i, text, reason):
            delta = {} if text is None else {"content": text}
            if i not in started:  # a choice's first chunk names the role
                started.add(i)
                delta = {"role": "assistant", **delta}
            return {"index": i, "delta": delta, "finish_reason": reason}

        _answer(self.runtime, resp, body, request, reply,
                lambda rid: {"id": "chatcmpl-" + rid, **head, "object": "chat.completion.chunk"}, choice)


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
