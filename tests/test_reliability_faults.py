"""Fault isolation: a failing or out-of-memory request inside a batched forward fails alone,
with the right code and no traceback; over-quota / timed-out / queue-full requests are
answered quickly with their codes; the worker keeps serving."""
import logging
import threading
import time

import numpy as np
import pytest

from api_helpers import Api, assert_error, assert_ok, make_runtime
from reliability_helpers import Faulty, Slow, program_spec, save_program


@pytest.fixture
def faulty_api(tmp_path):
    # a long queue delay: the requests of one /inference/batch call share one forward
    runtime = make_runtime(tmp_path / "state", max_queue_delay_ms=300)
    path = save_program(Faulty(), tmp_path / "state" / "models" / "faulty.pt")
    api = Api(runtime)
    assert_ok(api.post("/api/v1/models", program_spec("faulty", path, max_batch_size=16)))
    yield api
    runtime.close()


def test_failing_request_in_a_batch_fails_alone(faulty_api, caplog):
    api = faulty_api
    rows = [[1.0, 2.0, 3.0], [13.0, 0.0, 0.0], [4.0, 5.0, 6.0], [7.0, 0.0, 0.0], [-1.5, 0.25, 8.0]]
    with caplog.at_level(logging.INFO, logger="msmartcompute.runtime.batching"):
        body = assert_ok(api.post("/api/v1/inference/batch", {"requests": [
            {"model_id": "faulty", "input_data": [r]} for r in rows]}))
    # the first forward held all five (then they were retried one by one)
    assert any("batch of 5 failed" in rec.getMessage() for rec in caplog.records)
    results = body["results"]
    for i in (0, 2, 4):
        assert "error" not in results[i], results[i]
        np.testing.assert_allclose(results[i]["output_data"], [np.asarray(rows[i]) * 2])
    assert results[1]["error"]["code"] == "INTERNAL_ERROR"
    assert "marker 13 seen" in results[1]["error"]["message"]
    assert results[3]["error"]["code"] == "INSUFFICIENT_MEMORY"
    for i in (1, 3):
        message = results[i]["error"]["message"]
        assert "Traceback" not in message and "\n" not in message and "<--- HERE" not in message
    # single requests: the right HTTP status, and the worker still serves
    error = assert_error(api.post("/api/v1/inference", {"model_id": "faulty", "input_data": [[13.0, 1, 1]]}),
                         500, "INTERNAL_ERROR")
    assert "Traceback" not in error["message"] and "forward" not in error["message"]
    assert_error(api.post("/api/v1/inference", {"model_id": "faulty", "input_data": [[7.0, 1, 1]]}),
                 503, "INSUFFICIENT_MEMORY")
    out = assert_ok(api.post("/api/v1/inference", {"model_id": "faulty", "input_data": [[0.5, 1, 2]]}))
    np.testing.assert_allclose(out["output_data"], [[1.0, 2.0, 4.0]])


def test_async_job_failure_is_recorded_and_others_complete(faulty_api):
    api = faulty_api
    ids = [assert_ok(api.post("/api/v1/inference/async", {"model_id": "faulty", "input_data": [[v, 1.0, 1.0]]}))
           ["request_id"] for v in (1.0, 13.0, 2.0)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        responses = [api.get(f"/api/v1/inference/{i}") for i in ids]
        assert [r.status_code for r in responses] == [200] * 3
        states = [r.json for r in responses]
        if all(s["status"] in ("completed", "failed") for s in states):
            break
        time.sleep(0.05)
    assert [s["status"] for s in states] == ["completed", "failed", "completed"]
    assert states[1]["error"]["code"] == "INTERNAL_ERROR" and "Traceback" not in states[1]["error"]["message"]
    np.testing.assert_allclose(states[2]["output_data"], [[4.0, 2.0, 2.0]])


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def test_overload_is_refused_quickly_and_health_stays_fast(tmp_path):
    runtime = make_runtime(tmp_path / "state", max_queue_size=2, max_queue_delay_ms=0,
                           host_memory_capacity=1 << 30)
    path = save_program(Slow(), tmp_path / "state" / "models" / "slow.pt")
    api = Api(runtime)
    assert_ok(api.post("/api/v1/models", program_spec("slow", path, max_batch_size=1)))
    slow = {"model_id": "slow", "input_data": [[10.0, 0.0]]}
    results = []
    threads = [threading.Thread(target=lambda: results.append(api.post("/api/v1/inference", slow)))
               for _ in range(3)]
    # Hold the device so nothing finishes while the queue fills, whatever the machine's speed:
    # one request waits for the device on its own thread, two wait in the queue (its limit).
    hold = runtime.vgpus.schedulers[0].exclusive()
    hold.__enter__()
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while runtime.queued_requests() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        r, took = _timed(lambda: api.post("/api/v1/inference", slow))
        assert_error(r, 503, "QUEUE_FULL")
        assert took < 0.5, took
        # over the timeout: REQUEST_TIMEOUT when the deadline passes, not when the queue drains
        assert_ok(api.post("/api/v1/models", program_spec("slow2", path)))  # same worker, still busy
        r, took = _timed(lambda: api.post("/api/v1/inference", {"model_id": "slow2", "input_data": [[100.0, 0.0]],
                                                                "options": {"timeout": 0.2}}))
        assert_error(r, 504, "REQUEST_TIMEOUT")
        assert 0.2 <= took < 0.6, took
        # over quota: more memory than the host device has, which can never be granted
        r, took = _timed(lambda: api.post("/api/v1/resources", {"user_id": "u", "memory_size": 1 << 40,
                                                                "compute_units": 1, "duration": 60}))
        assert_error(r, 400, "INVALID_INPUT_DATA")
        assert took < 0.5, took
        latencies = []
        for _ in range(10):
            r, took = _timed(lambda: api.get("/health"))
            assert_ok(r)
            latencies.append(took)
        assert sorted(latencies)[len(latencies) // 2] < 0.1, latencies
    finally:
        hold.__exit__(None, None, None)
        for t in threads:
            t.join(timeout=60)
        runtime.close()
    assert sorted(r.status_code for r in results) == [200, 200, 200]
