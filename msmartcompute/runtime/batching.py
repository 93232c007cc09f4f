"""Dynamic batching: per-model queues served by one worker per vGPU (or per device pool).

A worker picks a model whose queue is ready (max_batch_size requests waiting, or the oldest
has waited max_queue_delay_ms), choosing among ready models by the vGPU's scheduling policy
(`choose_queue`). It takes up to max_batch_size requests (one when max_queue_delay_ms is 0:
batching off), groups those with equal Prepared.batch_key (order kept), and calls
ServedModel.run() once per group inside the device's time slot (vgpu.DeviceScheduler). If a
grouped run raises, the group's requests are run one by one so only the faulty one fails.

Idle fast path: a single request (Runtime.infer) that finds its executor idle (nothing running,
every queue empty) is run at once on the caller's thread, not handed to the worker and back.
Two thread hand-offs per request were most of the serving overhead at low concurrency (measured,
benchmarks/README.md); no batch could have formed anyway, since nothing else was waiting. Requests
that arrive while it runs queue up and the worker batches them as usual.

Errors a run raises map to: out of memory (models.base.is_out_of_memory) -> INSUFFICIENT_MEMORY, ValueError -> INVALID_INPUT_DATA, anything else
-> INTERNAL_ERROR whose message is the exception's last line only (a TorchScript error carries
the program's traceback: it goes to the log, never to the client); each fails its request alone. A full queue (RuntimeConfig.max_queue_size) refuses at once with QUEUE_FULL; a request
not done by its deadline fails with REQUEST_TIMEOUT (its slot in the queue is skipped).
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..models.base import is_out_of_memory
from .errors import InternalError, InvalidInputData, InvalidModelId, MSCError, QueueFull, RequestTimeout, insufficient_memory, last_line
from .vgpu import DeviceScheduler

log = logging.getLogger("msmartcompute.runtime.batching")


class Outcome:
    """A request's result or error, set once by whoever finishes it (the first setter wins; later
    ones are ignored). The part of concurrent.futures.Future the runtime uses: done, set_result,
    set_exception, result(timeout), exception(timeout), add_done_callback. Future built a
    Condition per request, 5% of the engine's time per request; here an Event is made only when
    a thread waits."""

    __slots__ = ("_lock", "_done", "_value", "_error", "_callbacks", "_waiter")

    def __init__(self):
        self._lock = threading.Lock()
        self._done = False
        self._value = self._error = None
        self._callbacks: list = []
        self._waiter: threading.Event | None = None

    def done(self) -> bool:
        return self._done

    def set_result(self, value) -> bool:
        return self._finish(value, None)

    def set_exception(self, error: BaseException) -> bool:
        return self._finish(None, error)

    def _finish(self, value, error) -> bool:
        with self._lock:
            if self._done:
                return False
            self._value, self._error, self._done = value, error, True
            callbacks, waiter = self._callbacks, self._waiter
        if waiter is not None:
            waiter.set()
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # one callback's bug must not keep the others (or the setter) from going on
                log.exception("a request's completion callback failed")
        return True

    def add_done_callback(self, fn) -> None:
        """fn(self) once done: now if it is, else on the thread that finishes it."""
        with self._lock:
            if not self._done:
                self._callbacks.append(fn)
                return
        fn(self)

    def result(self, timeout: float | None = None):
        """The value, or raise the error; TimeoutError when not done within timeout seconds."""
        if self.exception(timeout) is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error (None when it succeeded); TimeoutError when not done within timeout seconds."""
        if not self._done:
            with self._lock:
                if not self._done and self._waiter is None:
                    self._waiter = threading.Event()
                waiter = self._waiter
            if waiter is not None and not waiter.wait(timeout):
                raise TimeoutError("the request is not done yet")
        return self._error


@dataclass
class Pending:
    request_id: str
    prepared: object                  # models.Prepared
    deadline: float                   # time.monotonic() by which it must be done
    enqueued_at: float = field(default_factory=time.monotonic)
    future: Outcome = field(default_factory=Outcome)
    abandoned: bool = False           # the caller timed out or went away: skip it / stop it
    stream: "queue.SimpleQueue | None" = None  # decoders: token events as they come (generation/worker.py)
    decode_text: object = None        # for an input_text request: output_data -> output_text
    prompt_tokens: int | None = None  # for an input_text request: the tokens its text became
    no_wait: bool = False             # batch it with whatever is queued once the worker is free: no delay


