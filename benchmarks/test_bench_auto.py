"""backend="auto" against each backend it chooses from, side by side, for every op family at a
small, a medium and a large shape, on this machine's device (the CPU here: cpu and torch).

auto measures its candidates on its first call per (op, device, dtype, shape bucket) and keeps
the fastest; that call happens before the benchmark starts, so the figures are the steady state
a served model sees. Every benchmark checks its answer against the reference first.
"""
import pytest
import torch

from msmartcompute import ops
from msmartcompute.ops import _backend, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["auto"] + _backend.auto_candidates(torch.device(DEVICE))
SIZES = ["small", "medium", "large"]
GEN = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN).to(DEVICE, dtype)


def quantize_case(size):
    rows = {"small": 16, "medium": 256, "large": 2048}[size]
    x = randn(rows, 4096)
    return (lambda b: ops.quantize_int8(x, backend=b)), lambda out: reference.quantize_int8(x)


def dequantize_case(size):
    rows = {"small": 16, "medium": 256, "large": 2048}[size]
    q, scale = reference.quantize_int8(randn(rows, 4096))
    return (lambda b: ops.dequantize_int8(q, scale, backend=b)), lambda out: reference.dequantize_int8(q, scale)


def linear_shape(size):
    return {"small": (1, 1024, 1024), "medium": (16, 2048, 2048), "large": (128, 2048, 2048)}[size]


def int8_linear_case(size):
    M, K, N = linear_shape(size)
    x, (w_q, w_scale) = randn(M, K), reference.quantize_int8(randn(N, K) / K ** 0.5)
    bias = randn(N)
    return ((lambda b: ops.int8_linear(x, w_q, w_scale, bias, "w8a8", backend=b)),
            lambda out: reference.int8_linear(x, w_q, w_scale, bias, "w8a8"))


def mixed_gemm_case(size):
    M, K, N = linear_shape(size)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    a, w, bias = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype) / K ** 0.5, randn(N, dtype=dtype)
    return ((lambda b: ops.mixed_gemm(a, w, bias, "gelu", backend=b)),
            lambda out: reference.mixed_gemm(a, w, bias, "gelu"))


def attention_case(size):
    B, H, S, D = {"small": (1, 8, 128, 64), "medium": (1, 8, 512, 64), "large": (1, 16, 1024, 64)}[size]
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    q, k, v = randn(B, H, S, D, dtype=dtype), randn(B, H, S, D, dtype=dtype), randn(B, H, S, D, dtype=dtype)
    return ((lambda b: ops.fused_attention(q, k, v, causal=True, backend=b)),
            lambda out: reference.attention_reference(q, k, v, True))


OPS = {"quantize_int8": quantize_case, "dequantize_int8": dequantize_case, "int8_linear": int8_linear_case,
       "mixed_gemm": mixed_gemm_case, "fused_attention": attention_case}


def check(out, expected):
    if isinstance(out, tuple):
        for o, e in zip(out, expected):
            torch.testing.assert_close(o, e, rtol=0, atol=0)
    else:
        torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("op", list(OPS))
def test_auto_vs_candidates(benchmark, op, size, backend):
    run, expected = OPS[op](size)
    before = ops.backend_choices()
    out = run(backend)  # auto measures its candidates here, once per shape bucket
    check(out, expected(out))
    if backend == "auto":
        made = [c for c in ops.backend_choices() if c not in before and c["op"] == op]
        if made:  # else this bucket was measured earlier in the process
            benchmark.extra_info["chose"] = made[0]["backend"]
            benchmark.extra_info["measured_us"] = made[0]["times_us"]
    benchmark(run, backend)
