"""The engine as a front process sees it: an object with the Runtime's services
(`client.inference.infer(...)`, `client.registry.load(...)`, `client.health()`, ...), each call
sent to the engine process and answered there (protocol.py).

The transport is a Unix stream socket to the engine. In a front, one connection serves the whole
process: a call writes its message and parks its request's greenlet on the front's loop
(serving/loop.py), which reads the replies and resumes each request with its own: no thread
hand-off anywhere on the path. Elsewhere (tests, tools, a front's start-up) each thread has its
own blocking connection and waits on it. A call the engine answers with a stream returns a
ReplyStream: iterate it for the messages; close() (or leaving it early) tells the engine the
client went away.

Engine down: no live engine named in the pid file, a call raises EngineUnavailable (HTTP 503 in
the envelope) at once; the engine's connection closes while a call waits (it died or was
replaced), the call raises EngineUnavailable at once; the next calls connect to the new engine
as soon as it listens.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections import deque
from pathlib import Path

import greenlet
from waitress import wasyncore

from ..runtime import errors
from ..runtime.operations import OPERATIONS
from . import protocol

log = logging.getLogger("msmartcompute.front")

_ERRORS = {cls.code: cls for cls in errors.MSCError.__subclasses__()}
_CONNECT_S = 2.0      # at most this long to connect to a live engine still starting before answering 503
_READ_BYTES = 1 << 18


def engine_pid(pid_file: Path) -> int | None:
    """The pid of the live engine process, or None while there is none."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return pid


class EngineClient:
    def __init__(self, address: str, pid_file: Path, loop=None):
        self.address = address  # the engine's Unix socket
        self.pid_file = Path(pid_file)
        self.loop = loop        # a front's serving.loop.Loop; None: a blocking connection per thread
        self._shared = _LoopConnection(self, loop) if loop is not None else None
        self._local = threading.local()
        self._ids = itertools.count(1)
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

    def _connection(self):
        if self._shared is not None and self.loop.in_request():
            return self._shared
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = _BlockingConnection(self)
        return connection

    def connect(self) -> socket.socket:
        """A new connection to the live engine: EngineUnavailable at once when none runs; while
        one is starting (its socket not yet listening) tried again for up to _CONNECT_S."""
        deadline = time.monotonic() + _CONNECT_S
        while True:
            if engine_pid(self.pid_file) is None:
                raise _unavailable()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.address)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise _unavailable() from None
                if self._shared is not None and self.loop.in_request():
                    self.loop.sleep(0.02)
                else:
                    time.sleep(0.02)

    # The rate-limit token of an HTTP request travels with its first engine call. Its state lives
    # on the request's greenlet (a front) or on the thread's own (elsewhere).
    def charge_next_call(self, rate_key: str) -> None:
        """The next call made by this request (its first) spends a rate-limit token of rate_key
        in the engine before it runs: one message for both (api/ratelimit.py)."""
        request = greenlet.getcurrent()
        request.msc_rate_key, request.msc_rate = rate_key, None

    def take_rate(self) -> tuple[tuple | None, str | None]:
        """(the engine's decision on the charged call, the key still to charge when no call
        carried it), and forget both."""
        request = greenlet.getcurrent()
        out = (getattr(request, "msc_rate", None), getattr(request, "msc_rate_key", None))
        request.msc_rate = request.msc_rate_key = None
        return out

    def call(self, op: str, *args, **kwargs):
        request = greenlet.getcurrent()
        rate_key = getattr(request, "msc_rate_key", None)
        call_id = next(self._ids)
        connection = self._connection()
        connection.send(call_id, protocol.pack(protocol.encode(
            protocol.Call(call_id, op, list(args), kwargs, rate_key))))
        if rate_key is not None:
            request.msc_rate_key = None  # sent: this call carries it
        first = self.checked(connection.receive(call_id))
        if first.last:
            return first.value
        return ReplyStream(self, connection, call_id, first)

    @staticmethod
    def checked(reply: protocol.Reply) -> protocol.Reply:
        """The reply, its rate-limit decision kept for take_rate(); its error raised."""
        if reply.rate is not None:
            greenlet.getcurrent().msc_rate = reply.rate
        if reply.error is not None:
            cls = _ERRORS.get(reply.error["code"], errors.InternalError)
            exc = cls(reply.error["message"], reply.error["details"])
            exc.code = reply.error["code"]
            raise exc
        return reply


class _BlockingConnection:
    """One thread's own connection: a call sends and then reads until its reply comes."""

    def __init__(self, client: EngineClient):
        self.client = client
        self.sock: socket.socket | None = None
        self.reader = protocol.MessageReader()
        self.received: deque = deque()  # messages read and not yet taken

    def send(self, call_id: int, buffers: list) -> None:
        for attempt in (1, 2):
            if self.sock is None:
                self.sock = self.client.connect()
            try:
                protocol.send_buffers(self.sock, buffers)
                return
            except OSError:  # the engine this thread last talked to is gone: once more, to the live one
                self.close()
                if attempt == 2:
                    raise _unavailable() from None

    def receive(self, call_id: int) -> protocol.Reply:
        while True:
            while self.received:
                reply = protocol.decode_reply(self.received.popleft())
                if reply.call_id == call_id:
                    return reply  # (others: the rest of a call this thread gave up on)
            try:
                data = self.sock.recv(_READ_BYTES)
            except OSError:
                data = b""
            if not data:
                self.close()
                raise _stopped()
            self.received.extend(self.reader.feed(data))

    def cancel(self, call_id: int) -> None:
        try:
            protocol.send_buffers(self.sock, protocol.pack(protocol.encode(protocol.Cancel(call_id))))
        except (OSError, AttributeError):
            pass

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.reader, self.received = None, protocol.MessageReader(), deque()


