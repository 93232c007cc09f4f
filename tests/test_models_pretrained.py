"""Hugging Face-format checkpoints (models/pretrained.py, llama.py, gpt2.py, bert.py, hf.py)
against transformers' own models on tiny random configs saved with save_pretrained."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_fixtures import hf_model, save, train_tokenizer
from msmartcompute.models import build_model
from msmartcompute.models.attention_context import CacheStep, NoCache, PagedCache
from msmartcompute.models.paged import new_caches
from msmartcompute.models.llama import LlamaConfig, rope_frequencies
from msmartcompute.models.spec import SpecError

pytest.importorskip("transformers")

DECODERS = ["llama", "mistral", "qwen2", "gpt2"]
CPU = torch.device("cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def as_lists(output_data) -> list:
    """Generated rows as lists (an int64 matrix when they have one length, else lists)."""
    return output_data.tolist() if isinstance(output_data, np.ndarray) else output_data


def load(folder, model_type="transformer", **spec):
    return build_model({"model_type": model_type, "model_path": str(folder), **spec}, CPU)


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize("family", DECODERS)
def test_decoder_logits_equal_transformers(tmp_path, family, fmt):
    ref = hf_model(family)
    ours = load(save(ref, tmp_path / family, fmt))
    assert ours.family == family and ours.model_type == "transformer"
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    got = ours.logits(ids)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("family", DECODERS)
def test_greedy_generation_equal_token_for_token(tmp_path, family):
    ref = hf_model(family, seed=3)
    ours = load(save(ref, tmp_path / family, tokenizer=None))
    ours.eos_ids = frozenset()  # compare full-length runs; the EOS stop is tested below
    prompts = [[5, 9, 17, 33, 2], [7, 7, 40]]  # different lengths: one left-padded batch
    prepared = ours.prepare(prompts, {"max_tokens": 12, "temperature": 0})
    got = as_lists(ours.run([prepared])[0].output_data)
    for prompt, row in zip(prompts, got):
        with torch.no_grad():
            x = torch.tensor([prompt])
            want = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert row == want.tolist()


def test_generation_stops_at_eos(tmp_path):
    ref = hf_model("llama", seed=5)
    ours = load(save(ref, tmp_path / "m", tokenizer=None))
    ours.eos_ids = frozenset()
    full = as_lists(ours.run([ours.prepare([[3, 4, 5]], {"max_tokens": 10, "temperature": 0})])[0].output_data)[0]
    ours.eos_ids = frozenset({full[4]})
    first = full.index(full[4])
    out = ours.run([ours.prepare([[3, 4, 5]], {"max_tokens": 10, "temperature": 0})])[0]
    assert as_lists(out.output_data) == [full[:first]] and out.finish_reasons == ["stop"]
    assert out.tokens_generated == first


def test_tied_and_untied_embeddings(tmp_path):
    for tied in (True, False):
        ref = hf_model("qwen2", tie_word_embeddings=tied)
        ours = load(save(ref, tmp_path / str(tied), tokenizer=None))
        assert (ours.module.lm_head is None) == tied
        ids = torch.randint(0, 128, (2, 7))
        with torch.no_grad():
            assert rel_err(ours.logits(ids), ref(ids).logits) <= 1e-4


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
])
def test_rope_scaling_kinds_match_transformers(tmp_path, scaling):
    ref = hf_model("llama", rope_parameters={"rope_theta": 5000.0, **scaling})
    ours = load(save(ref, tmp_path / scaling["rope_type"], tokenizer=None))
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert rel_err(ours.logits(ids), ref(ids).logits) <= 1e-4


def test_old_style_rope_config_is_read():
    cfg = LlamaConfig.from_hf({"vocab_size": 8, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 8, "rope_theta": 500000.0,
                               "rope_scaling": {"type": "linear", "factor": 4.0}})
    inv, scale = rope_frequencies(cfg)
    assert cfg.rope_theta == 500000.0 and scale == 1.0
    assert torch.allclose(inv[0], torch.tensor(0.25))


def test_gqa_reaches_the_fused_op_unexpanded(tmp_path, monkeypatch):
    from msmartcompute import ops

    seen = []
    real = ops.fused_attention
    monkeypatch.setattr(ops, "fused_attention", lambda q, k, v, **kw: seen.append((q.shape[1], k.shape[1])) or real(q, k, v, **kw))
    ours = load(save(hf_model("llama"), tmp_path / "m", tokenizer=None))
    ours.logits(torch.randint(0, 128, (1, 5)))
    assert seen and all(h == 4 and kv == 2 for h, kv in seen)


def test_paged_cache_chunks_equal_full_forward(tmp_path):
    """Prefill, a chunk and decode steps through the paged cache give the full forward's logits."""
    ours = load(save(hf_model("mistral"), tmp_path / "m", tokenizer=None))
    ids = torch.randint(0, 128, (2, 9))
    full = ours.logits(ids)
    caches = new_caches(ours.module.cfg, 6, 4, CPU, torch.float32)
    table = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32)  # blocks of 4 tokens, any order
    steps = []
    with torch.inference_mode():
        for start, end in ((0, 5), (5, 6), (6, 9)):
            positions = torch.arange(start, end).expand(2, -1)
            slots = (table.long().gather(1, positions // 4) * 4 + positions % 4).flatten()
            ctx = PagedCache(caches, CacheStep(table, slots, torch.full((2,), end, dtype=torch.int32)))
            steps.append(ours.module(ids[:, start:end], positions, ctx))
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("pooling,normalize", [("mean", False), ("cls", True)])
def test_bert_pooled_embeddings_equal_transformers(tmp_path, fmt, pooling, normalize):
    ref = hf_model("bert")
    folder = save(ref, tmp_path / "bert", fmt, tokenizer="wordpiece")
    ours = load(folder, "encoder", parameters={"pooling": pooling, "normalize": normalize})
    rows = [[2, 17, 30, 44, 9, 3], [2, 21, 3]]
    got = [ours.run([ours.prepare([r], {})])[0].output_data[0] for r in rows]
    batched = ours.run([ours.prepare(rows, {})])[0].output_data
    for r, g, b in zip(rows, got, batched):
        with torch.no_grad():
            h = ref(torch.tensor([r])).last_hidden_state[0]
        want = h[0] if pooling == "cls" else h.mean(dim=0)
        if normalize:
            want = torch.nn.functional.normalize(want, dim=-1)
        assert np.abs(g - want.numpy()).max() <= 1e-5
        assert np.abs(b - want.numpy()).max() <= 1e-5


def test_sentence_transformers_folder_sets_pooling(tmp_path):
    ref = hf_model("bert")
    folder = save(ref, tmp_path / "st", tokenizer="wordpiece")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    ours = load(folder, "encoder")
    assert (ours.module.pooling, ours.module.normalize) == ("cls", True)
    out = ours.run([ours.prepare([[2, 5, 6, 3]], {})])[0].output_data
    assert abs(np.linalg.norm(out[0]) - 1) < 1e-5


def test_parameters_must_agree_with_config(tmp_path):
    folder = save(hf_model("llama"), tmp_path / "m", tokenizer=None)
    with pytest.raises(SpecError) as err:
        load(folder, parameters={"hidden_size": 64})
    assert err.value.field == "parameters.hidden_size" and "32" in str(err.value)
    with pytest.raises(SpecError) as err:
        load(folder, "encoder")
    assert err.value.field == "model_type"
    with pytest.raises(SpecError) as err:
        load(folder, parameters={"architecture": "gpt2"})
    assert err.value.field == "parameters.architecture"
    assert load(folder, parameters={"hidden_size": 32, "num_kv_heads": 2}).family == "llama"


def test_single_weights_file_with_parameters(tmp_path):
    """The seed's own load example: a GPT-2 model.bin and its sizes in parameters."""
    ref = hf_model("gpt2")
    path = tmp_path / "model.bin"
    torch.save(ref.state_dict(), path)
    params = {"vocab_size": 320, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 128}
    ours = build_model({"model_type": "transformer", "model_path": str(path), "parameters": params}, CPU)
    assert ours.family == "gpt2"
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        assert rel_err(ours.logits(ids), ref(ids).logits) <= 1e-4
    with pytest.raises(SpecError) as err:
        build_model({"model_type": "transformer", "model_path": str(path), "parameters": dict(params, num_layers=3)}, CPU)
    assert "layers" in str(err.value) or "missing" in str(err.value) or "unexpected" in str(err.value)


def test_mismatched_checkpoint_names_the_tensor(tmp_path):
    folder = save(hf_model("llama"), tmp_path / "m", tokenizer=None)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=48)))
    with pytest.raises(SpecError, match=r"mlp\.(gate|up|down)_proj\.weight.* has shape"):
        load(folder)


