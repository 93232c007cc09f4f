"""Sessions (ids, expiry, ownership), persisted id counters, metrics counters and history."""
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from msmartcompute.runtime import clock
from msmartcompute.runtime.caller import Caller
from msmartcompute.runtime.engine import Runtime, RuntimeConfig
from msmartcompute.runtime.errors import Forbidden, InvalidModelId, NotFound
from msmartcompute.runtime.metrics import HISTORY_FIELDS

ALICE, BOB, ADMIN = Caller("alice", "user"), Caller("bob", "user"), Caller("root", "admin")
SPEC = {"model_id": "mlp", "model_type": "mlp", "parameters": {"input_size": 8, "hidden_sizes": [16],
                                                                "output_size": 4}}


def make_runtime(path, **kw):
    rt = Runtime(RuntimeConfig(state_dir=path, **kw))
    rt.start()
    if not rt.registry.list():  # a restart restores it
        rt.registry.load(SPEC)
    return rt


def test_sessions(tmp_path):
    rt = make_runtime(tmp_path)
    try:
        s = rt.sessions.create("alice", "mlp", caller=ALICE)
        assert s["session_id"].startswith("alice_") and s["user_id"] == "alice" and s["model_id"] == "mlp"
        created = datetime.fromisoformat(s["created_at"])
        assert (datetime.fromisoformat(s["expires_at"]) - created).total_seconds() == pytest.approx(3600, abs=0.01)
        assert rt.sessions.get(s["session_id"], ALICE) == s == rt.sessions.get(s["session_id"], ADMIN)
        with pytest.raises(NotFound):  # another user's: as if it did not exist
            rt.sessions.get(s["session_id"], BOB)
        with pytest.raises(NotFound):
            rt.sessions.delete(s["session_id"], BOB)
        with pytest.raises(Forbidden):
            rt.sessions.create("alice", "mlp", caller=BOB)
        with pytest.raises(InvalidModelId):
            rt.sessions.create("alice", "nope")
        bob = rt.sessions.create("bob", "mlp", caller=BOB)["session_id"]
        assert bob.startswith("bob_")
        assert rt.sessions.delete(s["session_id"], ALICE) == {"session_id": s["session_id"],
                                                              "message": "Session ended successfully"}
        with pytest.raises(NotFound):
            rt.sessions.get(s["session_id"])
    finally:
        rt.close()
    rt = make_runtime(tmp_path)  # the counter is persisted: ids never repeat
    try:
        assert rt.sessions.create("alice", "mlp")["session_id"] not in (s["session_id"], bob)
        assert rt.sessions.get(bob)["user_id"] == "bob"
    finally:
        rt.close()


def test_sessions_expire(tmp_path):
    rt = make_runtime(tmp_path, session_ttl_s=0.3, reaper_interval_s=3600)
    try:
        a = rt.sessions.create("alice", "mlp")
        b = rt.sessions.create("bob", "mlp")
        assert rt.sessions.get(a["session_id"])["session_id"] == a["session_id"]
        time.sleep(0.4)
        with pytest.raises(NotFound):  # expired on read
            rt.sessions.get(a["session_id"])
        assert rt.store.get("sessions", b["session_id"]) is not None
        assert rt.sessions.purge() == 1  # what the reaper runs
        assert rt.store.items("sessions") == []
    finally:
        rt.close()


def test_request_ids_stay_unique_across_a_restart(tmp_path):
    rt = make_runtime(tmp_path)
    x = np.ones((1, 8), np.float32)
    first = {rt.inference.infer({"model_id": "mlp", "input_data": x})["request_id"] for _ in range(20)}
    rt.close()
    rt = make_runtime(tmp_path)
    try:
        second = rt.inference.infer({"model_id": "mlp", "input_data": x})["request_id"]
        _, unix, _ = second.split("_")
        assert abs(int(unix) - time.time()) < 5
        assert second not in first and len(first) == 20  # 64 random bits (runtime/ids.py)
    finally:
        rt.close()


