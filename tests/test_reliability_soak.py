"""Soak: thousands of mixed requests at concurrency 32 against a live server (threads, one
keep-alive connection each) while 200 more connections sit idle: zero 5xx, zero lost async
results, /health fast, resident memory flat between the first and the last thousand requests.
Slow: run by .ci/run (MSC_RELIABILITY_SLOW=1)."""
import http.client
import itertools
import json
import os
import select
import socket
import threading
import time

import pytest

from live_server import LiveServer
from msmartcompute.runtime.keys import KeyStore
from msmartcompute.runtime.store import Store
from reliability_helpers import http as http1
from reliability_helpers import quiet_env, rss_bytes

pytestmark = pytest.mark.skipif(os.environ.get("MSC_RELIABILITY_SLOW") != "1",
                                reason="slow: run by .ci/run (MSC_RELIABILITY_SLOW=1)")

TOTAL = int(os.environ.get("MSC_SOAK_REQUESTS", "6000"))
CONCURRENCY = 32
IDLE_CONNECTIONS = 200  # open and silent beside the load: they must not take the server's slots
MLP = {"model_id": "soak-mlp", "model_type": "mlp", "max_batch_size": 16,
       "parameters": {"input_size": 16, "hidden_sizes": [64], "output_size": 4}}
LM = {"model_id": "soak-lm", "model_type": "transformer", "max_batch_size": 8, "max_sequence_length": 64,
      "parameters": {"vocab_size": 32, "hidden_size": 16, "num_heads": 2, "num_layers": 1}}


class Client:
    """One keep-alive connection; reconnects if the server closed it."""

    def __init__(self, port, key):
        self.port, self.key = port, key
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def __call__(self, method, path, body=None):
        data = None if body is None else json.dumps(body)
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if attempt:
                    raise