class _Waiter:
    __slots__ = ("replies", "request", "lost")

    def __init__(self):
        self.replies: deque = deque()
        self.request = None  # the greenlet parked for the next reply
        self.lost = False    # the connection closed before the last reply


class _LoopConnection:
    """A front's one connection: the loop reads it and resumes each waiting request."""

    def __init__(self, client: EngineClient, loop):
        self.client, self.loop = client, loop
        self.socket: _EngineSocket | None = None
        self.waiting: dict[int, _Waiter] = {}

    def send(self, call_id: int, buffers: list) -> None:
        if self.socket is None:
            self.socket = _EngineSocket(self, self.client.connect())
        self.waiting[call_id] = _Waiter()
        self.socket.push(buffers)

    def receive(self, call_id: int) -> protocol.Reply:
        waiter = self.waiting.get(call_id)
        if waiter is None:
            raise _stopped()
        if not waiter.replies and not waiter.lost:
            waiter.request = greenlet.getcurrent()
            try:
                self.loop.wait()
            finally:
                waiter.request = None
        if not waiter.replies:
            self.waiting.pop(call_id, None)
            raise _stopped()
        reply = waiter.replies.popleft()
        if reply.last:
            del self.waiting[call_id]
        return reply

    def cancel(self, call_id: int) -> None:
        if self.waiting.pop(call_id, None) is not None and self.socket is not None:
            self.socket.push(protocol.pack(protocol.encode(protocol.Cancel(call_id))))

    def deliver(self, reply: protocol.Reply) -> None:
        waiter = self.waiting.get(reply.call_id)
        if waiter is None:
            return  # the rest of a call its request gave up on
        waiter.replies.append(reply)
        if waiter.request is not None:
            self.loop.resume(waiter.request)
            waiter.request = None

    def lost(self, sock) -> None:
        """The engine's connection closed: every call waiting on it fails now."""
        if sock is not self.socket:
            return
        self.socket = None
        for waiter in self.waiting.values():  # each is forgotten when its request has seen it
            waiter.lost = True
            if waiter.request is not None:
                self.loop.resume(waiter.request)
                waiter.request = None


class _EngineSocket(wasyncore.dispatcher):
    """The engine's connection in the front's loop: replies read as they come; the calls of one
    loop turn written together at its end (one sendmsg, one wake-up of the engine, which then
    reads them all and batches them), and what the socket could not take as it drains."""

    def __init__(self, owner: _LoopConnection, sock: socket.socket):
        super().__init__(sock, map=owner.loop.map)
        self.connected = True  # waitress' dispatcher leaves it False for a socket it is given
        self.owner = owner
        self.reader = protocol.MessageReader()
        self.outbox: list = []

    def push(self, buffers: list) -> None:
        if not self.outbox:
            self.owner.loop.at_turn_end(self.handle_write)
        self.outbox.extend(buffers)

    def writable(self) -> bool:
        return bool(self.outbox)

    def handle_write(self) -> None:
        if not self.outbox or not self.connected:
            return
        try:
            self.outbox = protocol.send_buffers(self.socket, self.outbox)
        except OSError:
            self.handle_close()

    def handle_read(self) -> None:
        data = self.recv(_READ_BYTES)  # b"" and handle_close() when the engine is gone
        for frames in self.reader.feed(data):
            self.owner.deliver(protocol.decode_reply(frames))

    def handle_close(self) -> None:
        self.close()
        self.owner.lost(self)

    def handle_error(self) -> None:
        log.exception("the engine's connection failed: closing it")
        self.handle_close()


class _Service:
    """A namespace for one service's operations (client.inference.infer, ...)."""


class ReplyStream:
    """The messages of a streamed reply, in order; close() cancels the rest on the engine."""

    def __init__(self, client: EngineClient, connection, call_id: int, first: protocol.Reply):
        self.client, self.connection, self.call_id = client, connection, call_id
        self._pending, self.done = first, False

    def __iter__(self):
        return self

    def __next__(self):
        if self._pending is not None:
            reply, self._pending = self._pending, None
            return reply.value
        if self.done:
            raise StopIteration
        reply = self.client.checked(self.connection.receive(self.call_id))
        if reply.last:
            self.done = True
            raise StopIteration
        return reply.value

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.connection.cancel(self.call_id)


def _unavailable() -> errors.EngineUnavailable:
    return errors.EngineUnavailable("the engine process is not running (it is being restarted); retry shortly",
                                    {"retry": True})


def _stopped() -> errors.EngineUnavailable:
    return errors.EngineUnavailable("the engine process stopped while serving this request; it is being restarted, "
                                    "retry shortly", {"retry": True})
