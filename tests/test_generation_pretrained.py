"""GPT-2 and Llama-family checkpoints on the generation engine (through the Runtime), exactly like
the home decoder: continuous batching over the paged KV cache inside the quota, greedy equal to
the request alone and to transformers' generate, the checkpoint's EOS, preemption, cancellation,
stop strings across token boundaries with text deltas, and the vGPU's scheduling policy across
decoders (priority, fair share)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from hf_fixtures import hf_model, save
from concurrency_helpers import concurrently

pytest.importorskip("transformers")

FAMILIES = ["llama", "gpt2", "mistral", "qwen2"]


def checkpoint(rt, tmp_path, family="llama", model_id="lm", seed=3, tokenizer="bpe", **spec):
    """A tiny random checkpoint folder loaded as `model_id`; returns transformers' model."""
    ref = hf_model(family, seed=seed)
    save(ref, tmp_path / "models" / model_id, tokenizer=tokenizer)
    rt.registry.load({"model_id": model_id, "model_type": "transformer", "model_path": model_id, **spec})
    return ref


def ids(response: dict) -> list:
    data = response["output_data"]
    return data.tolist() if isinstance(data, np.ndarray) else data


def hf_greedy(ref, prompt: list[int], max_tokens: int, eos: int | None) -> list[int]:
    with torch.no_grad():
        x = torch.tensor([prompt])
        out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                           eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
    return out[:out.index(eos)] if eos is not None and eos in out else out


def generation(rt, model_id="lm") -> dict:
    return rt.metrics()["generation"][model_id]


