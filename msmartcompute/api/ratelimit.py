"""Rate limiting: two token buckets per caller, sustained (per minute) and burst (per second).

A request spends one token from both; it is refused (429) when either is empty. Buckets are per
USER (every key of a user shares them; open mode: per client address), and requests that fail
authentication are limited per client address, so guessing keys costs tokens too.

Start: a new caller's buckets start FULL: it may send `burst_per_second` requests at once, and
`per_minute` in its first minute; then the sustained bucket refills at per_minute / 60 a second.

Headers follow the seed: X-RateLimit-Limit is the per-minute limit; X-RateLimit-Remaining the
requests the caller may still make in the sustained window (the sustained bucket's whole tokens
after this request), 0 on a 429 (none is allowed now; Retry-After says when one is);
X-RateLimit-Reset the unix time at which the sustained bucket is full again.

Across front processes the limits stay exact because the buckets live in ONE place, the engine
process (serving/engine_server.py decides on its I/O thread): one process decides every request
in arrival order, and it costs no message of its own: the request's first call to the engine
carries the caller's key, the engine spends the token before it runs the call (or refuses it)
and its reply carries the decision the headers show (RemoteRateLimiter). Shared memory would
need a cross-process lock around every bucket update and a way to rebuild the table when a
front dies; the engine is already the one process every front talks to.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from ..runtime.errors import RateLimitExceeded


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

    def as_tuple(self) -> tuple:
        """As sent from the engine to a front (dataclasses.astuple is several times slower)."""
        return (self.allowed, self.limit, self.remaining, self.reset, self.retry_after)


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
            return Decision(allowed, cfg.per_minute, int(math.floor(sustained.tokens)) if allowed else 0,
                            int(math.ceil(self._wall() + full_in)), retry)



def refusal(decision: Decision, config: RateLimitConfig) -> RateLimitExceeded:
    """The error a refused request answers (429)."""
    retry = max(1, int(decision.retry_after + 0.999))
    return RateLimitExceeded(f"Rate limit exceeded: {decision.limit} requests per minute, "
                             f"bursts of {config.burst_per_second} per second",
                             {"retry_after": retry, "limit": decision.limit})


class RemoteRateLimiter:
    """The engine's RateLimiter, as a front process sees it. defer(): the request's token is spent
    by its first call to the engine, in the same message (serving/engine_client.py); settle() at
    the response gives that call's decision, or spends the token now when the request made no
    call (answered in the front: a bad body, an unknown route)."""

    deferred = True

    def __init__(self, engine, config: RateLimitConfig):
        self.engine, self.config = engine, config

    def check(self, key: str) -> Decision:
        return Decision(*self.engine.call("ratelimit.check", key))

    def defer(self, key: str) -> None:
        self.engine.charge_next_call(key)

    def settle(self) -> tuple[Decision | None, bool]:
        """(this request's decision, whether an engine call carried it); (None, False) when no
        token was deferred. Raises the engine's error (503) when it cannot decide now."""
        rate, key = self.engine.take_rate()
        if rate is not None:
            return Decision(*rate), True
        if key is None:
            return None, False
        return self.check(key), False