@dataclass
class Result:
    output: object                    # models.Output
    run_s: float                      # seconds of the run() call that served it
    batch_size: int                   # requests in that run() call
    memory_used: int                  # bytes, see engine.infer
    done_at: float = field(default_factory=time.monotonic)  # past the deadline: REQUEST_TIMEOUT


def map_run_error(exc: BaseException) -> MSCError:
    if isinstance(exc, MSCError):
        return exc
    if is_out_of_memory(exc):
        return insufficient_memory(exc, "inference")
    if isinstance(exc, ValueError):
        return InvalidInputData(str(exc))
    log.warning("inference failed: %s", exc)  # the full text (a program's traceback) stays in the log
    return InternalError(f"inference failed: {type(exc).__name__}: {last_line(exc)}")


class ModelQueue:
    """One model's waiting requests. Guarded by its executor's condition."""

    def __init__(self, model_id: str, model, max_batch_size: int, max_queue_size: int, priority: int = 0):
        self.model_id = model_id
        self.model = model
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_queue_size = max_queue_size
        self.priority = priority
        self.items: collections.deque[Pending] = collections.deque()
        self.device_time_s = 0.0      # fair_share: measured run() seconds on this worker
        self.recent_run_s = 0.0       # moving average of its run() seconds (may a caller run it inline?)
        # Held around every run() and by Registry.swap: a run sees the model's old weights or its
        # new ones (training, optimize), never a mix, and module and dtype change together.
        self.run_lock = threading.Lock()

    def prune(self) -> None:
        """Drop abandoned heads; fail expired ones with REQUEST_TIMEOUT."""
        now = time.monotonic()
        while self.items and (self.items[0].abandoned or self.items[0].deadline <= now):
            p = self.items.popleft()
            if not p.abandoned and not p.future.done():
                p.future.set_exception(_timeout(p))

    def ready_at(self, delay_s: float) -> float | None:
        """Monotonic time at which this queue is ready to form a batch (None when empty)."""
        self.prune()
        if not self.items:
            return None
        if delay_s <= 0 or len(self.items) >= self.max_batch_size or self.items[0].no_wait:
            return 0.0
        return self.items[0].enqueued_at + delay_s

    def take(self, limit: int | None = None) -> list[Pending]:
        batch, limit = [], self.max_batch_size if limit is None else min(limit, self.max_batch_size)
        while self.items and len(batch) < limit:
            p = self.items.popleft()
            if p.abandoned:
                continue
            if p.deadline <= time.monotonic():
                p.future.set_exception(_timeout(p))
                continue
            batch.append(p)
        return batch


def _timeout(p: Pending) -> RequestTimeout:
    return RequestTimeout(f"request {p.request_id} timed out in the queue", {"request_id": p.request_id})


def choose_queue(policy: str, ready: list[ModelQueue], last_served: str | None) -> ModelQueue:
    """Pick the next queue to serve among ready ones (see vgpu.py for the policies).

    round_robin: the first model id after `last_served` in sorted order, wrapping around.
    priority:    highest `priority`, ties by the oldest waiting request.
    fair_share:  least `device_time_s`, ties by the oldest waiting request.
    """
    if policy == "priority":
        return max(ready, key=lambda q: (q.priority, -q.items[0].enqueued_at))
    if policy == "fair_share":
        return min(ready, key=lambda q: (q.device_time_s, q.items[0].enqueued_at))
    ordered = sorted(ready, key=lambda q: q.model_id)
    for q in ordered:
        if last_served is None or q.model_id > last_served:
            return q
    return ordered[0]


