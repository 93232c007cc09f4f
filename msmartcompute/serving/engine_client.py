"""The engine as a front process sees it: an object with the Runtime's services
(`client.inference.infer(...)`, `client.registry.load(...)`, `client.health()`, ...), each call
sent to the engine process and answered there (protocol.py).

Each front thread has its own DEALER socket and waits on it for its own reply: no hand-off
between threads on the hot path (a waitress thread serves one request at a time). A call the
engine answers with a stream returns a ReplyStream: iterate it for the messages; close() (or
leaving it early) tells the engine the client went away.

Engine down: a send finds no connected engine (IMMEDIATE) or the engine named in its pid file
dies or is replaced while a call waits: the call raises EngineUnavailable (HTTP 503 in the
envelope) at once; the next calls succeed as soon as the supervisor has started a new engine.
"""
from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import zmq

from ..runtime import errors
from ..runtime.operations import OPERATIONS
from . import protocol

_ERRORS = {cls.code: cls for cls in errors.MSCError.__subclasses__()}
_WAIT_SLICE_MS = 250  # how often a waiting call checks that the engine is still the one it called
_CONNECT_MS = 2000    # at most this long to (re)connect to a live engine before answering 503


def engine_pid(pid_file: Path) -> int | None:
    """The pid of the live engine process, or None while there is none."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _running(pid: int) -> bool:
    """_alive, and not a zombie: a killed engine stays one until the supervisor reaps it, and
    kill(0) still succeeds on it. Read on the slow paths only (a /proc read per check)."""
    if not _alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc: kill(0) is all we can know


class EngineClient:
    def __init__(self, address: str, pid_file: Path):
        self.address = address
        self.pid_file = Path(pid_file)
        self.context = zmq.Context.instance()
        self._local = threading.local()
        self._ids = itertools.count(1)
        self._pid: int | None = None  # the engine's, read from pid_file again only once it is gone
        for op in OPERATIONS:
            service, _, method = op.rpartition(".")
            if service:
                proxy = self.__dict__.setdefault(service, _Service())
                setattr(proxy, method, self._method(op))
            else:
                setattr(self, method, self._method(op))

    def _method(self, op: str):
        def call(*args, **kwargs):
            return self.call(op, *args, **kwargs)
        call.__name__ = op
        return call

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = self._local.socket = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.IMMEDIATE, 1)   # no engine connected: refuse at once, never queue
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.address)
        return sock

    def _engine(self) -> int:
        pid = self._pid
        if pid is None or not _alive(pid):
            pid = self._pid = engine_pid(self.pid_file)
            if pid is None:
                raise _unavailable()
        return pid

    def charge_next_call(self, rate_key: str) -> None:
        """The next call made on this thread (the HTTP request's first) spends a rate-limit token
        of rate_key in the engine before it runs: one message for both (api/ratelimit.py)."""
        self._local.rate_key, self._local.rate = rate_key, None

    def take_rate(self) -> tuple[tuple | None, str | None]:
        """(the engine's decision on the charged call, the key still to charge when no call
        carried it), and forget both."""
        local = self._local
        out = (getattr(local, "rate", None), getattr(local, "rate_key", None))
        local.rate = local.rate_key = None
        return out

    def call(self, op: str, *args, **kwargs):
        pid = self._engine()
        sock, call_id = self._socket(), next(self._ids)
        rate_key = getattr(self._local, "rate_key", None)
        frames = protocol.encode(protocol.Call(call_id, op, list(args), kwargs, rate_key))
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # IMMEDIATE: writable only while connected; a new socket or a restarted engine takes a moment
            if not sock.poll(_CONNECT_MS, zmq.POLLOUT):
                raise _unavailable() from None
            if not _running(pid):  # connected to the engine that replaced the one we called
                self._pid = None
                raise _unavailable()
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                raise _unavailable() from None
        if rate_key is not None:
            self._local.rate_key = None  # sent: this call carries it
        first = self._receive(sock, call_id, pid)
        if first.last:
            return first.value
        return ReplyStream(self, sock, call_id, pid, first)

    def _receive(self, sock: zmq.Socket, call_id: int, pid: int) -> protocol.Reply:
        while True:
            if sock.poll(_WAIT_SLICE_MS):
                reply = protocol.decode_reply(sock.recv_multipart(copy=False))
                if reply.call_id != call_id:
                    continue  # the rest of a call this thread gave up on
                if reply.rate is not None:
                    self._local.rate = reply.rate
                if reply.error is not None:
                    cls = _ERRORS.get(reply.error["code"], errors.InternalError)
                    exc = cls(reply.error["message"], reply.error["details"])
                    exc.code = reply.error["code"]
                    raise exc
                return reply
            if not _running(pid):
                raise errors.EngineUnavailable(
                    "the engine process stopped while serving this request; it is being restarted, "
                    "retry shortly", {"retry": True})


class _Service:
    """A namespace for one service's operations (client.inference.infer, ...)."""


class ReplyStream:
    """The messages of a streamed reply, in order; close() cancels the rest on the engine."""

    def __init__(self, client: EngineClient, sock: zmq.Socket, call_id: int, pid: int, first: protocol.Reply):
        self.client, self.sock, self.call_id, self.pid = client, sock, call_id, pid
        self._pending, self.done = first, False

    def __iter__(self):
        return self

    def __next__(self):
        if self._pending is not None:
            reply, self._pending = self._pending, None
            return reply.value
        if self.done:
            raise StopIteration
        reply = self.client._receive(self.sock, self.call_id, self.pid)
        if reply.last:
            self.done = True
            raise StopIteration
        return reply.value

    def close(self) -> None:
        if not self.done:
            self.done = True
            try:
                self.sock.send_multipart(protocol.encode(protocol.Cancel(self.call_id)), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass


def _unavailable() -> errors.EngineUnavailable:
    return errors.EngineUnavailable("the engine process is not running (it is being restarted); retry shortly",
                                    {"retry": True})