def test_metrics_counters(tmp_path):
    rt = make_runtime(tmp_path)
    try:
        m = rt.metrics()
        assert m["total_requests"] == m["successful_requests"] == m["failed_requests"] == 0
        assert m["latency"] is None and m["throughput"] == 0 and m["gpu_utilization"] is None
        assert 0 < m["memory_utilization"] < 1
        for ok, latency in [(True, 0.01), (True, 0.03), (False, 0.02)]:
            rt.meter.record_request(ok, latency)
        x = np.ones((2, 8), np.float32)
        for _ in range(5):
            rt.inference.infer({"model_id": "mlp", "input_data": x})
        with pytest.raises(InvalidModelId):
            rt.inference.infer({"model_id": "nope", "input_data": x})
        m = rt.metrics()
        assert (m["total_requests"], m["successful_requests"], m["failed_requests"]) == (3, 2, 1)
        assert m["request_latency_p50"] == 0.025  # the upper bound of the bucket holding the median (0.02 s)
        assert (m["inference_requests"], m["inference_failures"]) == (6, 1)
        assert m["active_requests"] == 0 and m["queued_requests"] == 0
        assert 0 < m["latency_p50"] == m["latency"] <= m["latency_p99"]
        assert m["throughput"] > 0 and m["tokens_per_second"] == 0
        assert sum(m["batch_sizes"].values()) == 5
        # the same numbers as the Prometheus instruments
        samples = rt.meter.instruments.samples()
        assert sum(v for _, v in samples["msmartcompute_requests_total"]) == 3
        assert {(labels["model"], labels["status"]): v for labels, v in samples["msmartcompute_inferences_total"]} \
            == {("mlp", "ok"): 5, ("-", "INVALID_MODEL_ID"): 1}
        assert sum(v for labels, v in samples["msmartcompute_batch_size_count"]) == 5
    finally:
        rt.close()


def test_metrics_history_aggregates_by_interval(tmp_path):
    rt = make_runtime(tmp_path)
    try:
        base = 1_700_000_040 - 1_700_000_040 % 60  # a bucket boundary
        samples = [(base + 5, 0.2, 1.0), (base + 50, 0.4, 3.0), (base + 65, 0.6, None), (base + 130, 0.8, 2.0)]
        for ts, mem, latency in samples:
            rt.meter.persist({"memory_utilization": mem, "latency": latency}, ts=ts)
        start = datetime.fromtimestamp(base, timezone.utc)
        end = datetime.fromtimestamp(base + 120, timezone.utc)
        hist = rt.metrics_history(start, end, interval=60)
        assert [h["timestamp"] for h in hist] == [clock.iso(base), clock.iso(base + 60)]
        assert hist[0]["samples"] == 2
        assert hist[0]["memory_utilization"] == pytest.approx(0.3) and hist[0]["latency"] == pytest.approx(2.0)
        assert hist[1]["memory_utilization"] == pytest.approx(0.6) and hist[1]["latency"] is None
        assert set(HISTORY_FIELDS) <= set(hist[0])
        whole = rt.metrics_history(start, None, interval=3600)
        assert len(whole) == 1 and whole[0]["samples"] == 4
        assert whole[0]["memory_utilization"] == pytest.approx(0.5)
    finally:
        rt.close()


def test_sampler_persists_snapshots(tmp_path):
    rt = make_runtime(tmp_path, metrics_sample_interval_s=0.05)
    try:
        time.sleep(0.4)
        hist = rt.metrics_history(None, None, interval=1)
        assert sum(h["samples"] for h in hist) >= 3
        assert all(0 < h["memory_utilization"] < 1 for h in hist)
    finally:
        rt.close()


_FORKED_COUNTS = """
import json
import os
from msmartcompute.runtime.instruments import Instruments
inst = Instruments()
counter = inst.labelled(inst.inferences, "m", "ok")
counter.inc()
child = os.fork()
if child == 0:
    counter.inc(10)  # the child's own file: the parent's count must stay 1
    os._exit(0)
os.waitpid(child, 0)
counter.inc()
print(json.dumps({"files": os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]), "parent": os.getpid(), "child": child,
                  "total": sum(v for _, v in inst.samples()["msmartcompute_inferences_total"])}))
"""


def test_multiprocess_counts_keep_a_file_per_process_across_fork(tmp_path):
    """instruments.process_id() remembers the pid: a forked child must still write to its own file."""
    out = subprocess.run([sys.executable, "-c", _FORKED_COUNTS], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert {f"counter_{seen['parent']}.db", f"counter_{seen['child']}.db"} <= set(seen["files"])
    assert seen["total"] == 12.0
