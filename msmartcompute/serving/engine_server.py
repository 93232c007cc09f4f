"""The engine process: one Runtime (devices, registry, vGPUs, batching, jobs, training,
optimization; the only writer of the store) behind a ZeroMQ ROUTER socket.

One I/O thread owns the ROUTER. For each call it reads it first spends the caller's rate-limit
token when the call carries one (Call.rate_key: every front's requests are decided here, in
arrival order), then:
- `inference.infer` (the hot path) is checked and queued on the I/O thread itself
  (Inference.infer_then): no thread waits for it. When its model's executor is idle and the
  model is quick (recent runs under INLINE_MAX_S), the I/O thread claims the executor and, once
  it has read every call already waiting, runs them as one batch itself and sends the replies:
  no thread hand-off at all. Otherwise the model's worker runs the batch and sends the replies.
  The I/O thread keeps the deadlines and answers REQUEST_TIMEOUT for a request still
  unanswered at its own;
- any other call goes to a pool thread (calls block: a training runs for minutes).
Threads other than the I/O thread push their replies over an inproc socket (a ZeroMQ socket
belongs to one thread) and the I/O thread forwards them. A Cancel marks its call: a streaming
call stops before its next message.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import zmq

from ..api.ratelimit import refusal
from ..runtime.errors import InternalError, MSCError, RequestTimeout
from . import protocol

log = logging.getLogger("msmartcompute.engine")

_REPLIES = "inproc://msc-replies"
MAX_CALLS = 512  # calls served at once; more wait for a worker thread
# A model whose recent runs took at most this long is run on the I/O thread when its executor is
# idle: calls wait that long at most, and a hand-off to the worker and back cost more than the run.
INLINE_MAX_S = 0.002
_POLL_MS = 200


class EngineServer:
    def __init__(self, runtime, address: str, limiter=None):
        self.runtime = runtime
        self.limiter = limiter  # api.ratelimit.RateLimiter: every front's buckets, decided on the I/O thread
        self.address = address
        self.context = zmq.Context.instance()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(address)
        self.replies = self.context.socket(zmq.PULL)
        self.replies.bind(_REPLIES)
        self.pool = ThreadPoolExecutor(MAX_CALLS, thread_name_prefix="msc-call")
        self.cancelled: set[tuple[bytes, int]] = set()
        self._local = threading.local()
        self._io_thread: int | None = None
        self._deadlines: list = []  # heap of (deadline, seq, _Answer) of inferences not yet answered
        self._claimed: list = []    # (executor, queue, pending) to run on this thread once the socket is read
        self._seq = itertools.count()

    def serve(self, stopping: threading.Event) -> None:
        self._io_thread = threading.get_ident()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.replies, zmq.POLLIN)
        while not stopping.is_set():
            for sock, _ in poller.poll(self._poll_ms()):
                if sock is self.replies:
                    self._drain(self.replies, lambda frames: self.router.send_multipart(frames, copy=False))
                else:
                    self._drain(self.router, self._dispatch)
                    self._run_claimed()
            self._expire()

    @staticmethod
    def _drain(sock: zmq.Socket, handle) -> None:
        """Everything already waiting on `sock`, without going back to poll between messages
        (asked of EVENTS: a NOBLOCK recv that finds nothing raises, which cost more than the
        rest of the loop)."""
        for _ in range(256):  # a bound, so replies and calls take turns under a flood
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                return
            handle(sock.recv_multipart(copy=False))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.context.destroy(linger=0)  # every socket, the workers' too: nothing left to block the exit

    # ---- calls --------------------------------------------------------------------------------
    def _dispatch(self, frames: list) -> None:
        front = frames[0].bytes
        try:
            message = protocol.decode_call(frames[1:])
        except Exception:
            log.exception("undecodable message from a front")
            return
        if isinstance(message, protocol.Cancel):
            self.cancelled.add((front, message.call_id))
            return
        rate = None
        if message.rate_key is not None and self.limiter is not None:
            decision = self.limiter.check(message.rate_key)
            rate = decision.as_tuple()
            if not decision.allowed:
                self._send(front, protocol.Reply(message.call_id, error=_error(refusal(decision, self.limiter.config)),
                                                 rate=rate))
                return
        if message.op == "ratelimit.check" and self.limiter is not None:
            self._send(front, protocol.Reply(message.call_id, self.limiter.check(*message.args).as_tuple()))
        elif message.op == "inference.infer":
            self._infer(front, message, rate)
        else:
            self.pool.submit(self._run, front, message, rate)

    def _infer(self, front: bytes, call: protocol.Call, rate) -> None:
        answer = _Answer(self, front, call.call_id, rate)
        try:
            answer.executor, answer.pending, claimed = self.runtime.inference.infer_then(
                *call.args, reply=answer, inline_max_s=INLINE_MAX_S, **call.kwargs)
        except MSCError as exc:
            answer(None, exc)
            return
        except Exception as exc:
            log.exception("inference.infer failed")
            answer(None, InternalError(f"inference.infer failed: {type(exc).__name__}"))
            return
        if claimed is not None:
            self._claimed.append((answer.executor, claimed, answer.pending))
        if not answer.done:
            heapq.heappush(self._deadlines, (answer.pending.deadline, next(self._seq), answer))

    def _run_claimed(self) -> None:
        """Run the batches of the executors this thread claimed, each with what queued since."""
        claimed, self._claimed = self._claimed, []
        for executor, queue, pending in claimed:
            try:
                executor.run_inline(queue, pending)
            except Exception:  # each request is answered already; never let the I/O thread die
                log.exception("an inline batch failed")

    def _poll_ms(self) -> int:
        if not self._deadlines:
            return _POLL_MS
        return max(0, min(_POLL_MS, int((self._deadlines[0][0] - time.monotonic()) * 1000) + 1))

    def _expire(self) -> None:
        """Answer REQUEST_TIMEOUT for each inference past its deadline and not yet answered."""
        heap, now = self._deadlines, time.monotonic()
        while heap and (heap[0][2].done or heap[0][0] <= now):
            _, _, answer = heapq.heappop(heap)
            if not answer.done:
                answer.timeout()

    def _send(self, front: bytes, reply: protocol.Reply) -> None:
        if threading.get_ident() == self._io_thread:
            self.router.send_multipart([front, *protocol.encode(reply)], copy=False)
            return
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._local.push = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(_REPLIES)
        sock.send_multipart([front, *protocol.encode(reply)], copy=False)

    def _run(self, front: bytes, call: protocol.Call, rate=None) -> None:
        try:
            value = self.runtime.operation(call.op)(*call.args, **call.kwargs)
            if _is_stream(value):
                self._stream(front, call.call_id, value, rate)
            else:
                self._send(front, protocol.Reply(call.call_id, value, rate=rate))
        except MSCError as exc:
            self._send(front, protocol.Reply(call.call_id, error=_error(exc), rate=rate))
        except KeyError:
            self._send(front, protocol.Reply(call.call_id, error=_error(
                InternalError(f"the engine has no operation {call.op!r}")), rate=rate))
        except Exception as exc:
            log.exception("%s failed", call.op)
            self._send(front, protocol.Reply(call.call_id, error=_error(
                InternalError(f"{call.op} failed: {type(exc).__name__}")), rate=rate))

    def _stream(self, front: bytes, call_id: int, items, rate=None) -> None:
        key = (front, call_id)
        try:
            for item in items:
                if key in self.cancelled:
                    break
                self._send(front, protocol.Reply(call_id, item, last=False, rate=rate))
                rate = None
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's finally blocks run now: the request stops on the engine
            self.cancelled.discard(key)
        self._send(front, protocol.Reply(call_id, rate=rate))


class _Answer:
    """The one reply of an `inference.infer` call: from its worker when it is done, or from the
    I/O thread at its deadline, whichever comes first (the other is dropped)."""

    __slots__ = ("server", "front", "call_id", "rate", "executor", "pending", "done", "_lock")

    def __init__(self, server: EngineServer, front: bytes, call_id: int, rate):
        self.server, self.front, self.call_id, self.rate = server, front, call_id, rate
        self.executor = self.pending = None
        self.done = False
        self._lock = threading.Lock()

    def _claim(self) -> bool:
        with self._lock:
            if self.done:
                return False
            self.done = True
            return True

    def __call__(self, value, exc: MSCError | None) -> None:
        if self._claim():
            self.server._send(self.front, protocol.Reply(self.call_id, value, error=None if exc is None else
                                                         _error(exc), rate=self.rate))

    def timeout(self) -> None:
        if self._claim():
            self.executor.abandon(self.pending)
            self.server._send(self.front, protocol.Reply(self.call_id, error=_error(RequestTimeout(
                f"request {self.pending.request_id} did not complete in time",
                {"request_id": self.pending.request_id})), rate=self.rate))


def _is_stream(value) -> bool:
    return hasattr(value, "__next__") and not isinstance(value, (str, bytes, dict, list))


def _error(exc: MSCError) -> dict:
    return {"code": exc.code, "message": exc.message, "details": exc.details}