def test_folder_tokenizer_and_eos(tmp_path):
    folder = save(hf_model("llama"), tmp_path / "m")
    ours = load(folder)
    tok = ours.tokenizer
    assert tok is not None and tok.eos_ids == [1]
    text = "hello world, hello model"
    assert tok.decode(tok.encode(text)) == text
    assert "<s>" in tok.chat_template or "bos_token" in tok.chat_template


def test_gpt2_vocab_and_merges_tokenizer(tmp_path):
    folder = save(hf_model("gpt2"), tmp_path / "g", tokenizer=None)
    tok = train_tokenizer("bpe")
    data = json.loads(tok.to_str())
    (folder / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    merges = data["model"]["merges"]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(m if isinstance(m, str) else " ".join(m) for m in merges))
    ours = load(folder)
    text = "the quick brown fox"
    assert ours.tokenizer.encode(text) == tok.encode(text).ids
    assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == text
    assert ours.eos_ids == frozenset({1})  # from config.json


def test_no_attention_context_padding_leak():
    """A left-padded row attends to exactly what it would alone."""
    q = torch.randn(2, 5, 4, 8)
    k = torch.randn(2, 5, 2, 8)
    v = torch.randn(2, 5, 2, 8)
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    out = NoCache(causal=True, valid=valid).attend(0, q, k, v)
    alone = NoCache(causal=True).attend(0, q[1:, 2:], k[1:, 2:], v[1:, 2:])
    assert rel_err(out[1:, 2:], alone) <= 1e-5
    assert out[1, :2].abs().max() == 0                 # padding is not computed


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_path_falls_back_to_torch_sdpa(tmp_path, family, monkeypatch):
    """Padded prefill (varlen), decode (paged cache, GQA unexpanded) and the generation engine's
    step run our kernels: torch's SDPA is never called, and the results still equal transformers'."""
    ref = hf_model(family, seed=4)
    ours = load(save(ref, tmp_path / family, tokenizer=None))
    ours.eos_ids = frozenset()
    prompts = [[5, 9, 17, 33, 2, 8], [7, 7, 40]]
    wants = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            wants.append(ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(p):].tolist())
        ids = torch.tensor([[0, 0, 0] + prompts[1], prompts[0]])
        want_logits = ref(torch.tensor([prompts[1]])).logits[0]

    def refuse(*args, **kwargs):
        raise AssertionError("torch SDPA was called")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)
    from msmartcompute import ops
    heads, paged, varlen = [], ops.paged_attention, ops.varlen_attention  # (query heads, kv heads) seen
    monkeypatch.setattr(ops, "paged_attention", lambda q, kc, *a, **kw: heads.append((q.shape[2], kc.shape[2]))
                        or paged(q, kc, *a, **kw))
    monkeypatch.setattr(ops, "varlen_attention", lambda q, k, *a, **kw: heads.append((q.shape[1], k.shape[1]))
                        or varlen(q, k, *a, **kw))
    assert as_lists(ours.run([ours.prepare(prompts, {"max_tokens": 6, "temperature": 0})])[0].output_data) == wants
    kv_heads = 2 if family == "llama" else 4                # GQA: the cache keeps the checkpoint's kv heads
    assert heads and all(h == (4, kv_heads) for h in heads)
    valid = ids != 0
    valid[1] = True
    positions = (torch.arange(6) - 3 * ~valid[:, :1]).clamp(min=0)
    with torch.inference_mode():
        padded = ours.module(ids, positions, NoCache(causal=True, valid=valid))
    assert rel_err(padded[0, 3:], want_logits) <= 1e-4


