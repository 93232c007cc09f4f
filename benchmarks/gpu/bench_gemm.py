"""GPU GEMM benchmark: our CUDA and Triton kernels against the torch baselines.

  python benchmarks/gpu/bench_gemm.py --out benchmarks/results/gemm-<card>.json

For each M (K = N = --hidden unless --square) it times, with CUDA events (median of
--reps after --warmup):
  int8_matmul (bf16 out, bias)      vs torch._int_mm (int32 out, no epilogue)  -> TOPS
  int8_linear w8a8 / w8a16          vs F.linear in bf16 (cuBLAS)               -> TFLOP/s
  mixed_gemm bf16 / fp16 bias+gelu  vs torch.matmul, and F.linear + F.gelu     -> TFLOP/s
  quantize_int8 of an [M, K] bf16   vs a device-to-device copy of the same     -> GB/s
and writes every row plus the card, torch and CUDA versions as JSON to --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from the checkout
from benchmarks.gpu.report import new_report, write_json  # noqa: E402
from msmartcompute.bench import cuda_time_ms  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--m", default="1,16,64,256,1024,4096,8192", help="comma-separated M values")
    p.add_argument("--hidden", type=int, default=4096, help="K = N (ignored with --square)")
    p.add_argument("--square", action="store_true", help="M = N = K for every size")
    p.add_argument("--backends", default="cuda,triton", help="our backends to time")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    return p.parse_args(argv)




def measure(report, args, name, impl, fn, work, unit, shape):
    """Times fn and appends a row (the JSON is rewritten); a failing implementation is recorded with its error."""
    row = {"op": name, "impl": impl, "M": shape[0], "K": shape[1], "N": shape[2], "unit": unit}
    try:
        ms, _ = cuda_time_ms(fn, args.warmup, args.reps)
        row.update(ms=ms, rate=work / (ms * 1e-3) / 1e12 if unit in ("TFLOP/s", "TOPS") else work / (ms * 1e-3) / 1e9)
    except Exception as exc:  # e.g. torch._int_mm's shape limits
        row.update(ms=None, rate=None, error=f"{type(exc).__name__}: {exc}"[:300])
    report["results"].append(row)
    write_json(args.out, report)
    rate = f"{row['rate']:.2f} {unit}" if row["rate"] is not None else row["error"]
    print(f"{name:16s} {impl:22s} M={shape[0]:5d} K={shape[1]:5d} N={shape[2]:5d}  {rate}", flush=True)


def run(args) -> dict:
    from msmartcompute import ops

    backends = [b for b in args.backends.split(",") if b]
    report = new_report(args)
    for m in (int(v) for v in args.m.split(",")):
        k = n = m if args.square else args.hidden
        shape = (m, k, n)
        flops = 2 * m * k * n
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        x_q, x_scale = ops.quantize_int8(x)
        w_q, w_scale = ops.quantize_int8(w)

        for b in backends:
            measure(report, args, "int8_matmul", b,
                    lambda b=b: ops.int8_matmul(x_q, w_q, x_scale, w_scale, bias, torch.bfloat16, backend=b),
                    flops, "TOPS", shape)
        measure(report, args, "int8_matmul", "torch._int_mm", lambda: torch._int_mm(x_q, w_q.t()), flops, "TOPS", shape)

        for mode in ("w8a8", "w8a16"):
            for b in backends:
                measure(report, args, f"int8_linear_{mode}", b,
                        lambda b=b, mode=mode: ops.int8_linear(x, w_q, w_scale, bias, mode, backend=b),
                        flops, "TFLOP/s", shape)
        measure(report, args, "linear_bf16", "F.linear (cuBLAS)", lambda: F.linear(x, w, bias), flops, "TFLOP/s", shape)

        for dtype in (torch.bfloat16, torch.float16):
            a, wt, bt = x.to(dtype), w.to(dtype), bias.to(dtype)
            tag = str(dtype)[6:]
            for b in backends:
                measure(report, args, f"mixed_gemm_{tag}", b,
                        lambda b=b, a=a, wt=wt, bt=bt: ops.mixed_gemm(a, wt, bt, "gelu", backend=b),
                        flops, "TFLOP/s", shape)
            measure(report, args, f"mixed_gemm_{tag}", "torch.matmul (no epilogue)",
                    lambda a=a, wt=wt: torch.matmul(a, wt.t()), flops, "TFLOP/s", shape)
            measure(report, args, f"mixed_gemm_{tag}", "F.linear+F.gelu (unfused)",
                    lambda a=a, wt=wt, bt=bt: F.gelu(F.linear(a, wt, bt)), flops, "TFLOP/s", shape)

        moved = x.numel() * x.element_size() + x.numel() + m * 4  # read bf16, write int8 + scales
        for b in backends:
            measure(report, args, "quantize_int8", b, lambda b=b: ops.quantize_int8(x, backend=b), moved, "GB/s", shape)
        copy_dst = torch.empty_like(x)
        measure(report, args, "quantize_int8", "d2d copy (bound)", lambda: copy_dst.copy_(x),
                2 * x.numel() * x.element_size(), "GB/s", shape)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gemm: needs a CUDA device", file=sys.stderr)
        return 2
    result = run(args)
    print(f"wrote {args.out} ({result['card']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
