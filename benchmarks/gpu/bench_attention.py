"""Fused attention on a GPU: TFLOP/s of our CUDA and Triton kernels against
torch.nn.functional.scaled_dot_product_attention with each backend torch offers
(flash, efficient, cuDNN), forward and forward + backward.

Timing: CUDA events around each call after a warm-up, the median of --reps runs.
FLOPs: 4 * B * H * Sq * Sk * D for the forward (two matmuls), halved-ish for causal
(the visible fraction of the score matrix), and 2.5x that for the backward
(five matmuls against two), as flash-attention's benchmarks count them.

    python benchmarks/gpu/bench_attention.py --out benchmarks/results/attention_<card>.json
    python benchmarks/gpu/bench_attention.py --list      # print the cases, run nothing
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from the checkout
from benchmarks.gpu.report import add_row, listed_or_no_gpu, new_report, parser, skipped  # noqa: E402
from msmartcompute.bench import cuda_time_ms  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__, warmup=5, reps=30)
    p.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen kept about constant")
    p.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim / head_dim")
    p.add_argument("--kv-groups", type=int, default=1, help="query heads per kv head (GQA)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    p.add_argument("--impls", nargs="+", default=["ours-cuda", "ours-triton", "sdpa-flash", "sdpa-efficient",
                                                  "sdpa-cudnn"])
    return p.parse_args(argv)


def cases(args):
    for d in args.head_dims:
        heads = max(1, args.model_dim // d)
        for s in args.seqlens:
            batch = max(1, args.tokens // s)
            for causal in {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]:
                for mode in args.modes:
                    yield dict(batch=batch, heads=heads, kv_heads=max(1, heads // args.kv_groups), seqlen=s,
                               head_dim=d, causal=causal, mode=mode)


def flops(case):
    b, h, s, d = case["batch"], case["heads"], case["seqlen"], case["head_dim"]
    f = 4 * b * h * s * s * d * ((s + 1) / (2 * s) if case["causal"] else 1.0)
    return f * (3.5 if case["mode"] == "fwd_bwd" else 1.0)


def implementation(name):
    """A callable (q, k, v, causal) -> out, or the reason it cannot run here."""
    if name.startswith("ours-"):
        from msmartcompute import ops

        backend = name.removeprefix("ours-")
        if backend not in ops.available_backends("cuda"):
            return f"backend {backend} not available (extension: {ops.extension_info()})"
        return lambda q, k, v, causal: ops.fused_attention(q, k, v, causal=causal, backend=backend)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
               "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}.get(name)
    if backend is None:
        return f"unknown implementation {name}"

    def run(q, k, v, causal):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])

    return run




def measure(impl, case, dtype, args):
    b, h, hkv, s, d = case["batch"], case["heads"], case["kv_heads"], case["seqlen"], case["head_dim"]
    grad = case["mode"] == "fwd_bwd"
    q = torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=grad)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype, requires_grad=grad)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype, requires_grad=grad)
    dout = torch.randn_like(q)
    if grad:
        def fn():
            out = impl(q, k, v, case["causal"])
            torch.autograd.grad(out, (q, k, v), dout)
    else:
        def fn():
            with torch.no_grad():
                impl(q, k, v, case["causal"])
    median, best = cuda_time_ms(fn, args.warmup, args.reps)
    return {"median_ms": median, "min_ms": best, "tflops": flops(case) / (median * 1e-3) / 1e12}


def main(argv=None):
    args = parse_args(argv)
    all_cases = list(cases(args))
    status = listed_or_no_gpu(args, all_cases, args.impls, "bench_attention")
    if status is not None:
        return status
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    impls = {name: implementation(name) for name in args.impls}
    report = new_report(args, cudnn=torch.backends.cudnn.version(),
                        timing=f"CUDA events, median of {args.reps} after {args.warmup} warm-up runs")
    for case in all_cases:
        for name, impl in impls.items():
            row = dict(case, impl=name, dtype=args.dtype)
            if isinstance(impl, str):
                row["skipped"] = impl
            else:
                try:
                    row.update(measure(impl, case, dtype, args))
                except Exception as exc:  # an SDPA backend refusing a shape, out of memory, ...
                    row["skipped"] = skipped(exc)
                torch.cuda.empty_cache()
            shown = f"{row['tflops']:7.1f} TFLOP/s {row['median_ms']:8.3f} ms" if "tflops" in row else row["skipped"]
            add_row(report, row, args.out, f"d={case['head_dim']:<3} s={case['seqlen']:<6} b={case['batch']:<3} "
                    f"{'causal' if case['causal'] else 'full  '} {case['mode']:<7} {name:<15} {shown}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