RSS_SCRIPT = r"""
import sys, torch
from msmartcompute.models import build_model
from msmartcompute.models.base import module_bytes
import msmartcompute.models.pretrained, tokenizers  # imported before measuring


def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))


before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
model = build_model({"model_type": "transformer", "model_path": sys.argv[1]}, torch.device("cpu"))
print(status("VmHWM") - before, module_bytes(model.module))
"""


def test_safetensors_load_peak_rss_at_most_1_3x_weights(tmp_path):
    """Weights are read into the parameters themselves: the load's peak RSS growth stays
    within 1.3x the weights (measured in a fresh process, peak reset just before the load)."""
    import subprocess
    import sys

    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4)
    folder = tmp_path / "big"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(folder)], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ})
    assert out.returncode == 0, out.stderr[-2000:]
    grown, weights = map(int, out.stdout.split()[-2:])
    print(f"peak RSS growth {grown / 2**20:.1f} MiB for {weights / 2**20:.1f} MiB of weights "
          f"({grown / weights:.3f}x)")
    assert weights > 100 * 2**20
    assert grown <= 1.3 * weights


def test_bf16_checkpoint_and_mixed_precision(tmp_path):
    """A checkpoint stored in bf16 is converted tensor by tensor to the compute dtype (float32 by
    default; bf16 with enable_mixed_precision)."""
    ref = hf_model("llama").to(torch.bfloat16)
    folder = save(ref, tmp_path / "bf16", tokenizer=None)
    ours = load(folder)
    assert ours.dtype == torch.float32
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        want = ref.float()(ids).logits
    assert rel_err(ours.logits(ids), want) <= 1e-4
    half = load(folder, enable_mixed_precision=True)
    assert half.dtype == torch.bfloat16 and half.module.embed.weight.dtype == torch.bfloat16
    assert half.module.inv_freq.dtype == torch.float32  # rotary frequencies stay exact
    assert rel_err(half.logits(ids), want) <= 0.05


def test_chat_template_is_sandboxed():
    """A chat template is data from the checkpoint folder: it cannot reach Python internals."""
    from msmartcompute.models.tokenizer import Tokenizer

    messages = [{"role": "user", "content": "hi"}]
    ok = Tokenizer(None, [], "<s>", "</s>", "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert ok.render_chat(messages) == "<s>hi"
    for template in ("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                     "{{ messages.append(1) }}",  # immutable sandbox: no mutation either
                     "{{ raise_exception('no system role') }}"):
        with pytest.raises(ValueError):
            Tokenizer(None, [], None, None, template).render_chat(messages)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(None, [], None, None, None).render_chat(messages)
