"""Served transformer throughput: generated tokens/s through the Runtime (dynamic batching,
the same path POST /inference takes) with bf16 weights against int8 w8a16 weights
(enable_quantization: per-channel int8 weights, bf16 activations).

  python benchmarks/gpu/bench_serving.py --out benchmarks/results/serving-<card>.json
  python benchmarks/gpu/bench_serving.py --device cpu --out /tmp/s.json --hidden 64 --layers 2 \
      --heads 4 --vocab 256 --prompt 16 --new-tokens 4 --batch 1,4 --reps 1   # a CPU smoke run

For each concurrency B, B threads each send one greedy request (a --prompt token prompt,
--new-tokens new tokens) at once, so the runtime batches them; tokens/s = tokens generated /
wall time of the round (median of --reps rounds after one warm-up round). Also records how
many greedy tokens of the int8 model agree with the bf16 model (quantization changes them a
little; a low agreement would mean a broken int8 path).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from the checkout
from benchmarks.gpu.report import write_json  # noqa: E402

VARIANTS = {"bf16": {"enable_mixed_precision": True},
            "int8_w8a16": {"enable_mixed_precision": True, "enable_quantization": True}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch", default="1,8,32", help="concurrent requests per round")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    return p.parse_args(argv)


def spec(args, variant: str, batch: int) -> dict:
    return {"model_id": f"lm-{variant}", "model_type": "transformer", "seed": 0, "max_batch_size": batch,
            "max_sequence_length": args.prompt + args.new_tokens,
            "parameters": {"vocab_size": args.vocab, "hidden_size": args.hidden, "num_layers": args.layers,
                           "num_heads": args.heads}, **VARIANTS[variant]}


def one_round(rt, model_id: str, prompts: np.ndarray, new_tokens: int) -> tuple[float, int, list]:
    outs: list = [None] * len(prompts)
    errors: list = []
    barrier = threading.Barrier(len(prompts) + 1)

    def client(i):
        barrier.wait()
        try:
            outs[i] = rt.inference.infer({"model_id": model_id, "input_data": prompts[i:i + 1],
                                "options": {"max_tokens": new_tokens, "temperature": 0}})
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, sum(o["tokens_generated"] for o in outs), [o["output_data"] for o in outs]


def run(args) -> dict:
    from msmartcompute.runtime.engine import Runtime, RuntimeConfig

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible (use --device cpu for a smoke run)")
    if args.device == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu on a machine with a GPU: the runtime would place the model on the GPU; "
                         "hide it with CUDA_VISIBLE_DEVICES=")
    batches = [int(b) for b in args.batch.split(",")]
    rows, tokens_by_variant = [], {}
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, args.vocab, size=(max(batches), args.prompt), dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        rt = Runtime(RuntimeConfig(state_dir=Path(tmp), max_queue_delay_ms=5.0, metrics_sample_interval_s=3600))
        rt.start()
        try:
            for variant in VARIANTS:
                s = spec(args, variant, max(batches))
                loaded = rt.registry.load(s)
                for b in batches:
                    one_round(rt, s["model_id"], prompts[:b], args.new_tokens)  # warm-up
                    walls, tokens = [], 0
                    for _ in range(args.reps):
                        wall, tokens, outputs = one_round(rt, s["model_id"], prompts[:b], args.new_tokens)
                        walls.append(wall)
                    tokens_by_variant.setdefault(variant, {})[b] = outputs
                    wall = statistics.median(walls)
                    row = {"variant": variant, "batch": b, "prompt": args.prompt, "new_tokens": args.new_tokens,
                           "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                           "memory_allocated": loaded["memory_allocated"]}
                    rows.append(row)
                    write_json(args.out, {"suite": "gpu-serving", "settings": vars(args), "rows": rows,
                                          "complete": False})
                    print(f"{variant:<11} B={b:<3} {row['tokens_per_s']:10.1f} tokens/s  ({wall * 1000:.1f} ms/round, "
                          f"weights {loaded['memory_allocated'] / 2**20:.0f} MiB)", flush=True)
                rt.registry.unload(s["model_id"])
        finally:
            rt.close()
    agree = []
    for b, outs in tokens_by_variant.get("int8_w8a16", {}).items():
        ref = tokens_by_variant["bf16"][b]
        a = np.concatenate([np.asarray(o).ravel() for o in outs])
        r = np.concatenate([np.asarray(o).ravel() for o in ref])
        agree.append(float((a == r).mean()) if a.shape == r.shape else 0.0)
    for row in rows:
        if row["variant"] == "int8_w8a16":
            base = next(x for x in rows if x["variant"] == "bf16" and x["batch"] == row["batch"])
            row["vs_bf16"] = row["tokens_per_s"] / base["tokens_per_s"]
    cuda = args.device == "cuda"
    return {"suite": "gpu-serving", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z"),
        "machine": {"label": torch.cuda.get_device_name(0) if cuda else f"{platform.machine()} CPU",
                    "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
                    "cuda": torch.version.cuda if cuda else None, "python": platform.python_version()},
        "settings": vars(args), "rows": rows, "int8_greedy_token_agreement": agree}


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, run(args))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
