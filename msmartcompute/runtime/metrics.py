"""Live counters, latency and throughput, device readings, and the persisted history.

The counters and histograms are Prometheus instruments (instruments.py: multiprocess mode under
`msmartcompute serve`, so every front's requests count); the JSON fields below are read from
those same numbers.

What the fields mean:
  total/successful/failed_requests  API requests answered (status < 400 / >= 400), by every front:
                                    msmartcompute_requests_total.
  inference_requests/_failures      inferences run by the engine (sync, async, batch items):
                                    msmartcompute_inferences_total.
  latency                           p50, in seconds, of the most recent inferences (end to end:
                                    queue wait + run); latency_p50 / latency_p99 the same window.
  request_latency_p50/_p99          over API requests: the upper bound of the histogram bucket
                                    holding that quantile (msmartcompute_request_duration_seconds).
  throughput                        inferences completed per second over the sliding window
                                    (RuntimeConfig.metrics_window_s, or the uptime when shorter);
                                    tokens_per_second likewise for generated tokens.
  active_requests / queued_requests requests inside a run() now / waiting in batch queues and
                                    queued async jobs.
  batch_sizes                       how many run() calls had each batch size (msmartcompute_batch_size;
                                    exact up to 32, then by bucket upper bound).
  queue_depth / queue_depth_max     requests waiting per model now / the most ever seen waiting.
  models                            per model: requests_per_second (over the window), latency_p50 /
                                    latency_p99 (queue wait + run, in the engine), batch_sizes,
                                    queue_depth, queue_depth_max.
  gpu_utilization, temperature,     NVML readings (None with no GPU);
  power_usage
  memory_utilization                device memory used / total (NVML), else host memory in use.
A sampler thread persists a snapshot every RuntimeConfig.metrics_sample_interval_s into the
store's metrics_history table; history() averages them per `interval`-second bucket.
"""
from __future__ import annotations

import collections
import statistics
import threading
import time

from . import clock, devices
from .instruments import Instruments
from .store import Store

HISTORY_FIELDS = ("gpu_utilization", "memory_utilization", "temperature", "power_usage", "throughput",
                  "latency", "active_requests", "queued_requests")
_RECENT = 1024  # latencies kept for the percentiles


def _counts(samples: dict[str, list]) -> dict:
    """The JSON fields that come from the Prometheus instruments' samples."""
    requests = samples.get("msmartcompute_requests_total", [])
    ok = sum(v for labels, v in requests if int(labels["status"]) < 400) if requests else 0
    total = sum(v for _, v in requests)
    inferences = samples.get("msmartcompute_inferences_total", [])
    batches: dict[float, float] = {}
    for labels, v in samples.get("msmartcompute_batch_size_bucket", []):
        batches[float(labels["le"])] = batches.get(float(labels["le"]), 0) + v
    sizes, below = {}, 0.0
    for bound in sorted(b for b in batches if b != float("inf")):
        if batches[bound] > below:
            sizes[str(int(bound))] = int(batches[bound] - below)
        below = batches[bound]
    latency: dict[float, float] = {}
    for labels, v in samples.get("msmartcompute_request_duration_seconds_bucket", []):
        latency[float(labels["le"])] = latency.get(float(labels["le"]), 0) + v
    return {"total_requests": int(total), "successful_requests": int(ok), "failed_requests": int(total - ok),
            "inference_requests": int(sum(v for _, v in inferences)),
            "inference_failures": int(sum(v for labels, v in inferences if labels["status"] != "ok")),
            "batch_sizes": sizes,
            "request_latency_p50": _bucket_quantile(latency, 0.5),
            "request_latency_p99": _bucket_quantile(latency, 0.99)}


def _bucket_quantile(cumulative: dict[float, float], q: float) -> float | None:
    """The upper bound of the histogram bucket holding quantile q (None: no observation, or beyond
    the last finite bucket)."""
    total = cumulative.get(float("inf"), 0)
    if not total:
        return None
    for bound in sorted(cumulative):
        if cumulative[bound] >= q * total:
            return None if bound == float("inf") else bound
    return None


