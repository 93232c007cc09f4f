"""One token for "stop this work": its deadline and its cancellation.

Running work polls `stopped()` between steps (a training between mini-batches, a dense
generation between decode steps) and then calls `check()`, which raises why: the
cancellation's reason (DELETE /training/{id}: Cancelled), or RequestTimeout past the
deadline. `cancel(reason)` may come from any thread. Stopped work keeps nothing: a stopped
training swaps nothing in, a stopped generation answers no partial output.
"""
from __future__ import annotations

import time

from .errors import MSCError, RequestTimeout


class Deadline:
    def __init__(self, at: float | None = None):
        self.at = at                            # time.monotonic() past which the work is late; None: never
        self._reason: MSCError | None = None

    @classmethod
    def after(cls, seconds: float | None) -> "Deadline":
        return cls(None if seconds is None else time.monotonic() + seconds)

    def cancel(self, reason: MSCError) -> None:
        if self._reason is None:  # the first reason wins
            self._reason = reason

    def stopped(self) -> bool:
        """Cancelled, or past the deadline: the work should stop at its next step."""
        return self._reason is not None or (self.at is not None and time.monotonic() >= self.at)

    def check(self) -> None:
        """Raise why the work must stop, if it must."""
        if self._reason is not None:
            raise type(self._reason)(self._reason.message, dict(self._reason.details))  # a fresh one per raise
        if self.at is not None and time.monotonic() >= self.at:
            raise RequestTimeout("the request ran past its deadline and was stopped")
