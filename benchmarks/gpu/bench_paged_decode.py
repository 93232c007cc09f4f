"""Decode-step attention bandwidth on a GPU: one new query token per sequence against a KV cache,
paged (ops.paged_attention through a block table) and dense (ops.fused_attention on a cache
slice), as GB/s of K/V read, next to the card's copy bandwidth measured the same way.

Decode is memory-bound: the step must read every cached key and value once, so the goal is a
large fraction of what a plain device-to-device copy reaches (copy GB/s counts the bytes read
plus the bytes written, like a memcpy benchmark).

Timing: CUDA events around each call after a warm-up, the median of --reps runs.

    python benchmarks/gpu/bench_paged_decode.py --out benchmarks/results/paged_decode_<card>.json
    python benchmarks/gpu/bench_paged_decode.py --list      # print the cases, run nothing
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from the checkout
from benchmarks.gpu.report import add_row, listed_or_no_gpu, new_report, parser, skipped  # noqa: E402
from msmartcompute.bench import cuda_time_ms  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__, warmup=5, reps=30)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--impls", nargs="+", default=["paged-cuda", "paged-triton", "dense-cuda", "copy"])
    p.add_argument("--max-cache-gib", type=float, default=8.0, help="skip cases whose K/V cache is larger")
    return p.parse_args(argv)


def cases(args):
    for batch in args.batches:
        for context in args.contexts:
            yield dict(batch=batch, context=context, heads=args.heads, kv_heads=args.kv_heads,
                       head_dim=args.head_dim, block_size=args.block_size)


def kv_bytes(case, element_size=2):
    """Bytes of K and V one decode step reads."""
    return 2 * case["batch"] * case["context"] * case["kv_heads"] * case["head_dim"] * element_size


def make_inputs(case, dtype):
    b, ctx, h, hkv, d, bs = (case[k] for k in ("batch", "context", "heads", "kv_heads", "head_dim", "block_size"))
    blocks_per_seq = -(-ctx // bs)
    # Blocks of the sequences interleaved in a shuffled pool, as a serving cache ends up.
    perm = torch.randperm(b * blocks_per_seq, device="cuda", dtype=torch.int64)
    block_table = perm.view(b, blocks_per_seq).to(torch.int32)
    k_cache = torch.randn(b * blocks_per_seq, bs, hkv, d, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    seq_lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(b, 1, h, d, device="cuda", dtype=dtype)
    return q, k_cache, v_cache, block_table, seq_lens


def implementation(name, case, dtype):
    """A no-argument callable timing one decode step (or a copy), and the bytes it moves; or the
    reason it cannot run here."""
    from msmartcompute import ops

    q, k_cache, v_cache, block_table, seq_lens = make_inputs(case, dtype)
    read = kv_bytes(case, k_cache.element_size())
    if name.startswith("paged-"):
        backend = name.removeprefix("paged-")
        if not hasattr(ops, "paged_attention"):
            return "ops.paged_attention does not exist in this checkout"
        if backend not in ops.available_backends("cuda"):
            return f"backend {backend} not available (extension: {ops.extension_info()})"
        return (lambda: ops.paged_attention(q, k_cache, v_cache, block_table, seq_lens, backend=backend)), read
    if name == "dense-cuda":
        # The same cache as one [B, Hkv, capacity, D] buffer read through a slice, as the dense decoder does.
        b, ctx, hkv, d = case["batch"], case["context"], case["kv_heads"], case["head_dim"]
        k = torch.randn(b, hkv, ctx + 64, d, device="cuda", dtype=dtype)[:, :, :ctx]
        v = torch.randn(b, hkv, ctx + 64, d, device="cuda", dtype=dtype)[:, :, :ctx]
        qd = q.transpose(1, 2)
        return (lambda: ops.fused_attention(qd, k, v, causal=True, backend="cuda")), read
    if name == "copy":
        src = torch.cat([k_cache.flatten(), v_cache.flatten()])
        dst = torch.empty_like(src)
        return (lambda: dst.copy_(src)), 2 * read  # read + written
    return f"unknown implementation {name}"


def main(argv=None):
    args = parse_args(argv)
    all_cases = list(cases(args))
    status = listed_or_no_gpu(args, all_cases, args.impls, "bench_paged_decode",
                              lambda case: dict(case, kv_cache_gib=round(kv_bytes(case) / 2**30, 3)))
    if status is not None:
        return status
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    report = new_report(args, timing=f"CUDA events, median of {args.reps} after {args.warmup} warm-up runs",
                        bytes="decode: K and V read once; copy: bytes read + written")
    for case in all_cases:
        # the copy first, so every decode row of the case can say its fraction of it
        names = sorted(args.impls, key=lambda name: name != "copy")
        copy_gbs = None
        for name in names:
            row = dict(case, impl=name, dtype=args.dtype)
            if kv_bytes(case) > args.max_cache_gib * 2**30:
                row["skipped"] = f"K/V cache over --max-cache-gib {args.max_cache_gib}"
            else:
                try:
                    impl = implementation(name, case, dtype)
                    if isinstance(impl, str):
                        row["skipped"] = impl
                    else:
                        fn, moved = impl
                        with torch.no_grad():
                            median, best = cuda_time_ms(fn, args.warmup, args.reps)
                        row.update(median_ms=median, min_ms=best, gb_per_s=moved / (median * 1e-3) / 1e9)
                        if name == "copy":
                            copy_gbs = row["gb_per_s"]
                        elif copy_gbs:
                            row["fraction_of_copy"] = row["gb_per_s"] / copy_gbs
                except Exception as exc:  # out of memory, a backend refusing a shape, ...
                    row["skipped"] = skipped(exc)
                torch.cuda.empty_cache()
            shown = f"{row['gb_per_s']:8.1f} GB/s {row['median_ms']:8.3f} ms" if "gb_per_s" in row else row["skipped"]
            add_row(report, row, args.out, f"b={case['batch']:<3} ctx={case['context']:<6} {name:<13} {shown}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