class Executor:
    """The worker of one vGPU (or of a device's models not on a vGPU)."""

    def __init__(self, name: str, policy: str, scheduler: DeviceScheduler, compute_units: int,
                 max_queue_delay_s: float, metrics, cuda_device: torch.device | None = None):
        self.name = name
        self.policy = policy
        self.scheduler = scheduler
        self.max_queue_delay_s = max_queue_delay_s
        self.metrics = metrics
        self.cuda_device = cuda_device
        self.queues: dict[str, ModelQueue] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._busy = False            # a batch is running (on the worker or inline on a caller)
        self._last_served: str | None = None
        scheduler.register(name, compute_units)
        self._thread = threading.Thread(target=self._loop, name=f"msc-worker-{name}", daemon=True)
        self._thread.start()

    # ---- callers ----------------------------------------------------------------------------
    def add(self, queue: ModelQueue) -> None:
        with self._cond:
            self.queues[queue.model_id] = queue

    def remove(self, model_id: str, reason: MSCError) -> None:
        with self._cond:
            q = self.queues.pop(model_id, None)
            if q is not None:
                while q.items:
                    p = q.items.popleft()
                    if not p.future.done():
                        p.future.set_exception(reason)

    def submit(self, model_id: str, pending: Pending, may_run_inline: bool = False,
               inline_max_s: float | None = None) -> ModelQueue | None:
        """Queue `pending` for the worker. With may_run_inline and an idle executor it is not
        queued: the executor is marked busy and its queue returned, and the caller must then
        call run_inline(queue, pending) (requests queued meanwhile join its batch).
        inline_max_s: only when the model's recent runs took at most this long and no other
        worker holds the device (the caller must not wait long)."""
        with self._cond:
            q = self.queues.get(model_id)
            if q is None:  # unloaded since the caller looked the model up
                raise InvalidModelId(f"model {model_id!r} was unloaded", {"model_id": model_id})
            if may_run_inline and not self._busy and not self._stop and not any(
                    x.items for x in self.queues.values()) and (
                    inline_max_s is None or (q.recent_run_s <= inline_max_s and self.scheduler.idle())):
                self._busy = True
                return q
            if len(q.items) >= q.max_queue_size:
                q.prune()
            if len(q.items) >= q.max_queue_size:
                raise QueueFull(f"queue of model {model_id!r} is full ({q.max_queue_size} requests)",
                                {"model_id": model_id, "max_queue_size": q.max_queue_size})
            q.items.append(pending)
            self.metrics.record_queue_depth(model_id, len(q.items))
            # Wake the worker only when this changes what it waits for: a first request (starts
            # the delay), a full batch, or batching off. Otherwise it is already timed to the
            # oldest request, and a wake-up per request costs a GIL hand-off each. Never while a
            # batch runs: whoever runs it serves or signals the queue when it is done.
            if not self._busy and (len(q.items) == 1 or len(q.items) >= q.max_batch_size
                                   or self.max_queue_delay_s <= 0):
                self._cond.notify()
            return None

    def run_inline(self, queue: ModelQueue, pending: Pending) -> None:
        """Serve one request on the calling thread (after submit() returned its queue)."""
        try:
            with self._cond:  # requests queued since it was claimed share its run (batching on)
                batch = [pending, *queue.take(queue.max_batch_size - 1)] if self.max_queue_delay_s > 0 else [pending]
                self.metrics.record_queue_depth(queue.model_id, len(queue.items))
            # the caller's own deadline bounds its wait for the device (the worker path prunes instead)
            self._serve(queue, batch, deadline=pending.deadline)
            item = self._take_queued()
            if item is not None:  # queued while this ran: serve them here, sparing a worker wake-up
                self._serve(*item)
        finally:
            with self._cond:
                self._busy = False
                if any(q.items for q in self.queues.values()):  # requests that queued meanwhile;
                    self._cond.notify()  # a needless wake-up costs the worker a GIL hand-off

    def abandon(self, pending: Pending) -> None:
        with self._cond:
            pending.abandoned = True

    def depth(self) -> int:
        with self._cond:
            return sum(len(q.items) for q in self.queues.values())

    def depths(self) -> dict[str, int]:
        with self._cond:
            return {m: len(q.items) for m, q in self.queues.items()}

    def close(self, reason: MSCError) -> None:
        """Stop the worker after its current run; waiting requests fail with `reason`."""
        with self._cond:
            self._stop = True
            for model_id in list(self.queues):
                self.remove(model_id, reason)
            self._cond.notify_all()
        self._thread.join(timeout=10)
        self.scheduler.unregister(self.name)

    def _take_queued(self):
        """(queue, batch) of requests already waiting, without the batching delay, or None."""
        with self._cond:
            ready = [q for q in self.queues.values() if q.ready_at(0.0) is not None]
            if not ready or self._stop:
                return None
            q = choose_queue(self.policy, ready, self._last_served)
            self._last_served = q.model_id
            batch = q.take(1 if self.max_queue_delay_s <= 0 else None)
            self.metrics.record_queue_depth(q.model_id, len(q.items))
            return (q, batch) if batch else None

    # ---- worker -----------------------------------------------------------------------------
    def _next_batch(self):
        """Wait for a ready queue; returns (queue, batch) or None when stopping."""
        with self._cond:
            while not self._stop:
                if self._busy:  # an inline run holds the device; it notifies when done
                    self._cond.wait()
                    continue
                now = time.monotonic()
                ready, wake = [], None
                for q in self.queues.values():
                    t = q.ready_at(self.max_queue_delay_s)
                    if t is None:
                        continue
                    if t <= now:
                        ready.append(q)
                    else:
                        wake = t if wake is None else min(wake, t)
                if ready:
                    q = choose_queue(self.policy, ready, self._last_served)
                    self._last_served = q.model_id
                    batch = q.take(1 if self.max_queue_delay_s <= 0 else None)
                    self.metrics.record_queue_depth(q.model_id, len(q.items))
                    if batch:
                        self._busy = True
                        return q, batch
                    continue
                q = None  # hold no model's queue while waiting: an unloaded model must be freed now
                self._cond.wait(None if wake is None else max(0.0, wake - now))
            return None

    def _loop(self) -> None:
        while True:
            item = self._next_batch()
            if item is None:
                return
            try:
                self._serve(*item)
            except BaseException:  # never let the worker die; each request is already answered
                log.exception("worker %s: unexpected failure", self.name)
            finally:
                with self._cond:
                    self._busy = False
            del item  # drop references to the model and tensors before waiting again

    def _serve(self, queue: ModelQueue, batch: list[Pending], deadline: float | None = None) -> None:
        model = queue.model
        groups: dict[tuple, list[Pending]] = {}
        for p in batch:
            groups.setdefault(p.prepared.batch_key, []).append(p)
        for group in groups.values():
            self.metrics.active_add(len(group))
            try:
                try:
                    self._run(queue, model, group, deadline)
                except Exception as exc:
                    if isinstance(exc, TimeoutError):
                        exc = RequestTimeout(f"request not run within its timeout: {exc}")
                    if len(group) == 1:
                        _fail(group[0], exc)
                        continue
                    log.info("worker %s: batch of %d failed (%s); retrying singly", self.name, len(group), exc)
                    for p in group:
                        try:
                            self._run(queue, model, [p])
                        except Exception as exc1:
                            _fail(p, exc1)
            finally:
                self.metrics.active_add(-len(group))

    def _run(self, queue: ModelQueue, model, group: list[Pending], deadline: float | None = None) -> None:
        cuda = self.cuda_device
        with self.scheduler.slot(self.name, deadline):
            if cuda is not None:
                torch.cuda.reset_peak_memory_stats(cuda)
                base = torch.cuda.memory_allocated(cuda)
            t0 = time.perf_counter()
            with torch.inference_mode(), queue.run_lock:
                outputs = model.run([p.prepared for p in group])
            if cuda is not None:
                torch.cuda.synchronize(cuda)
                peak = torch.cuda.max_memory_allocated(cuda) - base
            run_s = time.perf_counter() - t0
        queue.device_time_s += run_s
        queue.recent_run_s += 0.25 * (run_s - queue.recent_run_s)
        if len(outputs) != len(group):
            raise InternalError(f"model returned {len(outputs)} outputs for {len(group)} requests")
        finished = time.monotonic()
        self.metrics.record_batch(queue.model_id, len(group), [finished - p.enqueued_at for p in group])
        for p, out in zip(group, outputs):
            if cuda is None:
                memory = int(p.prepared.tensor.nbytes) + _nbytes(out.output_data)
            else:
                memory = int(peak)
            if not p.future.done():
                p.future.set_result(Result(out, run_s, len(group), memory))


def _fail(p: Pending, exc: BaseException) -> None:
    if not p.future.done():
        p.future.set_exception(map_run_error(exc))


def _nbytes(data) -> int:
    nbytes = getattr(data, "nbytes", None)
    if nbytes is not None:
        return int(nbytes)
    try:
        import numpy as np
        return int(np.asarray(data).nbytes)
    except Exception:
        return 0

