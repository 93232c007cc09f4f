"""Per-key rate limiting: two token buckets, sustained (per minute) and burst (per second).

A request spends one token from both; it is refused when either is empty.
Headers follow the seed: X-RateLimit-Limit is the per-minute limit,
X-RateLimit-Remaining the sustained bucket's whole tokens, X-RateLimit-Reset the
unix time at which the sustained bucket is full again.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


@dataclass
class RateLimitConfig:
    per_minute: int = 1000
    burst_per_second: int = 100
    enabled: bool = True


class _Bucket:
    __slots__ = ("capacity", "rate", "tokens", "stamp")

    def __init__(self, capacity: float, rate: float, now: float):
        self.capacity, self.rate, self.tokens, self.stamp = capacity, rate, capacity, now

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now


@dataclass
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset: int          # unix seconds when the sustained bucket is full again
    retry_after: float  # seconds until a request would be allowed (0 if allowed)


class RateLimiter:
    def __init__(self, config: RateLimitConfig, clock=time.monotonic, wall=time.time):
        self.config = config
        self._clock, self._wall = clock, wall
        self._buckets: dict[str, tuple[_Bucket, _Bucket]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> Decision:
        cfg = self.config
        now = self._clock()
        with self._lock:
            pair = self._buckets.get(key)
            if pair is None:
                pair = (_Bucket(cfg.per_minute, cfg.per_minute / 60.0, now),
                        _Bucket(cfg.burst_per_second, float(cfg.burst_per_second), now))
                self._buckets[key] = pair
                if len(self._buckets) > 100_000:  # bound memory: forget the oldest idle keys
                    for stale in list(self._buckets)[:10_000]:
                        del self._buckets[stale]
            sustained, burst = pair
            sustained.refill(now)
            burst.refill(now)
            allowed = sustained.tokens >= 1 and burst.tokens >= 1
            if allowed:
                sustained.tokens -= 1
                burst.tokens -= 1
                retry = 0.0
            else:
                retry = max((1 - sustained.tokens) / sustained.rate if sustained.tokens < 1 else 0.0,
                            (1 - burst.tokens) / burst.rate if burst.tokens < 1 else 0.0)
            full_in = (sustained.capacity - sustained.tokens) / sustained.rate
            return Decision(allowed, cfg.per_minute, int(math.floor(sustained.tokens)),
                            int(math.ceil(self._wall() + full_in)), retry)
