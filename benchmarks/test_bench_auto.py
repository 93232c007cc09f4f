"""backend="auto" against each backend it chooses from, side by side, for every op family at a
small, a medium and a large shape, on this machine's device (the CPU here: cpu and torch).

auto measures its candidates on its first call per (op, device, dtype, shape bucket) and keeps
the fastest; that call happens before anything is timed here, so the figures are the steady
state a served model sees. Then auto and every candidate are timed interleaved (one call each
per round, rotating order, `_backend.measure`), so load from other processes falls on all of
them alike; extra_info holds each one's fastest call (`side_by_side_us`, the estimate auto itself
uses: a call's time when no other process takes the cores) and median (`median_us`), which
candidate auto chose, and auto's time over the fastest candidate's by both (`auto_over_fastest`,
`auto_over_fastest_median`; the goal: <= 1.10). The
benchmarked call is auto itself. Every case checks its answer against the reference first.

    pytest benchmarks/test_bench_auto.py --benchmark-json=benchmarks/results/auto-backend-cpu-2core.json
"""
import statistics

import pytest
import torch

from msmartcompute import ops
from msmartcompute.ops import _backend, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CANDIDATES = _backend.auto_candidates(torch.device(DEVICE))
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


def shape_of(op, size):
    if op in ("quantize_int8", "dequantize_int8"):
        return f"{ {'small': 16, 'medium': 256, 'large': 2048}[size]}x4096"
    if op == "fused_attention":
        B, H, S, D = {"small": (1, 8, 128, 64), "medium": (1, 8, 512, 64), "large": (1, 16, 1024, 64)}[size]
        return f"B{B} H{H} S{S} D{D} causal"
    return "M{} K{} N{}".format(*linear_shape(size))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("op", list(OPS))
def test_auto_vs_candidates(benchmark, op, size):
    run, expected = OPS[op](size)
    before = ops.backend_choices()
    out = run("auto")  # auto measures its candidates here, once per shape bucket
    check(out, expected(out))
    made = [c for c in ops.backend_choices() if c not in before and c["op"] == op]
    chose = made[0] if made else None  # else this bucket was measured earlier in the process
    if not benchmark.enabled:  # make test: correctness only
        return
    samples, _, errors = _backend.measure({b: (lambda b=b: run(b)) for b in ["auto"] + CANDIDATES},
                                          torch.device(DEVICE), warmup=2, min_reps=15, max_reps=101, min_time_s=0.5)
    assert not errors, errors
    side = {b: _backend.typical(s) * 1e6 for b, s in samples.items()}
    medians = {b: statistics.median(s) * 1e6 for b, s in samples.items()}
    fastest = min(side[b] for b in CANDIDATES)
    benchmark.extra_info.update({
        "op": op, "size": size, "shape": shape_of(op, size), "rounds": len(samples["auto"]),
        "side_by_side_us": {b: round(t, 1) for b, t in side.items()},
        "median_us": {b: round(t, 1) for b, t in medians.items()},
        "auto_over_fastest": round(side["auto"] / fastest, 3),
        "auto_over_fastest_median": round(medians["auto"] / min(medians[b] for b in CANDIDATES), 3),
        "chose": chose["backend"] if chose else None, "chooser_us": chose["times_us"] if chose else None,
    })
    benchmark(run, "auto")
