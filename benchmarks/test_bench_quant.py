"""CPU int8 quantize: our C++ kernel against the plain-torch reference, GB/s in extra_info."""
import pytest
import torch

from msmartcompute import ops

SHAPES = [(16, 4096), (128, 4096), (1024, 1024), (4095, 257)]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantize_int8_cpu(benchmark, backend, shape):
    x = torch.randn(shape)
    q, scale = benchmark(ops.quantize_int8, x, backend=backend)
    assert q.shape == x.shape
    if benchmark.stats:  # absent under --benchmark-disable
        moved = x.numel() * 4 + q.numel() + scale.numel() * 4
        benchmark.extra_info["GB/s"] = moved / benchmark.stats.stats.median / 1e9