def prompts(n: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(2, 300, 3 + 13 * i % 40).tolist() for i in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_in_a_continuous_batch_equals_alone_and_transformers(rt, tmp_path, family):
    ref = checkpoint(rt, tmp_path, family, tokenizer=None)
    assert rt.registry.entry("lm").executor.__class__.__name__ == "GenerationWorker"
    reqs = [{"model_id": "lm", "input_data": [p], "options": {"temperature": 0, "max_tokens": 5 + 4 * (i % 3),
                                                                 "ignore_eos": True}}
            for i, p in enumerate(prompts(6))]
    together = concurrently(rt, reqs)
    for req, got in zip(reqs, together):
        assert ids(got) == ids(rt.inference.infer(req))
        assert ids(got) == [hf_greedy(ref, req["input_data"][0], req["options"]["max_tokens"], None)]
    g = generation(rt)
    assert g["kv_blocks_used"] == 0 and g["steps"] > 0 and g["time_to_first_token_p99"] is not None


def test_the_checkpoints_eos_ends_a_row(rt, tmp_path):
    ref = checkpoint(rt, tmp_path, "llama", seed=5, tokenizer=None)
    eos = 1                                               # config.json's eos_token_id (hf_fixtures)
    prompt = [3, 4, 5]
    full = ids(rt.inference.infer({"model_id": "lm", "input_data": [prompt],
                                   "options": {"temperature": 0, "max_tokens": 40, "ignore_eos": True}}))[0]
    got = rt.inference.infer({"model_id": "lm", "input_data": [prompt], "options": {"temperature": 0, "max_tokens": 40}})
    want = hf_greedy(ref, prompt, 40, eos)
    assert ids(got) == [want]
    assert got["finish_reasons"] == (["stop"] if eos in full else ["length"])
    assert ids(got)[0] == (full[:full.index(eos)] if eos in full else full)


def test_a_small_pool_preempts_and_still_answers_exactly(rt, tmp_path):
    # 10 blocks of 16 tokens for a model of 2 layers, 2 kv heads of 8 dims, fp32
    per_block = 2 * 2 * 16 * 2 * 8 * 4
    checkpoint(rt, tmp_path, "llama", tokenizer=None, kv_cache_memory=10 * per_block, max_batch_size=6,
               max_sequence_length=128)
    assert generation(rt)["kv_blocks_total"] == 10
    reqs = [{"model_id": "lm", "input_data": [p], "options": {"temperature": 0, "max_tokens": 50, "ignore_eos": True}}
            for p in prompts(6)]
    together = concurrently(rt, reqs)
    assert generation(rt)["preempted"] > 0
    for req, got in zip(reqs, together):
        assert ids(got) == ids(rt.inference.infer(req))
    assert generation(rt)["kv_blocks_used"] == 0


def test_sampled_rows_depend_only_on_their_seed(rt, tmp_path):
    checkpoint(rt, tmp_path, "gpt2", tokenizer=None)
    reqs = [{"model_id": "lm", "input_data": [p], "options": {"temperature": 0.8, "top_k": 40, "seed": 10 + i,
                                                                 "max_tokens": 12, "ignore_eos": True}}
            for i, p in enumerate(prompts(5))]
    together = concurrently(rt, reqs)
    for req, got in zip(reqs, together):
        assert ids(got) == ids(rt.inference.infer(req))
    model = rt.registry.entry("lm").model
    dense = model.run([model.prepare(r["input_data"], r["options"]) for r in reqs])
    assert [ids({"output_data": d.output_data}) for d in dense] == [ids(g) for g in together]


def test_stop_strings_cut_the_text_across_token_boundaries_and_never_stream(rt, tmp_path):
    checkpoint(rt, tmp_path, "llama", seed=8)
    tok = rt.registry.entry("lm").model.tokenizer
    base = {"model_id": "lm", "input_text": "the quick brown", "options": {"temperature": 0, "max_tokens": 30,
                                                                          "ignore_eos": True}}
    full = rt.inference.infer(base)
    text, out_ids = full["output_text"][0], ids(full)[0]
    assert text == tok.decode(out_ids)
    # a stop string that starts inside one token's text and ends inside a later one's
    pieces = [tok.decode(out_ids[:i]) for i in range(len(out_ids) + 1)]
    i = next(i for i in range(2, len(out_ids)) if len(pieces[i]) - len(pieces[i - 1]) >= 2
             and len(pieces[i + 1]) > len(pieces[i]))
    stop = text[len(pieces[i]) - 1:len(pieces[i]) + 1]
    cut = text.index(stop)
    got = rt.inference.infer({**base, "options": {**base["options"], "stop": [stop, "never-there"]}})
    assert got["output_text"] == [text[:cut]] and got["finish_reasons"] == ["stop"]
    assert len(ids(got)[0]) < len(out_ids)               # generation ended there, not at max_tokens
    events = list(rt.inference.infer_stream({**base, "options": {**base["options"], "stop": stop}}))
    deltas = [e["text"][0] for e in events[:-1]]
    assert "".join(deltas) == text[:cut] and all(stop not in d for d in deltas)
    assert events[-1]["output_text"] == [text[:cut]]


def test_stream_sends_text_deltas_as_tokens_come(rt, tmp_path):
    checkpoint(rt, tmp_path, "gpt2", seed=2)
    req = {"model_id": "lm", "input_text": ["hello world", "numbers 1"],
           "options": {"temperature": 0, "max_tokens": 40, "ignore_eos": True}}
    stream = rt.inference.infer_stream(req)
    first = next(stream)
    assert "output_data" not in first and len(first["text"]) == 2
    events = [first, *stream]
    final = events[-1]
    assert len(events) > 5
    for row in range(2):
        assert "".join(e["text"][row] for e in events[:-1]) == final["output_text"][row]
        assert sum((e["token_ids"][row] for e in events[:-1]), []) == ids(final)[row]


def test_a_closed_stream_frees_its_blocks_at_the_next_step(rt, tmp_path):
    checkpoint(rt, tmp_path, "qwen2", tokenizer=None)
    events = rt.inference.infer_stream({"model_id": "lm", "input_data": [[5, 6, 7]],
                                        "options": {"temperature": 0, "max_tokens": 120, "ignore_eos": True}})
    next(events)
    steps = generation(rt)["steps"]
    events.close()
    deadline = time.monotonic() + 10
    while generation(rt)["kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.005)
    g = generation(rt)
    assert g["kv_blocks_used"] == 0 and g["cancelled_sequences"] == 1 and g["steps"] - steps <= 2


@pytest.mark.parametrize("policy", ["priority", "fair_share"])
def test_the_vgpu_policy_picks_the_next_decoder(rt, tmp_path, policy):
    """A decoder that has run long (fair_share: more device time) or has a lower priority waits
    while the other's request runs: that request is served to its end in a few of the other's steps."""
    v = rt.vgpus.create({"memory_size": 256 << 20, "compute_units": 1, "scheduling_policy": policy})
    vgpu = v["virtual_gpu_id"]
    checkpoint(rt, tmp_path, "llama", "busy", tokenizer=None, virtual_gpu_id=vgpu, priority=0)
    checkpoint(rt, tmp_path, "llama", "other", tokenizer=None, virtual_gpu_id=vgpu, priority=5)
    long = threading.Thread(target=rt.inference.infer, args=({
        "model_id": "busy", "input_data": [[3, 4, 5]], "options": {"temperature": 0, "max_tokens": 120,
                                                                    "ignore_eos": True}},))
    long.start()
    busy, other = (rt.registry.entry(m).queue.stats for m in ("busy", "other"))
    while busy.steps < 20:                             # fair_share: busy has device time now, other none
        time.sleep(0.001)
    got = rt.inference.infer({"model_id": "other", "input_data": [[6, 7]],
                              "options": {"temperature": 0, "max_tokens": 10, "ignore_eos": True}})
    long.join()
    assert got["tokens_generated"] == 10 and other.steps == 10
    # the steps' end times (GenerationStats keeps them for tokens/s): none of busy's fell between
    # other's first and last step (round robin would alternate: 9)
    first, last = other._tokens[0][0], other._tokens[-1][0]
    assert sum(first < t < last for t, _ in busy._tokens) == 0
