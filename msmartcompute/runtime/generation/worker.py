"""The generation worker: one thread per vGPU (or per device) that runs the decoders placed
there one iteration at a time.

Each decoder has a GenerationQueue: its KV pool (blocks sized from the memory quota, see
`pool_blocks`), its scheduler and its requests (a request's input rows are sequences). Every
step the worker picks one decoder with work by the vGPU's scheduling policy (`choose_queue`:
round_robin, priority, fair_share by device time), then for that decoder:
1. drops the requests nobody waits for any more (past their deadline: REQUEST_TIMEOUT;
   abandoned by the caller or a disconnected client) and frees their blocks, so a cancelled
   request leaves the device at the next step;
2. admits new requests, schedules the step (scheduler.py), runs the model on it inside the
   device's time slot (vgpu.DeviceScheduler), samples one token per finished chunk with each
   sequence's own params and generator, checks stops;
3. streams the new tokens to requests that asked for a stream (Pending.stream) and answers
   the finished ones (Pending.future, as batching.Result).
The worker offers the Executor's face (submit / abandon / depth / depths / remove / close),
so the runtime queues a decoder's requests the way it queues any model's.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ...models.base import Output
from ...models.paged import ChunkInput, cache_bytes
from ...models.sampling import StopChecker, sample_rows
from ..batching import Pending, Result, choose_queue, map_run_error
from ..errors import InsufficientMemory, InvalidModelId, MSCError, QueueFull, RequestTimeout
from ..vgpu import DeviceScheduler
from .blocks import BlockManager
from .scheduler import Chunk, Scheduler, Sequence
from .stats import GenerationStats

log = logging.getLogger("msmartcompute.runtime.generation")

BLOCK_SIZE = 16          # tokens per KV block
MAX_STEP_TOKENS = 512    # tokens computed per step, decodes and prefill chunks together
STREAM_END = None        # the last item a Pending.stream receives


def pool_blocks(model, free_bytes: int, max_running: int, block_size: int = BLOCK_SIZE,
                requested_bytes: int | None = None) -> int:
    """How many KV blocks a decoder gets: `requested_bytes` (the load spec's kv_cache_memory),
    else enough for max_running sequences of max_sequence_length; never more than the free
    memory of its vGPU (or device), never fewer than one longest sequence needs."""
    per_block = model.kv_bytes_per_block(block_size)
    longest = -(-(model.config.max_sequence_length + 1) // block_size)
    want = requested_bytes if requested_bytes is not None else max_running * longest * per_block
    blocks = min(want, max(0, free_bytes)) // per_block
    if blocks < longest:
        raise InsufficientMemory(
            f"the KV cache needs at least {longest * per_block} bytes ({longest} blocks of {block_size} "
            f"tokens, one sequence of max_sequence_length); {min(want, max(0, free_bytes))} bytes given",
            {"requested": int(longest * per_block), "available": int(max(0, min(want, free_bytes)))})
    return int(blocks)


@dataclass(eq=False)
class _Request:
    pending: Pending
    seqs: list[Sequence] = field(default_factory=list)
    stops: list[StopChecker] = field(default_factory=list)
    generators: list = field(default_factory=list)
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: dict = field(default_factory=dict)   # row -> monotonic time of its last token
    rows_done: int = 0
    peak_blocks: int = 0


class GenerationQueue:
    """One decoder's KV pool, scheduler and requests. Its requests and scheduler are touched
    by the worker thread; callers only append to `incoming` (under the worker's condition)."""

    def __init__(self, model_id: str, model, max_running: int, max_queue_size: int, priority: int,
                 num_blocks: int, block_size: int = BLOCK_SIZE, max_step_tokens: int = MAX_STEP_TOKENS,
                 window_s: float = 60.0):
        self.model_id = model_id
        self.model = model
        self.max_queue_size = max_queue_size
        self.priority = priority
        self.blocks = BlockManager(num_blocks, block_size)
        self.cache = model.new_kv_cache(num_blocks, block_size)
        self.kv_bytes_per_block = model.kv_bytes_per_block(block_size)
        self.scheduler = Scheduler(self.blocks, max_running, max_step_tokens)
        self.requests: list[_Request] = []   # oldest first; choose_queue reads items[0]
        self.device_time_s = 0.0
        self.stats = GenerationStats(window_s)
        self.run_lock = threading.Lock()     # as ModelQueue.run_lock: Registry.swap holds it

    @property
    def items(self) -> list[Pending]:
        return [r.pending for r in self.requests]

    @property
    def kv_cache_bytes(self) -> int:
        return cache_bytes(self.cache)

    def waiting_requests(self) -> int:
        return sum(1 for r in self.requests if r.started_at is None)

    def snapshot(self) -> dict:
        s = self.scheduler
        out = self.stats.snapshot()
        out.update(running=len(s.running), waiting=len(s.waiting) + sum(
            1 for r in self.requests if not r.seqs), preempted=s.preempted_total,
            kv_blocks_total=self.blocks.num_blocks, kv_blocks_used=self.blocks.used_blocks,
            kv_blocks_free=self.blocks.free_blocks, kv_block_size=self.blocks.block_size,
            kv_cache_bytes=self.kv_cache_bytes, kv_cache_tokens=self.blocks.num_blocks * self.blocks.block_size)
        return out


class GenerationWorker:
    def __init__(self, name: str, policy: str, scheduler: DeviceScheduler, compute_units: int, metrics):
        self.name = name
        self.policy = policy
        self.device = scheduler
        self.metrics = metrics
        self.queues: dict[str, GenerationQueue] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._last_served: str | None = None
        scheduler.register(name, compute_units)
        self._thread = threading.Thread(target=self._loop, name=f"msc-generation-{name}", daemon=True)
        self._thread.start()

    # ---- callers (the Executor's face) ----------------------------------------------------
    def add(self, queue: GenerationQueue) -> None:
        with self._cond:
            self.queues[queue.model_id] = queue

    def remove(self, model_id: str, reason: MSCError) -> None:
        with self._cond:
            q = self.queues.pop(model_id, None)
        if q is not None:  # the worker no longer sees q; its requests fail now
            for r in list(q.requests):
                _answer(r, error=reason)
            q.requests.clear()
            q.model = None

    def submit(self, model_id: str, pending: Pending, may_run_inline: bool = False) -> None:
        with self._cond:
            q = self.queues.get(model_id)
            if q is None:  # unloaded since the caller looked the model up
                raise InvalidModelId(f"model {model_id!r} was unloaded", {"model_id": model_id})
            if len(q.requests) >= q.max_queue_size:
                raise QueueFull(f"queue of model {model_id!r} is full ({q.max_queue_size} requests)",
                                {"model_id": model_id, "max_queue_size": q.max_queue_size})
            q.requests.append(_Request(pending))
            self.metrics.record_queue_depth(model_id, q.waiting_requests())
            self._cond.notify()
        return None

    def abandon(self, pending: Pending) -> None:
        """Nobody waits for `pending` any more: it leaves the batch at the next step."""
        with self._cond:
            pending.abandoned = True
            self._cond.notify()

    def depth(self) -> int:
        return sum(self.depths().values())

    def depths(self) -> dict[str, int]:
        with self._cond:
            return {m: q.waiting_requests() for m, q in self.queues.items()}

    def snapshots(self) -> dict[str, dict]:
        with self._cond:
            queues = list(self.queues.values())
        return {q.model_id: q.snapshot() for q in queues}

    def close(self, reason: MSCError) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        for model_id in list(self.queues):
            self.remove(model_id, reason)
        self.device.unregister(self.name)

    # ---- the worker thread ----------------------------------------------------------------
    def _next(self) -> GenerationQueue | None:
        with self._cond:
            while not self._stop:
                ready = [q for q in self.queues.values() if q.requests]
                if ready:
                    q = choose_queue(self.policy, ready, self._last_served)
                    self._last_served = q.model_id
                    return q
                self._cond.wait()
            return None

    def _loop(self) -> None:
        while True:
            q = self._next()
            if q is None:
                return
            try:
                self._step(q)
            except BaseException:  # never let the worker die
                log.exception("generation worker %s: unexpected failure", self.name)
            del q

    def _drop(self, q: GenerationQueue, r: _Request, error: MSCError | None) -> None:
        for seq in r.seqs:
            q.scheduler.finish(seq)
        with self._cond:
            if r in q.requests:
                q.requests.remove(r)
        _answer(r, error=error)

    def _admit_and_cancel(self, q: GenerationQueue) -> None:
        now = time.monotonic()
        with self._cond:
            requests = list(q.requests)
        for r in requests:
            p = r.pending
            if p.abandoned or p.future.done():
                q.stats.record_cancelled()
                self._drop(q, r, None)
            elif p.deadline <= now:
                q.stats.record_cancelled()
                self._drop(q, r, RequestTimeout(f"request {p.request_id} did not complete in time",
                                                {"request_id": p.request_id}))
            elif not r.seqs:
                model, params = q.model, p.prepared.sampling
                try:
                    for row, prompt in enumerate(p.prepared.prompts()):
                        stop = StopChecker(params, model.eos_ids, model.decode)
                        r.stops.append(stop)
                        r.generators.append(params.generator(row, model.device))
                        r.seqs.append(Sequence(prompt, owner=(r, row), output=stop.tokens))
                    for seq in r.seqs:
                        q.scheduler.add(seq)
                except ValueError as exc:
                    self._drop(q, r, map_run_error(exc))

    def _step(self, q: GenerationQueue) -> None:
        if q.cache[0].k.dtype != q.model.dtype:  # optimize swapped in another dtype
            self._reset_cache(q)
        self._admit_and_cancel(q)
        plan = q.scheduler.schedule()
        if not plan:
            return
        sampling = [c for c in plan if c.samples]
        chunks = [ChunkInput(c.seq.tokens[c.start:c.start + c.count], c.start,
                             q.blocks.tables[c.seq.seq_id], c.samples) for c in plan]
        t0 = time.perf_counter()
        try:
            with self.device.slot(self.name), q.run_lock, torch.inference_mode():
                logits = q.model.step(q.cache, chunks)                      # [len(sampling), V]
                tokens = sample_rows(logits, [c.seq.owner[0].pending.prepared.sampling for c in sampling],
                                     [c.seq.owner[0].generators[c.seq.owner[1]] for c in sampling])
        except Exception as exc:
            error = map_run_error(exc)
            for r in {c.seq.owner[0] for c in plan}:
                self._drop(q, r, error)
            return
        q.device_time_s += time.perf_counter() - t0
        q.scheduler.computed(plan)
        self._deliver(q, plan, sampling, tokens)

    def _deliver(self, q: GenerationQueue, plan: list[Chunk], sampling: list[Chunk], tokens: list[int]) -> None:
        now = time.monotonic()
        new: dict[_Request, dict[int, list[int]]] = collections.defaultdict(dict)   # request -> row -> new ids
        for c in plan:
            r = c.seq.owner[0]
            if r.started_at is None:
                r.started_at = now
            r.peak_blocks = max(r.peak_blocks, sum(len(q.blocks.tables.get(s.seq_id, ())) for s in r.seqs))
        for c, token in zip(sampling, tokens):
            r, row = c.seq.owner
            stop = r.stops[row]
            before = len(stop.tokens)
            finished = stop.add(token)
            if len(stop.tokens) > before or finished:  # finished: its last text goes out too
                new[r][row] = stop.tokens[before:]
            if r.first_token_at is None:
                r.first_token_at = now
                q.stats.record_first_token(now - r.pending.enqueued_at)
            if row in r.last_token_at:
                q.stats.record_inter_token(now - r.last_token_at[row])
            r.last_token_at[row] = now
            if finished:
                q.scheduler.finish(c.seq)
                r.rows_done += 1
        q.stats.record_step(len(tokens))
        # the dashboard's per-model columns: a step is the batch continuous batching forms
        self.metrics.record_formed_batch(q.model_id, len(plan))
        for r, rows in new.items():
            if r.pending.stream is not None:
                event = {"token_ids": [rows.get(i, []) for i in range(len(r.seqs))]}
                if q.model.decode is not None:  # text deltas (a stop string is held back, never sent)
                    event["text"] = [stop.take_text() for stop in r.stops]
                r.pending.stream.put(event)
        for r in {c.seq.owner[0] for c in sampling}:
            if r.rows_done == len(r.seqs):
                with self._cond:
                    q.requests.remove(r)
                _answer(r, q=q, batch_size=len(plan))
                self.metrics.record_finished(q.model_id, [now - r.pending.enqueued_at])

    def _reset_cache(self, q: GenerationQueue) -> None:
        """A new cache in the model's dtype; running sequences are recomputed into it."""
        for seq in list(q.scheduler.running):
            q.scheduler._preempt(seq)
        q.cache = q.model.new_kv_cache(q.blocks.num_blocks, q.blocks.block_size)
        q.kv_bytes_per_block = q.model.kv_bytes_per_block(q.blocks.block_size)


def _answer(r: _Request, error: MSCError | None = None, q: GenerationQueue | None = None,
            batch_size: int = 0) -> None:
    """Resolve the request's future (result or error) and end its stream."""
    p = r.pending
    if not p.future.done():
        if error is not None:
            p.future.set_exception(error)
        elif q is not None:
            rows = [list(s.tokens) for s in r.stops]
            data = np.array(rows, dtype=np.int64) if len({len(x) for x in rows}) == 1 else rows
            memory = int(p.prepared.tensor.nbytes) + 8 * sum(map(len, rows)) + r.peak_blocks * q.kv_bytes_per_block
            output = Output(output_data=data, tokens_generated=sum(map(len, rows)),
                            finish_reasons=[s.finish_reason for s in r.stops],
                            texts=[s.output_text() for s in r.stops] if q.model.decode is not None else None)
            p.future.set_result(Result(output, time.monotonic() - (r.started_at or p.enqueued_at),
                                       batch_size, memory))
        else:  # cancelled: nobody reads the future; resolve it so no waiter hangs
            p.future.set_exception(RequestTimeout(f"request {p.request_id} was cancelled",
                                                  {"request_id": p.request_id}))
    if p.stream is not None:
        p.stream.put(STREAM_END)

