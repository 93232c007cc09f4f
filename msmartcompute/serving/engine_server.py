"""The engine process: one Runtime (devices, registry, vGPUs, batching, jobs, training,
optimization; the only writer of the store) behind a Unix socket every front connects to.

One I/O thread reads every front's connection (epoll). For each call it reads it first spends
the caller's rate-limit token when the call carries one (Call.rate_key: every front's requests
are decided here, in arrival order), then:
- `inference.infer` (the hot path) is checked and queued on the I/O thread itself
  (Inference.infer_then): no thread waits for it. When its model's executor is idle and the
  model is quick (recent runs under INLINE_MAX_S), the I/O thread claims the executor and, once
  it has read every call already waiting, runs them as one batch itself and sends the replies:
  no thread hand-off at all. Otherwise the model's worker runs the batch and sends the replies.
  The I/O thread keeps the deadlines and answers REQUEST_TIMEOUT for a request still
  unanswered at its own;
- any other call goes to a pool thread (calls block: a training runs for minutes).
Whichever thread has a reply writes it to the front's socket itself, under that connection's
lock: no forwarding between threads (protocol.py frames the messages). A Cancel marks its call:
a streaming call stops before its next message.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..api.ratelimit import refusal
from ..runtime.errors import InternalError, MSCError, RequestTimeout
from . import protocol

log = logging.getLogger("msmartcompute.engine")

MAX_CALLS = 512  # calls served at once; more wait for a worker thread
# A model whose recent runs took at most this long is run on the I/O thread when its executor is
# idle: calls wait that long at most, and a hand-off to the worker and back cost more than the run.
INLINE_MAX_S = 0.002
_POLL_S = 0.2
_READ_BYTES = 1 << 18
# A front that takes no reply bytes for this long is stuck: its connection is closed (its calls
# answer 503 there) rather than let one front stall the thread writing to it.
SEND_TIMEOUT_S = 10.0


class FrontConnection:
    """One front's (or one client thread's) connection: read by the I/O thread only, written
    by any thread, one whole message at a time. The I/O thread's own replies (an inline batch,
    refusals, timeouts) are held until the end of its turn and written together: one sendmsg
    and one wake-up of the front for a whole batch instead of one per request."""

    __slots__ = ("sock", "reader", "lock", "io_thread", "held", "dirty", "__weakref__")

    def __init__(self, sock: socket.socket, dirty: list):
        sock.settimeout(SEND_TIMEOUT_S)  # reads happen only once epoll says there are bytes
        self.sock, self.reader, self.lock = sock, protocol.MessageReader(), threading.Lock()
        self.io_thread = threading.get_ident()  # made by the I/O thread
        self.held: list = []  # buffers the I/O thread wrote this turn
        self.dirty = dirty    # the connections holding some, flushed at the end of the turn

    def send(self, reply: protocol.Reply) -> None:
        buffers = protocol.pack(protocol.encode(reply))
        if threading.get_ident() == self.io_thread:
            if not self.held:
                self.dirty.append(self)
            self.held.extend(buffers)
            return
        self._write(buffers)

    def flush(self) -> None:
        buffers, self.held = self.held, []
        self._write(buffers)

    def _write(self, buffers: list) -> None:
        with self.lock:
            if self.sock.fileno() < 0:
                return  # the front went away meanwhile
            try:
                protocol.send_buffers(self.sock, buffers)
            except OSError as exc:  # gone, or stuck past SEND_TIMEOUT_S: the I/O thread sees it closed
                log.warning("a front stopped taking replies (%s): closing its connection", exc)
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self.lock:  # never while another thread writes: its descriptor could be reused meanwhile
            self.sock.close()


class EngineServer:
    def __init__(self, runtime, address: str, limiter=None):
        self.runtime = runtime
        self.limiter = limiter  # api.ratelimit.RateLimiter: every front's buckets, decided on the I/O thread
        self.address = address  # the Unix socket's path
        if os.path.exists(address):
            os.unlink(address)  # left by an engine that was killed
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(address)
        self.listener.listen(1024)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.pool = ThreadPoolExecutor(MAX_CALLS, thread_name_prefix="msc-call")
        self.cancelled: set[tuple[FrontConnection, int]] = set()
        self._deadlines: list = []  # heap of (deadline, seq, _Answer) of inferences not yet answered
        self._claimed: list = []    # (executor, queue, pending) to run on this thread once the sockets are read
        self._dirty: list[FrontConnection] = []  # connections holding this turn's replies
        self._seq = itertools.count()

    def serve(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            for key, _ in self.selector.select(self._poll_s()):
                if key.data is None:
                    self._accept()
                else:
                    self._read(key.data)
            self._run_claimed()
            self._expire()
            dirty, self._dirty[:] = list(self._dirty), []
            for front in dirty:
                front.flush()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.selector.register(sock, selectors.EVENT_READ, FrontConnection(sock, self._dirty))

    def _read(self, front: FrontConnection) -> None:
        try:
            data = front.sock.recv(_READ_BYTES)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return
        except OSError:
            data = b""
        if not data:  # the front went away (or its connection was closed for being stuck)
            self.selector.unregister(front.sock)
            front.close()
            self.cancelled = {key for key in self.cancelled if key[0] is not front}
            return
        for frames in front.reader.feed(data):
            self._dispatch(front, frames)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for key in list(self.selector.get_map().values()):
            (key.fileobj if key.data is None else key.data).close()  # the listener, or a FrontConnection
        self.selector.close()
        try:
            os.unlink(self.address)
        except OSError:
            pass

    # ---- calls --------------------------------------------------------------------------------
    def _dispatch(self, front: FrontConnection, frames: list) -> None:
        try:
            message = protocol.decode_call(frames)
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
                front.send(protocol.Reply(message.call_id, error=_error(refusal(decision, self.limiter.config)),
                                                 rate=rate))
                return
        if message.op == "ratelimit.check" and self.limiter is not None:
            front.send(protocol.Reply(message.call_id, self.limiter.check(*message.args).as_tuple()))
        elif message.op == "inference.infer":
            self._infer(front, message, rate)
        else:
            self.pool.submit(self._run, front, message, rate)

    def _infer(self, front: FrontConnection, call: protocol.Call, rate) -> None:
        answer = _Answer(front, call.call_id, rate)
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

    def _poll_s(self) -> float:
        if self._claimed:
            return 0
        if not self._deadlines:
            return _POLL_S
        return max(0.0, min(_POLL_S, self._deadlines[0][0] - time.monotonic() + 0.001))

    def _expire(self) -> None:
        """Answer REQUEST_TIMEOUT for each inference past its deadline and not yet answered."""
        heap, now = self._deadlines, time.monotonic()
        while heap and (heap[0][2].done or heap[0][0] <= now):
            _, _, answer = heapq.heappop(heap)
            if not answer.done:
                answer.timeout()

    def _run(self, front: FrontConnection, call: protocol.Call, rate=None) -> None:
        try:
            value = self.runtime.operation(call.op)(*call.args, **call.kwargs)
            if _is_stream(value):
                self._stream(front, call.call_id, value, rate)
            else:
                front.send(protocol.Reply(call.call_id, value, rate=rate))
        except MSCError as exc:
            front.send(protocol.Reply(call.call_id, error=_error(exc), rate=rate))
        except KeyError:
            front.send(protocol.Reply(call.call_id, error=_error(
                InternalError(f"the engine has no operation {call.op!r}")), rate=rate))
        except Exception as exc:
            log.exception("%s failed", call.op)
            front.send(protocol.Reply(call.call_id, error=_error(
                InternalError(f"{call.op} failed: {type(exc).__name__}")), rate=rate))

    def _stream(self, front: FrontConnection, call_id: int, items, rate=None) -> None:
        key = (front, call_id)
        try:
            for item in items:
                if key in self.cancelled:
                    break
                front.send(protocol.Reply(call_id, item, last=False, rate=rate))
                rate = None
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's finally blocks run now: the request stops on the engine
            self.cancelled.discard(key)
        front.send(protocol.Reply(call_id, rate=rate))


class _Answer:
    """The one reply of an `inference.infer` call: from its worker when it is done, or from the
    I/O thread at its deadline, whichever comes first (the other is dropped)."""

    __slots__ = ("front", "call_id", "rate", "executor", "pending", "done", "_lock")

    def __init__(self, front: FrontConnection, call_id: int, rate):
        self.front, self.call_id, self.rate = front, call_id, rate
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
            self.front.send(protocol.Reply(self.call_id, value, error=None if exc is None else _error(exc),
                                           rate=self.rate))

    def timeout(self) -> None:
        if self._claim():
            self.executor.abandon(self.pending)
            self.front.send(protocol.Reply(self.call_id, error=_error(RequestTimeout(
                f"request {self.pending.request_id} did not complete in time",
                {"request_id": self.pending.request_id})), rate=self.rate))


def _is_stream(value) -> bool:
    return hasattr(value, "__next__") and not isinstance(value, (str, bytes, dict, list))


def _error(exc: MSCError) -> dict:
    return {"code": exc.code, "message": exc.message, "details": exc.details}
