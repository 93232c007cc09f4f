"""The messages between front processes and the engine process (msgspec headers and raw
buffers, framed on a Unix stream socket).

front (one connection per front process,      engine (one I/O thread reads every connection)
       or per thread of a plain client)
  [header: Call, *buffers]             ->   (rate_key set: spend one token of that caller first)
                                       <-   [header: Reply, *buffers]   (one, or a stream of them;
                                                the first carries the rate-limit decision)
  [header: Cancel]                     ->   (the client went away: stop the stream)

Headers are msgpack (msgspec). A numpy array anywhere in the arguments or the result travels as
a raw buffer in its own frame (zero-copy on both ends); the header holds an Ext in its place with
the frame's index, dtype and shape. A Caller travels as an Ext too. A unary call gets one Reply
with `last` set; a streaming one (the operation returned an iterator) gets Replies with `last`
false and then a final one with `last` set; an error is a Reply with `error` set and `last` set.

On the socket a message is [u32 length of the rest][u32 frame count][u32 length of each frame]
[frames...]: written with one sendmsg (the buffers are not joined first) and cut back into
frames by MessageReader.
"""
from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import msgspec
import numpy as np

from ..runtime.caller import Caller

_ARRAY, _CALLER = 1, 2


class Call(msgspec.Struct, tag=True):
    call_id: int
    op: str                       # "service.method", one of runtime.engine.OPERATIONS
    args: list = []
    kwargs: dict = {}
    rate_key: str | None = None   # the HTTP request's rate-limit key: the engine spends its token, then runs op


class Cancel(msgspec.Struct, tag=True):
    call_id: int


class Reply(msgspec.Struct):
    call_id: int
    value: Any = None
    last: bool = True
    error: dict | None = None     # {code, message, details}
    rate: tuple | None = None     # the decision on Call.rate_key: (allowed, limit, remaining, reset, retry_after)


_local = threading.local()        # the frames of the message being encoded / decoded on this thread


def _enc_hook(obj):
    if isinstance(obj, np.ndarray):
        frames = _local.frames
        frames.append(np.ascontiguousarray(obj))
        return msgspec.msgpack.Ext(_ARRAY, msgspec.msgpack.encode((len(frames) - 1, obj.dtype.str, obj.shape)))
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot send a {type(obj).__name__} to the engine")


def _ext_hook(code: int, data: memoryview):
    if code == _ARRAY:
        index, dtype, shape = msgspec.msgpack.decode(data)
        return np.frombuffer(_local.frames[index], dtype=np.dtype(dtype)).reshape(shape)
    if code == _CALLER:
        return Caller(*msgspec.msgpack.decode(data))
    raise ValueError(f"unknown extension {code}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_to_engine = msgspec.msgpack.Decoder(Call | Cancel, ext_hook=_ext_hook)
_to_front = msgspec.msgpack.Decoder(Reply, ext_hook=_ext_hook)


def _caller(value):
    # msgspec would send a Caller (a dataclass) as a plain dict: tag it to come back a Caller
    if isinstance(value, Caller):
        return msgspec.msgpack.Ext(_CALLER, msgspec.msgpack.encode((value.user_id, value.role)))
    return value


def encode(message) -> list:
    """A message as frames: [header, *buffers]."""
    if isinstance(message, Call):  # a caller is always an argument of the call itself
        message = Call(message.call_id, message.op, [_caller(a) for a in message.args],
                       {k: _caller(v) for k, v in message.kwargs.items()}, message.rate_key)
    _local.frames = []
    header = _encoder.encode(message)
    frames, _local.frames = _local.frames, None
    return [header, *frames]


def decode_call(frames: list) -> Call | Cancel:
    return _decode(_to_engine, frames)


def decode_reply(frames: list) -> Reply:
    return _decode(_to_front, frames)


def _decode(decoder, frames):
    _local.frames = [memoryview(f) if not isinstance(f, (bytes, memoryview)) else f for f in frames[1:]]
    try:
        return decoder.decode(frames[0])
    finally:
        _local.frames = None


# ---- framing on a stream socket ------------------------------------------------------------------
_HEAD = struct.Struct("<II")  # length of the rest of the message, number of frames


def pack(frames: list) -> list:
    """The buffers of one message on the wire: its head, then the frames themselves."""
    views = [memoryview(f.reshape(-1).view(np.uint8)) if isinstance(f, np.ndarray) else memoryview(f)
             for f in frames]  # bytes of any array, empty and 0-d ones too
    lengths = [v.nbytes for v in views]
    rest = 4 * len(views) + sum(lengths)
    if rest >= 1 << 32:
        raise ValueError("a message to or from the engine must be under 4 GiB")
    return [_HEAD.pack(rest, len(views)) + struct.pack(f"<{len(views)}I", *lengths), *views]


def send_buffers(sock: socket.socket, buffers: list) -> list:
    """Send as much of `buffers` as the socket takes now (all of it, on a blocking socket);
    returns what is left (empty when all went)."""
    while buffers:
        try:
            sent = sock.sendmsg(buffers[:512])  # under IOV_MAX
        except (BlockingIOError, InterruptedError):
            return buffers
        while sent:
            first = len(buffers[0]) if isinstance(buffers[0], bytes) else buffers[0].nbytes
            if sent >= first:
                sent -= first
                buffers = buffers[1:]
            else:
                buffers = [memoryview(buffers[0])[sent:], *buffers[1:]]
                sent = 0
    return buffers


class MessageReader:
    """Bytes read from a stream socket in, whole messages (lists of frames) out. A frame is a
    view into memory no one else reads or writes, so arrays decoded from it stay valid."""

    def __init__(self):
        self._pending = bytearray()
        self._need = _HEAD.size  # bytes _pending must hold before a message can be cut from it

    def feed(self, data: bytes) -> list[list[memoryview]]:
        if self._pending:
            self._pending += data
            if len(self._pending) < self._need:  # a large message still arriving: no copy per read
                return []
            data, self._pending = bytes(self._pending), bytearray()
        view, pos, messages = memoryview(data), 0, []
        while len(view) - pos >= _HEAD.size:
            rest, count = _HEAD.unpack_from(view, pos)
            end = pos + _HEAD.size + rest
            if end > len(view):
                self._pending += view[pos:]
                self._need = end - pos
                return messages
            lengths = struct.unpack_from(f"<{count}I", view, pos + _HEAD.size)
            at = pos + _HEAD.size + 4 * count
            body = view
            if count > 1:  # arrays: their own writable copy (torch.from_numpy wants one), reused by no one
                body, at = memoryview(bytearray(view[at:end])), 0
            frames = []
            for length in lengths:
                frames.append(body[at:at + length])
                at += length
            messages.append(frames)
            pos = end
        if pos < len(view):
            self._pending += view[pos:]
        self._need = _HEAD.size
        return messages
