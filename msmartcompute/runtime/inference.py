"""The inference service: POST /inference (sync, batch, async) and GET /inference/{id}.

A request goes through its model's batch queue (batching.py), a decoder's through its
generation worker (generation/worker.py; `infer_stream` streams its tokens); `inference_time` is seconds end
to end (queue wait + run). `memory_used`: on CUDA the allocator's peak growth during the run
that served it; on the host the bytes of this request's input and output tensors. Async
requests are persisted jobs (jobs.py) that take the same path from a worker thread and are
run again after a restart. A request may send input_text in place of input_data for a model
with a tokenizer; its result then carries output_text, finish_reasons and prompt_tokens."""
from __future__ import annotations

import queue as queue_module
import time
from typing import Callable, Iterator

import numpy as np
import orjson

from . import clock, ids
from .access import visible
from .batching import Executor, Pending, Result
from .caller import Caller
from .generation.worker import STREAM_END, GenerationWorker
from .errors import InternalError, InvalidInputData, MSCError, NotFound, RequestTimeout
from .jobs import JobRunner, error_dict
from .metrics import Metrics
from .registry import Registry
from .store import Store


# extension fields of a request sent as input_text (see prepare)
TEXT_FIELDS = ("output_text", "finish_reasons", "prompt_tokens")


def prepare(model, request: dict):
    """One request checked by its model -> (Prepared, prompt tokens of an input_text request).
    input_text (a string or a list of strings, one row each) is tokenized by the model's
    tokenizer in place of input_data (add_special_tokens false: a chat template framed it)."""
    text, data = request.get("input_text"), request.get("input_data")
    field = "input_data"
    if text is not None:
        if data is not None:
            raise InvalidInputData("give input_data or input_text, not both", {"field": "input_text"})
        field = "input_text"
        try:
            data = model.encode_text([text] if isinstance(text, str) else text,
                                     add_special_tokens=request.get("add_special_tokens", True))
        except ValueError as exc:
            raise InvalidInputData(str(exc), {"field": field}) from None
    elif data is None:
        raise InvalidInputData("input_data is required (or input_text for a model with a tokenizer)",
                               {"field": "input_data"})
    try:
        prepared = model.prepare(data, request.get("options") or {})
    except ValueError as exc:
        raise InvalidInputData(str(exc), {"field": field}) from None
    return prepared, (sum(len(row) for row in data) if text is not None else None)


def output_values_bound(model, prepared) -> int | None:
    """How many numbers a request's output holds at most, known before it runs: rows x
    max_tokens for a decoder, rows x the output width otherwise; None when only the run
    tells (a user program)."""
    if model.language_model:
        max_tokens = getattr(prepared.sampling, "max_tokens", None) or (prepared.options or {}).get("max_tokens")
        return None if max_tokens is None else prepared.rows * int(max_tokens)
    try:
        return prepared.rows * int(model.output_width)
    except NotImplementedError:
        return None


def output_values(data) -> int:
    """How many numbers an output holds (a numpy array, or ragged rows of generated ids)."""
    return int(data.size) if isinstance(data, np.ndarray) else sum(len(row) for row in data)


class OutputBudget:
    """The numbers one response may hold (RuntimeConfig.max_output_values). A JSON answer costs
    ~10-20 bytes a number, and several times that in memory while it is rendered, so a small
    request must not build a huge answer: checked before the run from the model's output
    shape, and after it from the real output. An inference/batch shares one budget."""

    def __init__(self, limit: int):
        self.limit = self.left = limit

    def check(self, values: int | None, when: str) -> None:
        if values is not None and values > self.left:
            raise InvalidInputData(
                f"the output would hold {values} values {when}, over the response limit of {self.limit} "
                "(max_output_values, shared by the requests of a batch): send fewer rows or a smaller max_tokens",
                {"field": "input_data", "output_values": values, "max_output_values": self.limit})

    def spend(self, values: int) -> None:
        self.left -= values


