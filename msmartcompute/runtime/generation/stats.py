"""One decoder's generation metrics: time to first token, inter-token latency, generated
tokens per second over the metrics window, preemptions; the live counts (running, waiting,
KV blocks) are read from its scheduler when a snapshot is taken."""
from __future__ import annotations

import collections
import threading
import time

from ..metrics import percentile

_RECENT = 1024  # latencies kept for the percentiles


class GenerationStats:
    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._ttft = collections.deque(maxlen=_RECENT)
        self._itl = collections.deque(maxlen=_RECENT)
        self._tokens = collections.deque()   # (monotonic time, tokens) per step in the window
        self.generated = 0
        self.steps = 0
        self.cancelled = 0

    def record_first_token(self, seconds: float) -> None:
        with self._lock:
            self._ttft.append(seconds)

    def record_inter_token(self, seconds: float) -> None:
        with self._lock:
            self._itl.append(seconds)

    def record_step(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.steps += 1
            self.generated += tokens
            self._tokens.append((now, tokens))
            while self._tokens and self._tokens[0][0] < now - self.window_s:
                self._tokens.popleft()

    def record_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def snapshot(self) -> dict:
        now = time.monotonic()
        with self._lock:
            span = max(1e-9, min(self.window_s, now - self.started))
            recent = sum(t for ts, t in self._tokens if ts >= now - self.window_s)
            ttft, itl = list(self._ttft), list(self._itl)
            return {"time_to_first_token_p50": percentile(ttft, 0.5),
                    "time_to_first_token_p99": percentile(ttft, 0.99),
                    "inter_token_latency_p50": percentile(itl, 0.5),
                    "inter_token_latency_p99": percentile(itl, 0.99),
                    "tokens_per_second": recent / span,
                    "tokens_generated": self.generated,
                    "steps": self.steps,
                    "cancelled_sequences": self.cancelled}
