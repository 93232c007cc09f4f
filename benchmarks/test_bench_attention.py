"""CPU fused attention: our C++ kernel against torch's scaled_dot_product_attention, GFLOP/s in extra_info."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from msmartcompute import ops

# (B, H, Hkv, Sq, Sk, D): prefill, grouped-query prefill, one decode step against a KV cache.
SHAPES = [(1, 8, 8, 512, 512, 64), (1, 8, 2, 256, 1024, 128), (4, 32, 8, 1, 2048, 128)]


def flops(shape, causal):
    B, H, _, Sq, Sk, D = shape
    full = 4 * B * H * Sq * Sk * D  # two matmuls of 2 * Sq * Sk * D each
    if not causal:
        return full
    visible = sum(min(Sk, Sk - Sq + i + 1) for i in range(Sq))  # keys seen, mask aligned to the end
    return full * visible / (Sq * Sk)


def sdpa(q, k, v, causal):
    if causal and q.shape[2] != k.shape[2]:  # is_causal aligns to the start; ours aligns to the end
        mask = causal_lower_right(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


@pytest.mark.parametrize("impl", ["ours", "sdpa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_attention_cpu(benchmark, impl, causal, dtype, shape):
    B, H, Hkv, Sq, Sk, D = shape
    q = torch.randn(B, H, Sq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Sk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Sk, D, dtype=dtype)
    if impl == "ours":
        out = benchmark(ops.fused_attention, q, k, v, causal=causal, backend="cpu")
    else:
        out = benchmark(sdpa, q, k, v, causal)
    assert out.shape == q.shape
    if benchmark.stats:  # absent under --benchmark-disable
        benchmark.extra_info["GFLOP/s"] = flops(shape, causal) / benchmark.stats.stats.median / 1e9
