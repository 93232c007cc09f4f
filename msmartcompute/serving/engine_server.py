"""The engine process: one Runtime (devices, registry, vGPUs, batching, jobs, training,
optimization; the only writer of the store) behind a ZeroMQ ROUTER socket.

One I/O thread owns the ROUTER: it reads calls and hands each to a worker thread (calls block:
an inference waits for its batch, a training runs for minutes), forwards the workers' replies
(each worker pushes them over an inproc socket, since a ZeroMQ socket belongs to one thread),
and answers rate-limit checks inline. A Cancel marks its call: a streaming call stops before its next message.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import zmq

from ..runtime.errors import InternalError, MSCError
from . import protocol

log = logging.getLogger("msmartcompute.engine")

_REPLIES = "inproc://msc-replies"
MAX_CALLS = 512  # calls served at once; more wait for a worker thread


class EngineServer:
    def __init__(self, runtime, address: str, limiter=None):
        self.runtime = runtime
        self.limiter = limiter  # api.ratelimit.RateLimiter: every front's buckets, answered inline
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

    def serve(self, stopping: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.replies, zmq.POLLIN)
        while not stopping.is_set():
            for sock, _ in poller.poll(200):
                if sock is self.replies:
                    self.router.send_multipart(self.replies.recv_multipart(copy=False), copy=False)
                else:
                    self._dispatch(self.router.recv_multipart(copy=False))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.context.destroy(linger=0)  # every socket, the workers' too: nothing left to block the exit

    def _dispatch(self, frames: list) -> None:
        front = frames[0].bytes
        try:
            message = protocol.decode_call(frames[1:])
        except Exception:
            log.exception("undecodable message from a front")
            return
        if isinstance(message, protocol.Cancel):
            self.cancelled.add((front, message.call_id))
        elif message.op == "ratelimit.check" and self.limiter is not None:
            # inline on the I/O thread: one process decides every request in arrival order, no worker hop
            reply = protocol.Reply(message.call_id, self.limiter.check_dict(*message.args))
            self.router.send_multipart([frames[0], *protocol.encode(reply)], copy=False)
        else:
            self.pool.submit(self._run, front, message)

    def _send(self, front: bytes, reply: protocol.Reply) -> None:
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._local.push = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(_REPLIES)
        sock.send_multipart([front, *protocol.encode(reply)], copy=False)

    def _run(self, front: bytes, call: protocol.Call) -> None:
        try:
            value = self.runtime.operation(call.op)(*call.args, **call.kwargs)
            if _is_stream(value):
                self._stream(front, call.call_id, value)
            else:
                self._send(front, protocol.Reply(call.call_id, value))
        except MSCError as exc:
            self._send(front, protocol.Reply(call.call_id, error=_error(exc)))
        except KeyError:
            self._send(front, protocol.Reply(call.call_id, error=_error(
                InternalError(f"the engine has no operation {call.op!r}"))))
        except Exception as exc:
            log.exception("%s failed", call.op)
            self._send(front, protocol.Reply(call.call_id, error=_error(
                InternalError(f"{call.op} failed: {type(exc).__name__}"))))

    def _stream(self, front: bytes, call_id: int, items) -> None:
        key = (front, call_id)
        try:
            for item in items:
                if key in self.cancelled:
                    break
                self._send(front, protocol.Reply(call_id, item, last=False))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's finally blocks run now: the request stops on the engine
            self.cancelled.discard(key)
        self._send(front, protocol.Reply(call_id))


def _is_stream(value) -> bool:
    return hasattr(value, "__next__") and not isinstance(value, (str, bytes, dict, list))


def _error(exc: MSCError) -> dict:
    return {"code": exc.code, "message": exc.message, "details": exc.details}
