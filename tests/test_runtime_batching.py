"""Dynamic batching, scheduling policies, device-time sharing, timeouts and full queues."""
import copy
import threading
import time

import numpy as np
import pytest
import torch

from msmartcompute.models import Prepared
from msmartcompute.runtime.batching import ModelQueue, Outcome, Pending, choose_queue
from msmartcompute.runtime.engine import Runtime, RuntimeConfig
from msmartcompute.runtime.errors import InsufficientMemory, InternalError, QueueFull, RequestTimeout
from msmartcompute.runtime.vgpu import DeviceScheduler

from concurrency_helpers import concurrently

IN, OUT = 24, 12


def mlp_spec(model_id="mlp", max_batch_size=16, **kw):
    return {"model_id": model_id, "model_type": "mlp", "max_batch_size": max_batch_size, "seed": 3,
            "parameters": {"input_size": IN, "hidden_sizes": [48, 48], "output_size": OUT}, **kw}


def make_runtime(tmp_path, **kw):
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, **kw))
    rt.start()
    return rt


def rows(seed, n):
    return np.random.default_rng(seed).standard_normal((n, IN)).astype(np.float32)


def mlp_requests(inputs, model_id="mlp"):
    return [{"model_id": model_id, "input_data": x} for x in inputs]


def test_64_concurrent_requests_batch_and_match_unbatched(tmp_path):
    rt = make_runtime(tmp_path, max_queue_delay_ms=20)
    try:
        rt.registry.load(mlp_spec())
        inputs = [rows(i, 1 + i % 3) for i in range(64)]
        results = concurrently(rt, mlp_requests(inputs))
        sizes = {int(k): v for k, v in rt.metrics()["batch_sizes"].items()}
        assert sum(k * v for k, v in sizes.items()) == 64
        assert max(sizes) > 1, sizes
        assert max(sizes) <= 16  # the load spec's max_batch_size
        assert rt.metrics()["queue_depth_max"]["mlp"] > 1
        assert rt.metrics()["queue_depth"] == {"mlp": 0}

        model = rt.registry.models["mlp"].model
        ref64 = copy.deepcopy(model.module).double()
        for x, res in zip(inputs, results):
            alone = model.run([model.prepare(x, {})])[0].output_data
            with torch.no_grad():
                exact = ref64(torch.from_numpy(x).double()).numpy()
            tol = 2 * np.abs(alone - exact).max() + np.finfo(np.float32).eps  # float32's own error
            got = np.asarray(res["output_data"], dtype=np.float32)
            assert got.shape == (x.shape[0], OUT)
            np.testing.assert_allclose(got, alone, rtol=0, atol=tol)
            assert res["request_id"].startswith("req_") and res["memory_used"] > 0
        assert len({r["request_id"] for r in results}) == 64
    finally:
        rt.close()


def test_zero_delay_turns_batching_off(tmp_path):
    rt = make_runtime(tmp_path, max_queue_delay_ms=0)
    try:
        rt.registry.load(mlp_spec())
        assert all(isinstance(r, dict) for r in concurrently(rt, mlp_requests([rows(i, 1) for i in range(16)])))
        assert rt.metrics()["batch_sizes"] == {"1": 16}
    finally:
        rt.close()


def submit_raw(rt, model_id, prepared, timeout=10.0):
    """Queue a Prepared directly on the model's worker; returns the Pending."""
    entry = rt.registry.models[model_id]
    pending = Pending(f"raw_{id(prepared)}", prepared, deadline=time.monotonic() + timeout)
    entry.executor.submit(model_id, pending)
    return pending


def test_faulty_request_in_a_batch_fails_alone(tmp_path):
    rt = make_runtime(tmp_path, max_queue_delay_ms=50)
    try:
        rt.registry.load(mlp_spec())
        model = rt.registry.models["mlp"].model
        good = [model.prepare(rows(i, 2), {}) for i in range(3)]
        key = good[0].batch_key
        # a request that got past prepare() wrong: its width breaks the stacked forward
        wrong = Prepared(tensor=torch.ones(2, IN + 1), options={}, batch_key=key, rows=2)
        # a request whose run needs more memory than the host has: a real allocation failure
        huge = Prepared(tensor=torch.ones(1, IN).expand(2**40, IN), options={}, batch_key=key, rows=2**40)
        with rt.vgpus.schedulers[0].exclusive():  # hold the device so all five land in one batch
            pending = [submit_raw(rt, "mlp", p) for p in (good[0], wrong, good[1], huge, good[2])]
            time.sleep(0.1)
        outs = [p.future.exception(timeout=10) or p.future.result() for p in pending]
        assert isinstance(outs[1], InternalError)
        assert isinstance(outs[3], InsufficientMemory)
        for p, out in zip(good, (outs[0], outs[2], outs[4])):
            np.testing.assert_array_equal(out.output.output_data, model.run([p])[0].output_data)
        assert rt.metrics()["batch_sizes"].get("5") is None  # the failed batch of 5 is not counted
    finally:
        rt.close()


