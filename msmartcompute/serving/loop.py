"""A front's one thread: waitress' asyncore loop, with every request served in a greenlet of that
same thread (this Loop is the waitress server's task dispatcher). A request runs until it waits
for the engine (or for time to pass), then the loop goes on with the others; the engine's reply
resumes it. A request's path crosses no thread: waitress' own dispatcher handed every request
to a task thread and its answer back to the loop (a wake-up each way), and the front's 16-32 task
threads took turns on one GIL (perf, c=32: 55% of a front's CPU was the kernel switching between
them). Requests run on a pool of long-lived worker greenlets: a new greenlet per request mapped
and unmapped a 16 KiB Python frame stack and faulted its pages in every time (2 of a front's ~5
system calls per request; 8.1 against 0.6 us per task in a microbenchmark).

Code that waits on something other than the engine client or Loop.sleep would stall the whole
front: nothing in the API does (its store reads are local SQLite reads).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque

import greenlet
from waitress import wasyncore

log = logging.getLogger("msmartcompute.front")

MAX_IDLE_WORKERS = 256  # parked workers kept past a burst; more finish and are freed


class Loop:
    def __init__(self):
        self.hub = greenlet.getcurrent()
        self.map: dict = {}
        self.use_poll = True
        self._ready: deque = deque()  # (greenlet, exception or None, value) to switch into, in order
        self._idle: list = []         # parked workers, each waiting for its next channel
        self._timers: list = []       # heap of (monotonic time, seq, greenlet)
        self._turn_end: list = []     # callables to run once this turn's requests have run
        self._seq = itertools.count()

    def attach(self, server) -> None:
        """Turn the loop over this waitress server's sockets. There is no other thread to wake,
        and the loop rebuilds its poll set every turn: waitress' trigger is not needed."""
        from waitress.server import BaseWSGIServer

        self.map = server._map if hasattr(server, "_map") else server.map  # one socket / several
        self.use_poll = server.adj.asyncore_use_poll
        for listener in [server, *self.map.values()]:
            if isinstance(listener, BaseWSGIServer):
                listener.pull_trigger = _no_wake

    # ---- waitress' task dispatcher -----------------------------------------------------------
    def set_thread_count(self, count: int) -> None:
        """No threads: every request is a greenlet."""

    def add_task(self, channel) -> None:
        # called with the channel's requests_lock held: the request starts once this turn's
        # reads are done, never from inside them
        worker = self._idle.pop() if self._idle else greenlet.greenlet(self._work, parent=self.hub)
        self._ready.append((worker, None, channel))

    def _work(self, channel) -> None:
        me = greenlet.getcurrent()
        while True:
            try:
                channel.service()
            except Exception:  # waitress' service() catches the app's; this is a bug of ours
                log.exception("a request's greenlet failed")
            vars(me).clear()  # what a request kept on its greenlet (engine_client) ends with it
            if len(self._idle) >= MAX_IDLE_WORKERS:
                return
            self._idle.append(me)
            channel = self.hub.switch()

    def shutdown(self, cancel_pending: bool = True, timeout: float = 5) -> bool:
        self._ready.clear()
        self._timers.clear()
        return True

    # ---- for code running in a request's greenlet ---------------------------------------------
    def in_request(self) -> bool:
        return greenlet.getcurrent() is not self.hub

    def wait(self):
        """Park the current request until resume(); raises the exception it was resumed with."""
        return self.hub.switch()

    def resume(self, request: greenlet.greenlet, exception: BaseException | None = None) -> None:
        self._ready.append((request, exception, None))

    def at_turn_end(self, fn) -> None:
        """Run fn once every request ready this turn has run (the engine socket writes what they
        sent in one go)."""
        self._turn_end.append(fn)

    def sleep(self, seconds: float) -> None:
        heapq.heappush(self._timers, (time.monotonic() + seconds, next(self._seq), greenlet.getcurrent()))
        self.wait()

    # ---- the loop ------------------------------------------------------------------------------
    def run_once(self, timeout: float) -> None:
        """One turn: wait at most `timeout` for sockets, serve them, then run every request
        that became ready."""
        if self._ready:
            timeout = 0
        elif self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - time.monotonic()))
        wasyncore.loop(timeout=timeout, map=self.map, use_poll=self.use_poll, count=1)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            self._ready.append((heapq.heappop(self._timers)[2], None, None))
        for _ in range(len(self._ready)):  # those that resume meanwhile run next turn, after a poll
            request, exception, value = self._ready.popleft()
            if request.dead:
                continue
            try:
                if exception is None:
                    request.switch(value)
                else:
                    request.throw(exception)
            except Exception:  # a worker catches its request's errors: this is the switch itself
                log.exception("resuming a request failed")
        turn_end, self._turn_end = self._turn_end, []
        for fn in turn_end:
            fn()


def _no_wake() -> None:
    pass
