"""Durability: SIGKILL with async jobs queued and running loses nothing; SIGTERM drains
in-flight requests and exits 0; the job runner's restart rules."""
import json
import os
import signal
import socket
import sqlite3
import threading
import time

import numpy as np
import pytest

from api_helpers import MLP_SPEC
from live_server import LiveServer
from msmartcompute.runtime.jobs import JobRunner
from msmartcompute.runtime.keys import KeyStore
from msmartcompute.runtime.store import Store
from reliability_helpers import Slow, http, program_spec, quiet_env, save_program, slow_units_for


def _job_states(state_dir) -> dict[str, int]:
    with sqlite3.connect(state_dir / "msmartcompute.sqlite3") as conn:
        return dict(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())


def _wait_terminal(base_url, key, ids, timeout=120):
    deadline = time.monotonic() + timeout
    pending, out = set(ids), {}
    while pending and time.monotonic() < deadline:
        for rid in sorted(pending):
            status, body = http(base_url, "GET", f"/api/v1/inference/{rid}", key=key)
            if status == 429:  # 16 jobs polled 10 times a second outrun the 100/s burst: wait as told
                time.sleep(body["error"]["details"]["retry_after"])
                continue
            assert status == 200, (rid, status, body)  # a job never vanishes
            if body["status"] in ("completed", "failed"):
                out[rid] = body
                pending.discard(rid)
        time.sleep(0.1)
    assert not pending, f"jobs not finished in {timeout} s: {sorted(pending)}"
    return out


@pytest.mark.parametrize("kill", ["group", "engine"])
def test_sigkill_with_jobs_in_flight_loses_nothing(tmp_path, kill):
    """group: SIGKILL to the supervisor, its engine and its fronts, then a new server.
    engine: SIGKILL to the engine process only: the fronts answer 503 until the supervisor has
    started a new engine, which restores everything; the same server serves on."""
    state = tmp_path / "state"
    path = save_program(Slow(), state / "models" / "slow.pt")
    store = Store(state / "msmartcompute.sqlite3")
    keys = KeyStore(store)
    admin, alice = keys.create("root", "admin"), keys.create("alice", "user")
    store.close()

    server = LiveServer(state, env=quiet_env())
    try:
        url = server.base_url
        assert http(url, "POST", "/api/v1/virtualization/gpus",
                    {"virtual_gpu_id": "vg1", "memory_size": 64 << 20, "compute_units": 1}, admin)[0] == 200
        assert http(url, "POST", "/api/v1/models", program_spec("slow", path, max_batch_size=1), admin)[0] == 200
        assert http(url, "POST", "/api/v1/models", {**MLP_SPEC, "virtual_gpu_id": "vg1"}, admin)[0] == 200
        status, session = http(url, "POST", "/api/v1/sessions", {"user_id": "alice", "model_id": "slow"}, alice)
        assert status == 200
        status, alloc = http(url, "POST", "/api/v1/resources",
                             {"user_id": "alice", "memory_size": 1 << 20, "compute_units": 1, "duration": 3600}, alice)
        assert status == 200
        inputs = {}
        units = slow_units_for(0.2)
        for i in range(16):
            x = [[float(units + i), float(i), -0.5]]  # >= 0.2 s each, one at a time
            status, body = http(url, "POST", "/api/v1/inference/async", {"model_id": "slow", "input_data": x}, alice)
            assert status == 200 and body["status"] == "queued"
            inputs[body["request_id"]] = x
        deadline = time.monotonic() + 30
        while _job_states(state).get("running", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        health = []  # the server is busy with jobs: /health still answers at once
        for _ in range(9):
            t0 = time.perf_counter()
            assert http(url, "GET", "/health")[0] == 200
            health.append(time.perf_counter() - t0)
        assert sorted(health)[4] < 0.1, health
        if kill == "group":
            server.kill_group()
        else:
            os.kill(server.engine_pid(), signal.SIGKILL)
            at_kill = _job_states(state)
            status, body = http(url, "GET", "/api/v1/models", key=admin)
            assert status == 503 and body["error"]["code"] == "ENGINE_UNAVAILABLE", (status, body)
    except BaseException:
        server.stop()
        raise
    if kill == "group":
        server.stop()
        at_kill = _job_states(state)
    assert at_kill.get("running", 0) >= 1 and at_kill.get("queued", 0) >= 1, at_kill

    if kill == "group":
        server = LiveServer(state, env=quiet_env())
    try:
        url = server.base_url
        deadline = time.monotonic() + 120
        while http(url, "GET", "/health")[0] != 200:  # a new engine restores the state first
            assert time.monotonic() < deadline, "the engine did not come back"
            time.sleep(0.2)
        results = _wait_terminal(url, alice, inputs)
        assert {r["status"] for r in results.values()} == {"completed"}, results
        for rid, body in results.items():
            np.testing.assert_allclose(body["output_data"], np.asarray(inputs[rid]) * 2)
        status, body = http(url, "GET", "/api/v1/models", key=admin)
        models = {m["model_id"]: m for m in body["models"]}
        assert set(models) == {"slow", "mlp-small"} and {m["status"] for m in models.values()} == {"loaded"}
        assert models["mlp-small"]["virtual_gpu_id"] == "vg1"
        status, out = http(url, "POST", "/api/v1/inference", {"model_id": "mlp-small", "input_data": [[1, 2, 3, 4]]},
                           alice)
        assert status == 200 and np.asarray(out["output_data"]).shape == (1, 3)
        assert http(url, "GET", f"/api/v1/sessions/{session['session_id']}", key=alice)[1]["model_id"] == "slow"
        assert http(url, "GET", f"/api/v1/resources/{alloc['allocation_id']}", key=alice)[1]["memory_size"] == 1 << 20
        assert http(url, "GET", "/api/v1/virtualization/gpus/vg1", key=alice)[1]["memory_size"] == 64 << 20
        assert http(url, "GET", "/api/v1/models", key="msc_nokey_" + "x" * 32)[0] == 401
    finally:
        server.stop()


def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path):
    state = tmp_path / "state"
    path = save_program(Slow(), state / "models" / "slow.pt")
    server = LiveServer(state)  # open mode on loopback
    url = server.base_url
    try:
        assert http(url, "POST", "/api/v1/models", program_spec("slow", path, max_batch_size=1))[0] == 200
        results = {}
        units = slow_units_for(0.6)

        def call(i):
            x = [[float(units + i), float(i)]]  # >= 0.6 s each, served one after another
            results[i] = (x, *http(url, "POST", "/api/v1/inference", {"model_id": "slow", "input_data": x}))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        t_term = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # no new connections while the in-flight requests finish
        refused = False
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
        except ConnectionRefusedError:
            refused = True
        assert server.process.poll() is None, "exited before the in-flight requests finished"
        assert refused
        assert server.process.wait(timeout=45) == 0
        drain_s = time.monotonic() - t_term
        for t in threads:
            t.join(timeout=5)
    finally:
        server.stop()
    assert sorted(results) == [0, 1, 2, 3]
    for x, status, body in results.values():
        assert status == 200, body
        np.testing.assert_allclose(body["output_data"], np.asarray(x) * 2)
    log = server.process.stdout.read().decode()
    assert "draining" in log and "stopped" in log, log
    print(f"SIGTERM to exit: {drain_s:.1f} s")
    assert drain_s < 30


