"""A front's heartbeat: the monotonic time of its loop's last turn, in an 8-byte file the front
maps and writes (a store to memory, no system call) and the supervisor reads. CLOCK_MONOTONIC
is one clock for every process on the machine.

A front serves every request on its one thread, so a front wedged in one request (a bug, a
deadlock) serves none of its connections: the supervisor kills a front whose heartbeat is older
than `front_stall_timeout_s` and starts another, as gunicorn does with a worker silent past its
timeout.
"""
from __future__ import annotations

import mmap
import struct
import time
from pathlib import Path

_STAMP = struct.Struct("d")


class Heartbeat:
    def __init__(self, path: Path, reset: bool = False):
        """reset: write "now" first (the supervisor, before it starts the front: a front still
        importing is not stalled)."""
        if reset:
            Path(path).write_bytes(_STAMP.pack(time.monotonic()))
        self._file = open(path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), _STAMP.size)

    def beat(self) -> None:
        _STAMP.pack_into(self._map, 0, time.monotonic())

    def age(self) -> float:
        """Seconds since the last beat."""
        return time.monotonic() - _STAMP.unpack_from(self._map, 0)[0]

    def close(self) -> None:
        self._map.close()
        self._file.close()
