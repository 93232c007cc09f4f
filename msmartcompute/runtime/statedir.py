"""The state dir's exclusive lock: one engine per state dir.

Taken before anything in the dir is read, so a second `serve` on a live state dir stops
before it loads models or recovers (and so fails) the live server's jobs. An flock on
`<state_dir>/lock`: the kernel drops it when the process dies, even on SIGKILL, so a crash
never leaves a stale lock behind. Short-lived writers beside a live server (the `keys`
command, `store backup`) do not take it; `store restore` does.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "lock"


class StateDirBusy(RuntimeError):
    """Another process holds the state dir."""


class StateDirLock:
    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "StateDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StateDirBusy(f"state dir {self.path.parent} is in use by pid {holder}; "
                               "stop that server first (one server per state dir)") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
