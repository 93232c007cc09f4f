"""GET /api/v1/metrics, /api/v1/metrics/history (the seed's JSON) and /metrics (Prometheus text)."""
from __future__ import annotations

from datetime import datetime, timezone

import falcon
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..runtime.errors import InvalidInputData
from .envelope import ok


def _parse_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInputData(f"query.{name} must be an ISO 8601 timestamp, got {value!r}",
                               {"field": f"query.{name}"}) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


class MetricsResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_get(self, req, resp):
        resp.media = ok({"metrics": self.runtime.metrics()})


class MetricsHistoryResource:
    def __init__(self, runtime):
        self.runtime = runtime

    def on_get(self, req, resp):
        start = _parse_time(req.get_param("start_time"), "start_time")
        end = _parse_time(req.get_param("end_time"), "end_time")
        raw_interval = req.get_param("interval", default="60")  # blank is kept (app.py) and refused
        if not raw_interval.isdigit() or not 1 <= int(raw_interval) <= 86400:
            raise InvalidInputData("query.interval must be an integer number of seconds in 1..86400",
                                   {"field": "query.interval", "value": raw_interval})
        if start and end and end < start:
            raise InvalidInputData("query.end_time is before query.start_time", {"field": "query.end_time"})
        resp.media = ok({"history": self.runtime.metrics_history(start, end, int(raw_interval))})


class _ReadingsCollector:
    """The readings of runtime.metrics() that are not Prometheus instruments already (device
    readings, windowed throughput and latency percentiles), as gauges at scrape time; None readings
    are left out, not zeroed."""

    FROM_INSTRUMENTS = {"total_requests", "successful_requests", "failed_requests", "inference_requests",
                        "inference_failures", "request_latency_p50", "request_latency_p99"}

    def __init__(self, runtime):
        self.runtime = runtime

    # per-model generation metrics (runtime/generation/): counters, the rest are gauges
    GENERATION_COUNTERS = ("tokens_generated", "steps", "cancelled_sequences", "preempted")

    def collect(self):
        metrics = self.runtime.metrics()
        yield from self._generation(metrics.get("generation") or {})
        for name, value in metrics.items():
            if name in self.FROM_INSTRUMENTS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            yield GaugeMetricFamily(f"msmartcompute_{name}", name.replace("_", " "), value=value)

    def _generation(self, per_model: dict):
        families = {}
        for model_id, stats in sorted(per_model.items()):
            for name, value in stats.items():
                if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if name not in families:
                    kind = CounterMetricFamily if name in self.GENERATION_COUNTERS else GaugeMetricFamily
                    families[name] = kind(f"msmartcompute_generation_{name}", f"generation: {name.replace('_', ' ')}",
                                          labels=["model_id"])
                families[name].add_metric([model_id], value)
        yield from families.values()


class PrometheusResource:
    """GET /metrics: the instruments (counters with _total, latency histograms in seconds, labels
    model / route / status, queue depth, formed batch size) merged over every serving process,
    then the readings."""

    def __init__(self, runtime, instruments):
        self.instruments = instruments
        self.readings = CollectorRegistry()
        self.readings.register(_ReadingsCollector(runtime))

    def on_get(self, req, resp):
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = generate_latest(self.instruments.read()) + generate_latest(self.readings)
        resp.status = falcon.HTTP_200
