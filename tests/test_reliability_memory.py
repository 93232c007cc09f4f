"""Loading and unloading the same model 50 times gives its memory back: the server process's
resident memory returns to its baseline (peers leak here: triton-inference-server/server#5841)."""
import statistics
import time

import numpy as np

from live_server import LiveServer
from reliability_helpers import http, quiet_env, rss_bytes

# ~25 MB of float32 weights: a leak of one copy per cycle would be gigabytes after 50
SPEC = {"model_id": "churn", "model_type": "mlp", "max_batch_size": 4,
        "parameters": {"input_size": 512, "hidden_sizes": [2048, 2048], "output_size": 512}}
WEIGHT_BYTES = 4 * (512 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 512 + 512)


def _cycle(url) -> int:
    """Load, serve two requests, measure RSS while loaded, unload."""
    status, body = http(url, "POST", "/api/v1/models", SPEC)
    assert status == 200, body
    for rows in (1, 3):
        status, body = http(url, "POST", "/api/v1/inference",
                            {"model_id": "churn", "input_data": np.full((rows, 512), 0.01).tolist()})
        assert status == 200 and len(body["output_data"]) == rows, body
    return body


def _settled_rss(pid) -> int:
    samples = []
    for _ in range(5):
        time.sleep(0.05)
        samples.append(rss_bytes(pid))
    return int(statistics.median(samples))


def test_load_unload_50_times_returns_memory(tmp_path):
    server = LiveServer(tmp_path / "state", env=quiet_env())
    url, pid = server.base_url, server.engine_pid()  # the engine holds the models
    try:
        for _ in range(3):  # warm-up: allocator pools, lazy imports, first-use caches
            _cycle(url)
            assert http(url, "DELETE", "/api/v1/models/churn")[0] == 200
        baseline = _settled_rss(pid)
        loaded = []
        for i in range(50):
            _cycle(url)
            if i % 10 == 0:
                loaded.append(rss_bytes(pid))
            assert http(url, "DELETE", "/api/v1/models/churn")[0] == 200
        after = _settled_rss(pid)
        status, body = http(url, "GET", "/api/v1/models")
        assert status == 200 and body["models"] == []
    finally:
        server.stop()
    # the measurement sees the model: RSS grew by most of its weights while it was loaded
    assert min(loaded) - baseline > 0.5 * WEIGHT_BYTES, (baseline, loaded)
    growth = (after - baseline) / baseline
    print(f"RSS baseline {baseline / 2**20:.1f} MiB, after 50 cycles {after / 2**20:.1f} MiB ({growth:+.2%})")
    assert growth < 0.03, (baseline, after)