def percentile(values, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class _ModelStats:
    def __init__(self):
        self.batch_sizes: collections.Counter = collections.Counter()
        self.latency = collections.deque(maxlen=_RECENT)
        self.done = collections.deque()  # monotonic times of served requests in the window


class Metrics:
    def __init__(self, store: Store, window_s: float = 60.0):
        self.store = store
        self.window_s = window_s
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self.instruments = Instruments()
        self.active = 0
        self._latency = collections.deque(maxlen=_RECENT)
        self._done = collections.deque()  # (monotonic time, tokens) of completed inferences in the window
        self.queue_depth: dict[str, int] = {}
        self.models: dict[str, _ModelStats] = {}

    # ---- recording --------------------------------------------------------------------------
    def record_request(self, ok: bool, latency_s: float, route: str = "-", method: str = "-",
                       status: int | None = None) -> None:
        """One API request (the API's middleware records into its own Instruments; this is for
        callers without an app)."""
        status = status if status is not None else (200 if ok else 500)
        self.instruments.labelled(self.instruments.requests, route, method, str(status)).inc()
        self.instruments.labelled(self.instruments.request_seconds, route).observe(latency_s)

    def record_inference(self, ok: bool, latency_s: float, tokens: int = 0, model: str = "-",
                         code: str = "ok") -> None:
        """model: a loaded model's id, or "-" (never a caller's unknown id: label values stay few)."""
        now = time.monotonic()
        self.instruments.labelled(self.instruments.inferences, model, "ok" if ok else code).inc()
        if not ok:
            return
        self.instruments.labelled(self.instruments.inference_seconds, model).observe(latency_s)
        with self._lock:
            self._latency.append(float(latency_s))
            self._done.append((now, int(tokens)))
            self._trim(now)

    def record_batch(self, model_id: str, size: int, latencies_s: list[float] = ()) -> None:
        """One run() of `size` requests; latencies_s: each request's queue wait + run."""
        self.record_formed_batch(model_id, size)
        self.record_finished(model_id, latencies_s)

    def record_formed_batch(self, model_id: str, size: int) -> None:
        """One forward over `size` requests (a generation step counts its sequences)."""
        self.instruments.labelled(self.instruments.batch_size, model_id).observe(size)
        with self._lock:
            self.models.setdefault(model_id, _ModelStats()).batch_sizes[size] += 1

    def record_finished(self, model_id: str, latencies_s: list[float]) -> None:
        """Requests answered now; latencies_s: each one's queue wait + run."""
        now = time.monotonic()
        with self._lock:
            stats = self.models.setdefault(model_id, _ModelStats())
            stats.latency.extend(latencies_s)
            stats.done.extend([now] * len(latencies_s))

    def record_queue_depth(self, model_id: str, depth: int) -> None:
        self.instruments.labelled(self.instruments.queue_depth, model_id).set(depth)
        with self._lock:
            if depth > self.queue_depth.get(model_id, 0):
                self.queue_depth[model_id] = depth

    def active_add(self, n: int) -> None:
        with self._lock:
            self.active += n

    def _trim(self, now: float) -> None:
        while self._done and self._done[0][0] < now - self.window_s:
            self._done.popleft()
        for stats in self.models.values():
            while stats.done and stats.done[0] < now - self.window_s:
                stats.done.popleft()

    def forget_model(self, model_id: str) -> None:
        with self._lock:
            self.models.pop(model_id, None)
            self.queue_depth.pop(model_id, None)

    # ---- reading ----------------------------------------------------------------------------
    def recent_latency(self) -> float | None:
        with self._lock:
            return statistics.median(self._latency) if self._latency else None

    def snapshot(self, queued: int, depths: dict[str, int] | None = None) -> dict:
        now = time.monotonic()
        if devices.gpu_count() > 0:
            readings = devices.gpu_readings(0)
            memory_utilization = (readings["memory_used"] / readings["memory_total"]
                                  if readings["memory_total"] else devices.host_memory_usage())
        else:
            readings = devices.gpu_readings(0)
            memory_utilization = devices.host_memory_usage()
        counts = _counts(self.instruments.samples())
        with self._lock:
            self._trim(now)
            span = max(1e-9, min(self.window_s, now - self.started))
            latency = list(self._latency)
            return {
                "gpu_utilization": readings["gpu_utilization"],
                "memory_utilization": round(memory_utilization, 4),
                "temperature": readings["temperature"],
                "power_usage": readings["power_usage"],
                "throughput": len(self._done) / span,
                "tokens_per_second": sum(t for _, t in self._done) / span,
                "latency": statistics.median(latency) if latency else None,
                "latency_p50": percentile(latency, 0.5),
                "latency_p99": percentile(latency, 0.99),
                "request_latency_p50": counts["request_latency_p50"],
                "request_latency_p99": counts["request_latency_p99"],
                "active_requests": self.active,
                "queued_requests": int(queued),
                "total_requests": counts["total_requests"],
                "successful_requests": counts["successful_requests"],
                "failed_requests": counts["failed_requests"],
                "inference_requests": counts["inference_requests"],
                "inference_failures": counts["inference_failures"],
                "batch_sizes": counts["batch_sizes"],
                "queue_depth": dict(depths or {}),
                "queue_depth_max": dict(self.queue_depth),
                "models": {model_id: {
                    "requests_per_second": len(stats.done) / span,
                    "latency_p50": percentile(stats.latency, 0.5),
                    "latency_p99": percentile(stats.latency, 0.99),
                    "batch_sizes": {str(k): v for k, v in sorted(stats.batch_sizes.items())},
                    "queue_depth": (depths or {}).get(model_id, 0),
                    "queue_depth_max": self.queue_depth.get(model_id, 0),
                } for model_id, stats in self.models.items()},
            }

    # ---- history ----------------------------------------------------------------------------
    def persist(self, snapshot: dict, ts: float | None = None) -> None:
        ts = clock.now() if ts is None else ts
        self.store.connect().execute(
            f"INSERT INTO metrics_history(ts, {', '.join(HISTORY_FIELDS)}) "
            f"VALUES (?{', ?' * len(HISTORY_FIELDS)})", (ts, *[snapshot.get(f) for f in HISTORY_FIELDS]))

    def history(self, start: float | None, end: float | None, interval: int = 60) -> list[dict]:
        """Snapshots in [start, end] averaged per `interval`-second bucket (bucket start = timestamp)."""
        interval = max(1, int(interval))
        start = 0.0 if start is None else start
        end = clock.now() if end is None else end
        averages = ", ".join(f"AVG({f}) AS {f}" for f in HISTORY_FIELDS)
        rows = self.store.connect().execute(
            f"SELECT CAST(ts / ? AS INTEGER) * ? AS bucket, COUNT(*) AS samples, {averages} "
            "FROM metrics_history WHERE ts >= ? AND ts <= ? GROUP BY bucket ORDER BY bucket",
            (interval, interval, start, end)).fetchall()
        return [{"timestamp": clock.iso(r["bucket"]), "samples": r["samples"],
                 **{f: r[f] for f in HISTORY_FIELDS}} for r in rows]

    def prune_history(self, older_than: float) -> None:
        self.store.connect().execute("DELETE FROM metrics_history WHERE ts < ?", (older_than,))