def test_timeout_comes_back_fast(tmp_path):
    rt = make_runtime(tmp_path)
    try:
        rt.registry.load(mlp_spec())
        with rt.vgpus.schedulers[0].exclusive():
            t0 = time.perf_counter()
            with pytest.raises(RequestTimeout):
                rt.inference.infer({"model_id": "mlp", "input_data": rows(0, 1), "timeout": 0.2})
            assert time.perf_counter() - t0 < 1.0
        assert rt.inference.infer({"model_id": "mlp", "input_data": rows(1, 1)})["output_data"].size
        assert rt.metrics()["inference_failures"] == 1
    finally:
        rt.close()


def test_full_queue_rejects_fast(tmp_path):
    rt = make_runtime(tmp_path, max_queue_size=4)
    try:
        rt.registry.load(mlp_spec(max_batch_size=1))
        executor = rt.registry.models["mlp"].executor
        results = []
        with rt.vgpus.schedulers[0].exclusive():
            threads = [threading.Thread(target=lambda i=i: results.append(
                rt.inference.infer({"model_id": "mlp", "input_data": rows(i, 1)}))) for i in range(5)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 10
            while executor.depth() < 4 and time.monotonic() < deadline:  # one taken by the worker, 4 wait
                time.sleep(0.01)
            assert executor.depth() == 4
            assert rt.metrics()["queued_requests"] == 4 and rt.metrics()["queue_depth"] == {"mlp": 4}
            t0 = time.perf_counter()
            with pytest.raises(QueueFull) as err:
                rt.inference.infer({"model_id": "mlp", "input_data": rows(9, 1)})
            assert time.perf_counter() - t0 < 0.5  # no wait for a slot (the default timeout is 30 s)
            assert err.value.code == "QUEUE_FULL" and err.value.details["max_queue_size"] == 4
        for t in threads:
            t.join()
        assert len(results) == 5
    finally:
        rt.close()


def queue_with(model_id, priority=0, device_time=0.0, waiting_since=0.0):
    q = ModelQueue(model_id, None, max_batch_size=4, max_queue_size=8, priority=priority)
    q.device_time_s = device_time
    q.items.append(Pending("r", None, deadline=1e18, enqueued_at=waiting_since))
    return q


def test_choose_queue_policies():
    a, b, c = queue_with("a", 0, 5.0, 1.0), queue_with("b", 2, 1.0, 3.0), queue_with("c", 2, 3.0, 2.0)
    ready = [c, a, b]
    assert [choose_queue("round_robin", ready, last).model_id for last in (None, "a", "b", "c")] == \
        ["a", "b", "c", "a"]
    assert choose_queue("priority", ready, None).model_id == "c"  # priority 2, waiting longer than b
    assert choose_queue("fair_share", ready, None).model_id == "b"  # least device time


@pytest.mark.parametrize("policy", ["round_robin", "priority", "fair_share"])
def test_vgpu_policy_orders_service(tmp_path, policy):
    rt = make_runtime(tmp_path, max_queue_delay_ms=0)
    try:
        rt.vgpus.create({"virtual_gpu_id": "v", "memory_size": 2**24, "compute_units": 1,
                        "scheduling_policy": policy})
        rt.registry.load(mlp_spec("a", max_batch_size=1, virtual_gpu_id="v", priority=0))
        rt.registry.load(mlp_spec("b", max_batch_size=1, virtual_gpu_id="v", priority=5))
        model = {m: rt.registry.models[m].model for m in "ab"}
        for i in range(3):
            rt.inference.infer({"model_id": "a", "input_data": rows(i, 1)})
        queue_a = rt.registry.models["a"].queue
        assert queue_a.device_time_s > 0 and rt.registry.models["b"].queue.device_time_s == 0
        queue_a.device_time_s += 1.0  # as if a had run for a second: b is owed far more than it will use
        order = []
        with rt.vgpus.schedulers[0].exclusive():
            decoy = submit_raw(rt, "a", model["a"].prepare(rows(0, 1), {}))
            time.sleep(0.05)  # the worker takes the decoy and waits for the device
            pending = [submit_raw(rt, m, model[m].prepare(rows(i, 1), {})) for i, m in enumerate("aaabbb")]
            for m, p in zip("aaabbb", pending):
                p.future.add_done_callback(lambda f, m=m: order.append(m))
        decoy.future.result(timeout=10)
        for p in pending:
            p.future.result(timeout=10)
        expected = {"round_robin": "bababa", "priority": "bbbaaa", "fair_share": "bbbaaa"}
        assert "".join(order) == expected[policy]
    finally:
        rt.close()


def test_device_time_shared_by_compute_units():
    sched = DeviceScheduler()
    sched.register("big", 3)
    sched.register("small", 1)
    stop = time.monotonic() + 0.8

    def work(key):
        while time.monotonic() < stop:
            with sched.slot(key):
                time.sleep(0.004)

    threads = [threading.Thread(target=work, args=(k,)) for k in ("big", "small")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ratio = sched.used_s["big"] / sched.used_s["small"]
    assert 2.2 < ratio < 4.0, ratio


def test_unload_fails_the_requests_still_queued(tmp_path):
    rt = make_runtime(tmp_path)
    try:
        rt.registry.load(mlp_spec(max_batch_size=1))
        model = rt.registry.models["mlp"].model
        with rt.vgpus.schedulers[0].exclusive():
            pending = [submit_raw(rt, "mlp", model.prepare(rows(i, 1), {})) for i in range(3)]
            time.sleep(0.05)  # the worker holds the first and waits for the device
            rt.registry.unload("mlp")
        first = pending[0].future.result(timeout=10)  # already taken: it completes
        assert first.output.output_data.shape == (1, OUT)
        for p in pending[1:]:
            assert p.future.exception(timeout=10).code == "INVALID_MODEL_ID"
    finally:
        rt.close()


def test_generation_batches_mixed_options_and_counts_tokens(tmp_path):
    rt = make_runtime(tmp_path, max_queue_delay_ms=30)
    try:
        rt.registry.load({"model_id": "lm", "model_type": "transformer", "max_sequence_length": 32,
                       "parameters": {"vocab_size": 50, "hidden_size": 32, "num_layers": 1, "num_heads": 4}})
        model = rt.registry.models["lm"].model
        requests = [{"model_id": "lm", "input_data": np.random.default_rng(i).integers(0, 50, (1 + i % 2, 5)),
                     "options": {"temperature": 0, "max_tokens": 3 + 2 * (i % 2)}} for i in range(12)]
        results = concurrently(rt, requests)
        for req, res in zip(requests, results):
            alone = model.run([model.prepare(req["input_data"], req["options"])])[0]
            np.testing.assert_array_equal(np.asarray(res["output_data"]), alone.output_data)
            assert res["tokens_generated"] == req["input_data"].shape[0] * req["options"]["max_tokens"]
        m = rt.metrics()
        # one step per token of the longest, not per request: mixed options share the steps
        assert m["generation"]["lm"]["steps"] < sum(r["options"]["max_tokens"] for r in requests) / 2
        assert m["tokens_per_second"] > 0
    finally:
        rt.close()


def test_an_outcome_is_set_once_and_wakes_its_waiters_and_callbacks():
    outcome = Outcome()
    with pytest.raises(TimeoutError):
        outcome.result(timeout=0.01)
    seen = []
    outcome.add_done_callback(lambda o: seen.append(("before", o.result())))
    outcome.add_done_callback(lambda o: 1 / 0)  # a broken callback: logged, the others still run
    outcome.add_done_callback(lambda o: seen.append(("also", o.result())))
    waiter = threading.Thread(target=lambda: seen.append(("waited", outcome.result(timeout=10))))
    waiter.start()
    time.sleep(0.05)
    assert outcome.set_result(7) is True
    assert outcome.set_exception(RuntimeError("late")) is False  # the first setter wins
    waiter.join(timeout=10)
    outcome.add_done_callback(lambda o: seen.append(("after", o.result())))  # done already: runs now
    assert sorted(seen) == [("after", 7), ("also", 7), ("before", 7), ("waited", 7)]
    assert outcome.exception() is None

    failed = Outcome()
    failed.set_exception(QueueFull("full"))
    assert isinstance(failed.exception(timeout=0), QueueFull)
    with pytest.raises(QueueFull):
        failed.result()
