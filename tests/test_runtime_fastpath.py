"""Dynamic batching as served: batching off runs one request per forward, on groups waiting
requests into one forward, the idle fast path and the drain keep every answer right under
concurrency; request ids stay unique across restarts; cached key lookups expire."""
import re
import threading
import time

import numpy as np
import pytest
import torch

from msmartcompute.runtime import ids
from msmartcompute.runtime.engine import Runtime, RuntimeConfig
from msmartcompute.runtime.keys import KeyStore
from msmartcompute.runtime.store import Store

SPEC = {"model_id": "m", "model_type": "mlp", "max_batch_size": 8,
        "parameters": {"input_size": 16, "hidden_sizes": [32], "output_size": 4}}


def _runtime(tmp_path, delay_ms):
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, max_queue_delay_ms=delay_ms, metrics_sample_interval_s=3600))
    rt.start()
    rt.registry.load(dict(SPEC))
    return rt


def _expected(rt, x):
    with torch.inference_mode():
        return rt.registry.entry("m").model.module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("delay_ms,sizes", [(0, {"1": 8}), (50, {"8": 1})])
def test_batching_off_runs_one_request_per_forward_on_groups_them(tmp_path, delay_ms, sizes):
    rt = _runtime(tmp_path, delay_ms)
    try:
        x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
        out = rt.inference.infer_batch([{"model_id": "m", "input_data": x[i:i + 1]} for i in range(8)])
        got = np.concatenate([np.asarray(r["output_data"], np.float32) for r in out["results"]])
        np.testing.assert_allclose(got, _expected(rt, x), rtol=1e-5, atol=1e-6)
        assert rt.metrics()["batch_sizes"] == sizes
    finally:
        rt.close()


@pytest.mark.parametrize("delay_ms", [0, 2])
def test_concurrent_callers_each_get_their_own_answer(tmp_path, delay_ms):
    rt = _runtime(tmp_path, delay_ms)
    try:
        x = np.random.default_rng(1).standard_normal((16 * 12, 16)).astype(np.float32)
        want = _expected(rt, x)
        wrong, errors = [], []

        def client(k):
            for j in range(12):
                i = k * 12 + j
                try:
                    got = np.asarray(rt.inference.infer({"model_id": "m", "input_data": x[i:i + 1]})["output_data"])
                    if not np.allclose(got, want[i:i + 1], rtol=1e-5, atol=1e-6):
                        wrong.append(i)
                except Exception as exc:  # noqa: BLE001 - collected and asserted below
                    errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and not wrong
        sizes = {int(k): v for k, v in rt.metrics()["batch_sizes"].items()}
        assert sum(k * v for k, v in sizes.items()) == 16 * 12
        if delay_ms == 0:
            assert set(sizes) == {1}
    finally:
        rt.close()


def test_public_ids_keep_the_seed_shape_and_are_random():
    reqs = [ids.request_id() for _ in range(2000)]
    assert len(set(reqs)) == len(reqs)
    assert all(re.fullmatch(r"req_\d{10}_[0-9a-f]{16}", r) for r in reqs)
    suffixes = [int(r.rsplit("_", 1)[1], 16) for r in reqs]
    assert suffixes != sorted(suffixes)  # not a sequence: nothing to count or guess
    assert re.fullmatch(r"alloc_\d{10}_[0-9a-f]{16}", ids.allocation_id())
    assert re.fullmatch(r"alice_[0-9a-f]{16}", ids.session_id("alice"))


def test_ids_made_across_threads_and_in_a_forked_child_never_repeat():
    """ids hands out pre-read random bytes: threads must not share a slice, and a forked child
    must not hand out the ids its parent is about to."""
    import os

    ids.request_id()  # the pool is filled now: the child inherits it
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, " ".join(ids.request_id() for _ in range(50)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as pipe:
        from_child = set(pipe.read().split())
    made = [[] for _ in range(8)]
    threads = [threading.Thread(target=lambda out=out: out.extend(ids.request_id() for _ in range(500)))
               for out in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    from_parent = {r for out in made for r in out}
    assert len(from_child) == 50 and len(from_parent) == 4000
    assert not from_child & from_parent


def test_a_key_revoked_elsewhere_stops_working_within_the_ttl(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    served = KeyStore(store, record_ttl_s=0.2)
    key = served.create("u", "user")
    assert served.authenticate(key).user_id == "u"
    other = KeyStore(Store(tmp_path / "s.sqlite3"))  # the CLI, another process in real life
    assert other.revoke(key.split("_")[1])
    time.sleep(0.3)
    assert served.authenticate(key) is None
    key2 = served.create("v", "user")
    assert served.authenticate(key2) is not None
    assert served.revoke(key2.split("_")[1])
    assert served.authenticate(key2) is None  # revoked in this process: at once


def test_a_request_run_inline_past_its_deadline_times_out(tmp_path):
    rt = _runtime(tmp_path, 5)
    try:
        x = np.ones((1, 16), np.float32)
        with pytest.raises(Exception) as info:
            rt.inference.infer({"model_id": "m", "input_data": x, "timeout": 1e-9})
        assert getattr(info.value, "code", None) == "REQUEST_TIMEOUT"
        assert rt.inference.infer({"model_id": "m", "input_data": x})["output_data"].size  # and it still serves
    finally:
        rt.close()