def hold_idle_connections(port: int, count: int, stop: threading.Event) -> None:
    """Keep `count` silent connections open until `stop`: one the server closed (its idle
    timeout) is replaced within a second."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    try:
        while not stop.wait(1.0):
            closed, _, _ = select.select(socks, [], [], 0)  # readable = the server closed it
            for s in closed:
                socks.remove(s)
                s.close()
                socks.append(socket.create_connection(("127.0.0.1", port)))
    finally:
        for s in socks:
            s.close()


def _row(i, width=16):
    return [((i * 7 + j) % 13) / 13.0 for j in range(width)]


def test_soak(tmp_path):
    state = tmp_path / "state"
    store = Store(state / "msmartcompute.sqlite3")
    keys = KeyStore(store)
    admin = keys.create("root", "admin")
    users = [keys.create(f"user{i}", "user") for i in range(4)]
    store.close()
    log_file = tmp_path / "server.log"
    server = LiveServer(state, env=quiet_env(MSC_RATE_LIMIT_ENABLED="0"), log_file=log_file)
    url, pid = server.base_url, server.engine_pid()  # the engine holds the models
    counter = itertools.count()
    lock = threading.Lock()
    statuses: dict[int, int] = {}
    async_jobs: list[tuple[str, str]] = []  # (request_id, key)
    rss: dict[str, int] = {}
    failures: list[str] = []
    health_s: list[float] = []  # /health round trips under the full load

    def one(call, key, i, w):
        kind = i % 12
        user = f"user{users.index(key)}"
        if kind == 0:
            return call("POST", "/api/v1/inference", {"model_id": "soak-mlp", "input_data": [_row(i)]})
        if kind == 1:
            status, body = call("POST", "/api/v1/inference/async", {"model_id": "soak-mlp",
                                                                    "input_data": [_row(i), _row(i + 1)]})
            if status == 200:
                with lock:
                    async_jobs.append((body["request_id"], key))
            return status, body
        if kind == 2:
            with lock:
                mine = [rid for rid, k in async_jobs[-50:] if k == key]
            return call("GET", f"/api/v1/inference/{mine[-1]}") if mine else call("GET", "/health")
        if kind == 3:
            return call("POST", "/api/v1/inference/batch", {"requests": [
                {"model_id": "soak-mlp", "input_data": [_row(i + j)]} for j in range(3)]})
        if kind == 4:
            return call("POST", "/api/v1/inference", {"model_id": "soak-lm", "input_data": [[1, 2, 3, i % 32]],
                                                      "options": {"max_tokens": 4, "seed": i}})
        if kind == 5:
            status, body = call("POST", "/api/v1/sessions", {"user_id": user, "model_id": "soak-mlp"})
            if status != 200:
                return status, body
            return call("DELETE", f"/api/v1/sessions/{body['session_id']}")
        if kind == 6 and w >= 2:  # the host has 2 compute units: at most 2 allocations at a time
            return call("GET", "/api/v1/resources")
        if kind == 6:
            status, body = call("POST", "/api/v1/resources", {"user_id": user, "memory_size": 4096,
                                                              "compute_units": 1, "duration": 60})
            if status != 200:
                return status, body
            return call("DELETE", f"/api/v1/resources/{body['allocation_id']}")
        if kind == 7:
            return call("POST", "/api/v1/inference", {"model_id": "soak-mlp", "input_data": [[1.0, 2.0]]})  # 400
        if kind == 8:
            return call("POST", "/api/v1/inference", {"model_id": "missing", "input_data": [_row(i)]})  # 404
        if kind == 9:
            return call("GET", "/api/v1/metrics")
        if kind == 10:
            return call("GET", "/api/v1/models")
        t0 = time.perf_counter()
        out = call("GET", "/health")
        with lock:
            health_s.append(time.perf_counter() - t0)
        return out

    def worker(w):
        key = users[w % len(users)]
        call = Client(server.port, key)
        while True:
            i = next(counter)
            if i >= TOTAL:
                return
            try:
                status, body = one(call, key, i, w)
            except Exception as exc:  # a dropped connection is a failure too
                with lock:
                    failures.append(f"{i}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status >= 500:
                    failures.append(f"{i}: {status} {body}")
                done = sum(statuses.values())
                if done == 1000:
                    rss["first_1000"] = rss_bytes(pid)

    stop_idle = threading.Event()
    idle = threading.Thread(target=hold_idle_connections, args=(server.port, IDLE_CONNECTIONS, stop_idle))
    idle.start()
    try:
        assert http1(url, "POST", "/api/v1/models", MLP, admin)[0] == 200
        assert http1(url, "POST", "/api/v1/models", LM, admin)[0] == 200
        t0 = time.monotonic()
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(CONCURRENCY)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        elapsed = time.monotonic() - t0
        rss["last_1000"] = rss_bytes(pid)
        # every accepted async job ends completed: none lost
        deadline = time.monotonic() + 120
        pending = dict(async_jobs)
        while pending and time.monotonic() < deadline:
            for rid, key in list(pending.items()):
                status, body = http1(url, "GET", f"/api/v1/inference/{rid}", key=key)
                assert status == 200, (rid, status, body)
                if body["status"] == "completed":
                    assert len(body["output_data"]) == 2
                    del pending[rid]
                else:
                    assert body["status"] in ("queued", "running"), body
            time.sleep(0.1)
    finally:
        stop_idle.set()
        idle.join()
        server.stop()
    log = log_file.read_text()
    print(f"\n{TOTAL} requests at concurrency {CONCURRENCY} in {elapsed:.1f} s ({TOTAL / elapsed:.0f}/s); "
          f"statuses {dict(sorted(statuses.items()))}; async jobs {len(async_jobs)}; RSS after the first "
          f"1000 {rss['first_1000'] / 2**20:.1f} MiB, at the end {rss['last_1000'] / 2**20:.1f} MiB")
    health_s.sort()
    p50, p95 = health_s[len(health_s) // 2], health_s[int(len(health_s) * 0.95)]
    print(f"/health under load: p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, max {health_s[-1] * 1000:.1f} ms")
    assert not failures, failures[:20]
    assert p95 < 1.0, (p50, p95)  # queued behind 32 clients on 8 threads, never starved
    assert sum(statuses.values()) == TOTAL
    assert not pending, f"{len(pending)} async results lost or unfinished"
    assert set(statuses) <= {200, 400, 404}, statuses
    assert rss["last_1000"] < 1.05 * rss["first_1000"], rss
    assert "Traceback" not in log, log[-4000:]
