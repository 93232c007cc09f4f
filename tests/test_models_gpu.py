"""The model families on a CUDA device (skipped without one)."""
import numpy as np
import pytest
import torch

from msmartcompute.models import build_model

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def lm_spec(**kw):
    base = {"model_type": "transformer", "max_sequence_length": 64,
            "parameters": {"vocab_size": 101, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}}
    base.update(kw)
    return base


def test_mlp_cuda_matches_cpu_and_restores_tf32():
    spec = {"model_type": "mlp", "enable_tensor_cores": False,
            "parameters": {"input_size": 33, "hidden_sizes": [65], "output_size": 7}}
    cpu, gpu = build_model(spec, "cpu"), build_model(spec, CUDA)
    x = np.random.default_rng(0).standard_normal((9, 33)).astype(np.float32)
    before = torch.backends.cuda.matmul.allow_tf32
    got = gpu.run([gpu.prepare(x, {})])[0].output_data
    assert torch.backends.cuda.matmul.allow_tf32 == before
    np.testing.assert_allclose(got, cpu.run([cpu.prepare(x, {})])[0].output_data, rtol=1e-4, atol=1e-5)


# fp32 activations only: in bf16 a batched matmul's rounding can legitimately flip an argmax.
@pytest.mark.parametrize("extra", [{}, {"enable_quantization": True}])
def test_transformer_cuda_cache_equals_recompute_and_batches(extra):
    model = build_model(lm_spec(**extra), CUDA)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 101, size=(2, 11)), rng.integers(0, 101, size=(1, 4))]
    for p in prompts:  # KV-cache decode equals the full causal forward, greedy
        seq = torch.as_tensor(p, device=CUDA)
        with torch.no_grad():
            for _ in range(8):
                seq = torch.cat([seq, model.module(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        np.testing.assert_array_equal(model.generate(p, 8).numpy(), seq[:, p.shape[1]:].cpu().numpy())
    opts = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 8, "seed": 4}
    batched = model.run([model.prepare(p, opts) for p in prompts])
    for p, out in zip(prompts, batched):
        np.testing.assert_array_equal(out.output_data, model.run([model.prepare(p, opts)])[0].output_data)


def test_transformer_cuda_mixed_precision_generates():
    model = build_model(lm_spec(enable_mixed_precision=True, enable_tensor_cores=True), CUDA)
    assert model.dtype in (torch.bfloat16, torch.float16)
    out = model.run([model.prepare([[1, 2, 3]], {"temperature": 0, "max_tokens": 5})])[0]
    assert out.output_data.shape == (1, 5) and out.tokens_generated == 5
    assert 0 <= out.output_data.min() and out.output_data.max() < 101


def test_encoder_cuda_batches():
    model = build_model(lm_spec(model_type="encoder"), CUDA)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 101, size=(2, 9)), rng.integers(0, 101, size=(3, 5))]
    for p, out in zip(prompts, model.run([model.prepare(p, {}) for p in prompts])):
        np.testing.assert_allclose(out.output_data, model.run([model.prepare(p, {})])[0].output_data,
                                   rtol=1e-4, atol=1e-4)
