"""The Prometheus instruments every serving process records into, and reading them back.

Fronts count HTTP requests; the engine counts inferences, queue depth and formed batch sizes.
Under `msmartcompute serve` every process has PROMETHEUS_MULTIPROC_DIR (set by the supervisor):
prometheus_client writes each process's values to files there, and read() merges them, so
/metrics (Prometheus text) and the seed's JSON /api/v1/metrics (runtime/metrics.py) are computed
from the same numbers, whichever process answers. In one process (tests), each Instruments has
its own registry. No torch here: fronts import it.
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (*range(1, 33), 48, 64, 96, 128, 256, 512, 1024)  # one per size up to 32: exact counts


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


def process_id() -> int:
    """os.getpid(), remembered and renewed in a forked child. Under multiprocess mode
    prometheus_client asks on every update whether the process has forked (to write to a file of
    its own); asking the kernel made that 3-4 system calls per request in each process."""
    return _pid


os.register_at_fork(after_in_child=_forked)
if multiprocess():  # set when this process starts (the supervisor's environment), as prometheus_client decides
    values.ValueClass = values.MultiProcessValue(process_id)


class Instruments:
    def __init__(self):
        self.registry = CollectorRegistry()
        self._children: dict = {}
        r = self.registry
        self.requests = Counter("msmartcompute_requests", "HTTP requests answered", ["route", "method", "status"],
                                registry=r)
        self.request_seconds = Histogram("msmartcompute_request_duration_seconds", "HTTP request latency",
                                         ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.inferences = Counter("msmartcompute_inferences", "inferences run by the engine", ["model", "status"],
                                  registry=r)
        self.inference_seconds = Histogram("msmartcompute_inference_duration_seconds",
                                           "inference latency, end to end (queue + run)", ["model"],
                                           buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("msmartcompute_batch_size", "requests per formed batch (one run() call)",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("msmartcompute_queue_depth", "requests waiting in the model's batch queue",
                                 ["model"], multiprocess_mode="livesum", registry=r)

    def labelled(self, metric, *values: str):
        """metric.labels(*values), remembered: labels() checks its arguments and takes a lock on
        every call, a third of what recording a request cost. Label values are few (routes,
        statuses, loaded models, error codes), so the memo stays small."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def read(self) -> CollectorRegistry:
        """What to collect from: every process's values under multiprocess mode, else this one's."""
        if not multiprocess():
            return self.registry
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return merged

    def samples(self) -> dict[str, list]:
        """{sample name: [(labels, value), ...]} over read()."""
        out: dict[str, list] = {}
        for family in self.read().collect():
            for s in family.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
        return out
