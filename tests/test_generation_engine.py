"""The generation engine through the Runtime: continuous batching over the paged KV cache,
greedy equality with single-request runs, seeds, preemption under a small pool, quotas,
stops, streaming, cancellation within one step, fairness across a vGPU's decoders."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from concurrency_helpers import concurrently
from msmartcompute.runtime.errors import InsufficientMemory, InvalidInputData, RequestTimeout

VOCAB = 97
PARAMS = {"vocab_size": VOCAB, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}


def lm_spec(model_id="lm", **kw):
    return {"model_id": model_id, "model_type": "transformer", "seed": 7, "max_sequence_length": 160,
            "parameters": dict(PARAMS), **kw}


def prompt(seed: int, length: int, rows: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (rows, length))


def request(data, model_id="lm", **options):
    return {"model_id": model_id, "input_data": data, "options": {"temperature": 0, **options}}


def ids(response: dict) -> list:
    """output_data as lists (a numpy array when the rows have one length, else lists)."""
    data = response["output_data"]
    return data.tolist() if isinstance(data, np.ndarray) else data


def generation(rt, model_id="lm") -> dict:
    return rt.metrics()["generation"][model_id]


def test_greedy_in_a_continuous_batch_equals_each_request_alone(rt):
    rt.registry.load(lm_spec())
    model = rt.registry.entry("lm").model
    reqs = [request(prompt(i, 3 + 17 * i), max_tokens=4 + 9 * (i % 4)) for i in range(8)]
    together = concurrently(rt, reqs)
    for req, got in zip(reqs, together):
        alone = rt.inference.infer(req)
        assert ids(got) == ids(alone)
        dense = model.generate(req["input_data"], req["options"]["max_tokens"], temperature=0).tolist()
        assert ids(got) == dense                          # the dense reference path
        assert got["finish_reasons"] == ["length"] and got["tokens_generated"] == req["options"]["max_tokens"]
    g = generation(rt)
    assert g["kv_blocks_used"] == 0 and g["running"] == 0 and g["waiting"] == 0
    assert g["tokens_generated"] >= 2 * sum(r["options"]["max_tokens"] for r in reqs)
    assert g["time_to_first_token_p99"] is not None and g["inter_token_latency_p50"] is not None


def test_per_model_metrics_count_generation_requests_and_steps(rt):
    # the dashboard's model columns (requests/s, p50/p99, formed batches) cover decoders too
    rt.registry.load(lm_spec())
    concurrently(rt, [request(prompt(i, 5 + i), max_tokens=6) for i in range(4)])
    model = rt.metrics()["models"]["lm"]
    assert model["requests_per_second"] > 0
    assert model["latency_p50"] is not None and model["latency_p99"] >= model["latency_p50"]
    steps = model["batch_sizes"]
    assert sum(steps.values()) >= 6                       # one entry per generation step
    assert max(int(size) for size in steps) <= 4


def test_sampled_tokens_depend_only_on_the_seed(rt):
    rt.registry.load(lm_spec())
    model = rt.registry.entry("lm").model
    reqs = [request(prompt(i, 5 + 11 * i, rows=1 + i % 2), max_tokens=12, temperature=0.8, seed=100 + i, top_k=20)
            for i in range(6)]
    together = concurrently(rt, reqs)
    for req, got in zip(reqs, together):
        assert ids(got) == ids(rt.inference.infer(req))
    one = request(prompt(0, 9), max_tokens=10, temperature=0.9, seed=5)
    dense = model.generate(one["input_data"], 10, temperature=0.9, seed=5).tolist()
    assert ids(rt.inference.infer(one)) == dense


def test_a_small_pool_preempts_the_newest_and_still_answers_exactly(rt):
    # 12 blocks of 16 tokens: two sequences of ~90 tokens fit, eight do not
    rt.registry.load(lm_spec(kv_cache_memory=12 * 2 * 2 * 16 * 2 * 16 * 4, max_batch_size=8))
    g = generation(rt)
    assert g["kv_blocks_total"] == 12 and g["kv_cache_bytes"] == 12 * 2 * 2 * 16 * 2 * 16 * 4
    reqs = [request(prompt(i, 30 + i), max_tokens=60) for i in range(8)]
    together = concurrently(rt, reqs)
    assert generation(rt)["preempted"] > 0
    for req, got in zip(reqs, together):
        assert ids(got) == ids(rt.inference.infer(req))
    assert generation(rt)["kv_blocks_used"] == 0


def test_the_vgpu_quota_bounds_the_pool(rt):
    sizes = {}
    for name, mib in (("small", 3), ("large", 8)):
        v = rt.vgpus.create({"memory_size": mib << 20, "compute_units": 1})
        rt.registry.load(lm_spec(name, virtual_gpu_id=v["virtual_gpu_id"], max_batch_size=64))
        sizes[name] = generation(rt, name)["kv_blocks_total"]
        reserved = rt.registry.entry(name).memory + generation(rt, name)["kv_cache_bytes"]
        assert reserved <= mib << 20
        rt.registry.unload(name)
        rt.delete_vgpu(v["virtual_gpu_id"])
    assert 0 < sizes["small"] < sizes["large"]
    v = rt.vgpus.create({"memory_size": 450_000, "compute_units": 1})  # the weights fit, one sequence does not
    with pytest.raises(InsufficientMemory):
        rt.registry.load(lm_spec("tiny", virtual_gpu_id=v["virtual_gpu_id"]))


def test_stop_token_ids_eos_and_stop_strings(rt):
    rt.registry.load(lm_spec())
    data = prompt(3, 12)
    full = ids(rt.inference.infer(request(data, max_tokens=12)))[0]
    stop_at = next(i for i in range(1, 12) if full[i] not in full[:i])
    got = rt.inference.infer(request(data, max_tokens=12, stop_token_ids=[full[stop_at]]))
    assert ids(got) == [full[:stop_at]] and got["finish_reasons"] == ["stop"]
    rt.registry.load(lm_spec("eos", parameters={**PARAMS, "eos_token_id": full[stop_at]}))
    assert ids(rt.inference.infer(request(data, "eos", max_tokens=12))) == [full[:stop_at]]
    assert ids(rt.inference.infer(request(data, "eos", max_tokens=12, ignore_eos=True))) == [full]
    with pytest.raises(InvalidInputData, match="tokenizer"):
        rt.inference.infer(request(data, stop=["x"]))


def test_rows_of_one_request_may_end_at_different_lengths(rt):
    rt.registry.load(lm_spec())
    data = prompt(4, 10, rows=2)
    full = ids(rt.inference.infer(request(data, max_tokens=8)))
    stop = full[0][2]
    got = rt.inference.infer(request(data, max_tokens=8, stop_token_ids=[stop]))
    expect = [row[:row.index(stop)] if stop in row else row for row in full]
    assert ids(got) == expect
    assert got["tokens_generated"] == sum(map(len, expect))


def test_stream_yields_each_token_as_it_is_sampled(rt):
    rt.registry.load(lm_spec())
    req = request(prompt(5, 20, rows=2), max_tokens=120)
    stream = rt.inference.infer_stream(req)
    first = next(stream)                   # out before the request is done
    assert 1 <= len(first["token_ids"][0]) < 120 and "output_data" not in first
    events = [first, *stream]
    final, steps = events[-1], events[:-1]
    assert all(len(e["token_ids"]) == 2 for e in steps)
    assert [sum((e["token_ids"][r] for e in steps), []) for r in range(2)] == ids(final)
    assert ids(final) == ids(rt.inference.infer(req))
    rt.registry.load({"model_id": "mlp", "model_type": "mlp", "parameters": {"input_size": 4, "output_size": 2}})
    with pytest.raises(InvalidInputData, match="stream"):
        rt.inference.infer_stream({"model_id": "mlp", "input_data": np.zeros((1, 4)), "options": {"stream": True}})


def test_a_closed_stream_leaves_the_batch_at_the_next_step(rt):
    rt.registry.load(lm_spec())
    events = rt.inference.infer_stream(request(prompt(6, 8), max_tokens=150))
    next(events)
    steps = generation(rt)["steps"]
    events.close()                                    # the client went away
    deadline = time.monotonic() + 10
    while generation(rt)["kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.005)
    g = generation(rt)
    assert g["kv_blocks_used"] == 0 and g["running"] == 0 and g["cancelled_sequences"] == 1
    assert g["steps"] - steps <= 2  # the step running when it closed, then it is dropped
    assert g["tokens_generated"] < 150


def test_a_timed_out_request_frees_the_device_within_one_step(rt):
    rt.registry.load(lm_spec())
    rt.registry.load(lm_spec("other"))
    with pytest.raises(RequestTimeout):
        rt.inference.infer(request(prompt(7, 8), max_tokens=150, timeout=0.05))
    steps = generation(rt)["steps"]
    deadline = time.monotonic() + 10
    while generation(rt)["kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.002)
    g = generation(rt)
    assert g["kv_blocks_used"] == 0 and g["running"] == 0 and g["cancelled_sequences"] == 1
    assert g["steps"] - steps <= 1
    assert g["tokens_generated"] < 150
    assert rt.inference.infer(request(prompt(8, 4), "other", max_tokens=2))["tokens_generated"] == 2


def test_decoders_on_one_vgpu_take_turns(rt):
    v = rt.vgpus.create({"memory_size": 64 << 20, "compute_units": 1, "scheduling_policy": "round_robin"})
    for name in ("a", "b"):
        rt.registry.load(lm_spec(name, virtual_gpu_id=v["virtual_gpu_id"]))
    done = {}

    def long():
        rt.inference.infer(request(prompt(9, 8), "a", max_tokens=150))
        done["a"] = time.monotonic()

    t = threading.Thread(target=long)
    t.start()
    while generation(rt, "a")["running"] == 0:
        time.sleep(0.001)
    rt.inference.infer(request(prompt(10, 8), "b", max_tokens=3))
    done["b"] = time.monotonic()
    t.join()
    assert done["b"] < done["a"]  # b did not wait for a's whole generation
