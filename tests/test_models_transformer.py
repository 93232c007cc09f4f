"""transformer (decoder LM) and encoder families: generation, KV cache, batching, sampling."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from msmartcompute.models import build_model
from msmartcompute.models.layers import QuantizedLinear
from msmartcompute.models.attention_context import NoCache
from msmartcompute.models.sampling import sample

CPU = torch.device("cpu")
VOCAB = 61


def spec(model_type="transformer", **kw):
    base = {"model_id": "lm", "model_type": model_type, "max_sequence_length": 40,
            "parameters": {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                           "num_kv_heads": 2, "intermediate_size": 48}}
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def lm():
    return build_model(spec(), CPU)


def prompt(rows, length, seed):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(rows, length))


def recompute_greedy(model, tokens, max_tokens):
    """Reference without a cache: run the whole sequence again for every new token."""
    seq = torch.as_tensor(tokens)
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = model.module(seq)[:, -1].argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[:, tokens.shape[1]:].numpy()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_kv_cache_generation_equals_full_recompute(kv_heads):
    s = spec()
    s["parameters"]["num_kv_heads"] = kv_heads
    model = build_model(s, CPU)
    tokens = prompt(3, 7, kv_heads)
    got = model.generate(tokens, 10, temperature=0).numpy()
    np.testing.assert_array_equal(got, recompute_greedy(model, tokens, 10))


def test_greedy_is_deterministic_and_counts_tokens(lm):
    tokens = prompt(2, 5, 0)
    a = lm.run([lm.prepare(tokens, {"temperature": 0, "max_tokens": 6})])[0]
    b = lm.run([lm.prepare(tokens, {"temperature": 0, "max_tokens": 6, "seed": 9})])[0]
    assert a.output_data.shape == (2, 6) and a.output_data.dtype == np.int64
    assert a.tokens_generated == 12
    np.testing.assert_array_equal(a.output_data, b.output_data)


def test_sampling_depends_on_seed_only(lm):
    tokens = prompt(1, 4, 1)

    def gen(seed):
        return lm.generate(tokens, 12, temperature=1.0, seed=seed).numpy()

    np.testing.assert_array_equal(gen(1), gen(1))
    assert not np.array_equal(gen(1), gen(2))


def test_tiny_top_p_is_greedy(lm):
    tokens = prompt(2, 6, 2)
    np.testing.assert_array_equal(lm.generate(tokens, 8, temperature=1.0, top_p=1e-9, seed=3).numpy(),
                                  lm.generate(tokens, 8, temperature=0).numpy())


def test_nucleus_keeps_only_the_top_mass():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).expand(400, 4)
    g = torch.Generator().manual_seed(0)
    picked = sample(logits, 1.0, 0.7, g)  # 0.5 + 0.3 reach 0.7: tokens 1 and 3 only
    assert set(picked.tolist()) == {1, 3}
    share = (picked == 1).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 4 * (0.625 * 0.375 / 400) ** 0.5  # 4 standard errors


@pytest.mark.parametrize("options", [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9}])
def test_batched_generation_equals_each_alone(lm, options):
    requests = [prompt(1, 9, 10), prompt(2, 3, 11), prompt(1, 6, 12)]
    opts = [dict(options, max_tokens=7, seed=i) for i in range(3)]
    prepared = [lm.prepare(r, o) for r, o in zip(requests, opts)]
    assert len({p.batch_key for p in prepared}) == 1
    batched = lm.run(prepared)
    for r, o, out in zip(requests, opts, batched):
        alone = lm.run([lm.prepare(r, o)])[0]
        np.testing.assert_array_equal(out.output_data, alone.output_data)
        assert out.tokens_generated == r.shape[0] * 7


def test_requests_with_any_options_share_a_batch(lm):
    # every row stops by its own options (max_tokens, temperature, ...): any requests share one run
    reqs = [([[1, 2]], {"temperature": 0, "max_tokens": 3}), ([[1, 2]], {"temperature": 0, "max_tokens": 4}),
            ([[1, 2, 3]], {"temperature": 0.7, "max_tokens": 5, "seed": 5})]
    prepared = [lm.prepare(r, o) for r, o in reqs]
    assert len({p.batch_key for p in prepared}) == 1
    for (r, o), out in zip(reqs, lm.run(prepared)):
        np.testing.assert_array_equal(out.output_data, lm.run([lm.prepare(r, o)])[0].output_data)
        assert out.output_data.shape == (1, o["max_tokens"])


@pytest.mark.parametrize("data,options,message", [
    ([[1, VOCAB]], {}, "out of range"),
    ([[-1, 2]], {}, "out of range"),
    ([[1.5, 2]], {}, "integers"),
    ([[1] * 41], {}, "exceeds"),
    ([[1] * 30], {"max_tokens": 11}, "exceeds max_sequence_length"),
    ([[1]], {"max_tokens": 0}, "max_tokens"),
    ([[1]], {"max_tokens": 2.5}, "max_tokens"),
    ([[1]], {"temperature": -0.1}, "temperature"),
    ([[1]], {"temperature": "hot"}, "temperature"),
    ([[1]], {"top_p": 0}, "top_p"),
    ([[1]], {"top_p": 1.5}, "top_p"),
    ([[1]], {"seed": -3}, "seed"),
    ([[1], [2, 3]], {}, "rectangular"),
])
def test_prepare_refuses(lm, data, options, message):
    with pytest.raises(ValueError, match=message):
        lm.prepare(data, options)


def test_default_max_tokens_fits_the_limit(lm):
    p = lm.prepare([[1] * 35], {"temperature": 0})
    assert p.options["max_tokens"] == 5
    assert lm.prepare([[1]], {}).options["max_tokens"] == 16


@pytest.mark.parametrize("params,message", [
    ({"vocab_size": 10, "hidden_size": 30, "num_layers": 1, "num_heads": 4}, "divisible"),
    ({"vocab_size": 10, "hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
    ({"vocab_size": 10, "hidden_size": 32, "num_heads": 4}, "num_layers"),
])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        build_model({"model_type": "transformer", "parameters": params}, CPU)


def test_checkpoint_round_trip_and_mismatch(tmp_path, lm):
    path = tmp_path / "lm.safetensors"
    save_file({k: v.contiguous() for k, v in lm.module.state_dict().items()}, str(path))
    loaded = build_model(spec(model_path=str(path), seed=123), CPU)
    tokens = prompt(1, 5, 4)
    np.testing.assert_array_equal(loaded.generate(tokens, 5).numpy(), lm.generate(tokens, 5).numpy())
    other = spec(model_path=str(path))
    other["parameters"] = dict(other["parameters"], vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="'embed.weight'"):
        build_model(other, CPU)


def test_quantized_and_bf16_transformer_generate(lm):
    q = build_model(spec(enable_quantization=True), CPU)
    assert sum(isinstance(m, QuantizedLinear) for m in q.module.modules()) == 2 * 4 + 1
    assert q.tensor_bytes() < lm.tensor_bytes() / 2
    out = q.generate(prompt(2, 4, 5), 4)
    assert out.shape == (2, 4) and int(out.min()) >= 0 and int(out.max()) < VOCAB
    half = build_model(spec(enable_mixed_precision=True), CPU)
    assert half.dtype == torch.bfloat16 and half.module.embed.weight.dtype == torch.bfloat16
    assert half.tensor_bytes() * 2 == lm.tensor_bytes()
    tokens = prompt(1, 4, 6)
    np.testing.assert_array_equal(half.generate(tokens, 5).numpy(), recompute_greedy(half, tokens, 5))


def test_padded_attention_runs_varlen_on_real_tokens_only():
    torch.manual_seed(0)
    q = torch.randn(2, 5, 4, 8)                        # [B, S, H, D]
    k, v = torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)  # two kv heads, not expanded
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, :2] = False                               # row 1 left-padded by two
    got = NoCache(causal=True, valid=valid).attend(0, q, k, v)

    def alone(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got[:1], alone(q[:1], k[:1], v[:1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1:, 2:], alone(q[1:, 2:], k[1:, 2:], v[1:, 2:]), rtol=1e-5, atol=1e-6)
    assert got[1, :2].abs().max() == 0                 # padding is not computed


def test_no_path_falls_back_to_torch_sdpa(lm, monkeypatch):
    # Padded generation (paged KV cache, prefill and decode), the padded full forward (varlen) and
    # the padded encoder batch (varlen) all run our kernels: torch's SDPA is never called.
    expected = [lm.generate(prompt(1, n, 40 + n), 4, temperature=0).numpy() for n in (3, 8)]
    tokens = torch.as_tensor(prompt(2, 6, 50))
    with torch.no_grad():
        full, shorter = lm.module(tokens), lm.module(tokens[:1, 2:])
    encoder_model = build_model(spec("encoder"), CPU)
    encoder_alone = encoder_model.run([encoder_model.prepare(prompt(1, 3, 51), {})])[0].output_data

    def refuse(*args, **kwargs):
        raise AssertionError("torch SDPA was called")
    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)
    batch = [lm.prepare(prompt(1, n, 40 + n), {"max_tokens": 4, "temperature": 0}) for n in (3, 8)]
    for out, want in zip(lm.run(batch), expected):
        np.testing.assert_array_equal(out.output_data, want)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, :2] = False
    with torch.no_grad():  # row 0 left-padded by two: its real tokens as if alone
        padded = lm.module(tokens, (torch.arange(6) - 2 * ~valid[:, :1]).clamp(min=0), valid)
    torch.testing.assert_close(padded[0, 2:], shorter[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1], full[1], rtol=1e-5, atol=1e-5)
    outputs = encoder_model.run([encoder_model.prepare(prompt(1, 3, 51), {}),
                                 encoder_model.prepare(prompt(1, 7, 52), {})])
    np.testing.assert_allclose(outputs[0].output_data, encoder_alone, rtol=1e-5, atol=1e-5)


# ---- encoder --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder():
    return build_model(spec("encoder"), CPU)


def test_encoder_batched_equals_alone(encoder):
    requests = [prompt(2, 7, 20), prompt(1, 3, 21), prompt(3, 5, 22)]
    prepared = [encoder.prepare(r, {}) for r in requests]
    assert len({p.batch_key for p in prepared}) == 1
    for r, out in zip(requests, encoder.run(prepared)):
        alone = encoder.run([encoder.prepare(r, {})])[0].output_data
        assert out.output_data.shape == (r.shape[0], 32) and out.output_data.dtype == np.float32
        np.testing.assert_allclose(out.output_data, alone, rtol=1e-5, atol=1e-5)


def test_encoder_mean_pools_and_is_bidirectional(encoder):
    tokens = torch.as_tensor(prompt(1, 6, 23))
    m = encoder.module
    with torch.no_grad():
        x = m.embed(tokens)
        pos = torch.arange(6)[None]
        for i, layer in enumerate(m.layers):
            x = layer(x, pos, NoCache(causal=False), i)
        want = m.norm(x).mean(dim=1)
    got = encoder.run([encoder.prepare(tokens.numpy(), {})])[0].output_data
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    with torch.no_grad():  # the first position sees the last token: not causal
        first = [encoder.module.layers[0](encoder.module.embed(t), pos, NoCache(causal=False), 0)[0, 0] for t in (tokens, changed)]
    assert not torch.equal(first[0], first[1])


def test_a_step_of_mixed_chunks_equals_each_chunk_alone(lm):
    """PagedDecoder.step runs a step's decodes as one batch and its prefill chunks left-padded as
    another; each chunk's logits (in the chunks' order) equal that chunk run alone."""
    from msmartcompute.models.paged import ChunkInput

    a, b, c, d = (prompt(1, 9, 60 + i)[0].tolist() for i in range(4))
    tables = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    together, alone = lm.new_kv_cache(12, 4), lm.new_kv_cache(12, 4)
    warm = [ChunkInput(a[:6], 0, tables[0], True), ChunkInput(c[:4], 0, tables[2], True)]
    mixed = [ChunkInput(a[6:7], 6, tables[0], True),        # a decode
             ChunkInput(b[:5], 0, tables[1], True),         # a whole prompt
             ChunkInput(c[4:5], 4, tables[2], True),        # a one-token prefill chunk after a longer one
             ChunkInput(d[:3], 0, tables[3], False)]        # the first chunk of a longer prompt
    with torch.inference_mode():
        for cache in (together, alone):
            lm.step(cache, warm)
        got = lm.step(together, mixed)
        want = torch.cat([lm.step(alone, [chunk]) for chunk in mixed])
    assert got.shape == (3, VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[0].k, alone[0].k)   # padding was never stored
