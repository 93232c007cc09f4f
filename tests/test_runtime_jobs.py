"""Async inference jobs: persisted rows, restart recovery, ownership, generic kinds."""
import re
import time
from datetime import datetime

import numpy as np
import pytest

from msmartcompute.runtime.caller import Caller
from msmartcompute.runtime.engine import Runtime, RuntimeConfig
from msmartcompute.runtime.errors import InvalidInputData, InvalidModelId, NotFound

ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
ALICE, BOB, ADMIN = Caller("alice", "user"), Caller("bob", "user"), Caller("root", "admin")
SPEC = {"model_id": "mlp", "model_type": "mlp", "seed": 5,
        "parameters": {"input_size": 8, "hidden_sizes": [16], "output_size": 4}}
X = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)


def make_runtime(path, **kw):
    rt = Runtime(RuntimeConfig(state_dir=path, **kw))
    rt.start()
    return rt


def wait_done(rt, request_id, caller=None, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = rt.inference.get(request_id, caller)
        if out["status"] in ("completed", "failed"):
            return out
        time.sleep(0.02)
    raise AssertionError(f"{request_id} still {out['status']}")


def test_async_inference_completes(tmp_path):
    rt = make_runtime(tmp_path)
    try:
        rt.registry.load(SPEC)
        expected = rt.inference.infer({"model_id": "mlp", "input_data": X})["output_data"]
        job = rt.inference.submit({"model_id": "mlp", "input_data": X})
        assert job["status"] == "queued" and job["request_id"].startswith("req_")
        assert ISO_Z.match(job["estimated_completion"])
        out = wait_done(rt, job["request_id"])
        assert out["status"] == "completed" and np.array_equal(np.asarray(out["output_data"], np.float32), expected)
        assert out["inference_time"] > 0 and ISO_Z.match(out["completion_time"])
        with pytest.raises(NotFound):
            rt.inference.get("req_0_0")
        with pytest.raises(InvalidModelId):
            rt.inference.submit({"model_id": "nope", "input_data": X})
        with pytest.raises(InvalidInputData):
            rt.inference.submit({"model_id": "mlp", "input_data": [[1.0, 2.0]]})
    finally:
        rt.close()


def test_estimated_completion_grows_with_the_queue(tmp_path):
    rt = make_runtime(tmp_path, job_workers=0)  # nothing runs: every job stays queued
    try:
        rt.registry.load(SPEC)
        for _ in range(3):
            rt.inference.infer({"model_id": "mlp", "input_data": X})  # observed latency, no job has completed yet
        latency = rt.metrics()["latency"]
        for k in range(12):
            before = time.time()
            eta = rt.inference.submit({"model_id": "mlp", "input_data": X})["estimated_completion"]
            ahead_s = datetime.fromisoformat(eta).timestamp() - before
            assert ahead_s >= (k + 1) * latency - 0.001  # k jobs ahead, one worker's worth each
            assert ahead_s <= (k + 1) * latency + 0.5
        assert rt.metrics()["queued_requests"] == 12
    finally:
        rt.close()


def test_queued_job_survives_restart(tmp_path):
    rt = make_runtime(tmp_path, job_workers=0)
    rt.registry.load(SPEC)
    expected = rt.inference.infer({"model_id": "mlp", "input_data": X})["output_data"]
    job = rt.inference.submit({"model_id": "mlp", "input_data": X}, caller=ALICE)
    queued = rt.inference.get(job["request_id"], ALICE)
    assert queued == {"request_id": job["request_id"], "status": "queued", "output_data": None,
                      "inference_time": None, "completion_time": None}
    rt.close()

    rt = make_runtime(tmp_path)  # a new server on the same state dir
    try:
        out = wait_done(rt, job["request_id"], ALICE)
        assert out["status"] == "completed" and np.array_equal(np.asarray(out["output_data"], np.float32), expected)
    finally:
        rt.close()


def test_running_jobs_on_restart_rerun_inference_fail_training(tmp_path):
    # no worker of either pool: a training worker could claim train_1 before the UPDATE below
    rt = make_runtime(tmp_path, job_workers=0, training_job_workers=0)
    rt.registry.load(SPEC)
    job = rt.inference.submit({"model_id": "mlp", "input_data": X})
    rt.jobs.submit("train_1", "training", "alice", {"model_id": "mlp"})
    # simulate a server killed while both were running
    rt.store.connect().execute("UPDATE jobs SET status = 'running', started_at = 1")
    rt.close()

    rt = make_runtime(tmp_path)
    try:
        assert wait_done(rt, job["request_id"])["status"] == "completed"
        train = rt.jobs.get("train_1")
        assert train["status"] == "failed" and "not resumed" in train["error"]["message"]
        with pytest.raises(NotFound):  # not an inference job
            rt.inference.get("train_1")
    finally:
        rt.close()


def test_job_failure_is_recorded(tmp_path):
    rt = make_runtime(tmp_path, job_workers=0)
    rt.registry.load(SPEC)
    job = rt.inference.submit({"model_id": "mlp", "input_data": X})
    rt.registry.unload("mlp")  # gone before the job runs
    rt.close()
    rt = make_runtime(tmp_path)
    try:
        out = wait_done(rt, job["request_id"])
        assert out["status"] == "failed" and out["output_data"] is None
        assert out["error"]["code"] == "INVALID_MODEL_ID" and "mlp" in out["error"]["message"]
    finally:
        rt.close()


def test_job_ownership(tmp_path):
    rt = make_runtime(tmp_path)
    try:
        rt.registry.load(SPEC)
        job = rt.inference.submit({"model_id": "mlp", "input_data": X}, caller=ALICE)
        wait_done(rt, job["request_id"], ALICE)
        with pytest.raises(NotFound):  # another user's job: as if it did not exist
            rt.inference.get(job["request_id"], BOB)
        assert rt.inference.get(job["request_id"], ADMIN)["status"] == "completed"
        assert rt.inference.get(job["request_id"])["status"] == "completed"
    finally:
        rt.close()


def test_runner_takes_new_kinds(tmp_path):
    rt = make_runtime(tmp_path)
    try:
        rt.jobs.register("echo", lambda request, token: {"echo": request["n"] * 2}, rerun_on_restart=False)
        rt.jobs.submit("e1", "echo", None, {"n": 21})
        deadline = time.monotonic() + 10
        while rt.jobs.get("e1")["status"] != "completed" and time.monotonic() < deadline:
            time.sleep(0.02)
        job = rt.jobs.get("e1")
        assert job["status"] == "completed" and job["result"] == {"echo": 42}
        assert job["created_at"] <= job["started_at"] <= job["completed_at"]
    finally:
        rt.close()


def test_close_is_prompt_and_loses_no_job(tmp_path):
    rt = make_runtime(tmp_path, job_workers=2)
    rt.registry.load(SPEC)
    ids = [rt.inference.submit({"model_id": "mlp", "input_data": X})["request_id"] for _ in range(20)]
    threads = [*rt._threads, *rt.jobs._threads, *(ex._thread for ex in rt.executors.values())]
    t0 = time.perf_counter()
    rt.close()
    assert time.perf_counter() - t0 < 2.0
    assert not any(t.is_alive() for t in threads)
    rt = make_runtime(tmp_path)  # whatever close cut short runs again; nothing failed
    try:
        assert {wait_done(rt, i)["status"] for i in ids} == {"completed"}
    finally:
        rt.close()