class Inference:
    def __init__(self, store: Store, registry: Registry, jobs: JobRunner, meter: Metrics,
                 request_timeout_s: float, job_workers: int, max_output_values: int = 1 << 22):
        self.store, self.registry, self.jobs, self.meter = store, registry, jobs, meter
        self.request_timeout_s = request_timeout_s
        self.job_workers = job_workers
        self.max_output_values = max_output_values
        jobs.register("inference", self._job, rerun_on_restart=True)

    def infer(self, request: dict) -> dict:
        """Run one request through its model's batch queue."""
        return self._infer(request, ids.request_id())

    def infer_then(self, request: dict, reply: Callable[[dict | None, MSCError | None], None],
                   inline_max_s: float | None = None) -> tuple[Executor, Pending, object]:
        """infer() with no thread waiting for it (the engine process's path): the request is checked
        and queued now (a bad one raises here), then reply(response, None) or reply(None, error) is
        called once, on the thread that finished it (its model's worker). The request is not waited
        for by a batching timer when its worker is free: a worker takes whatever is queued the
        moment it is free. The caller enforces the deadline: at Pending.deadline it abandons the
        request (Executor.abandon) and answers REQUEST_TIMEOUT itself, unless reply came first.
        inline_max_s: when the executor is idle and the model's recent runs took at most this
        long, the executor is claimed for the caller instead, and the third value returned is the
        queue to pass to executor.run_inline(queue, pending) (else None): the caller runs the
        batch itself, with whatever it queued meanwhile."""
        t0 = time.perf_counter()
        executor, pending, claimed = self._admit(request, ids.request_id(), t0, may_run_inline=inline_max_s is not None,
                                                 no_wait=True, inline_max_s=inline_max_s)
        model_id = request["model_id"]

        def finished(future) -> None:
            try:
                res = future.result()
            except MSCError as exc:
                reply(None, self._failed(exc, t0, model_id))
                return
            except BaseException as exc:  # the executors map run errors; anything else is a bug
                reply(None, self._failed(InternalError(f"inference failed: {type(exc).__name__}"), t0, model_id))
                return
            if res.done_at > pending.deadline:
                reply(None, self._failed(_timed_out(pending), t0, model_id))
                return
            try:
                self._spend(res, None)
            except MSCError as exc:
                reply(None, self._failed(exc, t0, model_id))
                return
            reply(self._response(pending, res, t0, model_id), None)

        pending.future.add_done_callback(finished)
        return executor, pending, claimed

    def infer_stream(self, request: dict) -> Iterator[dict]:
        """A decoder request whose tokens come as they are sampled. Checked and queued now (a
        bad request raises here, before anything streams); the iterator then yields
        {"request_id", "token_ids": [new ids per input row]} per step that produced any (plus
        "text": [new text per row] for a model with a tokenizer), and
        last the response infer() would give (an MSCError if it failed or timed out).
        Closing the iterator early (the client went away) cancels the request: it leaves
        the batch at the next step and its KV blocks are freed."""
        t0 = time.perf_counter()
        executor, pending, _ = self._admit(request, ids.request_id(), t0, stream=True)
        return self._stream_events(executor, pending, t0, request["model_id"])

    def _stream_events(self, executor: GenerationWorker, pending: Pending, t0: float,
                       model_id: str) -> Iterator[dict]:
        try:
            while time.monotonic() < pending.deadline:
                try:
                    event = pending.stream.get(timeout=min(1.0, max(0.0, pending.deadline - time.monotonic())))
                except queue_module.Empty:
                    continue
                ended = event is STREAM_END
                while not ended and not pending.stream.empty():  # a slow reader gets what piled up as one event
                    more = pending.stream.get_nowait()
                    ended = more is STREAM_END
                    if not ended:
                        event = {key: [a + b for a, b in zip(event[key], more[key])] for key in event}
                if event is not STREAM_END:
                    yield {"request_id": pending.request_id, **event}
                if ended:
                    break
            yield self._finish(executor, pending, t0, model_id)
        finally:
            if not pending.future.done():
                executor.abandon(pending)

    def infer_batch(self, requests: list[dict]) -> dict:
        """All requests are queued before any is awaited, so they can share batches. Their
        outputs share one OutputBudget: a request that would pass it fails alone."""
        t0 = time.perf_counter()
        queued, planned, budget = [], OutputBudget(self.max_output_values), OutputBudget(self.max_output_values)
        for request in requests:
            rid = ids.request_id()
            try:
                queued.append((rid, request, *self._enqueue(request, rid, budget=planned)[:2], None))
            except MSCError as exc:
                self.meter.record_inference(False, 0.0, model=self._label(request), code=exc.code)
                queued.append((rid, request, None, None, exc))
        results = []
        for rid, request, executor, pending, exc in queued:
            if exc is None:
                try:
                    out = self._finish(executor, pending, t0, request["model_id"], budget)
                    results.append({k: out[k] for k in ("request_id", "output_data", "inference_time",
                                                        *TEXT_FIELDS) if k in out})
                    continue
                except MSCError as e:
                    exc = e
            results.append({"request_id": rid, "error": error_dict(exc)})
        return {"results": results, "total_time": time.perf_counter() - t0}

    def submit(self, request: dict, caller: Caller | None = None) -> dict:
        """Queue an async inference job (validated now: model and input). estimated_completion:
        now + (jobs ahead / job workers + 1) x the mean duration of recent inference jobs (else
        the recent inference latency)."""
        entry = self.registry.entry(request.get("model_id"))
        prepared, _ = prepare(entry.model, request)
        OutputBudget(self.max_output_values).check(output_values_bound(entry.model, prepared), "(from the model)")
        rid = ids.request_id()
        stored = {k: v for k, v in request.items() if k != "input_data"}
        stored["request_id"] = rid
        if request.get("input_data") is not None:
            data = np.asarray(request["input_data"])
            stored.update(input_data=data.tolist(), input_dtype=data.dtype.name)
        owner = caller.user_id if caller else request.get("user_id")
        self.jobs.submit(rid, "inference", owner, stored)
        ahead = self.jobs.queued_ahead(rid)
        per_job = self.jobs.mean_duration("inference") or self.meter.recent_latency() or 0.0
        eta = clock.now() + (ahead // max(1, self.job_workers) + 1) * per_job
        return {"request_id": rid, "status": "queued", "estimated_completion": clock.iso(eta)}

    def get(self, request_id: str, caller: Caller | None = None) -> dict:
        job = self.jobs.get(request_id)
        if job is None or job["kind"] != "inference" or not visible(caller, job["owner"]):
            raise NotFound(f"inference request {request_id!r} not found")
        self.jobs.mark_read(job)
        result = job["result"] or {}
        out = {"request_id": request_id, "status": job["status"], "output_data": result.get("output_data"),
               "inference_time": result.get("inference_time"),
               "completion_time": clock.iso(job["completed_at"]) if job["status"] == "completed" else None}
        out.update({k: result[k] for k in TEXT_FIELDS if k in result})
        if job["status"] == "failed":
            out["error"] = {k: job["error"][k] for k in ("code", "message")}
        return out

    def chat_prompt(self, model_id: str, messages: list[dict]) -> str:
        """The prompt the model's chat template makes of `messages` (OpenAI chat format)."""
        model = self.registry.entry(model_id).model
        if model.tokenizer is None:
            raise InvalidInputData(f"model {model_id!r} has no tokenizer", {"field": "model"})
        try:
            return model.tokenizer.render_chat(messages)
        except ValueError as exc:
            raise InvalidInputData(str(exc), {"field": "messages"}) from None

    # ---- the path of one request ------------------------------------------------------------
    def _job(self, stored: dict, token) -> dict:
        """An async inference job; its token is not polled: an inference job is not cancellable
        and runs under the request's own deadline."""
        request = dict(stored)
        if stored.get("input_data") is not None:
            request["input_data"] = np.asarray(stored["input_data"], dtype=stored.get("input_dtype"))
        out = self._infer(request, stored["request_id"])
        # stored as JSON: the numbers a synchronous answer prints (float32's shortest form, not tolist()'s float64)
        out["output_data"] = orjson.loads(orjson.dumps(out["output_data"], option=orjson.OPT_SERIALIZE_NUMPY))
        return {k: out[k] for k in ("output_data", "inference_time", "tokens_generated", "memory_used",
                                    *TEXT_FIELDS) if k in out}

    def _infer(self, request: dict, request_id: str) -> dict:
        t0 = time.perf_counter()
        executor, pending, claimed = self._admit(request, request_id, t0, may_run_inline=True)
        if claimed is not None:  # the executor was idle: run it on this thread (see batching.py)
            executor.run_inline(claimed, pending)
        return self._finish(executor, pending, t0, request["model_id"])

    def _label(self, request: dict) -> str:
        """The model label of a metric: a loaded model's id, else "-" (label values stay few)."""
        model_id = request.get("model_id")
        return model_id if isinstance(model_id, str) and model_id in self.registry.models else "-"

    def _admit(self, request: dict, request_id: str, t0: float, **enqueue) -> tuple[Executor, Pending, object]:
        """_enqueue, counting a refused request in the metrics."""
        try:
            return self._enqueue(request, request_id, **enqueue)
        except MSCError as exc:
            self.meter.record_inference(False, time.perf_counter() - t0, model=self._label(request), code=exc.code)
            raise

    def _enqueue(self, request: dict, request_id: str, may_run_inline: bool = False, stream: bool = False,
                 no_wait: bool = False, budget: OutputBudget | None = None,
                 inline_max_s: float | None = None) -> tuple[Executor, Pending, object]:
        """Check and queue one request -> (executor, pending, the claimed queue when the caller
        must run it inline, else None)."""
        entry = self.registry.entry(request.get("model_id"))
        model, executor = entry.model, entry.executor
        if stream and not isinstance(executor, GenerationWorker):
            raise InvalidInputData(f"options.stream needs a decoder (transformer) model; "
                                   f"{entry.model_id!r} is a {entry.spec.get('model_type')} model",
                                   {"field": "options.stream"})
        prepared, prompt_tokens = prepare(model, request)
        budget = budget or OutputBudget(self.max_output_values)
        bound = output_values_bound(model, prepared)
        budget.check(bound, "(from the model)")  # before any work
        budget.spend(bound or 0)
        # options.timeout is the documented field; a top-level "timeout" is accepted too
        timeout = (request.get("options") or {}).get("timeout", request.get("timeout", self.request_timeout_s))
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidInputData("timeout must be a positive number of seconds", {"field": "timeout"})
        pending = Pending(request_id, prepared, deadline=time.monotonic() + float(timeout),
                          stream=queue_module.SimpleQueue() if stream else None, no_wait=no_wait)
        if prompt_tokens is not None:
            pending.decode_text, pending.prompt_tokens = model.decode_text, prompt_tokens
        if isinstance(executor, GenerationWorker):  # steps interleave: never run by a caller
            executor.submit(entry.model_id, pending)
            return executor, pending, None
        return executor, pending, executor.submit(entry.model_id, pending, may_run_inline, inline_max_s)

    def _wait(self, executor: Executor, pending: Pending) -> Result:
        try:
            res = pending.future.result(timeout=max(0.0, pending.deadline - time.monotonic()))
        except TimeoutError:
            executor.abandon(pending)
            res = None
        if res is None or res.done_at > pending.deadline:  # an inline run can end past it
            raise _timed_out(pending) from None
        return res

    def _finish(self, executor: Executor, pending: Pending, t0: float, model_id: str,
                budget: OutputBudget | None = None) -> dict:
        try:
            res = self._wait(executor, pending)
            self._spend(res, budget)
        except MSCError as exc:
            raise self._failed(exc, t0, model_id)
        return self._response(pending, res, t0, model_id)

    def _spend(self, res: Result, budget: OutputBudget | None) -> None:
        """The real output against the response budget (a user program's size is known only now)."""
        values = output_values(res.output.output_data)
        budget = budget or OutputBudget(self.max_output_values)
        budget.check(values, "(as run)")
        budget.spend(values)

    def _failed(self, exc: MSCError, t0: float, model_id: str) -> MSCError:
        self.meter.record_inference(False, time.perf_counter() - t0, model=model_id, code=exc.code)
        return exc

    def _response(self, pending: Pending, res: Result, t0: float, model_id: str) -> dict:
        elapsed = time.perf_counter() - t0
        self.meter.record_inference(True, elapsed, res.output.tokens_generated, model=model_id)
        # a numpy array stays one: it crosses to a front process as a raw buffer (serving/protocol.py)
        out = {"request_id": pending.request_id, "output_data": res.output.output_data,
               "inference_time": elapsed, "tokens_generated": int(res.output.tokens_generated),
               "memory_used": int(res.memory_used)}
        if pending.decode_text is not None:  # the request came as input_text
            out["prompt_tokens"] = pending.prompt_tokens
            # a decoder's texts come from its stops (cut before a stop string)
            text = res.output.texts if res.output.texts is not None else pending.decode_text(out["output_data"])
            if text is not None:
                out["output_text"] = text
        if res.output.finish_reasons is not None:
            out["finish_reasons"] = res.output.finish_reasons
        return out


def _timed_out(pending: Pending) -> RequestTimeout:
    return RequestTimeout(f"request {pending.request_id} did not complete in time", {"request_id": pending.request_id})