def test_job_runner_restart_rules(tmp_path):
    """What a killed server leaves: `running` rows. A rerunnable kind runs again; another
    kind (training) is failed with the reason; queued jobs of both run."""
    store = Store(tmp_path / "state.sqlite3")
    runner = JobRunner(store, workers=1)
    runner.register("inference", lambda r, token: {"y": r["x"] * 2}, rerun_on_restart=True)
    runner.register("training", lambda r, token: {"epochs": r["x"]}, rerun_on_restart=False)
    # rows as a killed process leaves them (no worker ever started)
    for job_id, kind in (("inf-run", "inference"), ("trn-run", "training"), ("inf-q", "inference"),
                         ("trn-q", "training"), ("bad-q", "training")):
        runner.submit(job_id, kind, "alice", {"x": 3} if job_id != "bad-q" else {})
    conn = store.connect()
    conn.execute("UPDATE jobs SET status = 'running', started_at = 1 WHERE id IN ('inf-run', 'trn-run')")
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while runner.count("queued") + runner.count("running") and time.monotonic() < deadline:
            time.sleep(0.02)
        jobs = {j: runner.get(j) for j in ("inf-run", "trn-run", "inf-q", "trn-q", "bad-q")}
    finally:
        runner.close()
    assert jobs["inf-run"]["status"] == "completed" and jobs["inf-run"]["result"] == {"y": 6}
    assert jobs["trn-run"]["status"] == "failed"
    assert "not resumed" in jobs["trn-run"]["error"]["message"]
    assert jobs["inf-q"]["status"] == "completed" and jobs["trn-q"]["result"] == {"epochs": 3}
    # a handler's crash fails its job with a reason and the worker carries on
    assert jobs["bad-q"]["status"] == "failed" and jobs["bad-q"]["error"]["code"] == "INTERNAL_ERROR"
    assert json.dumps(jobs["bad-q"]["error"])  # stored as JSON
    store.close()
