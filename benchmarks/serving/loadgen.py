"""A bounded HTTP load generator: loopback only, a fixed number of requests and a time limit.

`concurrency` threads each keep one keep-alive connection and send requests back to back
(closed loop) until `requests` have been sent or `time_limit_s` has passed, whichever comes
first: it always stops by itself. With `processes` > 1 the threads are spread over that many
forked processes, so one interpreter's GIL does not cap the load (a server with many fronts on
many cores answers faster than one Python process can ask). A sample of responses is checked against the model's local
output, so a target cannot look fast by answering wrongly (a wrong answer counts as an error).
"""
from __future__ import annotations

import http.client
import ipaddress
import itertools
import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Target:
    """How to talk to one server: where, and how to build a body and read the rows back."""
    name: str
    host: str
    port: int
    path: str
    encode: Callable[[np.ndarray], bytes]           # [rows, in] float32 -> request body
    decode: Callable[[bytes], np.ndarray]           # response body -> [rows, out]
    headers: dict = field(default_factory=dict)


@dataclass
class LoadResult:
    target: str
    concurrency: int
    requests: int               # answered (ok or not)
    errors: int                 # non-2xx, transport errors and wrong answers
    wrong: int                  # checked responses whose rows differ from the local model
    checked: int
    elapsed_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    first_error: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _require_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the load generator only targets loopback addresses, not {host}")


def run_load(target: Target, inputs: np.ndarray, expected: np.ndarray, concurrency: int,
             requests: int, time_limit_s: float, check_every: int = 10, warmup: int = 0,
             rtol: float = 1e-4, atol: float = 1e-5, processes: int = 1) -> LoadResult:
    """inputs: [P, in] float32 request rows (request i sends row i % P); expected: [P, out]."""
    _require_loopback(target.host)
    args = (target, inputs, expected, check_every, warmup, rtol, atol)
    if processes <= 1:
        parts = [_load(*args, concurrency, requests, time_limit_s)]
    else:
        parts = _forked(args, concurrency, requests, time_limit_s, processes)
    latencies = [dt for part in parts for dt in part["latencies"]]
    errors, elapsed = sum(p["errors"] for p in parts), max(p["elapsed"] for p in parts)
    lat = np.sort(np.asarray(latencies)) * 1000 if latencies else np.asarray([float("nan")])
    return LoadResult(target.name, concurrency, len(latencies) + errors, errors, sum(p["wrong"] for p in parts),
                      sum(p["checked"] for p in parts), elapsed, len(latencies) / elapsed if elapsed > 0 else 0.0,
                      float(np.percentile(lat, 50)), float(np.percentile(lat, 99)),
                      next((p["first_error"] for p in parts if p["first_error"]), None))


def _forked(args: tuple, concurrency: int, requests: int, time_limit_s: float, processes: int) -> list[dict]:
    """_load in `processes` forked children, the connections and the request budget shared out."""
    ctx = multiprocessing.get_context("fork")  # the child inherits target's encode/decode closures as is
    shares = [n for n in (concurrency // processes + (i < concurrency % processes) for i in range(processes)) if n]
    children, pipes = [], []
    for share in shares:
        receive, send = ctx.Pipe(duplex=False)

        def child(send=send, share=share):
            send.send(_load(*args, share, max(1, requests * share // concurrency), time_limit_s))

        proc = ctx.Process(target=child, daemon=True)
        proc.start()
        send.close()
        children.append(proc)
        pipes.append(receive)
    try:
        return [pipe.recv() for pipe in pipes]
    finally:
        for proc in children:
            proc.join(10)


def _load(target: Target, inputs: np.ndarray, expected: np.ndarray, check_every: int, warmup: int,
          rtol: float, atol: float, concurrency: int, requests: int, time_limit_s: float) -> dict:
    """One process's share: its latencies (s) and counts."""
    bodies = [target.encode(inputs[i:i + 1]) for i in range(len(inputs))]
    headers = {"Content-Type": "application/json", **target.headers}
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    stats = {"errors": 0, "wrong": 0, "checked": 0, "first_error": None}
    start_barrier = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def record_error(msg: str) -> None:
        with lock:
            stats["errors"] += 1
            if stats["first_error"] is None:
                stats["first_error"] = msg[:300]

    def one(conn: http.client.HTTPConnection, i: int) -> tuple[http.client.HTTPConnection, float | None]:
        k = i % len(bodies)
        t0 = time.perf_counter()
        try:
            conn.request("POST", target.path, body=bodies[k], headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            record_error(f"{type(exc).__name__}: {exc}")
            return http.client.HTTPConnection(target.host, target.port, timeout=60), None
        dt = time.perf_counter() - t0
        if not 200 <= resp.status < 300:
            record_error(f"HTTP {resp.status}: {data[:200]!r}")
            return conn, None
        if i % check_every == 0:
            try:
                got = np.asarray(target.decode(data), dtype=np.float32)
                good = got.shape == expected[k:k + 1].shape and np.allclose(got, expected[k:k + 1], rtol=rtol,
                                                                           atol=atol)
            except Exception as exc:  # an unreadable answer is a wrong answer
                good, got = False, exc
            with lock:
                stats["checked"] += 1
            if not good:
                with lock:
                    stats["wrong"] += 1
                record_error(f"wrong answer for row {k}: {str(got)[:200]}")
                return conn, None
        return conn, dt

    def worker() -> None:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=60)
        for w in range(warmup):  # not timed: connection set-up, first-call costs
            conn, _ = one(conn, w)
        mine = []
        start_barrier.wait()
        while True:
            i = next(counter)
            if i >= requests or time.perf_counter() >= stop_at[0]:
                break
            conn, dt = one(conn, i)
            if dt is not None:
                mine.append(dt)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + time_limit_s + 3600  # set for real once all are warm
    start_barrier.wait()
    stats.update(errors=0, wrong=0, checked=0, first_error=None)  # warm-up errors do not count
    t0 = time.perf_counter()
    stop_at[0] = t0 + time_limit_s
    for t in threads:
        t.join(time_limit_s + 120)
    return {**stats, "latencies": latencies, "elapsed": time.perf_counter() - t0}
