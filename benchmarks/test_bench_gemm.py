"""CPU GEMMs: int8_linear (w8a8, w8a16) against float32 F.linear on the same layer,
batch 1 / 16 / 128; mixed_gemm against F.linear + GELU. GFLOP/s in extra_info.

Compare medians within one run (same machine, same load): int8_linear[w8a8-b16] vs
f32_linear[b16] is the ratio the int8 path has to win."""
import pytest
import torch
import torch.nn.functional as F

from msmartcompute import ops

K, N = 4096, 4096
BATCHES = [1, 16, 128]


def _layer(batch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, K, generator=gen)
    w = torch.randn(N, K, generator=gen) / K ** 0.5
    bias = torch.randn(N, generator=gen)
    return x, w, bias


def _record(benchmark, batch):
    if benchmark.stats:  # absent under --benchmark-disable
        benchmark.extra_info["GFLOP/s"] = 2 * batch * K * N / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_f32_linear(benchmark, batch):
    x, w, bias = _layer(batch)
    out = benchmark(F.linear, x, w, bias)
    assert out.shape == (batch, N)
    _record(benchmark, batch)


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_int8_linear(benchmark, batch, mode):
    x, w, bias = _layer(batch)
    w_q, w_scale = ops.quantize_int8(w)
    out = benchmark(ops.int8_linear, x, w_q, w_scale, bias, mode, backend="cpu")
    assert out.shape == (batch, N)
    _record(benchmark, batch)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_mixed_gemm_bf16_gelu(benchmark, backend):
    x, w, bias = _layer(128)
    a, b = x.bfloat16(), w.bfloat16()
    out = benchmark(ops.mixed_gemm, a, b, bias, "gelu", backend=backend)
    assert out.shape == (128, N)
    _record(benchmark, 128)
